//! What the engine tells the outside about each call: the `idempotent.call` span, and,
//! with the feature `metrics`, the counters and histograms named in [`crate::metrics`].
//!
//! Without the feature, the metric half is made of empty types and empty functions the
//! compiler removes: the hot path reads no clock and touches no recorder. The engine's
//! code calls the same functions either way, so it needs no `cfg` of its own.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;

use futures_util::FutureExt as _;
use tracing::field::Empty;
use tracing::span::Entered;
use tracing::Span;

use crate::engine::{Inner, Outcome};
use crate::error::StoreError;
use crate::key::StoreKey;
use crate::stats::bump;

/// Something the engine counts: in [`Stats`](crate::Stats), and as a metric.
// Without the feature `metrics`, a store error's operation is read by nothing.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    Executed,
    Replayed,
    Coalesced,
    Rejected,
    Mismatched,
    StoreError(StoreOp),
    LeaseLost,
    Unstored,
}

/// A store round trip, as the `operation` label names it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StoreOp {
    Claim,
    Renew,
    Complete,
    Release,
    /// A look at the completed records the store keeps in this process (no round trip:
    /// never timed, counted only when the store answers wrongly).
    Lookup,
    /// [`Idempotency::record`](crate::Idempotency::record).
    Inspect,
    /// [`Idempotency::forget`](crate::Idempotency::forget).
    Forget,
    /// The steps of a transactional call: its transaction's start, the check that the
    /// operation left it open, its rollback after an error, its commit (which completes
    /// the claim too), and the look that settles a commit whose answer was lost.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Begin,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Verify,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Rollback,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Commit,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Settle,
}

impl StoreOp {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn as_str(self) -> &'static str {
        match self {
            StoreOp::Claim => "claim",
            StoreOp::Renew => "renew",
            StoreOp::Complete => "complete",
            StoreOp::Release => "release",
            StoreOp::Lookup => "lookup",
            StoreOp::Inspect => "inspect",
            StoreOp::Forget => "forget",
            StoreOp::Begin => "begin",
            StoreOp::Verify => "verify",
            StoreOp::Rollback => "rollback",
            StoreOp::Commit => "commit",
            StoreOp::Settle => "settle",
        }
    }
}

/// What a duplicate waited on, as the `via` label names it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Via {
    /// A call of this process with the same key (coalescing).
    InProcess,
    /// A claim in the store that another process (or engine) holds.
    Store,
}

// These three are read by `crate::metrics` and by the layers of optional features.
/// The `scope` label of calls of the engine's API made without one.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) const CALL_LABEL: &str = "call";
/// The `scope` label of the tower layer's and the actix-web middleware's calls, whose
/// scopes come from request paths and tenants.
#[cfg_attr(not(any(feature = "tower", feature = "actix")), allow(dead_code))]
pub(crate) const HTTP_LABEL: &str = "http";
/// The `scope` label of the gRPC layer's calls.
#[cfg_attr(not(feature = "grpc"), allow(dead_code))]
pub(crate) const GRPC_LABEL: &str = "grpc";

/// The metric scope a call was given: the attribute's scope, or
/// [`Call::metrics_scope`](crate::Call::metrics_scope)'s. Empty without the feature.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScopeLabel {
    #[cfg(feature = "metrics")]
    scope: Option<Cow<'static, str>>,
}

impl ScopeLabel {
    /// `scope`, which code chose (a `&'static str`, or a function's path).
    #[inline(always)]
    pub(crate) fn new(scope: Cow<'static, str>) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = scope;
        Self {
            #[cfg(feature = "metrics")]
            scope: Some(scope),
        }
    }
}

/// The labels one call's metrics carry. Empty without the feature.
#[derive(Debug, Clone)]
pub(crate) struct Labels {
    #[cfg(feature = "metrics")]
    scope: Cow<'static, str>,
    #[cfg(feature = "metrics")]
    store: &'static str,
}

