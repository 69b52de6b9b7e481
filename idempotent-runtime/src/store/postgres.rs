//! The PostgreSQL store: records in a table of the database the service already has, so
//! they survive restarts and are shared by every process that uses the database.
//!
//! The table is keyed by `(scope, key)`. A claim is one statement and one round trip: it
//! reads a live record and writes nothing (a hit), or inserts the claim, taking over with
//! `ON CONFLICT DO UPDATE ... WHERE expires_at <= now()` a row whose lease or TTL has run
//! out. Renewal, completion and release are `UPDATE`s and a `DELETE` guarded by the
//! holder's token, which the engine mints (unique without any clock). Time is the
//! database's `now()`, so the clocks of the processes do not matter.
//!
//! Expired rows stay until [`PostgresStore::purge_expired`] removes them (a live store
//! treats them as absent); [`PostgresStore::spawn_purger`] runs it periodically.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::query::Query;
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::{Claim, Fence, Inspected, Store};
use crate::clock::Timestamp;
use crate::error::{ConfigError, Error, StoreError};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::{FencingToken, Record, RecordState, StoredResult};

/// The table name unless set otherwise.
pub const DEFAULT_TABLE: &str = "idempotency_keys";

/// How long one statement may take unless set otherwise: under a sixth of the default
/// lease, the bound the engine puts on a renewal (a statement it stops waiting for
/// closes its connection, and a new one takes its place in the pool).
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_millis(1500);

/// A [`Store`] on PostgreSQL, through a `sqlx` pool.
///
/// ```no_run
/// # async fn demo() -> Result<(), idempotent_runtime::Error> {
/// use idempotent_runtime::{store::PostgresStore, Idempotency};
/// use std::time::Duration;
///
/// let store = PostgresStore::connect("postgres://app@127.0.0.1/app").await?;
/// store.migrate().await?;                      // creates the table if missing
/// let _purger = store.spawn_purger(Duration::from_secs(300));
/// let idem = Idempotency::new(store);
/// # let _ = idem; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    table: String,
    sql: Sql,
    timeout: Duration,
    // Shared by clones, as the pool is.
    transactions: Arc<Semaphore>,
}

/// A connection taken from the pool for one statement. If the statement does not finish
/// (it timed out, or its caller was dropped), the connection is closed rather than given
/// back: its answer may still be on the way, or never come (a peer that vanished without
/// a reset), and the next statement on it would read that answer or wait forever.
struct Statement(Option<PoolConnection<Postgres>>);

impl Statement {
    /// The connection, back to the pool: the statement finished.
    fn finish(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Statement {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            // Detached from the pool, the connection closes as it drops.
            drop(conn.detach());
        }
    }
}

/// The statements, with the table name in place.
#[derive(Debug, Clone)]
struct Sql {
    claim: String,
    claim_volatile: String,
    renew: String,
    complete: String,
    release: String,
    inspect: String,
    forget: String,
    purge: String,
    complete_in_transaction: String,
    settle: String,
    still_ours: String,
}

