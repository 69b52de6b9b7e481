//! A claim the engine holds while the operation runs: renewed while the holder lives, and
//! finished on every way out, even when the caller is dropped half-way through finishing
//! it: a result the operation returned is stored (retried across a store outage), and a
//! claim given up on an error, a panic or a cancellation is released, in the background
//! if need be, so no key stays locked and no finished result is lost.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use crate::engine::Inner;
use crate::error::StoreError;
use crate::flight::{FlightGuard, Landing};
use crate::key::StoreKey;
use crate::observe::{Event, Labels, StoreOp};
use crate::record::{FencingToken, StoredResult};
use crate::store::Fence;

/// How often a lease is renewed, as a fraction of it: two renewals may fail in a row (a
/// slow or briefly unreachable store) before the lease runs out.
pub(crate) const RENEWALS_PER_LEASE: u32 = 3;

/// The first pause before a completion is tried again after the store failed; it doubles
/// up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(25);
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The longest a completion is retried while the store keeps renewing the claim but
/// refusing the completion: past it the claim is left to lapse.
const COMPLETION_PATIENCE: Duration = Duration::from_secs(60);

/// What the claim still needs if its holder is dropped now.
enum Pending {
    /// The operation runs, or failed: the claim is to be released.
    Release,
    /// The operation returned a result that is to be stored.
    Complete(Completion),
    /// Finished.
    Nothing,
}

/// A result to store, and how.
#[derive(Clone)]
pub(crate) struct Completion {
    pub(crate) result: StoredResult,
    pub(crate) ttl: Duration,
    /// A marker in place of the operation's result (a value or error that cannot be
    /// stored faithfully, a transaction the operation ended): its execution counts in
    /// `unstored` once the marker is stored, or given up, but not when the claim was
    /// taken over first, which `lease_lost` counts.
    pub(crate) marker: bool,
}

/// `op`, or a [`StoreError`] once `within` has passed: a store that stops answering (a
/// connection whose peer vanished without a reset) must not hold a renewal or a
/// completion past the lease, which would let another caller take the key over and run.
pub(crate) async fn bounded<T>(
    within: Duration,
    op: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(within, op).await.unwrap_or_else(|_| {
        Err(StoreError::msg(
            "the store did not answer in time (a part of the lease)",
        ))
    })
}

/// A claim in the store plus the local flight it leads.
pub(crate) struct HeldClaim {
    engine: Arc<Inner>,
    key: StoreKey,
    labels: Labels,
    token: FencingToken,
    lease: Duration,
    // When the store last confirmed the claim: the sending of the claim or of the last
    // renewal it held, as nanoseconds after `since` (atomic: the heartbeat writes it
    // through a shared reference while the body runs).
    since: Instant,
    confirmed: AtomicU64,
    // `None` once handed to the followers.
    flight: Option<FlightGuard>,
    pending: Pending,
}

impl HeldClaim {
    /// A claim the store granted to `token`, sent at `claimed_at`.
    pub(crate) fn new(
        engine: Arc<Inner>,
        key: StoreKey,
        labels: Labels,
        token: FencingToken,
        lease: Duration,
        claimed_at: Instant,
        flight: FlightGuard,
    ) -> Self {
        Self {
            engine,
            key,
            labels,
            token,
            lease,
            since: claimed_at,
            confirmed: AtomicU64::new(0),
            flight: Some(flight),
            pending: Pending::Release,
        }
    }

    fn confirmed_at(&self) -> Instant {
        self.since + Duration::from_nanos(self.confirmed.load(Ordering::Relaxed))
    }

    fn confirm(&self, sent: Instant) {
        let after = sent.saturating_duration_since(self.since);
        let nanos = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
        self.confirmed.fetch_max(nanos, Ordering::Relaxed);
    }

    /// Runs `body` while renewing the claim every third of its lease. A body shorter than
    /// a third of its lease costs no renewal at all.
    pub(crate) async fn renewing<F: Future>(&self, body: F) -> F::Output {
        let heartbeat = self.heartbeat();
        tokio::pin!(body, heartbeat);
        tokio::select! {
            biased;
            out = &mut body => out,
            never = &mut heartbeat => match never {},
        }
    }