impl Labels {
    /// The labels of a call given `scope` on an engine over a store of `store` kind.
    #[inline(always)]
    pub(crate) fn new(scope: ScopeLabel, store: &'static str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = (scope, store);
        Self {
            #[cfg(feature = "metrics")]
            scope: scope.scope.unwrap_or(Cow::Borrowed(CALL_LABEL)),
            #[cfg(feature = "metrics")]
            store,
        }
    }
}

impl Inner {
    /// Counts `event` in the engine's stats and, with the feature, as a metric.
    #[inline(always)]
    pub(crate) fn count(&self, labels: &Labels, event: Event) {
        let s = &self.stats;
        bump(match event {
            Event::Executed => &s.executed,
            Event::Replayed => &s.replayed,
            Event::Coalesced => &s.coalesced,
            Event::Rejected => &s.rejected,
            Event::Mismatched => &s.mismatched,
            Event::StoreError(_) => &s.store_errors,
            Event::LeaseLost => &s.lease_lost,
            Event::Unstored => &s.unstored,
        });
        #[cfg(feature = "metrics")]
        record(labels, event);
        #[cfg(not(feature = "metrics"))]
        let _ = labels;
    }
}

impl Inner {
    /// `round_trip`, a store operation `op`: [`timed`], and counted as a store error of
    /// `op` if it fails.
    ///
    /// A combinator rather than an `async fn`: the round trip's future is not moved into
    /// another state machine.
    pub(crate) fn counted<'a, T>(
        &'a self,
        labels: &'a Labels,
        op: StoreOp,
        round_trip: impl Future<Output = Result<T, StoreError>> + 'a,
    ) -> impl Future<Output = Result<T, StoreError>> + 'a {
        timed(labels, op, round_trip).inspect(move |answer| {
            if answer.is_err() {
                self.count(labels, Event::StoreError(op));
            }
        })
    }

    /// [`Inner::counted`], for an operation of the engine's own API outside any call
    /// (inspecting or forgetting a key): with the scope label of calls made without one.
    pub(crate) async fn round_trip<T>(
        &self,
        op: StoreOp,
        round_trip: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let labels = Labels::new(ScopeLabel::default(), self.store_kind);
        self.counted(&labels, op, round_trip).await
    }
}

#[cfg(feature = "metrics")]
fn record(labels: &Labels, event: Event) {
    use crate::metrics::*;
    let name = match event {
        Event::Executed => EXECUTIONS,
        Event::Replayed => REPLAYS,
        Event::Coalesced => COALESCED,
        Event::Rejected => REJECTIONS,
        Event::Mismatched => MISMATCHES,
        Event::StoreError(op) => {
            ::metrics::counter!(STORE_ERRORS,
                SCOPE_LABEL => labels.scope.clone(),
                STORE_LABEL => labels.store,
                OPERATION_LABEL => op.as_str())
            .increment(1);
            return;
        }
        Event::LeaseLost => LEASES_LOST,
        Event::Unstored => UNSTORED,
    };
    ::metrics::counter!(name, SCOPE_LABEL => labels.scope.clone(), STORE_LABEL => labels.store)
        .increment(1);
}

/// Counts a result a store evicted before its TTL (the memory store's eviction listener).
#[inline(always)]
pub(crate) fn evicted_before_ttl(store: &'static str) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(crate::metrics::EVICTIONS_BEFORE_TTL, crate::metrics::STORE_LABEL => store)
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = store;
}

/// `round_trip`, a store operation, timed into [`STORE_SECONDS`](crate::metrics::STORE_SECONDS);
/// without the feature, `round_trip` itself.
#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn timed<F: Future>(_: &Labels, _: StoreOp, round_trip: F) -> F {
    round_trip
}

