//! A store wrapper that fails, or stops halfway, on demand, for the failure paths of the
//! engine.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

use async_trait::async_trait;
use idempotent_runtime::clock::Timestamp;
use idempotent_runtime::store::{Claim, Fence, Inspected, PostgresStore, Store, ValueCopy};
use idempotent_runtime::{
    FencingToken, Fingerprint, Record, RecordState, StoreError, StoreKey, StoredResult,
};

/// Wraps a store; while [`FaultyStore::set_down`] is on, every operation fails as an
/// unreachable server would. It can also hide the inner store's local tier, so the engine
/// takes the claim path a remote store takes.
#[derive(Debug, Clone)]
pub struct FaultyStore<S> {
    inner: S,
    down: Arc<AtomicBool>,
    claims: Arc<AtomicU64>,
    renewals: Arc<AtomicU64>,
    renewal_leases: Arc<Mutex<Vec<Duration>>>,
    completions: Arc<AtomicU64>,
    completions_fail: Arc<AtomicBool>,
    holds: Arc<Mutex<Vec<Hold>>>,
    peek: bool,
    misanswer: Arc<AtomicBool>,
}

/// Which operation a [`FaultyStore::hold`] stops, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A claim, after the inner store applied it: as if its answer were still on the way.
    ClaimAnswer,
    /// A completion, before it reaches the inner store.
    Completion,
    /// A completion, after the inner store applied it: its answer is lost on the way and
    /// the caller sees an error.
    CompletionAnswerLost,
    /// A renewal, before it reaches the inner store.
    Renewal,
}

#[derive(Debug)]
struct Hold {
    at: Stop,
    entered: Option<oneshot::Sender<()>>,
    open: Arc<Notify>,
}

/// One stopped operation: [`Held::entered`] resolves when an operation reaches the stop,
/// and [`Held::open`] lets it go on.
#[derive(Debug)]
pub struct Held {
    entered: oneshot::Receiver<()>,
    open: Arc<Notify>,
}

impl Held {
    /// Waits until an operation has reached the stop.
    pub async fn entered(&mut self) {
        (&mut self.entered)
            .await
            .expect("the store was dropped before the stop was reached");
    }

    /// Lets the stopped operation go on (if its caller is still there to poll it).
    pub fn open(&self) {
        self.open.notify_one();
    }
}

#[derive(Debug)]
struct Unreachable;

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("injected fault: store unreachable")
    }
}

impl std::error::Error for Unreachable {}