impl Sql {
    fn for_table(t: &str) -> Self {
        Self {
            claim: claim_sql(t, ""),
            // For a call run in a transaction: the same claim, committed without waiting
            // for its WAL to reach the disk. It is visible to every other process at once
            // all the same; only a crash of the database could lose it, and that crash also
            // ends the holder's transaction, which can then no longer commit: its
            // completion, in the same transaction, needs the claim's row, and the commit that
            // makes the completion durable flushes the claim's WAL before it.
            claim_volatile: claim_sql(
                t,
                "AND set_config('synchronous_commit', 'off', true) = 'off'",
            ),
            renew: format!(
                "UPDATE {t} SET expires_at = now() + $4::bigint * interval '1 millisecond'
                 WHERE scope = $1 AND key = $2 AND state = 'p' AND token = $3 AND expires_at > now()"
            ),
            // A row this token completed already is answered as held and left as it is:
            // the retry of a completion whose answer was lost.
            complete: format!(
                "UPDATE {t} SET state = CASE WHEN state = 'p' THEN $4 ELSE state END,
                                result = CASE WHEN state = 'p' THEN $5 ELSE result END,
                                expires_at = CASE WHEN state = 'p'
                                    THEN now() + $6::bigint * interval '1 millisecond'
                                    ELSE expires_at END
                 WHERE scope = $1 AND key = $2 AND token = $3 AND expires_at > now()"
            ),
            release: format!(
                "DELETE FROM {t}
                 WHERE scope = $1 AND key = $2 AND state = 'p' AND token = $3 AND expires_at > now()"
            ),
            // The time left by the database's clock, which decides expiry.
            inspect: format!(
                "SELECT token, state, fingerprint, result,
                        (extract(epoch FROM expires_at) * 1000)::bigint AS ends_at,
                        ceil(extract(epoch FROM expires_at - now()) * 1000)::bigint AS left_ms
                 FROM {t}
                 WHERE scope = $1 AND key = $2 AND expires_at > now()"
            ),
            // An expired row goes too (it counts as absent, and would be purged anyway);
            // the answer says whether a live one was there.
            forget: format!(
                "DELETE FROM {t} WHERE scope = $1 AND key = $2
                 RETURNING expires_at > now() AS live"
            ),
            purge: format!("DELETE FROM {t} WHERE expires_at <= now()"),
            // In the operation's transaction, just before its commit. No check of the
            // lease: a claim whose lease ran out but that nobody took over is still the
            // only one, and this row lock makes a takeover wait for the commit (and then
            // find the result) or come first (and then the token no longer matches).
            // `now()` is the transaction's start; the TTL counts from the completion.
            //
            // Only in the transaction the call began ($3 is in its `idempotent.token`,
            // set there): an operation that committed or rolled it back itself runs this
            // in a transaction of its own, which must not complete the claim. From here
            // on the session may stay idle in the transaction only $7 ms: a commit lost on
            // the way (a peer gone silent) ends the transaction, and frees the row lock
            // taken here, then rather than when the server notices the dead client.
            complete_in_transaction: format!(
                "WITH done AS (
                   UPDATE {t} SET state = $4, result = $5,
                          expires_at = clock_timestamp() + $6::bigint * interval '1 millisecond'
                   WHERE scope = $1 AND key = $2 AND token = $3 AND state = 'p'
                     AND current_setting('{TOKEN_SETTING}', true) = $3::text
                     AND set_config('idle_in_transaction_session_timeout', $7::text, true) IS NOT NULL
                   RETURNING txid_current() AS xid
                 )
                 SELECT (SELECT xid FROM done) AS xid,
                        coalesce(current_setting('{TOKEN_SETTING}', true) = $3::text, false) AS ours"
            ),
            // After a commit whose answer was lost: `FOR SHARE` waits for the
            // transaction that completed the row (it holds the row's lock) to end.
            settle: format!("SELECT 1 FROM {t} WHERE scope = $1 AND key = $2 FOR SHARE"),
            still_ours: format!(
                "SELECT coalesce(current_setting('{TOKEN_SETTING}', true) = $1::bigint::text, false)"
            ),
        }
    }
}

