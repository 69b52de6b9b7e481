//! Calls whose operation writes to the database the records are kept in, and whose writes
//! commit in one transaction with the stored result ([`Call::run_in_transaction`]).
//!
//! The claim is made as for [`Call::run`], committed at once, so other processes see the
//! key taken and wait. The operation then runs in a transaction of its own on the store's
//! pool; the completion of the claim, guarded by its token, is the transaction's last
//! statement, and one commit makes the operation's writes and its result durable
//! together. Whatever stops the operation before that commit (an error, a panic, a
//! cancelled caller, a crashed process, a claim taken over) rolls its writes back with the
//! transaction, so a retry that runs it again never finds the first run's writes.

use std::future::Future;
use std::panic::{resume_unwind, AssertUnwindSafe};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::{Postgres, Transaction};
use tracing::{debug, warn};

use crate::call::{Call, CallKey, ErrorPolicy};
use crate::codec::Codec;
use crate::engine::{Answer, Inner, Operation, Outcome, Request};
use crate::error::{CodecError, ConfigError, Error, StoreError};
use crate::lease::{bounded, Completion, HeldClaim};
use crate::observe::{
    self, timed, Event, StoreOp, OUTCOME_COMMIT_UNKNOWN, OUTCOME_INVALID, OUTCOME_LEASE_LOST,
    OUTCOME_STORE_ERROR,
};
use crate::record::StoredResult;
use crate::store::{Ended, PostgresStore, Settled};

impl<'a, K: CallKey, P> Call<'a, K, P> {
    /// Runs `op` at most once for the key inside a transaction on the engine's
    /// [`PostgresStore`], and commits its writes together with its stored result; or
    /// returns the stored result of an earlier call. See
    /// [`Call::run_in_transaction_with_outcome`].
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use idempotent_runtime::{store::PostgresStore, Idempotency};
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// enum LedgerError {
    ///     #[error(transparent)]
    ///     Db(#[from] sqlx::Error),
    ///     #[error(transparent)]
    ///     Idempotency(#[from] idempotent_runtime::Error),
    /// }
    ///
    /// let store = PostgresStore::connect("postgres://app@127.0.0.1/app").await?;
    /// store.migrate().await?;
    /// let idem = Idempotency::new(store);
    /// let (msg_id, account, cents) = ("msg-1", "acct-7", 1250_i64);
    /// let posted: i64 = idem
    ///     .call(msg_id)
    ///     .scope("ledger.apply")
    ///     .run_in_transaction(|tx| {
    ///         Box::pin(async move {
    ///             sqlx::query("INSERT INTO postings (message_id, account, cents) VALUES ($1, $2, $3)")
    ///                 .bind(msg_id)
    ///                 .bind(account)
    ///                 .bind(cents)
    ///                 .execute(&mut **tx)
    ///                 .await?;
    ///             Ok::<_, LedgerError>(cents)
    ///         })
    ///     })
    ///     .await?;
    /// # let _ = posted; Ok(()) }
    /// ```
    pub fn run_in_transaction<T, E, F>(self, op: F) -> impl Future<Output = Result<T, E>> + 'a
    where
        K: 'a,
        T: Serialize + DeserializeOwned + 'a,
        E: From<Error> + 'a,
        P: ErrorPolicy<E> + 'a,
        F: for<'c> FnOnce(&'c mut Transaction<'a, Postgres>) -> BoxFuture<'c, Result<T, E>>
            + Send
            + 'a,
    {
        self.run_in_transaction_with_outcome(op)
            .map(|answer| answer.map(|(value, _)| value))
    }

