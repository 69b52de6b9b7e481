//! `run_in_transaction`, second outside review of #13: attacks on the fixes of the first
//! review (BEGIN on a task of its own, the token in `idempotent.token`, the
//! `TransactionEnded` marker, the transaction limit, the volatile claim), against the
//! real PostgreSQL. The limits it found and that are documented rather than fixed (a
//! `BEGIN` whose answer never comes, bodies that `RESET ALL` or commit and begin anew,
//! pools of one connection, two stores on one pool) are in the docs of
//! `Call::run_in_transaction_with_outcome` and `PostgresStore::with_transaction_limit`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::store::PostgresStore;
use idempotent_runtime::{
    Codec, Concurrency, ConfigError, Error, Idempotency, Outcome, StoreError,
};
use idempotent_tests::transactions::{
    begin_delaying_proxy, effects, engine, insert, other_process, server_addr, store_with_effects,
    url_through,
};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Acquire as _;
use tokio::sync::Notify;

const SCOPE: &str = "review2.apply";

fn db(e: sqlx::Error) -> Error {
    Error::Store(StoreError::new("body", e))
}

/// A pool of `max` connections to `addr` (a proxy), with the settings
/// `PostgresStore::connect` gives its own.
async fn pool_through(addr: SocketAddr, max: u32) -> PgPool {
    let options: PgConnectOptions = url_through(addr).parse().expect("url");
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(options.options([("statement_timeout", "1500")]))
        .await
        .expect("connect through the proxy")
}

/// Whether the connection `conn` is inside a transaction left open by someone else: two
/// statements that each ask for their transaction's id get the same one.
async fn in_leftover_transaction(conn: &mut sqlx::PgConnection) -> bool {
    let a: i64 = sqlx::query_scalar("SELECT txid_current()")
        .fetch_one(&mut *conn)
        .await
        .expect("txid");
    let b: i64 = sqlx::query_scalar("SELECT txid_current()")
        .fetch_one(&mut *conn)
        .await
        .expect("txid");
    a == b
}

/// The settings the fixes set locally, as the connection sees them now.
async fn settings(conn: &mut sqlx::PgConnection) -> (String, String, String) {
    sqlx::query_as(
        "SELECT coalesce(current_setting('idempotent.token', true), '<null>'),
                current_setting('synchronous_commit'),
                current_setting('idle_in_transaction_session_timeout')",
    )
    .fetch_one(&mut *conn)
    .await
    .expect("settings")
}

// ---------------------------------------------------------------------------------------
// 1b. Holds up? A BEGIN slower than the lease: the engine gives up, the task finishes the
//     BEGIN and drops the transaction; the pool's one connection is then not inside a
//     transaction, and carries none of the call's settings.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_begin_given_up_on_leaves_a_clean_connection() {
    let direct = store_with_effects().await;
    let t = direct.table().to_owned();
    let (addr, armed) =
        begin_delaying_proxy(server_addr().await, Duration::from_millis(1500)).await;
    let pool = pool_through(addr, 1).await;
    let store = PostgresStore::from_pool(pool.clone())
        .with_table(&t)
        .expect("table");
    let idem = engine(store.clone(), Duration::from_millis(500));
    armed.store(1, Ordering::SeqCst);
    let slow = idem
        .call("tx-slow")
        .scope(SCOPE)
        .run_in_transaction(|_tx| Box::pin(async { Ok::<_, Error>(0_u32) }))
        .await;
    assert!(matches!(slow, Err(Error::Store(_))), "{slow:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut conn = pool.acquire().await.expect("acquire");
    assert!(
        !in_leftover_transaction(&mut conn).await,
        "left inside a transaction"
    );
    let (token, sync, idle) = settings(&mut conn).await;
    drop(conn);
    eprintln!("token {token:?}, synchronous_commit {sync}, idle timeout {idle}");
    assert!(token.is_empty() || token == "<null>", "{token}");
    assert_eq!((sync.as_str(), idle.as_str()), ("on", "0"));
    assert!(effects(&direct).await.is_empty());
}