impl<S: Store + Clone> FaultyStore<S> {
    /// Wraps `inner`, up, with its local tier visible.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            down: Arc::new(AtomicBool::new(false)),
            claims: Arc::new(AtomicU64::new(0)),
            renewals: Arc::new(AtomicU64::new(0)),
            renewal_leases: Arc::default(),
            completions: Arc::new(AtomicU64::new(0)),
            completions_fail: Arc::new(AtomicBool::new(false)),
            holds: Arc::new(Mutex::new(Vec::new())),
            peek: true,
            misanswer: Arc::new(AtomicBool::new(false)),
        }
    }

    /// While on, claims and local looks answer as a broken store would: a record said to
    /// be completed, whose state is in progress.
    pub fn set_misanswer(&self, on: bool) {
        self.misanswer.store(on, Ordering::SeqCst);
    }

    fn misanswered(&self, fingerprint: Option<Fingerprint>) -> Option<Record> {
        self.misanswer.load(Ordering::SeqCst).then(|| Record {
            fingerprint,
            state: RecordState::InProgress {
                token: FencingToken::mint(),
                lease_expires_at: Timestamp::from_millis(u64::MAX / 2),
            },
        })
    }

    /// Stops the next operation of the kind `at` names at that point, until the returned
    /// handle opens it.
    pub fn hold(&self, at: Stop) -> Held {
        let (tx, entered) = oneshot::channel();
        let open = Arc::new(Notify::new());
        self.holds.lock().expect("holds").push(Hold {
            at,
            entered: Some(tx),
            open: open.clone(),
        });
        Held { entered, open }
    }

    /// Waits at `at` if a hold is set there (taking it).
    async fn stop(&self, at: Stop) {
        let hold = {
            let mut holds = self.holds.lock().expect("holds");
            let i = holds.iter().position(|h| h.at == at);
            i.map(|i| holds.remove(i))
        };
        if let Some(mut hold) = hold {
            if let Some(tx) = hold.entered.take() {
                let _ = tx.send(());
            }
            hold.open.notified().await;
        }
    }

    /// How many completions reached the store (failed ones included).
    pub fn completions(&self) -> u64 {
        self.completions.load(Ordering::SeqCst)
    }

    /// Hides the inner store's `peek_completed`, as a store without a local tier.
    pub fn without_peek(mut self) -> Self {
        self.peek = false;
        self
    }

    /// Takes the store down (every operation fails) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// How many claims reached the store.
    pub fn claims(&self) -> u64 {
        self.claims.load(Ordering::SeqCst)
    }

    /// How many renewals reached the store.
    pub fn renewals(&self) -> u64 {
        self.renewals.load(Ordering::SeqCst)
    }

    /// While on, completions fail as an unreachable server's would, and every other
    /// operation answers: a store that keeps a claim but cannot take its result.
    pub fn set_completions_failing(&self, on: bool) {
        self.completions_fail.store(on, Ordering::SeqCst);
    }

    /// The lease each renewal that reached the store asked for, in order.
    pub fn renewal_leases(&self) -> Vec<Duration> {
        self.renewal_leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn check(&self, op: &'static str) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::new(op, Unreachable))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl<S: Store + Clone> Store for FaultyStore<S> {
    async fn claim(
        &self,
        key: &StoreKey,
        token: FencingToken,
        fp: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        self.check("claim")?;
        if let Some(rec) = self.misanswered(fp) {
            return Ok(Claim::Completed(rec));
        }
        let claim = self.inner.claim(key, token, fp, lease).await;
        self.stop(Stop::ClaimAnswer).await;
        claim
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        self.renewals.fetch_add(1, Ordering::SeqCst);
        self.renewal_leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(lease);
        self.stop(Stop::Renewal).await;
        self.check("renew")?;
        self.inner.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        result: StoredResult,
        ttl: Duration,
    ) -> Result<Fence, StoreError> {
        self.completions.fetch_add(1, Ordering::SeqCst);
        self.stop(Stop::Completion).await;
        self.check("complete")?;
        if self.completions_fail.load(Ordering::SeqCst) {
            return Err(StoreError::new("complete", Unreachable));
        }
        let fence = self.inner.complete(key, token, result, ttl).await?;
        let lost = {
            let mut holds = self.holds.lock().expect("holds");
            let i = holds
                .iter()
                .position(|h| h.at == Stop::CompletionAnswerLost);
            i.map(|i| holds.remove(i))
        };
        if let Some(mut hold) = lost {
            if let Some(tx) = hold.entered.take() {
                let _ = tx.send(());
            }
            return Err(StoreError::new("complete", Unreachable));
        }
        Ok(fence)
    }

    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<Fence, StoreError> {
        self.check("release")?;
        self.inner.release(key, token).await
    }

    async fn inspect(&self, key: &StoreKey) -> Result<Option<Inspected>, StoreError> {
        self.check("inspect")?;
        self.inner.inspect(key).await
    }

    async fn forget(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.check("forget")?;
        self.inner.forget(key).await
    }

    fn peek_completed(&self, key: &StoreKey) -> Option<Record> {
        if !self.peek {
            return None;
        }
        if let Some(rec) = self.misanswered(None) {
            return Some(rec);
        }
        if self.peek && !self.down.load(Ordering::SeqCst) {
            self.inner.peek_completed(key)
        } else {
            None
        }
    }

    // The inner store's copies of values answer as its records do: not while it is down,
    // nor with its local tier hidden.
    fn peek_completed_copy(&self, key: &StoreKey) -> Option<(Record, Option<ValueCopy>)> {
        if !self.peek {
            return None;
        }
        if let Some(rec) = self.misanswered(None) {
            return Some((rec, None));
        }
        if self.down.load(Ordering::SeqCst) {
            return None;
        }
        self.inner.peek_completed_copy(key)
    }

    fn keep_copy(&self, key: &StoreKey, token: FencingToken, copy: ValueCopy) {
        self.inner.keep_copy(key, token, copy)
    }

    fn evicted(&self) -> u64 {
        self.inner.evicted()
    }

    // The transactions run on the inner store's pool, past the faults: a test of a
    // transactional call takes down the claim's renewals, not the operation's database.
    fn postgres(&self) -> Option<&PostgresStore> {
        self.inner.postgres()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}