    /// Like [`Call::run_in_transaction`], and says whether the value was executed,
    /// replayed or coalesced.
    ///
    /// `op` gets a transaction on the store's pool (the closure's shape is that of sqlx's
    /// `Connection::transaction`); its statements run under the pool's settings, so on a
    /// pool made by [`PostgresStore::connect`] each is bounded by its statement timeout
    /// (`SET LOCAL statement_timeout` in `op` lifts that for one transaction).
    ///
    /// Coalescing, waiting for a holder in another process, fingerprints, the TTL and
    /// replay are those of [`Call::run_with_outcome`]. What differs is how the operation
    /// ends:
    /// - `Ok`: the claim is completed inside the transaction, which then commits: the
    ///   writes and the stored result become durable together, or neither does.
    /// - `Err`: the transaction rolls back, then the key is released (or, with
    ///   [`Call::store_errors`], the error is stored, so a retry gets it back; the
    ///   writes stay rolled back). An error to store that cannot be stored faithfully
    ///   frees the key, as an error not stored does: nothing of the operation took
    ///   effect.
    /// - A panic, or this future dropped: the transaction rolls back and the key is
    ///   released. The process dying does the same: the database rolls back the
    ///   transaction of a closed connection, and the claim lapses one lease later.
    /// - The claim taken over meanwhile (its lease ran out without renewal and another
    ///   caller claimed the key): the completion finds another token, the transaction
    ///   rolls back, and the caller gets [`Error::LeaseLost`], not a value whose effects
    ///   were undone.
    /// - The commit's answer lost: the outcome is asked of the database on another
    ///   connection, by the transaction's id; when even that fails, the caller gets
    ///   [`Error::Store`] of kind [`CommitUnknown`](crate::StoreErrorKind::CommitUnknown),
    ///   and a retry finds out. The server ends a transaction whose commit never came
    ///   one lease after its completion, so a peer gone silent does not keep the key's
    ///   row locked.
    /// - `op` committed or rolled back the transaction itself (raw `COMMIT` or
    ///   `ROLLBACK`; use a savepoint, `tx.begin()`, to undo part of the work): its writes
    ///   may be there without their result, so the key is marked for its TTL and this
    ///   call and every retry get [`Error::TransactionEnded`] rather than running again.
    ///
    /// On an engine over any other store, the call fails with [`Error::Config`]
    /// ([`ConfigError::NotTransactional`]) and runs nothing; so does a call made inside
    /// the operation of another ([`ConfigError::NestedTransaction`]): pass the outer
    /// transaction down instead.
    ///
    /// Limits, each a mistake in `op` that is not detected: `op` must not `RESET` the
    /// setting `idempotent.token` (`RESET ALL` does) that marks its transaction as the
    /// call's (the call then reports [`Error::TransactionEnded`], although nothing
    /// took effect), nor commit by hand and begin a transaction of its own that then
    /// fails (its first writes stay, and the key is released). A `BEGIN` sent to a
    /// database that then goes silent holds its connection of the pool until the
    /// operating system gives up on the TCP connection (minutes).
    pub fn run_in_transaction_with_outcome<T, E, F>(
        self,
        op: F,
    ) -> impl Future<Output = Result<(T, Outcome), E>> + 'a
    where
        K: 'a,
        T: Serialize + DeserializeOwned + 'a,
        E: From<Error> + 'a,
        P: ErrorPolicy<E> + 'a,
        F: for<'c> FnOnce(&'c mut Transaction<'a, Postgres>) -> BoxFuture<'c, Result<T, E>>
            + Send
            + 'a,
    {
        let inner = &self.engine.inner;
        let op = InTransaction {
            name: std::any::type_name::<F>(),
            body: Box::new(op),
        };
        inner.run::<K, T, E, P, InTransaction<'a, T, E>>(self, op)
    }
}

tokio::task_local! {
    /// Set in the task of an operation of [`Call::run_in_transaction`] while it runs: a
    /// transactional call made inside it is refused (see [`ConfigError::NestedTransaction`]).
    static IN_OPERATION: ();
}

/// The operation of [`Call::run_in_transaction`].
///
/// The transaction it is given is typed with the call's lifetime `'a`, so that the
/// closure's future, which lives no longer than its borrow of the transaction, may borrow
/// what the call may (`&self`, the caller's locals) rather than own everything, as sqlx's
/// own `Connection::transaction` asks. The closure is boxed: held as a type parameter
/// under that higher-ranked bound, it would make the call's future fail the compiler's
/// `Send` check wherever it is spawned.
pub(crate) struct InTransaction<'a, T, E> {
    name: &'static str,
    body: Body<'a, T, E>,
}

type Body<'a, T, E> = Box<
    dyn for<'c> FnOnce(&'c mut Transaction<'a, Postgres>) -> BoxFuture<'c, Result<T, E>>
        + Send
        + 'a,
>;

impl<'a, T, E> Operation<T, E> for InTransaction<'a, T, E>
where
    T: Serialize + DeserializeOwned,
    E: From<Error>,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn transactional(&self) -> bool {
        true
    }

    fn check(&self, engine: &Inner) -> Result<(), Error> {
        if IN_OPERATION.try_with(|_| ()).is_ok() {
            return Err(Error::Config(ConfigError::NestedTransaction));
        }
        match engine.store.postgres() {
            Some(_) => Ok(()),
            None => Err(Error::Config(ConfigError::NotTransactional)),
        }
    }

    fn execute<P: ErrorPolicy<E>>(
        self,
        engine: &Arc<Inner>,
        req: &Request,
        held: HeldClaim,
    ) -> impl Future<Output = Answer<T, E>> {
        run::<T, E, P>(engine, req, held, self.body)
    }
}