// ---------------------------------------------------------------------------------------
// 1c. The runtime the call runs on shuts down while its BEGIN is in flight (a pool shared
//     by runtimes: a per-test runtime with a static pool, a `block_on` in a blocking
//     thread). The BEGIN's task is dropped mid-flight, the very case the task was meant
//     to avoid. Does the pool's one connection come back inside a transaction?
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runtime_shut_down_during_begin_leaves_no_transaction_in_the_pool() {
    let direct = store_with_effects().await;
    let t = direct.table().to_owned();
    let (addr, armed) =
        begin_delaying_proxy(server_addr().await, Duration::from_millis(1500)).await;
    let pool = pool_through(addr, 1).await;
    let store = PostgresStore::from_pool(pool.clone())
        .with_table(&t)
        .expect("table");
    armed.store(1, Ordering::SeqCst);
    let other = store.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let idem = engine(other, Duration::from_secs(5));
        rt.block_on(async {
            let call = idem
                .call("tx-shutdown")
                .scope(SCOPE)
                .run_in_transaction(|_tx| Box::pin(async { Ok::<_, Error>(0_u32) }));
            let _ = tokio::time::timeout(Duration::from_millis(400), call).await;
        });
        // The BEGIN's task is still waiting for its answer: dropped with the runtime.
        drop(rt);
    })
    .join()
    .expect("the other runtime's thread");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let idem = engine(store.clone(), Duration::from_secs(5));
    let runs = AtomicU32::new(0);
    let plain = || {
        idem.call("plain-after-shutdown")
            .scope(SCOPE)
            .run(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(1_u32)
            })
    };
    let first = plain().await;
    eprintln!("plain call: {first:?}; pool size {}", pool.size());
    let mut conn = pool.acquire().await.expect("acquire");
    let leftover = in_leftover_transaction(&mut conn).await;
    drop(conn);
    let visible: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {t} WHERE key LIKE '%plain-after-shutdown' AND state = 'c'"
    ))
    .fetch_one(direct.pool())
    .await
    .expect("count");
    eprintln!("leftover transaction: {leftover}; completion visible elsewhere: {visible}");
    assert!(!leftover, "the pool's connection is inside a transaction");
    assert_eq!(visible, 1, "the plain call's completion is not committed");
}

