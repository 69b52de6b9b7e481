//! The storage contract, and the stores that implement it.
//!
//! A store only stores: it answers each of the operations below atomically for one key and
//! decides nothing else. The protocol built on them (check, claim, run, renew, complete,
//! release, wait) lives once, in the engine, so every store behaves the same.
//!
//! Expiry is decided by the store against its own clock: a claim whose lease has run out,
//! and a result whose TTL has run out, count as absent in every operation.
//!
//! Two more operations are for people rather than for the protocol:
//! [`inspect`](Store::inspect) shows what a key holds, and [`forget`](Store::forget) deletes
//! it (a support engineer undoing a stuck payment); the engine's
//! [`Idempotency::record`](crate::Idempotency::record) and
//! [`Idempotency::forget`](crate::Idempotency::forget) call them.
//!
//! Every store must pass the conformance suite in the workspace's `tests` crate
//! (`idempotent_tests::store_conformance!`).

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
mod redis_acks;
#[cfg(feature = "redis")]
mod redis_connection;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use self::memory::{
    MemoryStore, MemoryStoreBuilder, DEFAULT_CAPACITY as DEFAULT_MEMORY_CAPACITY,
};
#[cfg(feature = "postgres")]
pub(crate) use self::postgres::{Ended, Settled};
#[cfg(feature = "postgres")]
pub use self::postgres::{
    PostgresStore, DEFAULT_STATEMENT_TIMEOUT as DEFAULT_POSTGRES_STATEMENT_TIMEOUT,
    DEFAULT_TABLE as DEFAULT_POSTGRES_TABLE,
};
#[cfg(feature = "redis")]
pub use self::redis::{RedisStore, DEFAULT_PREFIX as DEFAULT_REDIS_PREFIX};
#[cfg(feature = "redis")]
pub use self::redis_acks::TooFewReplicas;
#[cfg(feature = "redis")]
pub use self::redis_connection::RedisConnection;
pub use crate::copy::ValueCopy;
use crate::error::StoreError;
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::{FencingToken, Record, StoredResult};

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key was free (never used, released, expired, or its holder's lease ran out) and
    /// now belongs to the caller, who must complete or release it with the token it
    /// claimed with.
    Acquired,
    /// Another caller holds the key within its lease. The record shows its fingerprint.
    InProgress(Record),
    /// The key has a stored result within its TTL.
    Completed(Record),
}

/// Whether an operation that needs the claim was done by its current holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Fence {
    /// The token held the claim, and the operation took effect.
    Held,
    /// The token no longer holds the claim (its lease ran out, another caller took the key
    /// over, or it was released); nothing changed.
    Lost,
}

/// What [`Store::inspect`] found under a key: its live record, and how long it has left.
///
/// The time left comes from the store's own clock (Redis's `PTTL`, PostgreSQL's `now()`),
/// because the record's timestamps were written by whichever process's clock made them and
/// a reader's clock may disagree with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    /// The record: a claim in progress or a completed result.
    pub record: Record,
    /// How long until the claim's lease, or the result's TTL, runs out and the key is new.
    pub time_left: Duration,
}