/// Runs `op` in a transaction under `held`, and completes the claim in it.
async fn run<'a, T, E, P>(
    engine: &Arc<Inner>,
    req: &Request,
    held: HeldClaim,
    op: Body<'a, T, E>,
) -> Answer<T, E>
where
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    P: ErrorPolicy<E>,
{
    let Some(pg) = engine.store.postgres() else {
        // Checked before the call was resolved; a store whose answer changed is a setting
        // refused all the same.
        held.release().await;
        observe::outcome(&req.span, OUTCOME_INVALID);
        return Err(Error::Config(ConfigError::NotTransactional).into());
    };
    // Dropped half-way (a panic, a cancelled caller), the transaction queues its rollback
    // and its connection goes back to the pool, which sends the rollback before it hands
    // the connection out again, and closes it if it is broken; a closed connection's
    // transaction is rolled back by the server. The claim is renewed while the call
    // waits for a transaction: with as many running as the store allows, or every
    // connection of the pool taken, the wait may be long.
    let begun = held
        .renewing(async {
            // The wait for a permit is the store's own queue, not a round trip: not timed.
            let permit = pg.transaction_permit().await?;
            let begin = timed(
                &req.labels,
                StoreOp::Begin,
                pg.begin(held.token(), held.lease()),
            );
            Ok::<_, StoreError>((permit, begin.await?))
        })
        .await;
    let (_permit, mut tx): (_, Transaction<'a, Postgres>) = match begun {
        Ok(begun) => begun,
        Err(e) => {
            engine.count(&req.labels, Event::StoreError(StoreOp::Begin));
            held.release().await;
            observe::outcome(&req.span, OUTCOME_STORE_ERROR);
            return Err(Error::Store(e).into());
        }
    };
    engine.count(&req.labels, Event::Executed);
    let body = IN_OPERATION.scope((), AssertUnwindSafe(op(&mut tx)).catch_unwind());
    let ran = held.renewing(body).await;
    req.end_body();
    // The body ran. Its outcome is `executed` unless its transaction was rolled back
    // under it at the commit: then nothing of it took effect, and the span says why. It
    // is recorded as the call is answered (see `engine::Unfinished`).
    match ran {
        Err(panic) => {
            drop(tx);
            held.release().await;
            resume_unwind(panic)
        }
        Ok(Err(err)) => {
            // An operation that committed its transaction itself, then failed, must not
            // have its key released: its writes may be there.
            let verified = engine.counted(
                &req.labels,
                StoreOp::Verify,
                pg.still_ours(&mut tx, held.token()),
            );
            match verified.await {
                Ok(false) => {
                    drop(tx);
                    let ended = ended_by_operation(req, held).await;
                    observe::answered(&req.span, Outcome::Executed);
                    return Err(ended.into());
                }
                Ok(true) => {}
                // Unknown: rolled back as if open (the rollback of a transaction already
                // ended does nothing), and the key released.
                Err(_) => {}
            }
            // Rolled back before the key is given up: a retry that takes it over then
            // meets none of this transaction's locks.
            // Failed, the connection goes back to the pool, which rolls it back or
            // closes it.
            let _ = engine
                .counted(
                    &req.labels,
                    StoreOp::Rollback,
                    bounded(pg.statement_timeout(), rollback(tx)),
                )
                .await;
            finish_error(req, held, P::encode(&err, engine.codec)).await;
            observe::answered(&req.span, Outcome::Executed);
            debug!(scope = req.key.scope(), key = %req.key.digest(), outcome = Outcome::Executed.as_str(), ok = false, "idempotent call in a transaction");
            Err(err)
        }
        Ok(Ok(value)) => {
            let completion = engine.value_completion(req, &value);
            let commit = pg.complete_and_commit(
                tx,
                &req.key,
                held.token(),
                &completion.result,
                completion.ttl,
                held.lease(),
            );
            let ended = timed(&req.labels, StoreOp::Commit, commit).await;
            match ended {
                Ended::Committed => {
                    observe::answered(&req.span, Outcome::Executed);
                    held.stored(completion.result, completion.marker)
                }
                Ended::Lost => {
                    // Rolled back: the key's new holder runs the operation.
                    held.lost();
                    observe::outcome(&req.span, OUTCOME_LEASE_LOST);
                    return Err(Error::LeaseLost.into());
                }
                Ended::ByOperation => {
                    let ended = ended_by_operation(req, held).await;
                    observe::answered(&req.span, Outcome::Executed);
                    return Err(ended.into());
                }
                Ended::NotCommitted(e) => {
                    // Nothing of the operation took effect; the key is free for a retry.
                    engine.count(&req.labels, Event::StoreError(StoreOp::Commit));
                    held.release().await;
                    observe::outcome(&req.span, OUTCOME_STORE_ERROR);
                    return Err(Error::Store(e).into());
                }
                Ended::CommitSent(e, xid) => {
                    // The commit's round trip failed, whatever the settling finds.
                    engine.count(&req.labels, Event::StoreError(StoreOp::Commit));
                    settle(engine, pg, req, held, completion, e, xid).await?;
                }
            }
            debug!(scope = req.key.scope(), key = %req.key.digest(), outcome = Outcome::Executed.as_str(), ok = true, "idempotent call in a transaction");
            Ok((value, Outcome::Executed))
        }
    }
}

