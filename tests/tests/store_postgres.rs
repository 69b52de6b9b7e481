//! The PostgreSQL store against a real PostgreSQL: the conformance suite, then several
//! engines, a crashed holder process, purging, and an outage.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotent_runtime::store::PostgresStore;
use idempotent_runtime::{ConfigError, Error, Idempotency, Outcome};
use idempotent_tests::postgres::{drop_stale_tables, fresh_store, postgres_url};
use idempotent_tests::TcpProxy;

idempotent_tests::store_conformance!(idempotent_tests::PostgresHarness::new());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engines_on_two_pools_make_one_execution_for_100_callers() {
    let a = fresh_store(&postgres_url()).await;
    let b = PostgresStore::connect(&postgres_url())
        .await
        .unwrap()
        .with_table(a.table())
        .unwrap();
    let side = format!("{}_side", a.table());
    sqlx::query(&format!("CREATE TABLE {side} (n int)"))
        .execute(a.pool())
        .await
        .unwrap();
    let engines = [Idempotency::new(a.clone()), Idempotency::new(b)];
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let idem = engines[i % 2].clone();
            let (pool, side) = (a.pool().clone(), side.clone());
            tokio::spawn(async move {
                idem.call("pay-1")
                    .scope("pg")
                    .run(|| async move {
                        // The side effect is a row in the database itself.
                        sqlx::query(&format!("INSERT INTO {side} VALUES (1)"))
                            .execute(&pool)
                            .await
                            .map_err(|e| {
                                Error::Store(idempotent_runtime::StoreError::new("insert", e))
                            })?;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, Error>(7u32)
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 7);
    }
    let (rows,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {side}"))
        .fetch_one(a.pool())
        .await
        .unwrap();
    assert_eq!(rows, 1, "the side effect ran once across both engines");
    sqlx::query(&format!("DROP TABLE {side}"))
        .execute(a.pool())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holder_process_frees_its_key_within_one_lease() {
    let store = fresh_store(&postgres_url()).await;
    let lease = idempotent_tests::postgres::LEASE;
    let table = store.table().to_owned();
    let idem = Idempotency::builder()
        .store(store)
        .lease(lease)
        .build()
        .unwrap();
    idempotent_tests::crash::a_crashed_holder_process_frees_its_key(
        env!("CARGO_BIN_EXE_holder"),
        "postgres",
        &postgres_url(),
        &table,
        &idem,
        lease,
        Duration::from_secs(2),
    )
    .await;
}

/// The CI failure this lease was chosen against: a commit the database holds for most of
/// a second and a half (a disk that makes it wait, here another session's lock on the
/// key's row) holds the renewals sent meanwhile. Each lands when the stall ends, with its
/// lease counted from when it was sent; a lease a renewal every third of it keeps for
/// longer than the stall never lapses, and no duplicate runs the body meanwhile. (On a
/// one-second lease the claim lapses during this stall: a duplicate then meets an expired
/// row, waits on its lock, and fails, or takes the key over once the lock is gone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renewals_held_by_a_stalled_database_keep_the_claim() {
    let store = fresh_store(&postgres_url()).await;
    let lease = idempotent_tests::postgres::LEASE;
    let stall = Duration::from_millis(1400);
    let engine = || {
        Idempotency::builder()
            .store(store.clone())
            .lease(lease)
            .build()
            .unwrap()
    };
    let (holder, other) = (engine(), engine());
    let runs = Arc::new(AtomicU32::new(0));
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let runs = runs.clone();
        tokio::spawn(async move {
            holder
                .call("stalled")
                .scope("pg")
                .run_with_outcome(|| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = entered_tx.send(());
                    let _ = finished.await;
                    Ok::<_, Error>(7u32)
                })
                .await
        })
    };
    entered.await.expect("the holder enters its body");
    // A duplicate, which must be refused while the holder runs.
    let refused = || {
        let runs = runs.clone();
        let dup = other
            .call("stalled")
            .scope("pg")
            .concurrency(idempotent_runtime::Concurrency::Reject)
            .run(|| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(8u32)
            });
        async move {
            let dup = dup.await;
            assert!(
                matches!(dup, Err(Error::InProgress)),
                "duplicate got {dup:?}"
            );
        }
    };
    // Two stalls in a row, each holding the renewals sent while it lasts.
    let mut sent = 0;
    for _ in 0..2 {
        let mut tx = store.pool().begin().await.unwrap();
        sqlx::query(&format!("SELECT 1 FROM {} FOR UPDATE", store.table()))
            .execute(&mut *tx)
            .await
            .unwrap();
        let stalled = Instant::now();
        while stalled.elapsed() < stall {
            refused().await;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tx.rollback().await.unwrap();
        // The renewals the stall held land now; a duplicate after them still waits.
        tokio::time::sleep(lease / 3).await;
        refused().await;
    }
    assert!(sent > 10, "only {sent} duplicates were sent");
    finish.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap(), (7, Outcome::Executed));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let (v, how) = other
        .call("stalled")
        .scope("pg")
        .run_with_outcome(|| async { Ok::<_, Error>(9u32) })
        .await
        .unwrap();
    assert_eq!((v, how), (7, Outcome::Replayed));
}

