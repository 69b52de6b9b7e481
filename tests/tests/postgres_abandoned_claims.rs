//! PostgreSQL claims the client gave up on (a statement timeout, a caller dropped) while
//! they waited on a row lock. The server does not notice a closed connection, so such a
//! claim may still finish: it must then write nothing (past its deadline), or be released
//! by the engine, never hold the key for a lease for a call that never ran. And such
//! statements must not keep more server processes than the pool has connections.

use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idempotent_runtime::store::{Claim, Fence, Inspected, PostgresStore, Store};
use idempotent_runtime::{
    Concurrency, Error, FencingToken, Fingerprint, Idempotency, Outcome, StoreError, StoreKey,
    StoredResult,
};
use idempotent_tests::eventually;
use idempotent_tests::postgres::{fresh_store, postgres_url};

const SCOPE: &str = "abandoned";
const KEY: &str = "pay-1";
const LEASE: Duration = Duration::from_secs(5);

/// Counts the release answers the engine got (whatever they were).
#[derive(Debug, Clone)]
struct Observed<S> {
    inner: S,
    releases: Arc<AtomicU32>,
}

#[async_trait]
impl<S: Store + Clone> Store for Observed<S> {
    async fn claim(
        &self,
        key: &StoreKey,
        token: FencingToken,
        fp: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.inner.claim(key, token, fp, lease).await
    }
    async fn renew(&self, k: &StoreKey, t: FencingToken, l: Duration) -> Result<Fence, StoreError> {
        self.inner.renew(k, t, l).await
    }
    async fn complete(
        &self,
        k: &StoreKey,
        t: FencingToken,
        r: StoredResult,
        ttl: Duration,
    ) -> Result<Fence, StoreError> {
        self.inner.complete(k, t, r, ttl).await
    }
    async fn release(&self, k: &StoreKey, t: FencingToken) -> Result<Fence, StoreError> {
        let answer = self.inner.release(k, t).await;
        self.releases.fetch_add(1, Ordering::SeqCst);
        answer
    }
    async fn inspect(&self, k: &StoreKey) -> Result<Option<Inspected>, StoreError> {
        self.inner.inspect(k).await
    }
    async fn forget(&self, k: &StoreKey) -> Result<bool, StoreError> {
        self.inner.forget(k).await
    }
}

/// A store on a fresh table holding an expired claim of `KEY` (token 1), and a
/// transaction that holds that row's lock (another statement touching the row, a purge,
/// a vacuum-free long transaction: anything that makes a claim wait).
async fn expired_row_locked(
    timeout: Duration,
) -> (PostgresStore, sqlx::Transaction<'static, sqlx::Postgres>) {
    let store = fresh_store(&postgres_url())
        .await
        .with_statement_timeout(timeout);
    let t = store.table().to_owned();
    sqlx::query(&format!(
        "INSERT INTO {t} (scope, key, state, token, fingerprint, result, expires_at)
         VALUES ($1, $2, 'p', 1, NULL, NULL, now() - interval '1 second')"
    ))
    .bind(SCOPE)
    .bind(KEY)
    .execute(store.pool())
    .await
    .expect("insert an expired claim");
    let mut tx = store.pool().begin().await.expect("begin");
    sqlx::query(&format!("SELECT 1 FROM {t} FOR UPDATE"))
        .execute(&mut *tx)
        .await
        .expect("lock the row");
    (store, tx)
}

/// The key's row: its token, and whether it is a claim within its lease.
async fn row(store: &PostgresStore) -> Option<(i64, bool)> {
    let t = store.table();
    sqlx::query_as(&format!(
        "SELECT token, state = 'p' AND expires_at > now() FROM {t} WHERE scope = $1 AND key = $2"
    ))
    .bind(SCOPE)
    .bind(KEY)
    .fetch_optional(store.pool())
    .await
    .expect("read the row")
}

/// Waits until no claim statement on the store's table is running on the server: the
/// abandoned one has finished, one way or the other.
async fn claims_done(store: &PostgresStore) {
    let marker = format!("%INSERT INTO {} AS t%", store.table());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND state = 'active' \
             AND pid <> pg_backend_pid()",
        )
        .bind(&marker)
        .fetch_one(store.pool())
        .await
        .expect("count");
        if n == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "a claim still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn engine(store: impl Store) -> Idempotency {
    Idempotency::builder()
        .store(store)
        .lease(LEASE)
        .concurrency(Concurrency::Reject)
        .build()
        .expect("engine")
}

async fn retry_runs(store: &PostgresStore, runs: &Arc<AtomicU32>) -> Result<(u32, Outcome), Error> {
    let b = engine(store.clone());
    let runs = runs.clone();
    b.call(KEY)
        .scope(SCOPE)
        .run_with_outcome(move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(2u32)
        })
        .await
}