/// The claim statement; `extra` is one more condition of the insert.
fn claim_sql(t: &str, extra: &str) -> String {
    // A live record is read and nothing is written: a hit is a read-only statement, with
    // nothing to flush at commit. A claim that waited on a lock (an expired row another
    // transaction holds) past $6 ms writes nothing either: its caller has given up on it
    // by then, and would never release it.
    format!(
        "WITH live AS (
           SELECT token, state, fingerprint, result,
                  (extract(epoch FROM expires_at) * 1000)::bigint AS ends_at
           FROM {t}
           WHERE scope = $1::text AND key = $2::text AND expires_at > now()
         ), claimed AS (
           INSERT INTO {t} AS t (scope, key, state, token, fingerprint, result, expires_at)
           SELECT $1::text, $2::text, 'p', $5::bigint, $3::bytea, NULL,
                  now() + $4::bigint * interval '1 millisecond'
           WHERE NOT EXISTS (SELECT 1 FROM live) {extra}
             AND clock_timestamp() < statement_timestamp() + $6::bigint * interval '1 millisecond'
           ON CONFLICT (scope, key) DO UPDATE
             SET state = 'p', token = EXCLUDED.token, fingerprint = EXCLUDED.fingerprint,
                 result = NULL, expires_at = EXCLUDED.expires_at
             WHERE t.expires_at <= now()
               AND clock_timestamp() < statement_timestamp() + $6::bigint * interval '1 millisecond'
           RETURNING token
         )
         SELECT true AS acquired, token, NULL::text AS state, NULL::bytea AS fingerprint,
                NULL::bytea AS result, NULL::bigint AS ends_at
         FROM claimed
         UNION ALL
         SELECT false, token, state, fingerprint, result, ends_at FROM live"
    )
}

/// The setting a call's transaction carries its claim's token in, set by the `BEGIN`
/// that starts it: the completion checks that it still runs in that transaction.
const TOKEN_SETTING: &str = "idempotent.token";

fn valid_table(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 48
}

