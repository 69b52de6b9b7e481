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
    /// Store operations that failed (claims, renewals, completions, releases).
    pub store_errors: u64,
    /// Executions whose claim had been taken over before they could complete, so their
    /// result was not stored.
    pub lease_lost: u64,
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
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            executed: get(&self.executed),
            replayed: get(&self.replayed),
            coalesced: get(&self.coalesced),
            rejected: get(&self.rejected),
            mismatched: get(&self.mismatched),
            store_errors: get(&self.store_errors),
            lease_lost: get(&self.lease_lost),
        }
    }
}
