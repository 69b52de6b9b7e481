//! The protocol, written once for every store: check, claim, run (renewing the claim),
//! complete or release, and wait for duplicates, in this process and across processes.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::panic::{resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{debug, Instrument as _};

use crate::call::{Call, CallKey, ErrorPolicy};
use crate::codec::Codec;
use crate::copy::Copier;
use crate::error::{CodecError, CodecErrorKind, ConfigError, Error, StoreError, StoreErrorKind};
use crate::fingerprint::Fingerprint;
use crate::flight::{Flight, FlightGuard, Flights, Following, Joined, Landing, Waited};
use crate::key::{Scope, StoreKey};
use crate::lease::{Completion, HeldClaim, RENEWALS_PER_LEASE};
use crate::observe::{
    self, invalid_call_span, timed, CallSpan, Event, Labels, ScopeLabel, StoreOp, Via, Waiting,
    OUTCOME_MISMATCH, OUTCOME_REJECTED, OUTCOME_STORE_ERROR,
};
use crate::record::{FencingToken, Record, RecordState, StoredResult};
use crate::stats::{Counters, Stats};
use crate::store::{Claim, Fence, MemoryStore, Store};

/// How long results are replayed unless set otherwise: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a claim holds without renewal unless set otherwise: 10 seconds. A live holder
/// renews it; a crashed one frees its key this long after its last renewal.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// The longest key accepted unless set otherwise, in bytes (Stripe's limit).
pub const DEFAULT_MAX_KEY_LEN: usize = 255;
/// The shortest TTL accepted: stores keep time in milliseconds.
pub const MIN_TTL: Duration = Duration::from_millis(1);
/// The longest TTL (and lease) accepted: 100 years of 365.25 days (as `humantime` counts
/// `"100years"`), which every store can hold (Redis refuses an expiry past `i64`
/// milliseconds, PostgreSQL a timestamp past the year 294276). Longer is refused, not
/// clamped: a caller who asked for more should know.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 31_557_600);
/// The shortest lease accepted. The holder renews every third of it, so a third must
/// hold a store round trip and a timer tick on a busy machine; with leases of a few
/// milliseconds, live holders lose their keys and duplicates run.
pub const MIN_LEASE: Duration = Duration::from_millis(100);
/// The longest pause between two looks at a key held in another process.
const MAX_POLL: Duration = Duration::from_millis(100);
const FIRST_POLL: Duration = Duration::from_millis(2);

/// What a duplicate does when it arrives while the first call with its key still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Concurrency {
    /// Wait for the first call and return its result (the default).
    #[default]
    Wait,
    /// Fail at once with [`Error::InProgress`] (HTTP's 409).
    Reject,
}

/// How a call got its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// This call ran the operation.
    Executed,
    /// The value was stored by an earlier call and replayed.
    Replayed,
    /// A concurrent call in this process ran the operation (or fetched the stored value),
    /// and this call shared its value.
    Coalesced,
}

impl Outcome {
    /// The outcome as the `outcome` field of the `idempotent.call` span and of the engine's
    /// events writes it: `"executed"`, `"replayed"` or `"coalesced"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Executed => "executed",
            Outcome::Replayed => "replayed",
            Outcome::Coalesced => "coalesced",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The engine: runs each operation at most once per key, replays stored results, and
/// makes duplicates wait for (or be refused by) the call in flight.
///
/// Clones share the same store, flights and counters.
#[derive(Clone)]
pub struct Idempotency {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn Store>,
    /// [`Store::kind`], read once: the `store` field of spans and label of metrics.
    pub(crate) store_kind: &'static str,
    pub(crate) codec: Codec,
    pub(crate) flights: Flights,
    pub(crate) defaults: Settings,
    pub(crate) stats: Counters,
}

/// The settings one call runs with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) concurrency: Concurrency,
    pub(crate) max_key_len: usize,
}

impl Settings {
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        let (ttl, lease) = (self.ttl, self.lease);
        if ttl < MIN_TTL {
            return Err(ConfigError::TtlTooShort {
                got: ttl,
                min: MIN_TTL,
            });
        }
        if ttl > MAX_TTL {
            return Err(ConfigError::TtlTooLong {
                got: ttl,
                max: MAX_TTL,
            });
        }
        if lease < MIN_LEASE {
            return Err(ConfigError::LeaseTooShort {
                got: lease,
                min: MIN_LEASE,
            });
        }
        if lease > MAX_TTL {
            return Err(ConfigError::LeaseTooLong {
                got: lease,
                max: MAX_TTL,
            });
        }
        if self.max_key_len == 0 {
            return Err(ConfigError::ZeroMaxKeyLen);
        }
        Ok(())
    }
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("store", &self.inner.store)
            .field("defaults", &self.inner.defaults)
            .finish_non_exhaustive()
    }
}

/// Engine-wide defaults; each call may override them.
#[derive(Debug)]
pub struct IdempotencyBuilder {
    store: Option<Arc<dyn Store>>,
    codec: Codec,
    memory_capacity: u64,
    settings: Settings,
}