fn store_err(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError::new(op, e)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// A token as a `bigint`: the same 64 bits, read as signed.
fn token_arg(t: FencingToken) -> i64 {
    i64::from_be_bytes(t.get().to_be_bytes())
}

impl PostgresStore {
    /// Connects a pool to `url` (`postgres://user@host:port/db`). Acquiring a connection
    /// times out after two seconds, so an unreachable database fails a call rather than
    /// hanging it; the pool reconnects by itself when the database is back.
    ///
    /// Its connections also carry PostgreSQL's own `statement_timeout` of
    /// [`DEFAULT_STATEMENT_TIMEOUT`], so that a statement this side gave up on (timed out,
    /// or its caller dropped) is ended by the server too, rather than land later or hold a
    /// server process while it waits on a lock. A pool given to
    /// [`PostgresStore::from_pool`] should be set up the same way.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let timeout_ms = DEFAULT_STATEMENT_TIMEOUT.as_millis().to_string();
        let options = PgConnectOptions::from_str(url)
            .map_err(store_err("postgres: bad url"))?
            .options([("statement_timeout", timeout_ms.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(options)
            .await
            .map_err(store_err("postgres: connect"))?;
        Ok(Self::from_pool(pool))
    }

    /// A store on an existing pool, with the table [`DEFAULT_TABLE`].
    ///
    /// Transactions of [`Call::run_in_transaction`](crate::Call::run_in_transaction) may
    /// hold at most three quarters of the pool's connections at once (all but one, in a
    /// pool of two to seven; the only one, in a pool of one, which is then too small for
    /// them); see [`PostgresStore::with_transaction_limit`].
    pub fn from_pool(pool: PgPool) -> Self {
        let max = usize::try_from(pool.options().get_max_connections()).unwrap_or(usize::MAX);
        let limit = max.saturating_sub((max / 4).max(1)).max(1);
        Self {
            pool,
            table: DEFAULT_TABLE.to_owned(),
            sql: Sql::for_table(DEFAULT_TABLE),
            timeout: DEFAULT_STATEMENT_TIMEOUT,
            transactions: Arc::new(Semaphore::new(limit)),
        }
    }

    /// How many transactions of
    /// [`Call::run_in_transaction`](crate::Call::run_in_transaction) may run at once on
    /// this store's pool (default: three quarters of its connections). Each holds a
    /// connection for its whole operation, and every call's claim, and the renewals that
    /// keep a running operation's claim alive, need one too: with every connection held by
    /// a transaction, renewals would wait in vain, live holders would lose their claims,
    /// and their work would be rolled back. Calls past the limit wait for a transaction
    /// to end, their claims renewed meanwhile. Leave room for the application's own
    /// queries on the pool as well.
    ///
    /// The limit belongs to this store and the clones made of it (`with_table` keeps it):
    /// a second store built with [`PostgresStore::from_pool`] on the same pool counts its
    /// transactions apart, and together they may take every connection. Make the stores
    /// of other tables with `with_table` on a clone.
    pub fn with_transaction_limit(mut self, transactions: usize) -> Self {
        self.transactions = Arc::new(Semaphore::new(transactions.max(1)));
        self
    }

    /// How long one claim, renewal, completion or release may take (default
    /// [`DEFAULT_STATEMENT_TIMEOUT`]) before it fails with a store error and its
    /// connection is closed. Without a bound, a connection whose peer stopped answering
    /// would hold a renewal or a completion until the lease ran out, and another caller
    /// would take the key over and run the operation again. Keep it under a sixth of the
    /// shortest lease in use: the engine bounds each renewal by that much. A claim takes
    /// effect only within nine tenths of it, so a claim its caller gave up on (waiting on
    /// a lock, say) never lands afterwards and holds the key for a call that never ran.
    pub fn with_statement_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Uses the table `name`. The name goes into SQL text, so only plain identifiers are
    /// accepted.
    pub fn with_table(mut self, name: &str) -> Result<Self, Error> {
        if !valid_table(name) {
            return Err(ConfigError::InvalidTableName(name.to_owned()).into());
        }
        self.table = name.to_owned();
        self.sql = Sql::for_table(name);
        Ok(self)
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The pool, for the application's own queries.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the table and its expiry index if they are missing. Safe to run from many
    /// processes at once. (Tables made by earlier versions also have a sequence,
    /// `{table}_token`, which is no longer used.)
    pub async fn migrate(&self) -> Result<(), Error> {
        let t = &self.table;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(store_err("postgres: migrate"))?;
        // Another process may hold the lock while it creates the table: wait for it, past
        // the statement timeout that bounds the protocol's statements.
        sqlx::query("SET LOCAL statement_timeout = 0")
            .execute(&mut *tx)
            .await
            .map_err(store_err("postgres: migrate"))?;
        // `IF NOT EXISTS` is not safe against a concurrent creation; the lock is.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("idempotent-migrate:{t}"))
            .execute(&mut *tx)
            .await
            .map_err(store_err("postgres: migrate"))?;
        for ddl in [
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                   scope       text        NOT NULL,
                   key         text        NOT NULL,
                   state       text        NOT NULL CHECK (state IN ('p', 'c', 'e')),
                   token       bigint      NOT NULL,
                   fingerprint bytea,
                   result      bytea,
                   expires_at  timestamptz NOT NULL,
                   PRIMARY KEY (scope, key)
                 )"
            ),
            format!("CREATE INDEX IF NOT EXISTS {t}_expires_at ON {t} (expires_at)"),
        ] {
            sqlx::query(&ddl)
                .execute(&mut *tx)
                .await
                .map_err(store_err("postgres: migrate"))?;
        }
        tx.commit().await.map_err(store_err("postgres: migrate"))?;
        Ok(())
    }

    /// Deletes the rows whose lease or TTL has run out, and says how many.
    pub async fn purge_expired(&self) -> Result<u64, Error> {
        let err = store_err("postgres: purge");
        let mut tx = self.pool.begin().await.map_err(err)?;
        // A purge of a large table may take longer than the statement timeout that
        // bounds the protocol's statements; it holds no key, so it may.
        sqlx::query("SET LOCAL statement_timeout = 0")
            .execute(&mut *tx)
            .await
            .map_err(store_err("postgres: purge"))?;
        let done = sqlx::query(&self.sql.purge)
            .execute(&mut *tx)
            .await
            .map_err(store_err("postgres: purge"))?;
        tx.commit().await.map_err(store_err("postgres: purge"))?;
        Ok(done.rows_affected())
    }

    /// Runs [`PostgresStore::purge_expired`] every `every` on the current tokio runtime
    /// until the handle is aborted. Failures are logged and retried at the next tick.
    pub fn spawn_purger(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match store.purge_expired().await {
                    Ok(n) => {
                        tracing::debug!(table = %store.table, purged = n, "purged expired idempotency rows")
                    }
                    Err(e) => {
                        tracing::warn!(table = %store.table, error = %e, "could not purge expired idempotency rows")
                    }
                }
            }
        })
    }

    /// How long after the server received it a claim may still take effect: nine tenths
    /// of the statement timeout, so that a claim never lands after its caller gave up on
    /// it (the server receives a statement a little after the caller starts its clock).
    fn claim_deadline(&self) -> Duration {
        self.timeout * 9 / 10
    }

    /// A connection for one statement, from the pool.
    async fn statement(&self, op: &'static str) -> Result<Statement, StoreError> {
        let conn = self.pool.acquire().await.map_err(store_err(op))?;
        Ok(Statement(Some(conn)))
    }

    /// Runs `q` within the statement timeout: the rows it changed.
    async fn execute(
        &self,
        op: &'static str,
        q: Query<'_, Postgres, PgArguments>,
    ) -> Result<u64, StoreError> {
        let mut stmt = self.statement(op).await?;
        let conn = stmt.0.as_mut().ok_or(StoreError::msg(op))?;
        let done = tokio::time::timeout(self.timeout, q.execute(&mut **conn))
            .await
            .map_err(|elapsed| StoreError::new(op, elapsed))?
            .map_err(store_err(op))?;
        stmt.finish();
        Ok(done.rows_affected())
    }

    /// Runs `q` within the statement timeout: the row it returned, if any.
    async fn fetch_optional(
        &self,
        op: &'static str,
        q: Query<'_, Postgres, PgArguments>,
    ) -> Result<Option<PgRow>, StoreError> {
        let mut stmt = self.statement(op).await?;
        let conn = stmt.0.as_mut().ok_or(StoreError::msg(op))?;
        let row = tokio::time::timeout(self.timeout, q.fetch_optional(&mut **conn))
            .await
            .map_err(|elapsed| StoreError::new(op, elapsed))?
            .map_err(store_err(op))?;
        stmt.finish();
        Ok(row)
    }

    async fn fenced(
        &self,
        op: &'static str,
        q: Query<'_, Postgres, PgArguments>,
    ) -> Result<Fence, StoreError> {
        Ok(if self.execute(op, q).await? == 1 {
            Fence::Held
        } else {
            Fence::Lost
        })
    }
}

