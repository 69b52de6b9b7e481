//! Counters of what the engine did, for metrics and tests.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of an engine's counters since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Operations run (whatever they returned).
    pub executed: u64,
    /// Calls answered with a stored result.
    pub replayed: u64,
    /// Calls answered with the result of a concurrent call in this process.
    pub coalesced: u64,
    /// Duplicates refused with [`Error::InProgress`](crate::Error::InProgress).
    pub rejected: u64,
    /// Calls refused with [`Error::Mismatch`](crate::Error::Mismatch).
    pub mismatched: u64,
    /// Store operations that failed, whatever the operation: the engine's own (claims,
    /// renewals, completions, releases, those in the background included), inspecting and
    /// forgetting keys, the steps of a call in a transaction, and records the store
    /// answered in a state it should not have. The feature `metrics` counts them by
    /// operation (see [`metrics`](crate::metrics)).
    pub store_errors: u64,
    /// Executions whose claim had been taken over before they could complete, so their
    /// result was not stored.
    pub lease_lost: u64,
    /// Executions whose result was not stored although their claim was not taken over:
    /// the store stayed unreachable until the claim could have lapsed (completion is
    /// retried until then), or the value (or the error, for a call that stores errors)
    /// cannot be stored faithfully (a marker is stored instead, so retries get
    /// [`CodecErrorKind::Unstorable`](crate::CodecErrorKind::Unstorable); counted once the
    /// marker is stored, or its completion given up). Each is also logged at warn with
    /// its scope and key digest.
    pub unstored: u64,
    /// Records the store dropped before their lease or TTL ended, to make room (the memory
    /// store at capacity); each can let a retry run again. Read from the store, so engines
    /// sharing one see the same figure.
    pub evicted: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) executed: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) mismatched: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) lease_lost: AtomicU64,
    pub(crate) unstored: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// The counters, with `evicted` as the store reports it.
    pub(crate) fn snapshot(&self, evicted: u64) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            executed: get(&self.executed),
            replayed: get(&self.replayed),
            coalesced: get(&self.coalesced),
            rejected: get(&self.rejected),
            mismatched: get(&self.mismatched),
            store_errors: get(&self.store_errors),
            lease_lost: get(&self.lease_lost),
            unstored: get(&self.unstored),
            evicted,
        }
    }
}