/// Storage for idempotency records.
///
/// Implementations must make each method atomic for its key, across every process that
/// shares the store.
///
/// The engine mints every claim's [`FencingToken`] before it asks the store, so tokens are
/// unique whatever the store, and a claim whose answer never arrived (its caller was
/// cancelled during the round trip) can still be released by the token it was sent with.
#[async_trait]
pub trait Store: fmt::Debug + Send + Sync + 'static {
    /// Claims `key` for a caller with `token`, in one atomic step:
    /// - no live record: write an in-progress record with `token`, `fingerprint`, and a
    ///   lease of `lease`; answer [`Claim::Acquired`];
    /// - a claim within its lease: change nothing; answer [`Claim::InProgress`];
    /// - a result within its TTL: change nothing; answer [`Claim::Completed`].
    ///
    /// A store that cannot take another claim (a full in-process store) fails with a
    /// [`StoreError`] of kind [`Full`](crate::StoreErrorKind::Full) rather than
    /// answer [`Claim::Acquired`] without keeping the claim.
    async fn claim(
        &self,
        key: &StoreKey,
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, StoreError>;

    /// Extends the lease of `token`'s claim to `lease` from now, if `token` still holds a
    /// live claim on `key`.
    async fn renew(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fence, StoreError>;

    /// Replaces `token`'s live claim with the completed `result`, kept for `ttl`. The
    /// record keeps the fingerprint it was claimed with, and `token`.
    ///
    /// Idempotent: when the key already holds a result completed by `token` (an earlier
    /// completion whose answer was lost), answer [`Fence::Held`] and change nothing.
    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        result: StoredResult,
        ttl: Duration,
    ) -> Result<Fence, StoreError>;

    /// Deletes `token`'s claim, so the key is free at once (after an error that is not
    /// stored, a panic or a cancellation).
    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<Fence, StoreError>;

    /// The live record of `key` (a claim within its lease, or a result within its TTL),
    /// and the time it has left; `None` when there is none. Reads the shared record itself,
    /// never a copy in this process that may be older.
    async fn inspect(&self, key: &StoreKey) -> Result<Option<Inspected>, StoreError>;

    /// Deletes whatever `key` holds, whoever holds it, so the next claim acquires it; `true`
    /// when there was a live record. Anything the store keeps of the key in this process
    /// (a local tier, a value copy) goes too.
    ///
    /// Forgetting a claim in progress fences its holder as a lapsed lease does: its
    /// renewal, completion and release are [`Fence::Lost`], so its result is never written
    /// over a key that was forgotten or claimed again since.
    async fn forget(&self, key: &StoreKey) -> Result<bool, StoreError>;

    /// A completed record the store can hand over without I/O (one held in this process's
    /// memory), or `None`. The engine asks this first on every call, so a hit on a local
    /// tier costs no allocation of a future and no round trip. Stores without such a tier
    /// keep the default.
    fn peek_completed(&self, key: &StoreKey) -> Option<Record> {
        let _ = key;
        None
    }

    /// [`peek_completed`](Store::peek_completed), with the copy of its value kept by
    /// [`keep_copy`](Store::keep_copy), if any. The engine asks this one (a single lookup
    /// for both); stores that keep copies override both, others keep the default.
    fn peek_completed_copy(&self, key: &StoreKey) -> Option<(Record, Option<ValueCopy>)> {
        self.peek_completed(key).map(|record| (record, None))
    }

    /// Keeps `copy`, a value decoded from the result `token` completed on `key`, beside
    /// that result in this process, for [`peek_completed_copy`](Store::peek_completed_copy)
    /// to hand over until the result leaves. Only when the key still holds that very
    /// result (a result completed by another token is another value) and no copy yet (so
    /// callers of two types on one key do not replace each other's on every hit).
    /// Stores without a local tier keep the default, which keeps nothing.
    fn keep_copy(&self, key: &StoreKey, token: FencingToken, copy: ValueCopy) {
        let _ = (key, token, copy);
    }

    /// How many records this store dropped before their lease or TTL ended to make room
    /// (a bounded in-process store at capacity), since it was built. Each such eviction
    /// can let a retry run again. Stores that never evict keep the default, 0.
    fn evicted(&self) -> u64 {
        0
    }

    /// What kind of store this is, for the `store` field of the `idempotent.call` span
    /// and the `store` label of metrics: `"memory"`, `"redis"` or `"postgres"` for this
    /// crate's stores. Other stores keep the default, `"custom"`, or name themselves with
    /// a short constant (one value per kind of store, not per instance); wrappers forward
    /// their inner store's.
    fn kind(&self) -> &'static str {
        "custom"
    }

    /// The [`PostgresStore`] this store keeps its records in, whose transactions
    /// [`Call::run_in_transaction`](crate::Call::run_in_transaction) runs operations in:
    /// itself, for a `PostgresStore`, or the one a wrapper forwards to. Other stores keep
    /// the default, `None`, and refuse transactional calls. The claims of transactional
    /// calls go to the returned store directly (they are made for its transactions), so
    /// a wrapper does not see them.
    #[cfg(feature = "postgres")]
    fn postgres(&self) -> Option<&PostgresStore> {
        None
    }
}

#[async_trait]
impl<S: Store + ?Sized> Store for Arc<S> {
    async fn claim(
        &self,
        key: &StoreKey,
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        (**self).claim(key, token, fingerprint, lease).await
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        (**self).renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        result: StoredResult,
        ttl: Duration,
    ) -> Result<Fence, StoreError> {
        (**self).complete(key, token, result, ttl).await
    }

    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<Fence, StoreError> {
        (**self).release(key, token).await
    }

    async fn inspect(&self, key: &StoreKey) -> Result<Option<Inspected>, StoreError> {
        (**self).inspect(key).await
    }

    async fn forget(&self, key: &StoreKey) -> Result<bool, StoreError> {
        (**self).forget(key).await
    }

    fn peek_completed(&self, key: &StoreKey) -> Option<Record> {
        (**self).peek_completed(key)
    }

    fn peek_completed_copy(&self, key: &StoreKey) -> Option<(Record, Option<ValueCopy>)> {
        (**self).peek_completed_copy(key)
    }

    fn keep_copy(&self, key: &StoreKey, token: FencingToken, copy: ValueCopy) {
        (**self).keep_copy(key, token, copy)
    }

    fn evicted(&self) -> u64 {
        (**self).evicted()
    }

    fn kind(&self) -> &'static str {
        (**self).kind()
    }

    #[cfg(feature = "postgres")]
    fn postgres(&self) -> Option<&PostgresStore> {
        (**self).postgres()
    }
}
