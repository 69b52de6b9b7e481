//! The in-process store: claims in progress in a concurrent map that never evicts, and
//! completed results in a bounded moka cache.
//!
//! The two are apart because a cache at capacity drops entries, and a dropped claim is a
//! second execution while the first still runs. Claims are bounded too: at capacity a new
//! claim is refused with [`StoreErrorKind::Full`](crate::StoreErrorKind::Full), never
//! granted and then forgotten. Results leave least recently used first (moka's LRU
//! policy: its default admission filter would refuse fresh results outright), each such
//! eviction before its TTL counted and logged, or one by one when their own TTL runs out
//! (moka's per-entry expiry).
//!
//! A completion puts its result in the cache before it removes its claim, both under the
//! lock of the claim's map entry; a claim re-reads the cache under that same lock before it
//! takes a vacant key, so it never misses a result completed a moment before.
//!
//! Records are shared only by engines that share this store (clones share it); another
//! process has its own. For many processes use a shared store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Buf, Bytes};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use moka::Expiry;
use tracing::warn;

use super::{Claim, Fence, Inspected, Store, ValueCopy};
use crate::clock::{Clock, SystemClock, Timestamp};
use crate::error::StoreError;
use crate::fingerprint::Fingerprint;
use crate::hasher::KeyHasher;
use crate::key::{KeyDigest, StoreKey, SCOPE_SEPARATOR};
use crate::record::{FencingToken, Record, RecordState, StoredResult};

/// How many results (and, apart, how many claims in progress) a memory store keeps by
/// default.
pub const DEFAULT_CAPACITY: u64 = 100_000;

/// The least time between two sweeps of lapsed claims from a full store.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// An in-memory [`Store`]: claims in a map that never evicts them, results in a bounded
/// moka cache.
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
    results: Cache<String, Kept, KeyHasher>,
    claims: Arc<DashMap<String, Held, KeyHasher>>,
    // Entries in `claims`, live or lapsed; kept beside the map because a map's length
    // cannot be read under one of its entry locks.
    claim_count: Arc<AtomicU64>,
    capacity: u64,
    evicted: Arc<AtomicU64>,
    // When claims were last swept for lapsed ones (the store's clock, milliseconds): a
    // sweep locks the whole map, so a full store sweeps at most once per interval, not
    // on every refused claim.
    last_sweep: Arc<AtomicU64>,
    clock: Arc<dyn Clock>,
    // With the system clock, moka's own per-entry expiry (set from that clock) already
    // hides expired results on read, and the hit path skips a second clock read. A custom
    // clock moves apart from moka's, so every read checks against it.
    check_on_read: bool,
}

/// A completed result, and the copy of its value the first hit made, if any. The
/// `Record` it answers with, in fewer bytes: one is kept for every result.
///
/// A fingerprint is kept in the result's own buffer, its 32 bytes ahead of the encoded
/// result, not in a field of its own: an `Option<Fingerprint>` field made every record 32
/// bytes larger (96 rather than 64), with a fingerprint or not, and a boxed one would cost
/// a key with a fingerprint an allocation of its own. In the buffer, a key without one
/// pays nothing and a key with one pays its 32 bytes in an allocation it has anyway.
#[derive(Debug, Clone)]
struct Kept {
    /// The fingerprint's bytes (when `has_fingerprint`), then the encoded result.
    buffer: Bytes,
    token: FencingToken,
    expires_at: Timestamp,
    copy: Option<ValueCopy>,
    /// [`IS_ERR`] and [`HAS_FINGERPRINT`]: one byte rather than two `bool`s, so that a
    /// record read from moka is copied in aligned words.
    flags: u8,
}

/// The result is an `Err`.
const IS_ERR: u8 = 1;
/// The buffer begins with the fingerprint.
const HAS_FINGERPRINT: u8 = 2;

/// How many bytes a fingerprint takes at the front of a [`Kept`]'s buffer.
const FINGERPRINT_LEN: usize = 32;