impl IdempotencyBuilder {
    /// The store (default: a new [`MemoryStore`]).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The format results are stored in (default [`Codec::Json`]). Engines that share a
    /// store must use the same one.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// How long a result is replayed (default [`DEFAULT_TTL`]). After it the key is new.
    /// [`build`](Self::build) refuses one outside [`MIN_TTL`]..=[`MAX_TTL`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = ttl;
        self
    }

    /// How long a claim holds without renewal (default [`DEFAULT_LEASE`]). The holder
    /// renews it every third of it, so this bounds how long a crashed holder blocks its
    /// key, not how long an operation may run. [`build`](Self::build) refuses one outside
    /// [`MIN_LEASE`]..=[`MAX_TTL`].
    pub fn lease(mut self, lease: Duration) -> Self {
        self.settings.lease = lease;
        self
    }

    /// Wait for or reject duplicates in flight (default [`Concurrency::Wait`]).
    pub fn concurrency(mut self, concurrency: Concurrency) -> Self {
        self.settings.concurrency = concurrency;
        self
    }

    /// The longest key accepted, in bytes (default [`DEFAULT_MAX_KEY_LEN`]).
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.settings.max_key_len = bytes;
        self
    }

    /// How many keys the default memory store keeps (default
    /// [`DEFAULT_MEMORY_CAPACITY`](crate::store::DEFAULT_MEMORY_CAPACITY)); ignored when a store is set.
    pub fn memory_capacity(mut self, keys: u64) -> Self {
        self.memory_capacity = keys;
        self
    }

    /// Builds the engine, or says which setting is out of range.
    pub fn build(self) -> Result<Idempotency, Error> {
        self.settings.check()?;
        Ok(self.assemble())
    }

    /// The engine, settings already checked.
    fn assemble(self) -> Idempotency {
        let store = match self.store {
            Some(store) => store,
            None => Arc::new(
                MemoryStore::builder()
                    .capacity(self.memory_capacity)
                    .build(),
            ),
        };
        Idempotency {
            inner: Arc::new(Inner {
                store_kind: store.kind(),
                store,
                codec: self.codec,
                flights: Flights::default(),
                defaults: self.settings,
                stats: Counters::default(),
            }),
        }
    }
}

impl Idempotency {
    /// An engine over a new in-memory store, with the default settings.
    pub fn memory() -> Self {
        Self::new(MemoryStore::new())
    }

    /// An engine over `store`, with the default settings.
    pub fn new(store: impl Store) -> Self {
        // The default settings are in range; nothing to check.
        Self::builder().store(store).assemble()
    }

    /// Settings for an engine.
    pub fn builder() -> IdempotencyBuilder {
        IdempotencyBuilder {
            store: None,
            codec: Codec::Json,
            memory_capacity: crate::store::DEFAULT_MEMORY_CAPACITY,
            settings: Self::default_settings(),
        }
    }

    fn default_settings() -> Settings {
        Settings {
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            concurrency: Concurrency::Wait,
            max_key_len: DEFAULT_MAX_KEY_LEN,
        }
    }

    /// Runs `op` at most once for `key` with the engine's defaults, and returns its
    /// result, or the stored result of an earlier call with the same key.
    ///
    /// The default scope is the closure's type name (module path and function); see
    /// [`Call::scope`] for why long-lived records want an explicit one.
    pub async fn run<K, T, E, F, Fut>(&self, key: K, op: F) -> Result<T, E>
    where
        K: fmt::Display,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call(key).run(op).await
    }

    /// A call with per-call settings: scope, fingerprint, TTL, lease, concurrency, and
    /// whether errors are stored.
    pub fn call<K: fmt::Display>(&self, key: K) -> Call<'_, K> {
        Call::new(self, key)
    }

    /// A call on a key formatted beforehand, for the attribute's generated code.
    ///
    /// `scope`, which code chose, is also the `scope` label of the call's metrics.
    pub(crate) fn call_prepared(
        &self,
        scope: Cow<'static, str>,
        scope_checked: bool,
        key: &(impl fmt::Display + ?Sized),
        text: Option<&str>,
    ) -> Call<'_, crate::call::PreparedKey> {
        let max = self.inner.defaults.max_key_len;
        let in_scope = if scope_checked {
            Scope::checked(&scope)
        } else {
            Scope::unchecked(&scope)
        };
        let key = match text {
            Some(text) => StoreKey::from_text(in_scope, text, max),
            None => StoreKey::in_scope(in_scope, key, max),
        };
        // Made with its label rather than given it after: the hit path would move the
        // whole call once more.
        let key = crate::call::PreparedKey { key, direct: false };
        Call::labelled(self, key, ScopeLabel::new(scope))
    }

    /// The counters since the engine was built.
    pub fn stats(&self) -> Stats {
        self.inner.stats.snapshot(self.inner.store.evicted())
    }

    /// The store the engine runs on.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// How many keys are being run or waited on in this process right now.
    pub fn in_flight(&self) -> usize {
        self.inner.flights.len()
    }
}

/// A call, resolved: what the protocol needs beyond the operation.
pub(crate) struct Request {
    pub(crate) key: StoreKey,
    pub(crate) fingerprint: Option<Fingerprint>,
    pub(crate) settings: Settings,
    /// The operation runs in a transaction of the store's database, whose commit makes
    /// its claim durable too (see `PostgresStore::claim_for_transaction`).
    pub(crate) transactional: bool,
    /// The call's `idempotent.call` span, which its outcome is recorded on.
    pub(crate) span: CallSpan,
    /// The labels of the call's metrics (empty without the feature `metrics`).
    pub(crate) labels: Labels,
    /// Set once the operation's body has ended (returned or panicked): a call that
    /// unwinds after it, a panic of the body or of storing its value, ran it.
    pub(crate) body_ended: AtomicBool,
}

impl Request {
    /// The operation's body ended, whatever it ended with.
    pub(crate) fn end_body(&self) {
        self.body_ended.store(true, Ordering::Relaxed);
    }

    /// What a replay reads of the call.
    #[inline(always)]
    pub(crate) fn seen(&self) -> Seen<'_> {
        Seen {
            key: &self.key,
            fingerprint: self.fingerprint,
            labels: &self.labels,
            span: &self.span,
        }
    }
}