/// How the end of a call's transaction went.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Committed: the operation's writes and its result are durable.
    Committed,
    /// The claim was taken over; the transaction was rolled back.
    Lost,
    /// The operation committed or rolled back the transaction itself; nothing was
    /// completed.
    ByOperation,
    /// Failed before the commit was sent: the transaction, dropped, rolls back.
    NotCommitted(StoreError),
    /// The commit of the transaction with this id was sent, and its answer never came.
    CommitSent(StoreError, i64),
}

/// What became of a transaction whose commit's answer was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// It committed.
    Committed,
    /// It rolled back.
    RolledBack,
}

/// What [`Call::run_in_transaction`](crate::Call::run_in_transaction) needs of the store
/// beyond [`Store`]: a transaction marked as the call's, the completion in it, and, when
/// a commit's answer was lost, what the commit did.
impl PostgresStore {
    /// Waits for room for one more transaction (see
    /// [`PostgresStore::with_transaction_limit`]).
    pub(crate) async fn transaction_permit(&self) -> Result<SemaphorePermit<'_>, StoreError> {
        self.transactions
            .acquire()
            .await
            .map_err(|e| StoreError::new("postgres: transaction limit", e))
    }

    /// How long one statement may take; see [`PostgresStore::with_statement_timeout`].
    pub(crate) fn statement_timeout(&self) -> Duration {
        self.timeout
    }

    /// A claim by the statement `sql` (the plain claim, or the one for transactions).
    async fn claim_with(
        &self,
        sql: &str,
        key: &StoreKey,
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let fp = fingerprint.map(|f| f.as_bytes().to_vec());
        // Under READ COMMITTED, a row another transaction inserts after this statement's
        // snapshot makes the insert a no-op that the read cannot see yet; the next
        // statement sees it. Rare, and bounded.
        for _ in 0..5 {
            let q = sqlx::query(sql)
                .bind(key.scope())
                .bind(key.key())
                .bind(&fp)
                .bind(millis(lease))
                .bind(token_arg(token))
                .bind(millis(self.claim_deadline()));
            let row = self.fetch_optional("postgres: claim", q).await?;
            if let Some(row) = row {
                return parse_claim(&row);
            }
        }
        Err(StoreError::msg(
            "postgres: claim found neither a free key nor a record",
        ))
    }

    /// A claim for a call run in a transaction: see the statement's comment in `Sql`.
    pub(crate) async fn claim_for_transaction(
        &self,
        key: &StoreKey,
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claim_with(&self.sql.claim_volatile, key, token, fingerprint, lease)
            .await
    }

    /// Begins a transaction for the claim `token` on a connection of the pool, within
    /// the pool's acquire timeout and, as a last bound, `within`. The `BEGIN` runs on a
    /// task of its own: sqlx (0.8) gives a connection back to the pool inside the
    /// transaction when a `BEGIN` is dropped before its answer, and every later
    /// statement on it would join that transaction. Here it always finishes, and a
    /// transaction nobody waits for any more is dropped, which rolls it back.
    pub(crate) async fn begin(
        &self,
        token: FencingToken,
        within: Duration,
    ) -> Result<Transaction<'static, Postgres>, StoreError> {
        let op = "postgres: begin";
        let pool = self.pool.clone();
        // A number, so nothing but digits and a sign goes into the text.
        let begin = format!("BEGIN; SET LOCAL {TOKEN_SETTING} = '{}'", token_arg(token));
        let task = tokio::spawn(async move { pool.begin_with(begin).await });
        match tokio::time::timeout(within, task).await {
            Ok(Ok(begun)) => begun.map_err(store_err(op)),
            Ok(Err(join)) => Err(StoreError::new(op, join)),
            Err(elapsed) => Err(StoreError::new(op, elapsed)),
        }
    }

    /// Completes `token`'s claim with `result` as the last statement of `tx`, then
    /// commits `tx`: the operation's writes and the result become durable together.
    pub(crate) async fn complete_and_commit(
        &self,
        mut tx: Transaction<'_, Postgres>,
        key: &StoreKey,
        token: FencingToken,
        result: &StoredResult,
        ttl: Duration,
        lease: Duration,
    ) -> Ended {
        let q = completion(&self.sql.complete_in_transaction, key, token, result, ttl)
            .bind(millis(lease).to_string());
        let answered = tokio::time::timeout(self.timeout, q.fetch_one(&mut *tx)).await;
        let row = match answered {
            Ok(Ok(row)) => row,
            Ok(Err(sqlx::Error::Database(e)))
                if e.code().as_deref() == Some(IN_FAILED_TRANSACTION) =>
            {
                return Ended::NotCommitted(StoreError::new(
                    "postgres: a statement of the operation's transaction failed, and the \
                     operation returned Ok; its transaction was rolled back",
                    sqlx::Error::Database(e),
                ));
            }
            Ok(Err(e)) => {
                return Ended::NotCommitted(StoreError::new("postgres: complete in transaction", e))
            }
            Err(elapsed) => {
                return Ended::NotCommitted(StoreError::new(
                    "postgres: complete in transaction",
                    elapsed,
                ))
            }
        };
        // A row of another shape is an error, never a guess: guessed "not ours", it would
        // mark the key as ended by the operation for its whole TTL.
        let read = |e| StoreError::new("postgres: unexpected completion row", e);
        let (xid, ours) = match (
            row.try_get::<Option<i64>, _>("xid"),
            row.try_get::<bool, _>("ours"),
        ) {
            (Ok(xid), Ok(ours)) => (xid, ours),
            (Err(e), _) | (_, Err(e)) => return Ended::NotCommitted(read(e)),
        };
        if !ours {
            return Ended::ByOperation;
        }
        let Some(xid) = xid else {
            let _ = tokio::time::timeout(self.timeout, tx.rollback()).await;
            return Ended::Lost;
        };
        // Bounded by the lease: a commit may wait for a replica, and one cut short is
        // settled all the same.
        match tokio::time::timeout(lease, tx.commit()).await {
            Ok(Ok(())) => Ended::Committed,
            Ok(Err(e)) => Ended::CommitSent(StoreError::new("postgres: commit", e), xid),
            Err(elapsed) => Ended::CommitSent(StoreError::new("postgres: commit", elapsed), xid),
        }
    }

    /// Whether `tx` is still the transaction begun for `token`: the operation may have
    /// committed or rolled it back itself, with raw SQL.
    pub(crate) async fn still_ours(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        token: FencingToken,
    ) -> Result<bool, StoreError> {
        let q = sqlx::query_scalar::<_, bool>(&self.sql.still_ours).bind(token_arg(token));
        tokio::time::timeout(self.timeout, q.fetch_one(&mut **tx))
            .await
            .map_err(|elapsed| StoreError::new("postgres: check the transaction", elapsed))?
            .map_err(store_err("postgres: check the transaction"))
    }

    /// Whether the transaction `xid`, which completed the claim of `key` and whose
    /// commit's answer was lost, committed: asked on another connection once that
    /// transaction has ended (its lock on the row is waited for, within the statement
    /// timeout). The database's own record of the transaction answers, not the row, which
    /// may be gone or taken over since.
    pub(crate) async fn settle(&self, key: &StoreKey, xid: i64) -> Result<Settled, StoreError> {
        let wait = sqlx::query(&self.sql.settle)
            .bind(key.scope())
            .bind(key.key());
        self.fetch_optional("postgres: settle", wait).await?;
        let status = sqlx::query("SELECT txid_status($1)::text AS status").bind(xid);
        let row = self.fetch_optional("postgres: settle", status).await?;
        let status: Option<String> = row.and_then(|r| r.try_get("status").ok());
        match status.as_deref() {
            Some("committed") => Ok(Settled::Committed),
            Some("aborted") => Ok(Settled::RolledBack),
            _ => Err(StoreError::msg(
                "postgres: the transaction has not ended yet, or is too old to tell",
            )),
        }
    }
}