/// After the operation returned an error, and its transaction was rolled back: stores
/// the error, `encoded` by its policy (with [`Call::store_errors`]), or releases the claim,
/// so a retry runs again. Nothing of the operation took effect, so an error that cannot be
/// stored faithfully frees the key too, rather than leaving a marker as outside a
/// transaction.
async fn finish_error(req: &Request, held: HeldClaim, encoded: Option<Result<Bytes, CodecError>>) {
    match encoded {
        Some(Ok(bytes)) => {
            held.complete(Completion {
                result: StoredResult::Err(bytes),
                ttl: req.settings.ttl,
                marker: false,
            })
            .await
        }
        Some(Err(e)) => {
            warn!(scope = req.key.scope(), key = %req.key.digest(), error = %e,
                "could not store the error faithfully; not stored, and the key freed");
            held.release().await;
        }
        None => held.release().await,
    }
}

async fn rollback(tx: Transaction<'_, Postgres>) -> Result<(), StoreError> {
    tx.rollback()
        .await
        .map_err(|e| StoreError::new("postgres: rollback", e))
}

/// After the operation committed or rolled back its transaction itself: its writes may or
/// may not be there, and its result cannot be stored with them. Running it again could
/// apply them twice, so the key gets a marker for its TTL, which retries are refused by.
async fn ended_by_operation(req: &Request, held: HeldClaim) -> Error {
    warn!(scope = req.key.scope(), key = %req.key.digest(),
        "the operation committed or rolled back its own transaction; its key is marked, and retries get Error::TransactionEnded");
    held.complete(Completion {
        result: StoredResult::Ok(Codec::transaction_ended()),
        ttl: req.settings.ttl,
        marker: true,
    })
    .await;
    Error::TransactionEnded
}

/// After the commit's answer was lost: finds out from the database whether the
/// transaction committed, and answers as it did.
async fn settle<E: From<Error>>(
    engine: &Arc<Inner>,
    pg: &PostgresStore,
    req: &Request,
    held: HeldClaim,
    completion: Completion,
    failed: StoreError,
    xid: i64,
) -> Result<(), E> {
    let settled = engine.counted(&req.labels, StoreOp::Settle, pg.settle(&req.key, xid));
    match settled.await {
        Ok(Settled::Committed) => {
            observe::answered(&req.span, Outcome::Executed);
            debug!(scope = req.key.scope(), key = %req.key.digest(), "commit answer lost; the transaction committed");
            held.stored(completion.result, completion.marker);
            Ok(())
        }
        Ok(Settled::RolledBack) => {
            // Nothing of the operation took effect; the key is free for a retry.
            held.release().await;
            observe::outcome(&req.span, OUTCOME_STORE_ERROR);
            Err(Error::Store(failed).into())
        }
        Err(e) => {
            warn!(scope = req.key.scope(), key = %req.key.digest(), error = %e,
                "could not learn whether the idempotent transaction committed; a retry will");
            held.release().await;
            // Whether the operation took effect is unknown: its own outcome word.
            observe::outcome(&req.span, OUTCOME_COMMIT_UNKNOWN);
            Err(Error::Store(StoreError::commit_unknown("postgres: commit", failed)).into())
        }
    }
}
