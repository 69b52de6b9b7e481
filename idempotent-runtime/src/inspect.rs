//! Looking at one key, and forgetting it: for people (support staff undoing a stuck
//! payment, an operator checking what a retry will get), not for the protocol.
//!
//! Both address a key exactly as a call does: `scope` and `key` are joined into the same
//! store key that `idem.call(key).scope(scope)`, or `#[idempotent(scope = "..", key = ..)]`,
//! makes.

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tracing::{debug, info};

use crate::call::CallKey;
use crate::codec::Codec;
use crate::engine::Idempotency;
use crate::error::{CodecError, CodecErrorKind, Error};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::observe::StoreOp;
use crate::record::{FencingToken, RecordState, StoredResult};
use crate::store::Inspected;

/// What a key holds, as [`Idempotency::record`] found it in the store.
///
/// A snapshot: by the time it is read, the claim may have completed or lapsed, and the
/// result may have expired.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyRecord {
    /// A claim in progress, or a stored result.
    pub state: KeyState,
    /// The fingerprint the key was claimed with, if its call gave one: a retry with
    /// another payload is refused with [`Error::Mismatch`].
    pub fingerprint: Option<Fingerprint>,
    /// The token of the claim that holds the key, or of the one that completed it: tells
    /// one execution from another when the key is looked at twice.
    pub token: FencingToken,
    // To decode the result as a replay would, and name the scope in its errors.
    codec: Codec,
    scope: String,
}

/// Where a key stands: see [`KeyRecord::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyState {
    /// A caller holds the key and runs the operation (or its process died, and the claim
    /// lapses when its lease runs out); duplicates wait for it or are refused.
    InProgress {
        /// How long until the claim lapses unless its holder renews it (a live holder
        /// renews it every third of its lease).
        lease_left: Duration,
    },
    /// The operation finished; retries get this result until its TTL runs out.
    Completed {
        /// The encoded result; [`KeyRecord::value`] and [`KeyRecord::error`] decode it.
        result: StoredResult,
        /// How long until the result expires and the key is new.
        ttl_left: Duration,
    },
}

impl KeyRecord {
    fn new(inspected: Inspected, codec: Codec, scope: &str) -> Self {
        let Inspected { record, time_left } = inspected;
        let token = record.token();
        let state = match record.state {
            RecordState::InProgress { .. } => KeyState::InProgress {
                lease_left: time_left,
            },
            RecordState::Completed { result, .. } => KeyState::Completed {
                result,
                ttl_left: time_left,
            },
        };
        Self {
            state,
            fingerprint: record.fingerprint,
            token,
            codec,
            scope: scope.to_owned(),
        }
    }

    /// How long until the key is new again, unless something changes it: the lease left
    /// of a claim in progress, the TTL left of a result.
    pub fn time_left(&self) -> Duration {
        match &self.state {
            KeyState::InProgress { lease_left } => *lease_left,
            KeyState::Completed { ttl_left, .. } => *ttl_left,
        }
    }

    /// The lease left, for a claim in progress; `None` for a result.
    pub fn lease_left(&self) -> Option<Duration> {
        match &self.state {
            KeyState::InProgress { lease_left } => Some(*lease_left),
            KeyState::Completed { .. } => None,
        }
    }

    /// Whether the operation has finished and its result is stored.
    pub fn is_completed(&self) -> bool {
        matches!(self.state, KeyState::Completed { .. })
    }

    /// The stored value, decoded as a replay would decode it: `Some` for an `Ok` result,
    /// `None` for a claim in progress or a stored error. Fails as a replay would on a
    /// record it cannot decode into `T` (another type, another codec, a marker of a value
    /// that could not be stored).
    pub fn value<T: DeserializeOwned>(&self) -> Result<Option<T>, Error> {
        match &self.state {
            KeyState::Completed {
                result: StoredResult::Ok(bytes),
                ..
            } => self.decode(bytes).map(Some),
            _ => Ok(None),
        }
    }