/// The SQLSTATE of a statement in a transaction that an earlier error aborted.
const IN_FAILED_TRANSACTION: &str = "25P02";

/// A completion statement (`complete`, or `complete_in_transaction`, which take the same
/// parameters), bound.
fn completion<'q>(
    sql: &'q str,
    key: &'q StoreKey,
    token: FencingToken,
    result: &'q StoredResult,
    ttl: Duration,
) -> Query<'q, Postgres, PgArguments> {
    let state = if result.is_err() { "e" } else { "c" };
    sqlx::query(sql)
        .bind(key.scope())
        .bind(key.key())
        .bind(token_arg(token))
        .bind(state)
        .bind(result.bytes().as_ref())
        .bind(millis(ttl))
}

/// A claim's answer row.
fn parse_claim(row: &PgRow) -> Result<Claim, StoreError> {
    let bad = |e: sqlx::Error| StoreError::new("postgres: unexpected claim row", e);
    if row.try_get::<bool, _>("acquired").map_err(bad)? {
        return Ok(Claim::Acquired);
    }
    let record = parse_record(row)?;
    Ok(match record.state {
        RecordState::InProgress { .. } => Claim::InProgress(record),
        RecordState::Completed { .. } => Claim::Completed(record),
    })
}

/// A record from a row with its columns (`token`, `state`, `fingerprint`, `result`,
/// `ends_at`), as the claim and the inspection read them.
fn parse_record(row: &PgRow) -> Result<Record, StoreError> {
    let bad = |e: sqlx::Error| StoreError::new("postgres: unexpected record row", e);
    let token: i64 = row.try_get("token").map_err(bad)?;
    let token = FencingToken::new(u64::from_be_bytes(token.to_be_bytes()));
    let state: String = row.try_get("state").map_err(bad)?;
    let fp: Option<Vec<u8>> = row.try_get("fingerprint").map_err(bad)?;
    let result: Option<Vec<u8>> = row.try_get("result").map_err(bad)?;
    let ends_at: i64 = row.try_get("ends_at").map_err(bad)?;
    let ends_at = Timestamp::from_millis(u64::try_from(ends_at).unwrap_or(0));
    let fingerprint = match fp {
        Some(b) => Some(Fingerprint::from_bytes(b.try_into().map_err(|_| {
            StoreError::msg("postgres: a fingerprint is not 32 bytes")
        })?)),
        None => None,
    };
    let stored = || Bytes::from(result.clone().unwrap_or_default());
    let state = match state.as_str() {
        "p" => RecordState::InProgress {
            token,
            lease_expires_at: ends_at,
        },
        "c" => RecordState::Completed {
            token,
            result: StoredResult::Ok(stored()),
            expires_at: ends_at,
        },
        "e" => RecordState::Completed {
            token,
            result: StoredResult::Err(stored()),
            expires_at: ends_at,
        },
        _ => return Err(StoreError::msg("postgres: unknown record state")),
    };
    Ok(Record { fingerprint, state })
}