/// A's claim waits on the row lock past the statement timeout: A gets `Error::Store` and
/// never runs. When the lock goes, its claim is past its deadline and writes nothing; a
/// retry (B, reject mode) runs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_that_timed_out_on_a_lock_never_lands() {
    let (store, lock) = expired_row_locked(Duration::from_millis(300)).await;
    let releases = Arc::new(AtomicU32::new(0));
    let a = engine(Observed {
        inner: store.clone(),
        releases: releases.clone(),
    });
    let runs = Arc::new(AtomicU32::new(0));
    let got_a = {
        let runs = runs.clone();
        a.call(KEY)
            .scope(SCOPE)
            .run_with_outcome(move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(1u32)
            })
            .await
    };
    assert!(matches!(got_a, Err(Error::Store(_))), "{got_a:?}");
    eventually(Duration::from_secs(5), "the engine's release", || {
        releases.load(Ordering::SeqCst) >= 1
    })
    .await;
    lock.commit().await.expect("commit");
    claims_done(&store).await;
    assert_eq!(
        row(&store).await,
        Some((1, false)),
        "the abandoned claim wrote nothing"
    );

    let got_b = retry_runs(&store, &runs).await;
    assert!(matches!(got_b, Ok((2, Outcome::Executed))), "{got_b:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "only the retry ran");
}

/// The same with a caller dropped during the claim's round trip (a client timeout), and
/// the lock gone before the claim's deadline: the claim lands after the engine's first
/// releases found nothing, and a later one deletes it by its token (it does not lapse
/// with its lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_whose_caller_was_dropped_is_released_even_if_it_lands_late() {
    let (store, lock) = expired_row_locked(Duration::from_secs(2)).await;
    let releases = Arc::new(AtomicU32::new(0));
    let a = engine(Observed {
        inner: store.clone(),
        releases: releases.clone(),
    });
    let runs = Arc::new(AtomicU32::new(0));
    let call = {
        let runs = runs.clone();
        a.call(KEY)
            .scope(SCOPE)
            .run_with_outcome(move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(1u32)
            })
    };
    // The client gives up while the claim waits for the lock.
    let gave_up = tokio::time::timeout(Duration::from_millis(200), call).await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    eventually(
        Duration::from_secs(5),
        "the engine's first releases",
        || releases.load(Ordering::SeqCst) >= 2,
    )
    .await;
    lock.commit().await.expect("commit");
    claims_done(&store).await;
    // Landed or not, the key is free well before a lease: the row is gone, deleted by
    // the claim's token, or never taken.
    let deadline = tokio::time::Instant::now() + LEASE;
    while matches!(row(&store).await, Some((token, true)) if token != 1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned claim holds the key for a lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got_b = retry_runs(&store, &runs).await;
    assert!(matches!(got_b, Ok((2, Outcome::Executed))), "{got_b:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "only the retry ran");
}

/// Every statement that times out closes its pool connection, and the pool opens another;
/// the server ends the statement too (its `statement_timeout`), so a lock held for long
/// does not turn the pool's 16 connections into as many server processes as calls made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timed_out_statements_do_not_take_more_server_connections_than_the_pool() {
    // A pool whose connections carry the server's `statement_timeout` of the store's own,
    // as `PostgresStore::connect` makes them (here shorter, for a quick test).
    let table = fresh_store(&postgres_url()).await.table().to_owned();
    let options = sqlx::postgres::PgConnectOptions::from_str(&postgres_url())
        .expect("url")
        .options([("statement_timeout", "100")]);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect_with(options)
        .await
        .expect("pool");
    let store = PostgresStore::from_pool(pool)
        .with_table(&table)
        .expect("table")
        .with_statement_timeout(Duration::from_millis(100));
    let t = store.table().to_owned();
    let admin = PostgresStore::connect(&postgres_url())
        .await
        .expect("admin");
    let mut lock = admin.pool().begin().await.expect("begin");
    sqlx::query(&format!("LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *lock)
        .await
        .expect("lock");
    let a = engine(store.clone());
    for i in 0..24 {
        let got = a
            .call(format!("k{i}"))
            .scope(SCOPE)
            .run(|| async { Ok::<_, Error>(0u32) })
            .await;
        assert!(matches!(got, Err(Error::Store(_))), "{got:?}");
    }
    let marker = format!("%INSERT INTO {t} AS t%");
    let count = || async {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND state = 'active'",
        )
        .bind(&marker)
        .fetch_one(admin.pool())
        .await
        .expect("count");
        n
    };
    let stuck = count().await;
    lock.commit().await.expect("unlock");
    assert!(
        stuck <= 16,
        "{stuck} server backends run claims for one pool of at most 16 connections"
    );
}