/// `round_trip`, a store operation, timed into [`STORE_SECONDS`](crate::metrics::STORE_SECONDS);
/// without the feature, `round_trip` itself.
///
/// A round trip dropped before it ends (its caller cancelled, a renewal in flight when
/// the operation returned) is recorded too, with the time it had run: left out, the
/// slowest round trips, the ones most often cut short, would be the ones missing.
#[cfg(feature = "metrics")]
pub(crate) async fn timed<F: Future>(labels: &Labels, op: StoreOp, round_trip: F) -> F::Output {
    let _timing = Timing {
        store: labels.store,
        op,
        // Wall time, not tokio's clock: a test that pauses time still sees real round
        // trips.
        started: std::time::Instant::now(),
    };
    round_trip.await
}

/// One round trip's time, recorded when it is dropped, however the round trip ended.
#[cfg(feature = "metrics")]
struct Timing {
    store: &'static str,
    op: StoreOp,
    started: std::time::Instant,
}

#[cfg(feature = "metrics")]
impl Drop for Timing {
    fn drop(&mut self) {
        // The scope is left out: a round trip does not depend on it, and every label
        // multiplies a histogram's buckets.
        ::metrics::histogram!(crate::metrics::STORE_SECONDS,
            crate::metrics::STORE_LABEL => self.store,
            crate::metrics::OPERATION_LABEL => self.op.as_str())
        .record(self.started.elapsed());
    }
}

/// A duplicate's wait for the call in flight with its key, recorded into
/// [`WAIT_SECONDS`](crate::metrics::WAIT_SECONDS) when it stops or is dropped (a caller
/// that gave up waited too). Empty without the feature.
pub(crate) struct Waiting<'a> {
    #[cfg(feature = "metrics")]
    labels: &'a Labels,
    #[cfg(feature = "metrics")]
    via: Via,
    #[cfg(feature = "metrics")]
    since: Option<std::time::Instant>,
    #[cfg(not(feature = "metrics"))]
    _labels: std::marker::PhantomData<&'a Labels>,
}

impl<'a> Waiting<'a> {
    /// A wait on `via` not started yet.
    #[inline(always)]
    pub(crate) fn new(labels: &'a Labels, via: Via) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = (labels, via);
        Self {
            #[cfg(feature = "metrics")]
            labels,
            #[cfg(feature = "metrics")]
            via,
            #[cfg(feature = "metrics")]
            since: None,
            #[cfg(not(feature = "metrics"))]
            _labels: std::marker::PhantomData,
        }
    }

    /// Starts the wait, unless it runs already.
    #[inline(always)]
    pub(crate) fn start(&mut self) {
        #[cfg(feature = "metrics")]
        if self.since.is_none() {
            self.since = Some(std::time::Instant::now());
        }
    }

    /// Ends the wait, recording it if it ran.
    #[inline(always)]
    pub(crate) fn stop(&mut self) {
        #[cfg(feature = "metrics")]
        if let Some(since) = self.since.take() {
            let via = match self.via {
                Via::InProcess => crate::metrics::VIA_IN_PROCESS,
                Via::Store => crate::metrics::VIA_STORE,
            };
            ::metrics::histogram!(crate::metrics::WAIT_SECONDS,
                crate::metrics::SCOPE_LABEL => self.labels.scope.clone(),
                crate::metrics::STORE_LABEL => self.labels.store,
                crate::metrics::VIA_LABEL => via)
            .record(since.elapsed());
        }
    }
}

#[cfg(feature = "metrics")]
impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The span of one call, `idempotent.call`, at INFO: the body's own spans nest under it.
/// Its fields are the scope, a digest of the store key (never the key), the store's kind
/// and, once known, the outcome.
///
/// No span at all while no `tracing` subscriber takes INFO: with `tracing`'s `log`
/// feature on (a dependency turns it on), a disabled span would still be written to the
/// `log` crate, a line per call at INFO for a process that logs through `log` alone, and
/// each hit would pay for the checks of that on creating, entering, recording and
/// dropping it (about a tenth of a hit).
///
/// `None` then, rather than `Span::none()`: a `Span::none()` is still entered, recorded on
/// and dropped through calls into `tracing`, out of line (each also looks for a `log`
/// logger), about 100 instructions of a hit's 3,200 under callgrind; `None` is a compare.
#[derive(Clone)]
pub(crate) struct CallSpan(Option<Span>);