// ---------------------------------------------------------------------------------------
// 2. Holds up? The settings of a call's transaction end with it, whichever way it ended:
//    committed, rolled back on an error, aborted by a SQL error, a panic, a savepoint
//    rolled back; and a transactional claim (synchronous_commit off) leaves the session
//    synchronous. One connection, so each check reads the connection the call used.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_setting_of_a_call_outlives_it_on_its_connection() {
    let direct = store_with_effects().await;
    let t = direct.table().to_owned();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&idempotent_tests::postgres::postgres_url())
        .await
        .expect("pool");
    let store = PostgresStore::from_pool(pool.clone())
        .with_table(&t)
        .expect("table");
    let idem = engine(store.clone(), Duration::from_secs(5));
    let check = |what: &'static str| {
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await.expect("acquire");
            let leftover = in_leftover_transaction(&mut conn).await;
            let (token, sync, idle) = settings(&mut conn).await;
            eprintln!(
                "after {what}: leftover {leftover}, token {token:?}, sync {sync}, idle {idle}"
            );
            assert!(!leftover, "{what}: inside a transaction");
            assert!(
                token.is_empty() || token == "<null>",
                "{what}: token {token}"
            );
            assert_eq!((sync.as_str(), idle.as_str()), ("on", "0"), "{what}");
        }
    };
    // Committed.
    let ok = idem
        .call("k-ok")
        .scope(SCOPE)
        .run_in_transaction(|tx| {
            let t = t.clone();
            Box::pin(async move {
                insert(&t, "ok", tx).await?;
                Ok::<_, Error>(1_u32)
            })
        })
        .await;
    assert_eq!(ok.expect("ok"), 1);
    check("a commit").await;
    // Rolled back on an error.
    let err = idem
        .call("k-err")
        .scope(SCOPE)
        .run_in_transaction(|tx| {
            let t = t.clone();
            Box::pin(async move {
                insert(&t, "err", tx).await?;
                Err::<u32, _>(Error::Store(StoreError::msg("refused")))
            })
        })
        .await;
    assert!(err.is_err());
    check("an error").await;
    // Aborted by a SQL error, the error returned.
    let aborted = idem
        .call("k-aborted")
        .scope(SCOPE)
        .run_in_transaction(|tx| {
            Box::pin(async move {
                sqlx::query("SELECT 1/0")
                    .execute(&mut **tx)
                    .await
                    .map_err(db)?;
                Ok::<_, Error>(1_u32)
            })
        })
        .await;
    assert!(aborted.is_err());
    check("an aborted transaction").await;
    // A savepoint rolled back; the rest commits.
    let saved = idem
        .call("k-savepoint")
        .scope(SCOPE)
        .run_in_transaction(|tx| {
            let t = t.clone();
            Box::pin(async move {
                insert(&t, "kept", tx).await?;
                let mut sp = tx.begin().await.map_err(db)?;
                insert(&t, "undone", &mut sp).await?;
                sp.rollback().await.map_err(db)?;
                // A savepoint dropped without commit or rollback.
                let mut sp2 = tx.begin().await.map_err(db)?;
                insert(&t, "dropped", &mut sp2).await?;
                drop(sp2);
                insert(&t, "after", tx).await?;
                Ok::<_, Error>(2_u32)
            })
        })
        .await;
    assert_eq!(saved.expect("savepoints"), 2);
    check("savepoints").await;
    // A panic.
    let panicked = tokio::spawn({
        let idem = idem.clone();
        async move {
            idem.call("k-panic")
                .scope(SCOPE)
                .run_in_transaction(|_tx| {
                    Box::pin(async move {
                        if true {
                            panic!("boom");
                        }
                        Ok::<_, Error>(1_u32)
                    })
                })
                .await
        }
    })
    .await;
    assert!(panicked.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    check("a panic").await;
    // A transactional claim that finds the key completed, then a plain claim.
    let replay = idem
        .call("k-ok")
        .scope(SCOPE)
        .run_in_transaction_with_outcome(|_tx| Box::pin(async { Ok::<_, Error>(0_u32) }))
        .await
        .expect("replay");
    assert_eq!(replay, (1, Outcome::Replayed));
    idem.call("k-plain")
        .scope(SCOPE)
        .run(|| async { Ok::<_, Error>(3_u32) })
        .await
        .expect("plain");
    check("claims").await;
    assert_eq!(effects(&direct).await, ["ok", "kept", "after"]);
}