#[async_trait]
impl Store for PostgresStore {
    async fn claim(
        &self,
        key: &StoreKey,
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claim_with(&self.sql.claim, key, token, fingerprint, lease)
            .await
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let q = sqlx::query(&self.sql.renew)
            .bind(key.scope())
            .bind(key.key())
            .bind(token_arg(token))
            .bind(millis(lease));
        self.fenced("postgres: renew", q).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        result: StoredResult,
        ttl: Duration,
    ) -> Result<Fence, StoreError> {
        let q = completion(&self.sql.complete, key, token, &result, ttl);
        self.fenced("postgres: complete", q).await
    }

    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<Fence, StoreError> {
        let q = sqlx::query(&self.sql.release)
            .bind(key.scope())
            .bind(key.key())
            .bind(token_arg(token));
        self.fenced("postgres: release", q).await
    }

    async fn inspect(&self, key: &StoreKey) -> Result<Option<Inspected>, StoreError> {
        let q = sqlx::query(&self.sql.inspect)
            .bind(key.scope())
            .bind(key.key());
        let Some(row) = self.fetch_optional("postgres: inspect", q).await? else {
            return Ok(None);
        };
        let record = parse_record(&row)?;
        let left: i64 = row
            .try_get("left_ms")
            .map_err(store_err("postgres: unexpected record row"))?;
        let time_left = Duration::from_millis(u64::try_from(left).unwrap_or(0));
        Ok(Some(Inspected { record, time_left }))
    }

    async fn forget(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let q = sqlx::query(&self.sql.forget)
            .bind(key.scope())
            .bind(key.key());
        let row = self.fetch_optional("postgres: forget", q).await?;
        match row {
            None => Ok(false),
            Some(row) => row
                .try_get::<bool, _>("live")
                .map_err(store_err("postgres: unexpected forget row")),
        }
    }

    fn postgres(&self) -> Option<&PostgresStore> {
        Some(self)
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_identifiers_are_table_names() {
        for ok in ["idempotency_keys", "_t", "t1"] {
            assert!(valid_table(ok), "{ok}");
        }
        for bad in ["", "1t", "t; DROP TABLE x", "a-b", "\"t\"", &"t".repeat(49)] {
            assert!(!valid_table(bad), "{bad}");
        }
    }
}