impl Kept {
    fn new(
        fingerprint: Option<Fingerprint>,
        token: FencingToken,
        result: StoredResult,
        expires_at: Timestamp,
    ) -> Self {
        let (result, is_err) = match result {
            StoredResult::Ok(bytes) => (bytes, false),
            StoredResult::Err(bytes) => (bytes, true),
        };
        let buffer = match &fingerprint {
            None => result,
            // One copy of the result, into a buffer sized exactly (nothing to shrink later).
            Some(fingerprint) => {
                let mut joined = Vec::with_capacity(FINGERPRINT_LEN + result.len());
                joined.extend_from_slice(fingerprint.as_bytes());
                joined.extend_from_slice(&result);
                Bytes::from(joined)
            }
        };
        Kept {
            buffer,
            token,
            expires_at,
            copy: None,
            flags: if is_err { IS_ERR } else { 0 }
                | if fingerprint.is_some() {
                    HAS_FINGERPRINT
                } else {
                    0
                },
        }
    }

    fn record(self) -> (Record, Option<ValueCopy>) {
        let Kept {
            buffer: mut result,
            token,
            expires_at,
            copy,
            flags,
        } = self;
        let fingerprint = if flags & HAS_FINGERPRINT != 0 {
            // The buffer begins with the fingerprint whenever the flag is set (`new`).
            let fingerprint = result
                .first_chunk::<FINGERPRINT_LEN>()
                .map(|bytes| Fingerprint::from_bytes(*bytes));
            // Moves the start past it, in place: no reference count touched.
            result.advance(FINGERPRINT_LEN.min(result.len()));
            fingerprint
        } else {
            None
        };
        let result = if flags & IS_ERR != 0 {
            StoredResult::Err(result)
        } else {
            StoredResult::Ok(result)
        };
        let record = Record {
            fingerprint,
            state: RecordState::Completed {
                token,
                result,
                expires_at,
            },
        };
        (record, copy)
    }

    fn is_live(&self, now: Timestamp) -> bool {
        now < self.expires_at
    }
}

/// A claim in progress.
#[derive(Debug, Clone, Copy)]
struct Held {
    token: FencingToken,
    fingerprint: Option<Fingerprint>,
    lease_expires_at: Timestamp,
}

impl Held {
    fn record(&self) -> Record {
        Record {
            fingerprint: self.fingerprint,
            state: RecordState::InProgress {
                token: self.token,
                lease_expires_at: self.lease_expires_at,
            },
        }
    }

    fn held_by(&self, token: FencingToken, now: Timestamp) -> bool {
        self.token == token && now < self.lease_expires_at
    }
}

/// Settings for a [`MemoryStore`].
#[derive(Debug)]
pub struct MemoryStoreBuilder {
    capacity: u64,
    clock: Arc<dyn Clock>,
    custom_clock: bool,
}