/// What answering from a stored result reads of a call: its [`Request`]'s, or, for a
/// local hit of the attribute's, the call's own parts, borrowed, so that a hit builds no
/// request (see `Call::answer_locally`).
#[derive(Clone, Copy)]
pub(crate) struct Seen<'r> {
    pub(crate) key: &'r StoreKey,
    pub(crate) fingerprint: Option<Fingerprint>,
    pub(crate) labels: &'r Labels,
    pub(crate) span: &'r CallSpan,
}

/// Whether [`Inner::hit_or_request`] looks at the local tier: `Missing` when the call
/// looked there already, before its request was built, and found nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocalTier {
    Missing,
    Unsure,
}

/// What the local tier said of a call, looked at before its request is built.
pub(crate) enum Local<O> {
    /// Answered from a completed result, in the caller's own type.
    Answered(O),
    /// No completed result: the request need not look again.
    Missing,
    /// Not looked at, or found what only the request's own path answers (a record in
    /// progress): the request looks as before.
    Unsure,
}

pub(crate) type Answer<T, E> = Result<(T, Outcome), E>;

impl Inner {
    /// The protocol. Each branch that can use `op` returns, so it runs at most once.
    ///
    /// The call's only `async fn`: what it takes it keeps until it finishes, so it takes
    /// the call as it was built and resolves it here.
    pub(crate) async fn run<K, T, E, P, O>(
        self: &Arc<Self>,
        call: Call<'_, K, P>,
        op: O,
    ) -> Answer<T, E>
    where
        K: CallKey,
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
        O: Operation<T, E>,
    {
        let req = match self.hit_or_request::<K, T, E, P, O>(call, &op, LocalTier::Unsure) {
            Ok(req) => req,
            Err(answer) => return answer,
        };
        // Boxed, so a hit does not carry (and move) the futures of the slower paths.
        // Each boxed future below is made in a statement of its own: made in the
        // `.await`'s own statement, the unboxed future would be kept, moved-from, in this
        // future's state too.
        let rest = Box::pin(self.join_or_lead::<T, E, P, O>(req, op));
        rest.await
    }

    /// The call resolved into its request, or answered already: refused, or a local hit.
    ///
    /// Not written in [`Inner::run`]: a local borrowed there (as the request is, by the
    /// hit's check) stays in that future's state across its `.await`, and every call's
    /// future, moved whole on each hit, would be as much larger.
    #[inline(always)]
    pub(crate) fn hit_or_request<K, T, E, P, O>(
        &self,
        call: Call<'_, K, P>,
        op: &O,
        local: LocalTier,
    ) -> Result<Request, Answer<T, E>>
    where
        K: CallKey,
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
        O: Operation<T, E>,
    {
        if let Err(e) = op.check(self) {
            drop(invalid_call_span(self.store_kind));
            return Err(Err(e.into()));
        }
        let mut req = match call.into_request_named(op.name()) {
            Ok(req) => req,
            Err(e) => return Err(Err(e.into())),
        };
        req.transactional = op.transactional();
        if local == LocalTier::Missing {
            return Ok(req);
        }
        // Entered for the hit's own event, which then names the call's span.
        let hit = {
            let _in_span = req.span.enter();
            self.replay_local::<T, E, P>(&req, op.copier())
        };
        match hit {
            Some(answer) => {
                req.key.recycle();
                Err(answer)
            }
            None => Ok(req),
        }
    }

