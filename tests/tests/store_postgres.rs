//! The PostgreSQL store against a real PostgreSQL: the conformance suite, then several
//! engines, a crashed holder process, purging, and an outage.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotent_runtime::store::PostgresStore;
use idempotent_runtime::{ConfigError, Error, Idempotency, Outcome};
use idempotent_tests::postgres::{fresh_store, postgres_url};
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
    let lease = Duration::from_millis(500);
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
    )
    .await;
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