impl MemoryStoreBuilder {
    /// The most results kept at once, and apart the most claims in progress (default
    /// [`DEFAULT_MEMORY_CAPACITY`](crate::store::DEFAULT_MEMORY_CAPACITY)). Past it the
    /// least recently used results are evicted, which forgets them early (counted in
    /// [`Stats::evicted`](crate::Stats::evicted) and logged at warn); claims are never
    /// evicted, and a new one past capacity fails with
    /// [`StoreErrorKind::Full`](crate::StoreErrorKind::Full).
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
        let evicted = Arc::new(AtomicU64::new(0));
        let (counter, clock) = (evicted.clone(), self.clock.clone());
        let results = Cache::builder()
            .max_capacity(self.capacity)
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(move |key: Arc<String>, kept: Kept, cause| {
                // Only a result dropped within its TTL (by the store's clock) is lost early.
                if cause == RemovalCause::Size && kept.is_live(clock.now()) {
                    counter.fetch_add(1, Ordering::Relaxed);
                    crate::observe::evicted_before_ttl("memory");
                    let scope = key.split(SCOPE_SEPARATOR).next().unwrap_or_default();
                    warn!(scope, key = %KeyDigest::of_joined(&key),
                        "memory store full: a result was evicted before its TTL; a retry of its key runs again");
                }
            });
        // moka counts an entry's time to live on its own clock. That is the system's, so
        // with the system clock it drops each result when its TTL ends; a custom clock
        // moves apart from it, and then only reads decide (a result past its TTL by the
        // custom clock is absent, one within it stays until capacity evicts it).
        let results = if self.custom_clock {
            results.build_with_hasher(KeyHasher::default())
        } else {
            results
                .expire_after(RecordExpiry {
                    clock: self.clock.clone(),
                })
                .build_with_hasher(KeyHasher::default())
        };
        MemoryStore {
            results,
            claims: Arc::new(DashMap::with_hasher(KeyHasher::default())),
            claim_count: Arc::new(AtomicU64::new(0)),
            capacity: self.capacity,
            evicted,
            last_sweep: Arc::new(AtomicU64::new(0)),
            clock: self.clock,
            check_on_read: self.custom_clock,
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

    /// How many records the store holds (results and claims), counting any not yet
    /// removed after expiry. Call [`MemoryStore::run_pending_tasks`] first for an exact
    /// figure of results.
    pub fn entry_count(&self) -> u64 {
        self.results.entry_count() + self.claim_count.load(Ordering::Relaxed)
    }

    /// Runs the result cache's pending evictions and expirations now rather than on a
    /// later operation.
    pub fn run_pending_tasks(&self) {
        self.results.run_pending_tasks();
    }

    /// The key's result, if it is within its TTL.
    fn live_result(&self, key: &str, now: Timestamp) -> Option<Record> {
        self.results
            .get(key)
            .filter(|kept| kept.is_live(now))
            .map(|kept| kept.record().0)
    }

    /// The key's result, if it is within its TTL, asked first with `contains_key`: a
    /// claim's lookups are mostly misses, which a `get` would count as reads.
    fn completed_result(&self, key: &str, now: Timestamp) -> Option<Record> {
        if self.results.contains_key(key) {
            self.live_result(key, now)
        } else {
            None
        }
    }

    /// Takes a place for a new claim, or says the store has none left.
    fn reserve_claim(&self, now: Timestamp) -> Result<(), StoreError> {
        for attempt in 0..2 {
            if self.claim_count.fetch_add(1, Ordering::AcqRel) < self.capacity {
                return Ok(());
            }
            self.claim_count.fetch_sub(1, Ordering::AcqRel);
            if attempt == 0 {
                self.sweep_lapsed_claims(now);
            }
        }
        Err(StoreError::full(
            "memory store: as many claims in progress as its capacity",
        ))
    }

    /// Drops claims whose lease has run out (their holders stalled or vanished), unless
    /// that was done less than [`SWEEP_INTERVAL`] ago.
    fn sweep_lapsed_claims(&self, now: Timestamp) {
        let last = self.last_sweep.load(Ordering::Acquire);
        let due = Timestamp::from_millis(last).after(SWEEP_INTERVAL) <= now;
        if !due
            || self
                .last_sweep
                .compare_exchange(last, now.as_millis(), Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let mut dropped = 0;
        self.claims.retain(|_, held| {
            let live = now < held.lease_expires_at;
            dropped += u64::from(!live);
            live
        });
        self.claim_count.fetch_sub(dropped, Ordering::AcqRel);
    }

    /// Removes `token`'s live claim on `key` if `also` agrees, and says whether it did.
    fn take_claim(
        &self,
        key: &str,
        token: FencingToken,
        now: Timestamp,
        also: impl FnOnce(&Held),
    ) -> Fence {
        let removed = self.claims.remove_if(key, |_, held| {
            let mine = held.held_by(token, now);
            if mine {
                also(held);
            }
            mine
        });
        match removed {
            Some(_) => {
                self.claim_count.fetch_sub(1, Ordering::AcqRel);
                Fence::Held
            }
            None => Fence::Lost,
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(
        &self,
        key: &StoreKey,
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let now = self.clock.now();
        // A key in progress needs no place of its own, even in a full store.
        if let Some(held) = self.claims.get(key.as_str()) {
            if now < held.lease_expires_at {
                return Ok(Claim::InProgress(held.record()));
            }
        }
        // A completed key needs none either: a claim of it must not hold a place, even for
        // a moment, or a new key claimed beside it could find the store full. Asked with
        // `contains_key` (not a read for the cache's recency, and cheaper than a `get` on
        // the miss a new key makes).
        if let Some(rec) = self.completed_result(key.as_str(), now) {
            return Ok(Claim::Completed(rec));
        }
        // A free key needs a place: take it first (not under the entry's lock: a sweep of
        // lapsed claims takes every lock of the map), give it back when the key turns out
        // to be taken after all.
        self.reserve_claim(now)?;
        let (claim, new_entry) = match self.claims.entry(key.as_str().to_owned()) {
            Entry::Occupied(held) if now < held.get().lease_expires_at => {
                (Claim::InProgress(held.get().record()), false)
            }
            // Under the entry's lock: a completion that removed the claim here put its
            // result in the cache first.
            entry => match self.completed_result(key.as_str(), now) {
                Some(rec) => (Claim::Completed(rec), false),
                None => {
                    let new_entry = matches!(entry, Entry::Vacant(_));
                    entry.insert(Held {
                        token,
                        fingerprint,
                        lease_expires_at: now.after(lease),
                    });
                    (Claim::Acquired, new_entry)
                }
            },
        };
        if !new_entry {
            // The place was not needed: the key was taken, or a lapsed claim replaced.
            self.claim_count.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(claim)
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let now = self.clock.now();
        Ok(match self.claims.get_mut(key.as_str()) {
            Some(mut held) if held.held_by(token, now) => {
                held.lease_expires_at = now.after(lease);
                Fence::Held
            }
            _ => Fence::Lost,
        })
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        result: StoredResult,
        ttl: Duration,
    ) -> Result<Fence, StoreError> {
        let now = self.clock.now();
        let fence = self.take_claim(key.as_str(), token, now, |held| {
            let kept = Kept::new(held.fingerprint, token, result, now.after(ttl));
            self.results.insert(key.as_str().to_owned(), kept);
        });
        if fence == Fence::Lost {
            // Completed by this token already: the answer to an earlier completion was
            // lost on the way, and this is its retry.
            let mine = self.live_result(key.as_str(), now).map(|r| r.token()) == Some(token);
            return Ok(if mine { Fence::Held } else { Fence::Lost });
        }
        Ok(fence)
    }

    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<Fence, StoreError> {
        Ok(self.take_claim(key.as_str(), token, self.clock.now(), |_| {}))
    }

    async fn inspect(&self, key: &StoreKey) -> Result<Option<Inspected>, StoreError> {
        let now = self.clock.now();
        let live_claim = self
            .claims
            .get(key.as_str())
            .filter(|held| now < held.lease_expires_at)
            .map(|held| held.record());
        let record = live_claim.or_else(|| self.live_result(key.as_str(), now));
        Ok(record.map(|record| Inspected {
            time_left: record.ends_at().saturating_since(now),
            record,
        }))
    }

    async fn forget(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let now = self.clock.now();
        // Under the lock of the key's claim entry, which a claim, a completion and
        // `keep_copy` of the key all hold: none of them can put back, between the two
        // removals, what this one removes (a completion moves the claim into the cache
        // under that lock).
        let (claim_was_live, result_was_live) = match self.claims.entry(key.as_str().to_owned()) {
            Entry::Occupied(held) => {
                let result = self.results.remove(key.as_str());
                let held = held.remove();
                self.claim_count.fetch_sub(1, Ordering::AcqRel);
                (
                    now < held.lease_expires_at,
                    result.is_some_and(|kept| kept.is_live(now)),
                )
            }
            Entry::Vacant(_claim_lock) => {
                // The copy of the value a hit kept lives in the cache entry: it goes too.
                let result = self.results.remove(key.as_str());
                (false, result.is_some_and(|kept| kept.is_live(now)))
            }
        };
        Ok(claim_was_live || result_was_live)
    }

    fn peek_completed(&self, key: &StoreKey) -> Option<Record> {
        self.peek_completed_copy(key).map(|(record, _)| record)
    }

    fn peek_completed_copy(&self, key: &StoreKey) -> Option<(Record, Option<ValueCopy>)> {
        let kept = self.results.get(key.as_str())?;
        let live = !self.check_on_read || kept.is_live(self.clock.now());
        live.then(|| kept.record())
    }

    fn keep_copy(&self, key: &StoreKey, token: FencingToken, copy: ValueCopy) {
        let now = self.clock.now();
        // Under the lock of the key's claim entry, which a claim and a completion of the
        // key both hold: moka's compute does not hold off a plain insert, so without it a
        // completion landing between the compute's read and its write (the key expired,
        // claimed and run again meanwhile) would be written over by the old result and
        // its copy, and a retry would run the key a third time. A key claimed again
        // keeps no copy.
        let Entry::Vacant(_claim_lock) = self.claims.entry(key.as_str().to_owned()) else {
            return;
        };
        // The result is still the one `token` completed (not expired, evicted, or
        // replaced by a later completion of the key) and has no copy.
        self.results
            .entry_by_ref(key.as_str())
            .and_compute_with(|entry| match entry {
                Some(entry)
                    if entry.value().copy.is_none()
                        && entry.value().token == token
                        && entry.value().is_live(now) =>
                {
                    Op::Put(Kept {
                        copy: Some(copy),
                        ..entry.value().clone()
                    })
                }
                _ => Op::Nop,
            });
    }

    fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

/// Tells moka to drop each result when its own TTL ends.
struct RecordExpiry {
    clock: Arc<dyn Clock>,
}

impl RecordExpiry {
    fn remaining(&self, kept: &Kept) -> Option<Duration> {
        Some(kept.expires_at.saturating_since(self.clock.now()))
    }
}

impl Expiry<String, Kept> for RecordExpiry {
    fn expire_after_create(&self, _key: &String, kept: &Kept, _at: Instant) -> Option<Duration> {
        self.remaining(kept)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        kept: &Kept,
        _at: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.remaining(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::Copier;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint::from_bytes([n; 32])
    }

    /// Every combination of fingerprint, outcome and result length (the empty result too)
    /// comes back from a kept record as it went in.
    #[test]
    fn a_kept_record_round_trips() {
        let token = FencingToken::new(7);
        let expires_at = Timestamp::from_millis(1_234);
        for fingerprint in [None, Some(fp(0)), Some(fp(0xab))] {
            for body in [&b""[..], b"1", b"{\"id\":\"pay_1\",\"amount\":100}"] {
                for is_err in [false, true] {
                    let bytes = Bytes::copy_from_slice(body);
                    let result = if is_err {
                        StoredResult::Err(bytes)
                    } else {
                        StoredResult::Ok(bytes)
                    };
                    let kept = Kept::new(fingerprint, token, result.clone(), expires_at);
                    let expected = Record {
                        fingerprint,
                        state: RecordState::Completed {
                            token,
                            result,
                            expires_at,
                        },
                    };
                    let (record, copy) = kept.clone().record();
                    assert_eq!(record, expected);
                    assert!(copy.is_none());
                    // And again, from the same kept record (a read hands out clones).
                    assert_eq!(kept.record().0, expected);
                }
            }
        }
    }

    /// The record kept for every result: a fingerprint field would make it 96 bytes.
    #[test]
    fn a_kept_record_is_64_bytes() {
        assert_eq!(size_of::<Kept>(), 64);
    }

    /// Through the store: a result completed under a fingerprint reads back whole, before
    /// and after a hit keeps a copy beside it, and the copy is the one kept.
    #[tokio::test]
    async fn a_fingerprinted_result_reads_back_whole_with_its_copy() {
        let store = MemoryStore::new();
        let key = StoreKey::new("s", "k", 256).unwrap();
        let token = FencingToken::new(3);
        let claimed = store
            .claim(&key, token, Some(fp(9)), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(matches!(claimed, Claim::Acquired));
        let result = StoredResult::Err(Bytes::from_static(b"\"declined\""));
        let fence = store
            .complete(&key, token, result.clone(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(fence, Fence::Held);
        let check = |record: &Record| {
            assert_eq!(record.fingerprint, Some(fp(9)));
            assert_eq!(record.token(), token);
            match &record.state {
                RecordState::Completed { result: got, .. } => assert_eq!(got, &result),
                other => panic!("not completed: {other:?}"),
            }
        };
        check(&store.peek_completed(&key).unwrap());
        let copier = Copier::<String>::new();
        store.keep_copy(&key, token, copier.make(&"declined".to_owned()));
        let (record, copy) = store.peek_completed_copy(&key).unwrap();
        check(&record);
        assert_eq!(copier.take(&copy.unwrap()).as_deref(), Some("declined"));
        match store
            .claim(&key, FencingToken::new(4), None, Duration::from_secs(60))
            .await
            .unwrap()
        {
            Claim::Completed(record) => check(&record),
            other => panic!("not completed: {other:?}"),
        }
        check(&store.inspect(&key).await.unwrap().unwrap().record);
    }
}