// ---------------------------------------------------------------------------------------
// 3. Holds up? The marker replays as `TransactionEnded` to every kind of call: another
//    process's transactional call, a plain `run`, a `store_errors` call, an engine with
//    the Postcard codec, a call expecting another type.
// ---------------------------------------------------------------------------------------
#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
enum AppError {
    #[error("app")]
    App,
    #[error("idempotency: {0}")]
    Idem(String),
    #[error("transaction ended")]
    Ended,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        match e {
            Error::TransactionEnded => AppError::Ended,
            other => AppError::Idem(other.to_string()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_marker_replays_as_transaction_ended_to_every_kind_of_call() {
    for codec in [Codec::Json, Codec::Postcard] {
        let store = store_with_effects().await;
        let t = store.table().to_owned();
        let idem = Idempotency::builder()
            .store(store.clone())
            .codec(codec)
            .build()
            .expect("engine");
        let ended = idem
            .call("msg-marked")
            .scope(SCOPE)
            .store_errors()
            .run_in_transaction(|tx| {
                let t = t.clone();
                Box::pin(async move {
                    insert(&t, "x", tx).await.map_err(|_| AppError::App)?;
                    sqlx::query("COMMIT")
                        .execute(&mut **tx)
                        .await
                        .map_err(|_| AppError::App)?;
                    Err::<u32, _>(AppError::App)
                })
            })
            .await;
        assert!(matches!(ended, Err(AppError::Ended)), "{codec:?} {ended:?}");
        let ran = AtomicBool::new(false);
        let elsewhere = Idempotency::builder()
            .store(other_process(&t).await)
            .codec(codec)
            .build()
            .expect("engine");
        for idem in [&idem, &elsewhere] {
            let tx = idem
                .call("msg-marked")
                .scope(SCOPE)
                .run_in_transaction(|_tx| {
                    ran.store(true, Ordering::SeqCst);
                    Box::pin(async { Ok::<_, Error>(0_u32) })
                })
                .await;
            assert!(
                matches!(tx, Err(Error::TransactionEnded)),
                "{codec:?} {tx:?}"
            );
            let plain = idem
                .call("msg-marked")
                .scope(SCOPE)
                .run(|| async {
                    ran.store(true, Ordering::SeqCst);
                    Ok::<String, Error>("x".into())
                })
                .await;
            assert!(
                matches!(plain, Err(Error::TransactionEnded)),
                "{codec:?} {plain:?}"
            );
            let stored = idem
                .call("msg-marked")
                .scope(SCOPE)
                .store_errors()
                .run(|| async {
                    ran.store(true, Ordering::SeqCst);
                    Ok::<(), AppError>(())
                })
                .await;
            assert!(
                matches!(stored, Err(AppError::Ended)),
                "{codec:?} {stored:?}"
            );
            let io = idem
                .call("msg-marked")
                .scope(SCOPE)
                .run(|| async { Ok::<u8, std::io::Error>(1) })
                .await;
            assert!(io.is_err(), "{io:?}");
        }
        assert!(
            !ran.load(Ordering::SeqCst),
            "{codec:?}: something ran again"
        );
        assert_eq!(effects(&store).await, ["x"]);
    }
}

// ---------------------------------------------------------------------------------------
// 4. A transactional call whose operation makes another transactional call on the same
//    engine (a service method calling another, both idempotent). Its transaction would
//    commit apart from the outer one, and it would wait for a permit of the transaction
//    limit that its caller holds (forever, with a limit of 1, or with every permit held
//    by such outer calls). It is refused at once, and nothing of either runs on.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nested_transactional_call_is_refused_at_once() {
    let store = store_with_effects().await;
    let t = store.table().to_owned();
    let idem = engine(
        store.clone().with_transaction_limit(1),
        Duration::from_secs(1),
    );
    let inner_ran = AtomicBool::new(false);
    let answer = tokio::time::timeout(
        Duration::from_secs(8),
        idem.call("msg-nested")
            .scope(SCOPE)
            .run_in_transaction(|tx| {
                Box::pin(async {
                    insert(&t, "outer", tx).await?;
                    let inner = idem
                        .call("msg-nested-inner")
                        .scope("review2.inner")
                        .run_in_transaction(|tx2| {
                            Box::pin(async {
                                inner_ran.store(true, Ordering::SeqCst);
                                insert(&t, "inner", tx2).await?;
                                Ok::<_, Error>(1_u32)
                            })
                        })
                        .await?;
                    Ok::<_, Error>(inner + 1)
                })
            }),
    )
    .await
    .expect("refused at once, not waiting for a permit");
    assert!(
        matches!(answer, Err(Error::Config(ConfigError::NestedTransaction))),
        "{answer:?}"
    );
    assert!(!inner_ran.load(Ordering::SeqCst));
    assert!(
        effects(&store).await.is_empty(),
        "the outer write rolled back with its error"
    );
    // Both keys are free.
    let again = idem
        .call("msg-nested")
        .scope(SCOPE)
        .concurrency(Concurrency::Reject)
        .run_in_transaction(|_tx| Box::pin(async { Ok::<_, Error>(5_u32) }))
        .await;
    assert_eq!(again.expect("the key was released"), 5);
}

// ---------------------------------------------------------------------------------------
// 4c. Holds up? A call cancelled while it waits for a permit frees its key at once, and
//     the calls queued behind it go on; the holder's lease is kept meanwhile.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_cancelled_while_waiting_for_a_permit_frees_its_key() {
    let store = store_with_effects().await;
    let t = store.table().to_owned();
    let idem = engine(
        store.clone().with_transaction_limit(1),
        Duration::from_millis(600),
    );
    let release = Arc::new(Notify::new());
    let holder = {
        let (idem, t, release) = (idem.clone(), t.clone(), release.clone());
        tokio::spawn(async move {
            idem.call("holder")
                .scope(SCOPE)
                .run_in_transaction(move |tx| {
                    Box::pin(async move {
                        insert(&t, "holder", tx).await?;
                        release.notified().await;
                        Ok::<_, Error>(1_u32)
                    })
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waited = tokio::time::timeout(
        Duration::from_millis(1500),
        idem.call("waiter")
            .scope(SCOPE)
            .run_in_transaction(|_tx| Box::pin(async { Ok::<_, Error>(2_u32) })),
    )
    .await;
    assert!(waited.is_err(), "it should still be waiting: {waited:?}");
    // The waiter's key is free for another process right away.
    let other = engine(other_process(&t).await, Duration::from_secs(5));
    let again = other
        .call("waiter")
        .scope(SCOPE)
        .concurrency(Concurrency::Reject)
        .run(|| async { Ok::<_, Error>(3_u32) })
        .await;
    eprintln!("the cancelled waiter's key, from elsewhere: {again:?}");
    release.notify_one();
    let held = holder.await.expect("holder task");
    eprintln!("holder (ran 1.5 s = 2.5 leases): {held:?}");
    assert_eq!(held.expect("holder kept its claim"), 1);
    assert_eq!(again.expect("the key is free"), 3);
}

// ---------------------------------------------------------------------------------------
// 5. Holds up? Many transactional calls at once, some cancelled at random points, on a
//    small pool: afterwards no connection of the pool is inside a transaction or carries
//    a call's settings, and every key has at most one write.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_begins_some_cancelled_leave_every_connection_clean() {
    let direct = store_with_effects().await;
    let t = direct.table().to_owned();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&idempotent_tests::postgres::postgres_url())
        .await
        .expect("pool");
    let store = PostgresStore::from_pool(pool.clone())
        .with_table(&t)
        .expect("table");
    let idem = engine(store, Duration::from_secs(2));
    let mut calls = Vec::new();
    for i in 0..60u64 {
        let (idem, t) = (idem.clone(), t.clone());
        calls.push(tokio::spawn(async move {
            let call = idem
                .call(format!("many-{}", i % 20))
                .scope(SCOPE)
                .run_in_transaction(move |tx| {
                    Box::pin(async move {
                        insert(&t, &format!("k{}", i % 20), tx).await?;
                        tokio::time::sleep(Duration::from_millis(i % 7)).await;
                        Ok::<_, Error>(i)
                    })
                });
            // A third of them are cancelled after a few milliseconds.
            if i % 3 == 0 {
                let _ =
                    tokio::time::timeout(Duration::from_micros(200 + 300 * (i % 11)), call).await;
            } else {
                let _ = call.await;
            }
        }));
    }
    for c in calls {
        c.await.expect("task");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut conn = pool.acquire().await.expect("acquire");
        let leftover = in_leftover_transaction(&mut conn).await;
        let s = settings(&mut conn).await;
        assert!(!leftover, "a connection inside a transaction");
        assert!(s.0.is_empty() || s.0 == "<null>", "{s:?}");
        assert_eq!((s.1.as_str(), s.2.as_str()), ("on", "0"));
        conns.push(conn);
    }
    let written = effects(&direct).await;
    for k in 0..20 {
        let n = written.iter().filter(|w| **w == format!("k{k}")).count();
        assert!(n <= 1, "key {k} written {n} times");
    }
}
