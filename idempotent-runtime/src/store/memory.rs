//! The in-process store: a bounded moka cache, with one entry per key.
//!
//! Each operation is one `and_compute_with` on the key's entry, which moka runs atomically
//! for that key, so concurrent claims in this process see each other. Entries leave the
//! cache one by one when their own lease or TTL runs out (moka's per-entry expiry), or
//! earlier, least recently used first, when the cache is full.
//!
//! Records are shared only by engines that share this store (clones share it); another
//! process has its own. For many processes use a shared store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::ops::compute::Op;
use moka::sync::Cache;
use moka::Expiry;

use super::{Claim, Fence, Store};
use crate::clock::{Clock, SystemClock};
use crate::error::StoreError;
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::{FencingToken, Record, RecordState, StoredResult};

/// How many keys a memory store keeps by default before evicting the least recently used.
pub const DEFAULT_CAPACITY: u64 = 100_000;

/// An in-memory [`Store`] on a bounded moka cache.
///
/// Clones share the same records.
///
/// ```
/// use idempotent_runtime::{store::MemoryStore, Idempotency};
///
/// let store = MemoryStore::builder().capacity(10_000).build();
/// let idem = Idempotency::new(store);
/// # let _ = idem;
/// ```
#[derive(Debug, Clone)]
pub struct MemoryStore {
    cache: Cache<String, Record>,
    clock: Arc<dyn Clock>,
    // With the system clock, moka's own per-entry expiry (set from that clock) already
    // hides expired records on read, and the hit path skips a second clock read. A
    // custom clock moves apart from moka's, so every read checks against it.
    check_on_read: bool,
    // Tokens must grow across every key, so one counter serves the whole store.
    last_token: Arc<AtomicU64>,
}

/// Settings for a [`MemoryStore`].
#[derive(Debug)]
pub struct MemoryStoreBuilder {
    capacity: u64,
    clock: Arc<dyn Clock>,
    custom_clock: bool,
}

impl MemoryStoreBuilder {
    /// The most keys kept at once (default
    /// [`DEFAULT_MEMORY_CAPACITY`](crate::store::DEFAULT_MEMORY_CAPACITY)); past it the least
    /// recently used are evicted, which forgets their results early.
    pub fn capacity(mut self, keys: u64) -> Self {
        self.capacity = keys;
        self
    }

    /// The clock that decides expiry (default the system clock). Tests pass a
    /// [`ManualClock`](crate::clock::ManualClock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self.custom_clock = true;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        let cache = Cache::builder()
            .max_capacity(self.capacity)
            .expire_after(RecordExpiry {
                clock: self.clock.clone(),
            })
            .build();
        MemoryStore {
            cache,
            clock: self.clock,
            check_on_read: self.custom_clock,
            last_token: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl MemoryStore {
    /// A store with the default capacity and the system clock.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Settings for a store.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            capacity: DEFAULT_CAPACITY,
            clock: Arc::new(SystemClock),
            custom_clock: false,
        }
    }

    /// How many records the cache holds, counting any not yet evicted after expiry. Call
    /// [`MemoryStore::run_pending_tasks`] first for an exact figure.
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Runs the cache's pending evictions and expirations now rather than on a later
    /// operation.
    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }

    fn next_token(&self) -> FencingToken {
        FencingToken::new(self.last_token.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Applies `f` to the key's live record (or `None`) atomically, and reports whether the
    /// token held it. `f` returns the replacement, or `None` to delete.
    fn fenced(
        &self,
        key: &StoreKey,
        token: FencingToken,
        f: impl FnOnce(Record) -> Option<Record>,
    ) -> Fence {
        let mut fence = Fence::Lost;
        let now = self.clock.now();
        self.cache
            .entry_by_ref(key.as_str())
            .and_compute_with(|entry| match entry.map(|e| e.into_value()) {
                Some(rec) if rec.is_live(now) && rec.holder() == Some(token) => {
                    fence = Fence::Held;
                    match f(rec) {
                        Some(next) => Op::Put(next),
                        None => Op::Remove,
                    }
                }
                _ => Op::Nop,
            });
        fence
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn answer(rec: Record) -> Claim {
    match rec.state {
        RecordState::InProgress { .. } => Claim::InProgress(rec),
        RecordState::Completed { .. } => Claim::Completed(rec),
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let now = self.clock.now();
        // Most claims find a live record; a read avoids the write lock of a compute.
        if let Some(rec) = self.cache.get(key.as_str()) {
            if rec.is_live(now) {
                return Ok(answer(rec));
            }
        }
        let mut claim = None;
        self.cache
            .entry_by_ref(key.as_str())
            .and_compute_with(|entry| match entry.map(|e| e.into_value()) {
                Some(rec) if rec.is_live(now) => {
                    claim = Some(answer(rec));
                    Op::Nop
                }
                _ => {
                    let token = self.next_token();
                    claim = Some(Claim::Acquired(token));
                    Op::Put(Record {
                        fingerprint,
                        state: RecordState::InProgress {
                            token,
                            lease_expires_at: now.after(lease),
                        },
                    })
                }
            });
        claim.ok_or(StoreError::msg("memory store: compute did not run"))
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let now = self.clock.now();
        Ok(self.fenced(key, token, |rec| {
            Some(Record {
                state: RecordState::InProgress {
                    token,
                    lease_expires_at: now.after(lease),
                },
                ..rec
            })
        }))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        result: StoredResult,
        ttl: Duration,
    ) -> Result<Fence, StoreError> {
        let now = self.clock.now();
        Ok(self.fenced(key, token, |rec| {
            Some(Record {
                state: RecordState::Completed {
                    result,
                    expires_at: now.after(ttl),
                },
                ..rec
            })
        }))
    }

    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<Fence, StoreError> {
        Ok(self.fenced(key, token, |_| None))
    }

    fn peek_completed(&self, key: &StoreKey) -> Option<Record> {
        let rec = self.cache.get(key.as_str())?;
        let completed = matches!(rec.state, RecordState::Completed { .. });
        let live = !self.check_on_read || rec.is_live(self.clock.now());
        (completed && live).then_some(rec)
    }
}

/// Tells moka to drop each entry when its own lease or TTL ends.
struct RecordExpiry {
    clock: Arc<dyn Clock>,
}

impl RecordExpiry {
    fn remaining(&self, rec: &Record) -> Option<Duration> {
        Some(rec.ends_at().saturating_since(self.clock.now()))
    }
}

impl Expiry<String, Record> for RecordExpiry {
    fn expire_after_create(&self, _key: &String, rec: &Record, _at: Instant) -> Option<Duration> {
        self.remaining(rec)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        rec: &Record,
        _at: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.remaining(rec)
    }
}