    /// Everything after the check for a local hit: coalesce, claim, run or wait, inside
    /// the call's span, so that the operation's own spans nest under it (also on the task
    /// of [`Call::run_to_completion`], which this runs on).
    pub(crate) fn join_or_lead<'s, T, E, P, O>(
        self: &'s Arc<Self>,
        req: Request,
        op: O,
    ) -> impl Future<Output = Answer<T, E>> + 's
    where
        T: DeserializeOwned + 's,
        E: From<Error> + 's,
        P: ErrorPolicy<E> + 's,
        O: Operation<T, E> + 's,
    {
        let span = req.span.span();
        self.coalesce_or_lead::<T, E, P, O>(req, op)
            .instrument(span)
    }

    /// [`Inner::join_or_lead`], in its span.
    async fn coalesce_or_lead<T, E, P, O>(self: &Arc<Self>, req: Request, op: O) -> Answer<T, E>
    where
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
        O: Operation<T, E>,
    {
        // Answered or not, the span says how the call ended: a call dropped on its way
        // (cancelled, timed out around it) says so rather than nothing.
        let unanswered = Unfinished(&req);
        let answer = self.coalesce_or_lead_inner::<T, E, P, O>(&req, op).await;
        unanswered.answered();
        answer
    }

    /// [`Inner::coalesce_or_lead`], once its span's guard is set.
    async fn coalesce_or_lead_inner<T, E, P, O>(
        self: &Arc<Self>,
        req: &Request,
        op: O,
    ) -> Answer<T, E>
    where
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
        O: Operation<T, E>,
    {
        // Before the flight is joined: a follower may be handed the claim, and a leader
        // claims it; either keeps it with timers, which tokio panics without once the
        // operation has begun.
        if let Err(e) = crate::timers::required() {
            observe::outcome(&req.span, observe::OUTCOME_INVALID);
            return Err(e.into());
        }
        loop {
            match self.flights.join(&req.key, req.fingerprint) {
                // Claiming, waiting on another process, running and renewing make a future
                // of over a kilobyte: boxed apart, only the caller that talks to the store
                // pays for it, not each of a thousand followers.
                Joined::Leader(flight) => {
                    let lead = Box::pin(self.lead::<T, E, P, O>(req, flight, op));
                    return lead.await;
                }
                Joined::Follower(flight) => {
                    if let Some(answer) = self.follow::<T, E, P>(req, &flight).await {
                        return match answer {
                            Followed::Answer(a) => a,
                            Followed::TookOver(guard, token, sent) => {
                                let held = HeldClaim::new(
                                    self.clone(),
                                    req.key.clone(),
                                    req.labels.clone(),
                                    token,
                                    req.settings.lease,
                                    sent,
                                    guard,
                                );
                                let run = Box::pin(op.execute::<P>(self, req, held));
                                run.await
                            }
                        };
                    }
                }
            }
        }
    }

    /// Leads the key in this process: claims it in the store and runs, replays, or waits
    /// for a holder elsewhere. Local followers wait on `flight` meanwhile.
    async fn lead<T, E, P, O>(
        self: &Arc<Self>,
        req: &Request,
        flight: FlightGuard,
        op: O,
    ) -> Answer<T, E>
    where
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
        O: Operation<T, E>,
    {
        let mut pause = FIRST_POLL;
        // Started when the key is found held elsewhere; stopped when that wait ends.
        let mut waiting = Waiting::new(&req.labels, Via::Store);
        loop {
            flight.flight().beat();
            let (claim, token, sent) = self
                .claim(req)
                .await
                .map_err(|e| self.store_failed(req, e))?;
            match claim {
                Claim::Acquired => {
                    waiting.stop();
                    debug!(scope = req.key.scope(), key = %req.key.digest(), token = token.get(), "idempotency key claimed");
                    let held = HeldClaim::new(
                        self.clone(),
                        req.key.clone(),
                        req.labels.clone(),
                        token,
                        req.settings.lease,
                        sent,
                        flight,
                    );
                    return op.execute::<P>(self, req, held).await;
                }
                Claim::Completed(rec) => {
                    waiting.stop();
                    let (fingerprint, result) = self.completed(req, StoreOp::Claim, rec)?;
                    flight.land(Landing::Result {
                        result: result.clone(),
                        fingerprint,
                    });
                    return self.replay::<T, E, P>(req, fingerprint, result, Outcome::Replayed);
                }
                Claim::InProgress(rec) => {
                    self.check_fingerprint(req.seen(), rec.fingerprint)?;
                    if req.settings.concurrency == Concurrency::Reject {
                        return Err(self.reject(req).into());
                    }
                    // Held in another process (or by an engine beside this one): look again
                    // until it completes, is released, or its lease runs out.
                    waiting.start();
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_POLL).min(req.settings.lease / 4);
                }
            }
        }
    }

    /// Waits for the local leader. `None`: start over (the leader landed nothing).
    async fn follow<T, E, P>(
        self: &Arc<Self>,
        req: &Request,
        flight: &Arc<Flight>,
    ) -> Option<Followed<T, E>>
    where
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
    {
        if let Err(e) = self.check_fingerprint(req.seen(), flight.fingerprint()) {
            return Some(Followed::Answer(Err(e.into())));
        }
        if req.settings.concurrency == Concurrency::Reject {
            return Some(Followed::Answer(Err(self.reject(req).into())));
        }
        // Recorded when this function returns, whatever it returns with.
        let mut waiting = Waiting::new(&req.labels, Via::InProcess);
        waiting.start();
        // One follower at a time times the leader (a timer for each of a thousand
        // followers costs more than the rest of their wait); the others wait for the
        // landing, or for the timing follower to leave, and then one of them takes over.
        let mut watch = None;
        let mut seen = flight.beats();
        let mut following = flight.follow();
        loop {
            if watch.is_none() {
                watch = flight.watch_leader();
            }
            let landing = match &watch {
                None => match following.wait(true).await {
                    Waited::Landed(landing) => landing,
                    Waited::WatcherLeft => continue,
                },
                Some(_) => {
                    // Boxed: the timer and the store's claim are the timing follower's
                    // alone, and would otherwise make every follower's future larger.
                    let timing = Box::pin(self.time_leader::<T, E, P>(
                        req,
                        flight,
                        &mut following,
                        &mut seen,
                    ));
                    match timing.await {
                        Timed::Landed(landing) => landing,
                        Timed::Again => continue,
                        Timed::Answer(answer) => return Some(answer),
                    }
                }
            };
            return match landing {
                Landing::Retry => None,
                Landing::Result {
                    result,
                    fingerprint,
                } => Some(Followed::Answer(self.replay::<T, E, P>(
                    req,
                    fingerprint,
                    result,
                    Outcome::Coalesced,
                ))),
            };
        }
    }

    /// The timing follower's wait: the landing, or a lease without a beat from the leader.
    async fn time_leader<T, E, P>(
        self: &Arc<Self>,
        req: &Request,
        flight: &Flight,
        following: &mut Following,
        seen: &mut u64,
    ) -> Timed<T, E>
    where
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
    {
        tokio::select! {
            waited = following.wait(false) => match waited {
                Waited::Landed(landing) => Timed::Landed(landing),
                Waited::WatcherLeft => Timed::Again,
            },
            () = tokio::time::sleep(req.settings.lease) => {
                let now = flight.beats();
                if now != *seen {
                    *seen = now;
                    return Timed::Again;
                }
                // A whole lease without a beat: the leader's future is not being polled
                // (held but never awaited, or its task is stuck). Its claim has lapsed or
                // will; go to the store rather than wait forever.
                match self.claim(req).await {
                    Err(e) => Timed::Answer(Followed::Answer(Err(self.store_failed(req, e).into()))),
                    Ok((Claim::Acquired, token, sent)) => {
                        debug!(scope = req.key.scope(), key = %req.key.digest(), "stalled leader's claim taken over");
                        Timed::Answer(Followed::TookOver(
                            self.flights.take_over(&req.key, req.fingerprint),
                            token,
                            sent,
                        ))
                    }
                    Ok((Claim::Completed(rec), ..)) => {
                        Timed::Answer(Followed::Answer(self.replay_record::<T, E, P>(req, rec)))
                    }
                    Ok((Claim::InProgress(_), ..)) => Timed::Again,
                }
            }
        }
    }

    /// Runs the operation under a held claim, then completes or releases it.
    async fn execute<T, E, P, F, Fut>(&self, req: &Request, held: HeldClaim, op: F) -> Answer<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.count(&req.labels, Event::Executed);
        let body = AssertUnwindSafe(op()).catch_unwind();
        let ran = held.renewing(body).await;
        req.end_body();
        // The span's outcome is recorded once the claim is finished, as the call is
        // answered: dropped before, the call is `cancelled` (see `Unfinished`), although
        // its operation ran (counted above); unwinding, it is `executed`.
        let ran = match ran {
            Err(panic) => {
                held.release().await;
                resume_unwind(panic)
            }
            Ok(ran) => ran,
        };
        // A value (or an error to store) whose `Serialize` panics: the operation ran, so
        // its key keeps the marker of a result that cannot be stored (releasing it would
        // run the operation again on the next retry), and the panic goes on to the caller.
        let completion = std::panic::catch_unwind(AssertUnwindSafe(|| match &ran {
            Ok(value) => Some(self.value_completion(req, value)),
            Err(err) => self.error_completion::<E, P>(req, err),
        }));
        match completion {
            Ok(Some(completion)) => held.complete(completion).await,
            Ok(None) => held.release().await,
            Err(panic) => {
                held.complete(self.unstorable_completion(req)).await;
                resume_unwind(panic)
            }
        }
        observe::answered(&req.span, Outcome::Executed);
        debug!(scope = req.key.scope(), key = %req.key.digest(), outcome = Outcome::Executed.as_str(), ok = ran.is_ok(), "idempotent call");
        ran.map(|value| (value, Outcome::Executed))
    }

    /// The completion that stores the operation's error as `P` says: its encoding (with
    /// [`Call::store_errors`]), the marker of one that cannot be stored faithfully (the
    /// operation ran, as for a value), or `None` for an error not stored, whose claim is
    /// released so a retry runs again.
    fn error_completion<E, P: ErrorPolicy<E>>(&self, req: &Request, err: &E) -> Option<Completion> {
        match P::encode(err, self.codec)? {
            Ok(bytes) => Some(Completion {
                result: StoredResult::Err(bytes),
                ttl: req.settings.ttl,
                marker: false,
            }),
            Err(e) => {
                tracing::warn!(scope = req.key.scope(), key = %req.key.digest(), error = %e,
                    "the operation's error cannot be stored faithfully; retries of this key get Error::Codec (Unstorable)");
                Some(self.unstorable_completion(req))
            }
        }
    }

    /// The completion that stores `value`: its encoding, or, for a value that would not
    /// decode back as it is, a marker refused on replay.
    pub(crate) fn value_completion<T: Serialize + DeserializeOwned>(
        &self,
        req: &Request,
        value: &T,
    ) -> Completion {
        match self.codec.encode_checked(value) {
            Ok(bytes) => Completion {
                result: StoredResult::Ok(bytes),
                ttl: req.settings.ttl,
                marker: false,
            },
            Err(e) => {
                tracing::warn!(scope = req.key.scope(), key = %req.key.digest(), error = %e,
                    "the operation's value cannot be stored faithfully; retries of this key get Error::Codec (Unstorable)");
                self.unstorable_completion(req)
            }
        }
    }

    /// The completion that stores the marker of a value that cannot be stored (it does
    /// not encode, or not back to itself): the operation ran, so releasing would run it
    /// again on every retry, and storing what does not decode back would replay an error
    /// or another value. The marker is refused on replay.
    #[cold]
    pub(crate) fn unstorable_completion(&self, req: &Request) -> Completion {
        Completion {
            result: StoredResult::Ok(Codec::unstorable()),
            ttl: req.settings.ttl,
            marker: true,
        }
    }

    /// Claims the key in the store with a newly minted token, and answers with the claim,
    /// the token and when the claim was last confirmed (its lease started no earlier).
    ///
    /// Cancel-safe: if this future is dropped before the store answers, or the store
    /// fails (a timeout after the claim landed), the claim may still have landed, and is
    /// released in the background by its token, so no key waits out a lease for a call
    /// that never ran.
    ///
    /// An answer that took longer than a renewal interval may come after the lease it
    /// granted ran out, and another caller may hold the key by then: such a claim is
    /// renewed before it is used, and claimed afresh if the renewal finds it lost.
    ///
    /// Counts its own failures, by the operation that failed (a claim, or the renewal of
    /// a claim answered late).
    async fn claim(
        self: &Arc<Self>,
        req: &Request,
    ) -> Result<(Claim, FencingToken, tokio::time::Instant), StoreError> {
        let lease = req.settings.lease;
        for _ in 0..3 {
            let token = FencingToken::mint();
            let sent = tokio::time::Instant::now();
            let mut unanswered = Unanswered {
                engine: self,
                key: &req.key,
                labels: &req.labels,
                token: Some(token),
                answered_with_error: false,
            };
            let claim = match self.claim_once(req, token).await {
                Ok(claim) => claim,
                Err(e) => {
                    self.count(&req.labels, Event::StoreError(StoreOp::Claim));
                    // A full store refused before it kept anything; any other failure may
                    // have come after the claim landed (a timeout).
                    if e.kind() == StoreErrorKind::Full {
                        unanswered.token = None;
                    }
                    unanswered.answered_with_error = true;
                    return Err(e);
                }
            };
            let prompt = lease / RENEWALS_PER_LEASE;
            if claim != Claim::Acquired || sent.elapsed() < prompt {
                unanswered.token = None;
                return Ok((claim, token, sent));
            }
            // Answered late: the lease may have run out before the answer came. A renewal
            // answered promptly says the claim is still ours; a late one says nothing, so
            // ask again, a few times.
            for _ in 0..3 {
                let renewed = tokio::time::Instant::now();
                let renewal = self.store.renew(&req.key, token, lease);
                let renewal = timed(
                    &req.labels,
                    StoreOp::Renew,
                    tokio::time::timeout(prompt, renewal),
                );
                match renewal.await {
                    Ok(Ok(Fence::Held)) if renewed.elapsed() < prompt => {
                        unanswered.token = None;
                        return Ok((claim, token, renewed));
                    }
                    // Lost before it was used: nothing to release; claim again.
                    Ok(Ok(Fence::Lost)) => {
                        unanswered.token = None;
                        break;
                    }
                    Ok(Err(e)) => {
                        self.count(&req.labels, Event::StoreError(StoreOp::Renew));
                        return Err(e);
                    }
                    // Cut off by the engine's time limit: a failed round trip, as the
                    // heartbeat counts one.
                    Err(_) => self.count(&req.labels, Event::StoreError(StoreOp::Renew)),
                    Ok(Ok(Fence::Held)) => {}
                }
            }
            // Lost, or never confirmed in time (then, if it is ours still, released).
            drop(unanswered);
        }
        self.count(&req.labels, Event::StoreError(StoreOp::Claim));
        Err(StoreError::msg(
            "the store answers claims slower than a third of the lease",
        ))
    }

    /// One claim of the key with `token`: the store's, or, for an operation run in a
    /// transaction of the store's database, the one made for that.
    async fn claim_once(&self, req: &Request, token: FencingToken) -> Result<Claim, StoreError> {
        let (key, fingerprint, lease) = (&req.key, req.fingerprint, req.settings.lease);
        #[cfg(feature = "postgres")]
        if req.transactional {
            if let Some(pg) = self.store.postgres() {
                let claim = pg.claim_for_transaction(key, token, fingerprint, lease);
                return timed(&req.labels, StoreOp::Claim, claim).await;
            }
        }
        let claim = self.store.claim(key, token, fingerprint, lease);
        timed(&req.labels, StoreOp::Claim, claim).await
    }

    /// Answers from a completed record the store holds in this process, if it holds one:
    /// with a clone of the copy kept beside it when the caller's type is `Clone` and the
    /// copy's own, or else by decoding it (and then, for such a type, keeping a copy of
    /// what was decoded for the hits after it).
    pub(crate) fn replay_local<T, E, P>(
        &self,
        req: &Request,
        copier: Option<Copier<T>>,
    ) -> Option<Answer<T, E>>
    where
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
    {
        let replayed = |answer: Result<T, E>| answer.map(|value| (value, Outcome::Replayed));
        match self.answer_local::<T, E, P, _>(req.seen(), copier, replayed) {
            Local::Answered(answer) => Some(answer),
            Local::Missing => None,
            Local::Unsure => Some(Err(self.not_completed(req, StoreOp::Lookup).into())),
        }
    }

    /// [`Inner::replay_local`] of what it reads of the call; a record in progress, which
    /// the local tier should not hold completed, is `Unsure`. `finish` turns the answer
    /// into the caller's type where it is made: a hit's value is large, and each step it
    /// is moved through costs more than the rest of a hit's bookkeeping.
    #[inline(always)]
    pub(crate) fn answer_local<T, E, P, O>(
        &self,
        seen: Seen<'_>,
        copier: Option<Copier<T>>,
        finish: impl FnOnce(Result<T, E>) -> O,
    ) -> Local<O>
    where
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
    {
        let Some((rec, copy)) = self.store.peek_completed_copy(seen.key) else {
            return Local::Missing;
        };
        // Read in place, for the same reason.
        let (token, result) = match &rec.state {
            RecordState::Completed { token, result, .. } => (*token, result),
            RecordState::InProgress { .. } => return Local::Unsure,
        };
        let outcome = Outcome::Replayed;
        let Some(copier) = copier else {
            return Local::Answered(self.replay_with::<T, E, P, O>(
                seen,
                rec.fingerprint,
                result,
                outcome,
                finish,
            ));
        };
        // A copy is made from what this codec decoded; an engine of another codec reads
        // the record as before (and is refused it as `WrongCodec`).
        let ours = matches!(result, StoredResult::Ok(bytes) if self.codec.wrote(bytes));
        if let (Some(copy), true) = (&copy, ours) {
            // Checked before the copy is cloned: a refused call clones nothing (and a
            // `Clone` that panics cannot turn a mismatch into a panic).
            if let Err(e) = self.check_fingerprint(seen, rec.fingerprint) {
                return Local::Answered(finish(Err(e.into())));
            }
            if let Some(value) = copier.take(copy) {
                self.count_replay(seen, outcome);
                return Local::Answered(finish(Ok(value)));
            }
        }
        let keeps_copy = copy.is_none();
        Local::Answered(self.replay_with::<T, E, P, O>(
            seen,
            rec.fingerprint,
            result,
            outcome,
            |answer| {
                if let (true, Ok(value)) = (keeps_copy, &answer) {
                    self.store.keep_copy(seen.key, token, copier.make(value));
                }
                finish(answer)
            },
        ))
    }

    /// Answers from a completed record found in the store.
    pub(crate) fn replay_record<T, E, P>(&self, req: &Request, rec: Record) -> Answer<T, E>
    where
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
    {
        let (fingerprint, result) = self.completed(req, StoreOp::Claim, rec)?;
        self.replay::<T, E, P>(req, fingerprint, result, Outcome::Replayed)
    }

    /// Answers with a stored result, unless the call's fingerprint differs from its own.
    fn replay<T, E, P>(
        &self,
        req: &Request,
        fingerprint: Option<Fingerprint>,
        result: StoredResult,
        outcome: Outcome,
    ) -> Answer<T, E>
    where
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
    {
        self.replay_ref::<T, E, P>(req.seen(), fingerprint, &result, outcome)
    }

    /// [`Inner::replay`] of a result read in place.
    #[inline(always)]
    fn replay_ref<T, E, P>(
        &self,
        seen: Seen<'_>,
        fingerprint: Option<Fingerprint>,
        result: &StoredResult,
        outcome: Outcome,
    ) -> Answer<T, E>
    where
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
    {
        self.replay_with::<T, E, P, _>(seen, fingerprint, result, outcome, |answer| {
            answer.map(|value| (value, outcome))
        })
    }

    /// [`Inner::replay_ref`], whose answer `finish` turns into the caller's type as it is
    /// decoded (see [`Inner::answer_local`]).
    #[inline(always)]
    fn replay_with<T, E, P, O>(
        &self,
        seen: Seen<'_>,
        fingerprint: Option<Fingerprint>,
        result: &StoredResult,
        outcome: Outcome,
        finish: impl FnOnce(Result<T, E>) -> O,
    ) -> O
    where
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
    {
        if let Err(e) = self.check_fingerprint(seen, fingerprint) {
            return finish(Err(e.into()));
        }
        // A stored result this call cannot read (another type, another codec, a marker)
        // answers with an error, and is no replay on a dashboard: counted once decoded.
        let undecodable = |e: CodecError| -> E {
            observe::outcome(seen.span, observe::OUTCOME_UNDECODABLE);
            match e.kind() {
                CodecErrorKind::TransactionEnded => Error::TransactionEnded,
                _ => Error::Codec(e.in_scope(seen.key.scope())),
            }
            .into()
        };
        // Each arm hands its own result to `finish`: a decoded value wrapped in one
        // `Result` after another would be copied at each.
        match result {
            StoredResult::Ok(bytes) => match self.codec.decode::<T>(bytes) {
                Ok(value) => {
                    self.count_replay(seen, outcome);
                    finish(Ok(value))
                }
                Err(e) => finish(Err(undecodable(e))),
            },
            StoredResult::Err(bytes) => match P::decode(bytes, self.codec) {
                Ok(err) => {
                    self.count_replay(seen, outcome);
                    finish(Err(err))
                }
                Err(e) => finish(Err(undecodable(e))),
            },
        }
    }

    /// Counts (and logs) a call answered with a stored or shared value.
    #[inline(always)]
    fn count_replay(&self, seen: Seen<'_>, outcome: Outcome) {
        let event = match outcome {
            Outcome::Coalesced => Event::Coalesced,
            _ => Event::Replayed,
        };
        self.count(seen.labels, event);
        observe::answered(seen.span, outcome);
        debug!(scope = seen.key.scope(), key = %seen.key.digest(), outcome = outcome.as_str(), "idempotent call");
    }

    /// Refuses a call whose fingerprint differs from the one the key was claimed with.
    /// A side without a fingerprint is not compared.
    #[inline(always)]
    fn check_fingerprint(&self, seen: Seen<'_>, stored: Option<Fingerprint>) -> Result<(), Error> {
        match (seen.fingerprint, stored) {
            (Some(mine), Some(theirs)) if mine != theirs => {
                self.count(seen.labels, Event::Mismatched);
                observe::outcome(seen.span, OUTCOME_MISMATCH);
                debug!(scope = seen.key.scope(), key = %seen.key.digest(), outcome = OUTCOME_MISMATCH, "idempotent call");
                Err(Error::Mismatch)
            }
            _ => Ok(()),
        }
    }

    fn reject(&self, req: &Request) -> Error {
        self.count(&req.labels, Event::Rejected);
        observe::outcome(&req.span, OUTCOME_REJECTED);
        debug!(scope = req.key.scope(), key = %req.key.digest(), outcome = OUTCOME_REJECTED, "idempotent call");
        Error::InProgress
    }

    /// A claim the store failed (counted where it failed, by [`Inner::claim`]): nothing ran.
    fn store_failed(&self, req: &Request, err: StoreError) -> Error {
        observe::outcome(&req.span, OUTCOME_STORE_ERROR);
        debug!(scope = req.key.scope(), key = %req.key.digest(), outcome = OUTCOME_STORE_ERROR, error = %err, "idempotency store failed; not running");
        Error::Store(err)
    }

    /// The fingerprint and result of a record the store answered `op` with as completed.
    fn completed(
        &self,
        req: &Request,
        op: StoreOp,
        rec: Record,
    ) -> Result<(Option<Fingerprint>, StoredResult), Error> {
        match rec.state {
            RecordState::Completed { result, .. } => Ok((rec.fingerprint, result)),
            RecordState::InProgress { .. } => Err(self.not_completed(req, op)),
        }
    }

    /// The store answered `op` with a record in progress where it said it was completed:
    /// a store error like any other, on the dashboards and on the call's span.
    #[cold]
    fn not_completed(&self, req: &Request, op: StoreOp) -> Error {
        self.count(&req.labels, Event::StoreError(op));
        self.store_failed(
            req,
            StoreError::msg("store answered a claim as completed with a record in progress"),
        )
    }
}