/// The tests' own housekeeping: the test tables of runs more than an hour old go, with
/// the sequences earlier versions of the store made beside them; those of a run still
/// going stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_test_tables_are_dropped_and_young_ones_kept() {
    let store = fresh_store(&postgres_url()).await;
    let pool = store.pool();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let pid = std::process::id();
    let stale = format!("idemtest_{}_{pid}_stale", now - 7200);
    let young = format!("idemtest_{}_{pid}_young", now - 600);
    for ddl in [
        format!("CREATE TABLE {stale} (n int)"),
        format!("CREATE SEQUENCE {stale}_token"),
        format!("CREATE TABLE {young} (n int)"),
    ] {
        sqlx::query(&ddl).execute(pool).await.unwrap();
    }
    // Another test process's cleanup may drop the stale table first: what counts is
    // that it goes.
    drop_stale_tables(pool).await.expect("drop");
    let exists = |name: String| async move {
        let (found,): (bool,) = sqlx::query_as("SELECT to_regclass($1) IS NOT NULL")
            .bind(name)
            .fetch_one(pool)
            .await
            .unwrap();
        found
    };
    assert!(!exists(stale.clone()).await, "the stale table is gone");
    assert!(!exists(format!("{stale}_token")).await, "its sequence too");
    assert!(exists(young.clone()).await, "the young table stays");
    sqlx::query(&format!("DROP TABLE {young}"))
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_expired_rows_and_keeps_live_ones() {
    let store = fresh_store(&postgres_url()).await;
    let idem = Idempotency::new(store.clone());
    for i in 0..5u32 {
        let _: u32 = idem
            .call(i)
            .scope("purge")
            .ttl(Duration::from_millis(100))
            .run(|| async move { Ok::<_, Error>(i) })
            .await
            .unwrap();
    }
    let _: u32 = idem
        .call("keep")
        .scope("purge")
        .run(|| async { Ok::<_, Error>(9) })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(store.purge_expired().await.unwrap(), 5);
    assert_eq!(store.purge_expired().await.unwrap(), 0);
    let (left,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {}", store.table()))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(left, 1);
    let (v, how) = idem
        .call("keep")
        .scope("purge")
        .run_with_outcome(|| async { Ok::<_, Error>(0u32) })
        .await
        .unwrap();
    assert_eq!((v, how), (9, Outcome::Replayed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_purger_runs_by_itself() {
    let store = fresh_store(&postgres_url()).await;
    let idem = Idempotency::new(store.clone());
    let _: u32 = idem
        .call("gone")
        .scope("purge")
        .ttl(Duration::from_millis(50))
        .run(|| async { Ok::<_, Error>(1) })
        .await
        .unwrap();
    let purger = store.spawn_purger(Duration::from_millis(100));
    let count = || async {
        sqlx::query_as::<_, (i64,)>(&format!("SELECT count(*) FROM {}", store.table()))
            .fetch_one(store.pool())
            .await
            .unwrap()
            .0
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while count().await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    purger.abort();
    assert_eq!(count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_fails_closed_and_recovers_by_itself() {
    let target: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let table = fresh_store(&postgres_url()).await.table().to_owned();
    let proxy = TcpProxy::start(target).await;
    let url = postgres_url().replace("127.0.0.1:5432", &proxy.addr().to_string());
    assert_ne!(
        url,
        postgres_url(),
        "the proxy test needs the default database address"
    );
    let store = PostgresStore::connect(&url)
        .await
        .unwrap()
        .with_table(&table)
        .unwrap();
    let idem = Idempotency::new(store);
    let runs = Arc::new(AtomicU32::new(0));
    let call = |key: &'static str| {
        let runs = runs.clone();
        idem.call(key).scope("outage").run(move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<u32, Error>(7)
        })
    };
    assert_eq!(call("before").await.unwrap(), 7);
    proxy.cut();
    let r = call("during").await;
    assert!(matches!(r, Err(Error::Store(_))), "{r:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "nothing runs while the store is down"
    );
    proxy.restore();
    let v = idempotent_tests::until_ok(Duration::from_secs(20), || call("after")).await;
    assert_eq!(v, 7);
}

#[tokio::test]
async fn a_table_name_that_is_not_an_identifier_is_refused() {
    let store = PostgresStore::connect(&postgres_url()).await.unwrap();
    let r = store.with_table("x; DROP TABLE users");
    assert!(matches!(
        r,
        Err(Error::Config(ConfigError::InvalidTableName(_)))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_safe_from_many_processes_at_once() {
    let table = idempotent_tests::postgres::unique_table();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let table = table.clone();
            tokio::spawn(async move {
                let s = PostgresStore::connect(&postgres_url())
                    .await
                    .unwrap()
                    .with_table(&table)
                    .unwrap();
                s.migrate().await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}