    /// Renews every third of the lease. A renewal may take half of that at most, and one
    /// that fails is tried again after a quarter of it, so a store that fails once (one
    /// connection gone silent, a reconnect) still gets two more tries before the lease
    /// runs out.
    async fn heartbeat(&self) -> Infallible {
        let every = self.lease / RENEWALS_PER_LEASE;
        // Counted from the store's last confirmation (a claim renewed because its answer
        // came late was confirmed after it was sent), not from the body's start.
        let mut wait = every.saturating_sub(self.confirmed_at().elapsed());
        loop {
            tokio::time::sleep(wait).await;
            if let Some(flight) = &self.flight {
                flight.flight().beat();
            }
            let sent = Instant::now();
            let renewal = self.engine.store.renew(&self.key, self.token, self.lease);
            wait = every / 4;
            let renewal =
                self.engine
                    .counted(&self.labels, StoreOp::Renew, bounded(every / 2, renewal));
            match renewal.await {
                Ok(Fence::Held) => {
                    self.confirm(sent);
                    // From when it was sent, where the lease it confirmed starts: an answer
                    // that came late must not push the next renewal later, or a store slow
                    // to answer leaves less of the lease ahead at every round.
                    wait = every.saturating_sub(sent.elapsed());
                }
                Ok(Fence::Lost) => {
                    // Another caller took the key over; renewing cannot win it back, and
                    // completing will be refused. The body runs on to its end.
                    warn!(scope = self.key.scope(), key = %self.key.digest(), token = self.token.get(),
                        "idempotency claim lost while running; its result will not be stored");
                    break;
                }
                Err(err) => {
                    warn!(scope = self.key.scope(), key = %self.key.digest(), error = %err,
                        "could not renew idempotency claim; retrying");
                }
            }
        }
        std::future::pending().await
    }

    /// Stores `result` for `ttl` and hands it to the local followers.
    ///
    /// If the store fails, the followers in this process get the result at once and the
    /// completion is retried in the background, renewing the claim as it goes, until it
    /// is stored, the claim is provably lost, or the claim has gone a whole lease without
    /// the store confirming it (then it may lapse: counted in `unstored`, logged at warn).
    /// If this future is dropped before the store answers, the same happens: once the
    /// operation has returned, its result is stored whether or not its caller waits.
    pub(crate) async fn complete(mut self, completion: Completion) {
        let result = completion.result.clone();
        let (ttl, marker) = (completion.ttl, completion.marker);
        self.pending = Pending::Complete(completion);
        let attempt = self
            .engine
            .store
            .complete(&self.key, self.token, result.clone(), ttl);
        let within = self.lease / RENEWALS_PER_LEASE;
        let answer = self
            .engine
            .counted(&self.labels, StoreOp::Complete, bounded(within, attempt))
            .await;
        match answer {
            Ok(Fence::Held) => self.stored(result, marker),
            Ok(Fence::Lost) => self.lost(),
            Err(err) => {
                warn!(scope = self.key.scope(), key = %self.key.digest(), error = %err,
                    "could not store idempotency result; retrying in the background");
                // `Drop` retries the completion on a task of its own and lands the
                // result for the followers.
            }
        }
    }

    /// The landing that shares `result` with the followers, with the flight's fingerprint.
    fn result_landing(&self, result: StoredResult) -> Landing {
        Landing::Result {
            result,
            fingerprint: self.flight.as_ref().and_then(|f| f.flight().fingerprint()),
        }
    }

    /// The store keeps `result` now (a completion answered, or a transaction that
    /// completed the claim committed): counts it if it is a `marker`
    /// ([`Completion::marker`]), and hands it to the local followers.
    pub(crate) fn stored(mut self, result: StoredResult, marker: bool) {
        self.pending = Pending::Nothing;
        if marker {
            self.engine.count(&self.labels, Event::Unstored);
        }
        let landing = self.result_landing(result);
        if let Some(flight) = self.flight.take() {
            flight.land(landing);
        }
    }

    /// The completion found the claim taken over: counts it, and sends the local
    /// followers to the key's new holder, whose result is the key's.
    pub(crate) fn lost(mut self) {
        self.pending = Pending::Nothing;
        lost_before_completion(&self.engine, &self.labels, &self.key, self.token);
        if let Some(flight) = self.flight.take() {
            flight.land(Landing::Retry);
        }
    }

    /// The claim's token.
    #[cfg(feature = "postgres")]
    pub(crate) fn token(&self) -> FencingToken {
        self.token
    }

    /// The claim's lease.
    #[cfg(feature = "postgres")]
    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    /// Gives the claim up now, then wakes the followers to start over. Dropped before the
    /// store answers, it releases in the background.
    pub(crate) async fn release(mut self) {
        release(&self.engine, &self.labels, &self.key, self.token).await;
        self.pending = Pending::Nothing;
    }
}