/// Marks a call's span when dropped before [`Unfinished::answered`]: `cancelled`, or
/// `executed` when a panic unwinds through it after the operation's body ended (the
/// body's own panic, or one while storing its value). Every other outcome is recorded
/// just as its call is answered, with no await between, so the span gets one outcome.
struct Unfinished<'a>(&'a Request);

impl Unfinished<'_> {
    fn answered(self) {
        std::mem::forget(self);
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        let req = self.0;
        if std::thread::panicking() && req.body_ended.load(Ordering::Relaxed) {
            observe::answered(&req.span, Outcome::Executed);
        } else {
            // Dropped, or unwound by a panic that is not the operation's (a sibling's in
            // a `select!`): the call was never answered.
            observe::outcome(&req.span, observe::OUTCOME_CANCELLED);
        }
    }
}

enum Followed<T, E> {
    Answer(Answer<T, E>),
    TookOver(FlightGuard, FencingToken, tokio::time::Instant),
}

/// A claim sent to the store and not yet answered; see [`Inner::claim`].
struct Unanswered<'a> {
    engine: &'a Arc<Inner>,
    key: &'a StoreKey,
    labels: &'a Labels,
    // `None` once the store answered.
    token: Option<FencingToken>,
    // The store answered with an error: its request is done with, and one release
    // suffices (no late landing to wait for).
    answered_with_error: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let Some(token) = self.token else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            // After an error the request is over but for a statement the server is still
            // ending; a caller dropped mid-request leaves it to land up to a statement
            // timeout later (PostgreSQL's, 1.5 s, on pools `PostgresStore::connect` makes).
            let pauses: &'static [u64] = if self.answered_with_error {
                &[0, 250]
            } else {
                &[0, 50, 250, 1000, 2500]
            };
            rt.spawn(release_unanswered(
                self.engine.clone(),
                self.key.clone(),
                self.labels.clone(),
                token,
                pauses,
            ));
        }
    }
}