impl CallSpan {
    /// No span: for a call answered where no subscriber takes INFO.
    pub(crate) const NONE: CallSpan = CallSpan(None);

    /// The span of a call on `key`, if a subscriber takes INFO.
    #[inline(always)]
    pub(crate) fn new(key: &StoreKey, store: &'static str) -> Self {
        if !tracing::level_enabled!(tracing::Level::INFO) {
            return Self(None);
        }
        Self(Some(call_span(key, store)))
    }

    /// Enters the span, if there is one, until the guard is dropped.
    #[inline(always)]
    pub(crate) fn enter(&self) -> Option<Entered<'_>> {
        self.0.as_ref().map(Span::enter)
    }

    /// The span to run the rest of the call in: a handle to the same span, or
    /// `Span::none()`.
    pub(crate) fn span(&self) -> Span {
        self.0.clone().unwrap_or_else(Span::none)
    }
}

/// Made only where a subscriber takes INFO, and kept out of line: the hit path without
/// one carries none of it.
#[inline(never)]
fn call_span(key: &StoreKey, store: &'static str) -> Span {
    tracing::info_span!(
        "idempotent.call",
        scope = key.scope(),
        key_digest = %DigestOf(key),
        store,
        outcome = Empty,
    )
}

/// Writes a key's digest, hashing the key only when it is written. `tracing` builds a
/// span's field values even for a disabled span when its `log` feature is on (some
/// dependency turns it on) and no subscriber is set, to hand them to the `log` crate; a
/// digest computed there, a SHA-256 of the key, would cost each hit more than the rest of
/// the span.
struct DigestOf<'a>(&'a StoreKey);

impl fmt::Display for DigestOf<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.digest(), f)
    }
}

/// The span of a call refused before it had a key (an invalid key or setting).
#[cold]
pub(crate) fn invalid_call_span(store: &'static str) -> Span {
    if !tracing::level_enabled!(tracing::Level::INFO) {
        return Span::none();
    }
    tracing::info_span!(
        "idempotent.call",
        scope = Empty,
        key_digest = Empty,
        store,
        outcome = OUTCOME_INVALID,
    )
}

/// The `outcome` of a call whose key or settings were refused.
pub(crate) const OUTCOME_INVALID: &str = "invalid";
/// The `outcome` of a duplicate refused with `Error::InProgress`.
pub(crate) const OUTCOME_REJECTED: &str = "rejected";
/// The `outcome` of a call refused with `Error::Mismatch`.
pub(crate) const OUTCOME_MISMATCH: &str = "mismatch";
/// The `outcome` of a call whose stored result it could not decode (another type or
/// codec, or the marker of a result that was never stored).
pub(crate) const OUTCOME_UNDECODABLE: &str = "undecodable";
/// The `outcome` of a call the store failed before anything took effect.
pub(crate) const OUTCOME_STORE_ERROR: &str = "store_error";
/// The `outcome` of a call run in a transaction whose claim was taken over before it
/// committed: rolled back, nothing of it took effect.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) const OUTCOME_LEASE_LOST: &str = "lease_lost";
/// The `outcome` of a call run in a transaction whose commit's answer was lost and
/// could not be settled: whether it took effect is unknown.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) const OUTCOME_COMMIT_UNKNOWN: &str = "commit_unknown";
/// The `outcome` of a call dropped before it was answered (its caller cancelled, or
/// timed out around it).
pub(crate) const OUTCOME_CANCELLED: &str = "cancelled";

/// Records the call's outcome on its span, if it has one.
#[inline(always)]
pub(crate) fn outcome(span: &CallSpan, outcome: &'static str) {
    if let Some(span) = &span.0 {
        span.record("outcome", outcome);
    }
}

/// Records a value's outcome on the call's span, if it has one.
#[inline(always)]
pub(crate) fn answered(span: &CallSpan, how: Outcome) {
    outcome(span, how.as_str());
}