/// Counts and logs a completion refused because another caller holds the key now.
fn lost_before_completion(engine: &Inner, labels: &Labels, key: &StoreKey, token: FencingToken) {
    engine.count(labels, Event::LeaseLost);
    warn!(scope = key.scope(), key = %key.digest(), token = token.get(),
        "idempotency claim was taken over before completion; result not stored");
}

async fn release(engine: &Inner, labels: &Labels, key: &StoreKey, token: FencingToken) {
    let released = engine
        .counted(labels, StoreOp::Release, engine.store.release(key, token))
        .await;
    match released {
        Ok(_) => debug!(scope = key.scope(), key = %key.digest(), "idempotency claim released"),
        Err(err) => {
            warn!(scope = key.scope(), key = %key.digest(), error = %err,
                "could not release idempotency claim; it lapses with its lease");
        }
    }
}

/// A completion the first attempt of which failed or was cut short: tried again, with
/// backoff, while the claim may still be ours.
struct Retry {
    engine: Arc<Inner>,
    key: StoreKey,
    labels: Labels,
    token: FencingToken,
    completion: Completion,
    lease: Duration,
    confirmed_at: Instant,
}

impl Retry {
    async fn run(mut self) {
        let started = Instant::now();
        let mut pause = FIRST_RETRY_PAUSE;
        let within = self.lease / RENEWALS_PER_LEASE;
        let Completion {
            result,
            ttl,
            marker,
        } = self.completion.clone();
        loop {
            let store = &self.engine.store;
            let attempt = store.complete(&self.key, self.token, result.clone(), ttl);
            let attempt =
                self.engine
                    .counted(&self.labels, StoreOp::Complete, bounded(within, attempt));
            match attempt.await {
                Ok(Fence::Held) => {
                    if marker {
                        self.engine.count(&self.labels, Event::Unstored);
                    }
                    debug!(scope = self.key.scope(), key = %self.key.digest(),
                        "idempotency result stored after a retry");
                    return;
                }
                Ok(Fence::Lost) => {
                    lost_before_completion(&self.engine, &self.labels, &self.key, self.token);
                    return;
                }
                Err(_) => {}
            }
            // A store that answers renewals but fails completions keeps the claim ours;
            // a renewal it refuses proves nothing (the failed completion may have landed,
            // and the next completion says which).
            let sent = Instant::now();
            let renewal = store.renew(&self.key, self.token, self.lease);
            let renewal =
                self.engine
                    .counted(&self.labels, StoreOp::Renew, bounded(within, renewal));
            if let Ok(Fence::Held) = renewal.await {
                self.confirmed_at = sent;
            }
            let deadline = (self.confirmed_at + self.lease).min(started + COMPLETION_PATIENCE);
            let now = Instant::now();
            if now >= deadline {
                self.engine.count(&self.labels, Event::Unstored);
                warn!(scope = self.key.scope(), key = %self.key.digest(),
                    "could not store idempotency result before its claim could lapse; \
                     a retry of this key may run the operation again");
                return;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    }
}

impl Drop for HeldClaim {
    /// The holder's future was dropped before the claim was finished (a cancelled
    /// request, a timeout), or the completion failed and is to be retried.
    fn drop(&mut self) {
        let flight = self.flight.take();
        match std::mem::replace(&mut self.pending, Pending::Nothing) {
            Pending::Nothing => drop(flight),
            Pending::Release => {
                // Release before waking the followers, or they would find the key still
                // claimed and wait out the lease. Without a runtime to release on, the
                // lease frees the key.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let engine = self.engine.clone();
                    let key = self.key.clone();
                    let labels = self.labels.clone();
                    let token = self.token;
                    rt.spawn(async move {
                        release(&engine, &labels, &key, token).await;
                        drop(flight);
                    });
                }
            }
            Pending::Complete(completion) => {
                // The operation returned: this process's followers share its value now,
                // and the store gets it as soon as it answers.
                if let Some(flight) = flight {
                    let fingerprint = flight.flight().fingerprint();
                    flight.land(Landing::Result {
                        result: completion.result.clone(),
                        fingerprint,
                    });
                }
                let retry = Retry {
                    engine: self.engine.clone(),
                    key: self.key.clone(),
                    labels: self.labels.clone(),
                    token: self.token,
                    completion,
                    lease: self.lease,
                    confirmed_at: self.confirmed_at(),
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(retry.run());
                    }
                    Err(_) => {
                        self.engine.count(&self.labels, Event::Unstored);
                        warn!(scope = self.key.scope(), key = %self.key.digest(),
                            "no runtime to store the idempotency result on; it is lost");
                    }
                }
            }
        }
    }
}
