//! A store wrapper that fails on demand, for the failure paths of the engine.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idempotent_runtime::store::{Claim, Fence, Store};
use idempotent_runtime::{FencingToken, Fingerprint, Record, StoreError, StoreKey, StoredResult};

/// Wraps a store; while [`FaultyStore::set_down`] is on, every operation fails as an
/// unreachable server would. It can also hide the inner store's local tier, so the engine
/// takes the claim path a remote store takes.
#[derive(Debug, Clone)]
pub struct FaultyStore<S> {
    inner: S,
    down: Arc<AtomicBool>,
    claims: Arc<AtomicU64>,
    renewals: Arc<AtomicU64>,
    peek: bool,
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
            peek: true,
        }
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
        fp: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        self.check("claim")?;
        self.inner.claim(key, fp, lease).await
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        self.renewals.fetch_add(1, Ordering::SeqCst);
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
        self.check("complete")?;
        self.inner.complete(key, token, result, ttl).await
    }

    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<Fence, StoreError> {
        self.check("release")?;
        self.inner.release(key, token).await
    }

    fn peek_completed(&self, key: &StoreKey) -> Option<Record> {
        if self.peek && !self.down.load(Ordering::SeqCst) {
            self.inner.peek_completed(key)
        } else {
            None
        }
    }
}