    /// The stored error, decoded as a replay of a call that stores errors would decode
    /// it: `Some` for a stored `Err`, `None` otherwise.
    pub fn error<E: DeserializeOwned>(&self) -> Result<Option<E>, Error> {
        match &self.state {
            KeyState::Completed {
                result: StoredResult::Err(bytes),
                ..
            } => self.decode(bytes).map(Some),
            _ => Ok(None),
        }
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, Error> {
        self.codec
            .decode(bytes)
            .map_err(|e: CodecError| match e.kind() {
                CodecErrorKind::TransactionEnded => Error::TransactionEnded,
                _ => Error::Codec(e.in_scope(&self.scope)),
            })
    }
}

impl Idempotency {
    /// What `key` holds in `scope`: a claim in progress and its lease left, or a stored
    /// result and its TTL left; `None` when the key is new (never used, released, forgotten
    /// or expired). Reads the store itself, never a copy kept in this process.
    ///
    /// `scope` is the one the calls of the key use: [`Call::scope`](crate::Call::scope)'s,
    /// or the attribute's `scope = ".."` (give functions whose keys you will look at an
    /// explicit scope; the default one is a type name).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_runtime::Error> {
    /// use idempotent_runtime::{Error, Idempotency, KeyState};
    ///
    /// let idem = Idempotency::memory();
    /// let charge = || async { Ok::<_, Error>(1250u64) };
    /// idem.call("order-7").scope("payments").run(charge).await?;
    ///
    /// let rec = idem.record("payments", "order-7").await?.expect("stored");
    /// assert!(matches!(rec.state, KeyState::Completed { .. }));
    /// assert_eq!(rec.value::<u64>()?, Some(1250));
    /// assert!(idem.record("payments", "order-8").await?.is_none());
    /// # Ok(()) }
    /// ```
    pub async fn record<K: fmt::Display>(
        &self,
        scope: &str,
        key: K,
    ) -> Result<Option<KeyRecord>, Error> {
        let key = self.store_key(scope, key)?;
        let inspected = self
            .inner
            .round_trip(StoreOp::Inspect, self.inner.store.inspect(&key))
            .await?;
        debug!(scope = key.scope(), key = %key.digest(), found = inspected.is_some(), "idempotency key inspected");
        Ok(inspected.map(|i| KeyRecord::new(i, self.inner.codec, key.scope())))
    }

    /// Deletes what `key` holds in `scope`, so the next call with it runs the operation
    /// again; `true` when the store held a live claim or result. For undoing by hand what
    /// the protocol will not: a result that must not be replayed, a claim stuck behind a
    /// holder that hangs.
    ///
    /// Forgetting a key that is in progress does not stop its operation, which runs on to
    /// its end; but its claim is gone, so its result is not stored (the store fences its
    /// completion as it fences a holder whose lease ran out: counted in
    /// [`Stats::lease_lost`](crate::Stats::lease_lost) and logged at warn), and its caller
    /// still gets its value (one run in a PostgreSQL transaction, by
    /// [`Call::run_in_transaction`](crate::Call::run_in_transaction), is rolled back
    /// instead and gets [`Error::LeaseLost`]). The next call runs the operation again,
    /// maybe while the first still runs. Callers in this process waiting for the forgotten
    /// holder start over at once rather than wait for it: one of them claims the key and
    /// runs.
    ///
    /// A [`RedisStore::with_local_cache`](crate::store::RedisStore::with_local_cache) tier
    /// is cleared only in this engine's store (and its clones): the tier of another
    /// process, or of a `RedisStore` this process connected apart, replays a forgotten
    /// result until it leaves that tier (at most its TTL). Every call that starts after
    /// `forget` returns, through this engine or any engine without such a tier of its own,
    /// finds the key new.
    ///
    /// An error leaves it unknown whether the store deleted the key (a timeout after it
    /// did, or, with [`RedisStore::with_replica_acks`](crate::store::RedisStore::with_replica_acks),
    /// too few replicas acknowledged it): forgetting again is safe.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_runtime::Error> {
    /// use idempotent_runtime::{Idempotency, Outcome};
    ///
    /// let idem = Idempotency::memory();
    /// let refund = || async { Ok::<_, idempotent_runtime::Error>("rf_1".to_owned()) };
    /// idem.call("refund-1").scope("refunds").run(refund).await?;
    ///
    /// assert!(idem.forget("refunds", "refund-1").await?);
    /// let (_, how) = idem.call("refund-1").scope("refunds").run_with_outcome(refund).await?;
    /// assert_eq!(how, Outcome::Executed); // ran again
    /// assert!(!idem.forget("refunds", "never-used").await?);
    /// # Ok(()) }
    /// ```
    pub async fn forget<K: fmt::Display>(&self, scope: &str, key: K) -> Result<bool, Error> {
        let key = self.store_key(scope, key)?;
        let existed = self
            .inner
            .round_trip(StoreOp::Forget, self.inner.store.forget(&key))
            .await?;
        // After the store: a follower that starts over now claims a key that is free.
        let detached = self.inner.flights.detach(&key);
        // At info, not debug: an operator's deliberate deletion, which lets the operation run
        // again, is worth an audit trail (scope and digest only, as every log of the crate).
        info!(scope = key.scope(), key = %key.digest(), existed, detached, "idempotency key forgotten");
        Ok(existed)
    }

    /// The store key a call of `key` in `scope` uses: made by the same function as a
    /// call's, so that both address one record.
    ///
    /// Also where a runtime without timers is refused: the Redis and PostgreSQL clients
    /// bound their round trips with tokio's timers, and panic without them.
    fn store_key<K: fmt::Display>(&self, scope: &str, key: K) -> Result<StoreKey, Error> {
        let key = key.into_store_key(scope, self.inner.defaults.max_key_len)?;
        crate::timers::required()?;
        Ok(key)
    }
}