/// Releases a claim whose answer never arrived, after each of `pauses` (milliseconds).
/// A claim whose caller was dropped may land after a first release (sent on another
/// connection of a pool, say), so a release that finds nothing is tried again a few
/// times: each is one cheap statement, on a path only cancellations take.
async fn release_unanswered(
    engine: Arc<Inner>,
    key: StoreKey,
    labels: Labels,
    token: FencingToken,
    pauses: &'static [u64],
) {
    for &pause in pauses {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let release = engine.store.release(&key, token);
        match engine.counted(&labels, StoreOp::Release, release).await {
            Ok(Fence::Held) => {
                debug!(scope = key.scope(), key = %key.digest(), "unanswered claim released");
                return;
            }
            Ok(Fence::Lost) => {}
            // The store is failing: a claim that did land lapses with its lease.
            Err(_) => return,
        }
    }
}

/// How the timing follower's wait ended.
enum Timed<T, E> {
    Landed(Landing),
    /// Wait again: the leader beat, is still in progress in the store, or the role moved.
    Again,
    Answer(Followed<T, E>),
}

/// What runs under a held claim, and how it finishes it: the closure of [`Call::run`], or
/// one run in a PostgreSQL transaction. Everything before (coalescing, the claim, waiting,
/// replay) is the same for both.
pub(crate) trait Operation<T, E> {
    /// The default scope: the type name of the user's closure.
    fn name(&self) -> &'static str;

    /// Whether the operation runs in a transaction of the store's database.
    fn transactional(&self) -> bool {
        false
    }

    /// How copies of the value are made and read, where its type is `Clone` and the
    /// caller said so (the attribute does, for the type it returns).
    fn copier(&self) -> Option<Copier<T>> {
        None
    }

    /// Refuses, before anything runs or is claimed, an operation the engine cannot run.
    fn check(&self, engine: &Inner) -> Result<(), Error> {
        let _ = engine;
        Ok(())
    }

    /// Runs under `held`, then completes or releases it.
    fn execute<P: ErrorPolicy<E>>(
        self,
        engine: &Arc<Inner>,
        req: &Request,
        held: HeldClaim,
    ) -> impl Future<Output = Answer<T, E>>;
}

/// The operation of [`Call::run`]: a closure that makes a future, and the copier of its
/// value type where the caller has one (`C` is `()` where it has none, so that the
/// calls of the engine's API carry no room for one in their futures).
pub(crate) struct Plain<F, C = ()>(pub(crate) F, pub(crate) C);

/// Where a [`Plain`] operation keeps its copier: `()` (none) or `Option<Copier<T>>`.
pub(crate) trait CopierSlot<T>: Copy {
    fn copier(self) -> Option<Copier<T>>;
}

impl<T> CopierSlot<T> for () {
    fn copier(self) -> Option<Copier<T>> {
        None
    }
}

impl<T> CopierSlot<T> for Option<Copier<T>> {
    fn copier(self) -> Option<Copier<T>> {
        self
    }
}

impl<T, E, F, Fut, C> Operation<T, E> for Plain<F, C>
where
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    C: CopierSlot<T>,
{
    fn name(&self) -> &'static str {
        std::any::type_name::<F>()
    }

    fn copier(&self) -> Option<Copier<T>> {
        self.1.copier()
    }

    fn execute<P: ErrorPolicy<E>>(
        self,
        engine: &Arc<Inner>,
        req: &Request,
        held: HeldClaim,
    ) -> impl Future<Output = Answer<T, E>> {
        engine.execute::<T, E, P, F, Fut>(req, held, self.0)
    }
}
