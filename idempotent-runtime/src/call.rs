//! One call's settings, and how they resolve against the engine's defaults.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::Codec;
use crate::copy::Copier;
use crate::detached::{spawn_to_end, Detached};
use crate::engine::{
    Answer, Concurrency, Idempotency, Local, LocalTier, Outcome, Plain, Request, Seen, Settings,
};
use crate::error::{CodecError, Error, KeyError};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::observe::{invalid_call_span, CallSpan, Labels, ScopeLabel};

/// A call being set up: `idem.call(key)`, then any settings, then [`Call::run`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_runtime::Error> {
/// use idempotent_runtime::{Concurrency, Idempotency};
/// use std::time::Duration;
///
/// #[derive(serde::Serialize)]
/// struct Refund { order: u64, cents: u64 }
///
/// let idem = Idempotency::memory();
/// let req = Refund { order: 7, cents: 1250 };
/// let id: String = idem
///     .call("refund-7")
///     .scope("refunds")
///     .fingerprint(&req)
///     .ttl(Duration::from_secs(3600))
///     .concurrency(Concurrency::Reject)
///     .run(|| async { Ok::<_, idempotent_runtime::Error>(format!("rf_{}", req.order)) })
///     .await?;
/// assert_eq!(id, "rf_7");
/// # Ok(()) }
/// ```
#[must_use = "a call does nothing until `.run(..)` is awaited"]
pub struct Call<'a, K, P = DiscardErrors> {
    pub(crate) engine: &'a Idempotency,
    key: K,
    scope: Option<Cow<'a, str>>,
    fingerprint: Option<Result<Fingerprint, CodecError>>,
    ttl: Option<Duration>,
    lease: Option<Duration>,
    concurrency: Option<Concurrency>,
    /// The `scope` label of the call's metrics (empty without the feature `metrics`).
    label: ScopeLabel,
    policy: PhantomData<P>,
}

impl<K, P> fmt::Debug for Call<'_, K, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("scope", &self.scope)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl<'a, K: CallKey> Call<'a, K> {
    pub(crate) fn new(engine: &'a Idempotency, key: K) -> Self {
        Self::labelled(engine, key, ScopeLabel::default())
    }

    /// A call whose metrics carry `label`.
    pub(crate) fn labelled(engine: &'a Idempotency, key: K, label: ScopeLabel) -> Self {
        Self {
            engine,
            key,
            scope: None,
            fingerprint: None,
            ttl: None,
            lease: None,
            concurrency: None,
            label,
            policy: PhantomData,
        }
    }
}

impl<'a, K: CallKey, P> Call<'a, K, P> {
    /// The key's namespace: equal keys in two scopes are two keys.
    ///
    /// Without one, the scope is the operation closure's type name, which holds the module
    /// path and function it is written in. That name changes when the code is moved or
    /// renamed, and records stored under the old one are then not found: a retry that
    /// spans such a deploy runs again. Two closures in one function also share that name.
    /// Give every operation whose records must outlive a deploy an explicit scope.
    pub fn scope(mut self, scope: impl Into<Cow<'a, str>>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// A value that identifies the request's payload. Reusing the key with a value whose
    /// fingerprint differs fails with [`Error::Mismatch`] and runs nothing. Calls without a
    /// fingerprint are not compared.
    pub fn fingerprint<V: Serialize + ?Sized>(mut self, value: &V) -> Self {
        self.fingerprint = Some(Fingerprint::of(value));
        self
    }

    /// Sets the call's fingerprint to one computed beforehand, such as the request
    /// fingerprint of [`http::fingerprint_request`](crate::http::fingerprint_request), for a
    /// layer of your own that must agree with this crate's HTTP layers on one store.
    pub fn with_fingerprint(mut self, fingerprint: Fingerprint) -> Self {
        self.fingerprint = Some(Ok(fingerprint));
        self
    }

    /// Sets a fingerprint computed beforehand (for the attribute's generated code).
    pub(crate) fn fingerprint_result(mut self, fp: Result<Fingerprint, CodecError>) -> Self {
        self.fingerprint = Some(fp);
        self
    }

    /// How long the result is replayed. Outside [`MIN_TTL`](crate::MIN_TTL)..=
    /// [`MAX_TTL`](crate::MAX_TTL), the call fails with [`Error::Config`] and runs nothing.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long the claim holds without renewal. Outside [`MIN_LEASE`](crate::MIN_LEASE)
    /// ..=[`MAX_TTL`](crate::MAX_TTL), the call fails with [`Error::Config`] and runs
    /// nothing.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Wait for or reject a duplicate of this call that arrives while it runs.
    pub fn concurrency(mut self, concurrency: Concurrency) -> Self {
        self.concurrency = Some(concurrency);
        self
    }

    /// The `scope` label of the call's metrics (feature `metrics`; without it, this does
    /// nothing). Calls without one are labelled
    /// [`CALL_SCOPE`](crate::metrics::CALL_SCOPE), `"call"`.
    ///
    /// A `&'static str`, so that only code chooses it: a label value made from a key or a
    /// request (as [`Call::scope`] may be) would make a time series per request, which
    /// metric backends cannot hold. Name the operation, as a scope would:
    /// `"billing.refund"`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_runtime::Error> {
    /// # let idem = idempotent_runtime::Idempotency::memory();
    /// # let tenant = "acme";
    /// let id = idem
    ///     .call("refund-7")
    ///     .scope(format!("{tenant}.refunds")) // from the request: not a label
    ///     .metrics_scope("refunds")
    ///     .run(|| async { Ok::<_, idempotent_runtime::Error>(7u64) })
    ///     .await?;
    /// # assert_eq!(id, 7); Ok(()) }
    /// ```
    pub fn metrics_scope(mut self, scope: &'static str) -> Self {
        self.label = ScopeLabel::new(Cow::Borrowed(scope));
        self
    }

    /// Store `Err` results too, so a retry gets the same error rather than running again.
    /// The error type must then be `Serialize + DeserializeOwned`.
    ///
    /// Every error the operation returns is then final for the key's TTL, as a value is:
    /// one the codec cannot store faithfully (it does not read back as itself, or its
    /// `Serialize` panics) leaves the marker of an unstorable result, so retries get
    /// [`CodecErrorKind::Unstorable`](crate::CodecErrorKind::Unstorable) and the operation
    /// never runs again. In [`run_in_transaction`](Call::run_in_transaction), where the
    /// error's writes were rolled back, such an error frees the key instead.
    pub fn store_errors(self) -> Call<'a, K, StoreErrors> {
        Call {
            engine: self.engine,
            key: self.key,
            scope: self.scope,
            fingerprint: self.fingerprint,
            ttl: self.ttl,
            lease: self.lease,
            concurrency: self.concurrency,
            label: self.label,
            policy: PhantomData,
        }
    }

    /// Runs `op` at most once for the key, or returns the stored result of an earlier
    /// call; see [`Call::run_with_outcome`].
    pub fn run<T, E, F, Fut>(self, op: F) -> impl Future<Output = Result<T, E>> + 'a
    where
        K: 'a,
        T: Serialize + DeserializeOwned + 'a,
        E: From<Error> + 'a,
        P: ErrorPolicy<E> + 'a,
        F: FnOnce() -> Fut + 'a,
        Fut: Future<Output = Result<T, E>> + 'a,
    {
        // Built from the engine's one future, not from `async fn`s around it: each such
        // layer keeps its own copy of its arguments for the whole call, and a thousand
        // waiting callers would each carry the copies.
        self.run_with_outcome(op)
            .map(|answer| answer.map(|(value, _)| value))
    }

    /// Like [`Call::run`], and says whether the value was executed, replayed or coalesced.
    ///
    /// What the caller gets:
    /// - `Ok` or `Err` from `op` when this call ran it;
    /// - the stored value (or stored error, with [`Call::store_errors`]) when an earlier
    ///   call completed the key;
    /// - the value of a concurrent call in this process that ran it;
    /// - [`Error::InProgress`] for a duplicate in flight, in reject mode;
    /// - [`Error::Mismatch`], [`Error::InvalidKey`], [`Error::Config`]: nothing ran;
    /// - [`Error::Store`]: the store failed before the claim, and nothing ran.
    ///
    /// When `op` panics, its claim is released and the panic continues in this caller.
    /// When this future is dropped while `op` runs, `op` stops there (it is dropped with
    /// it) and its claim is released in the background. Either way, concurrent duplicates
    /// start over and one of them runs. For an operation that must never stop half-way,
    /// use [`Call::run_to_completion`].
    ///
    /// Once `op` has returned, its result is stored even if this future is dropped before
    /// the store answers, and a completion the store fails is retried in the background
    /// (renewing the claim) until it is stored or the claim could have lapsed; the caller
    /// gets its value meanwhile.
    ///
    /// When `op` succeeds but its claim was taken over meanwhile (its lease ran out
    /// without renewal: the task was stalled, or the store unreachable for a whole lease),
    /// the caller still gets its value, since the side effect happened; the result is
    /// not stored, the key keeps the new holder's, and
    /// [`Stats::lease_lost`](crate::Stats::lease_lost) counts it.
    pub fn run_with_outcome<T, E, F, Fut>(
        self,
        op: F,
    ) -> impl Future<Output = Result<(T, Outcome), E>> + 'a
    where
        K: 'a,
        T: Serialize + DeserializeOwned + 'a,
        E: From<Error> + 'a,
        P: ErrorPolicy<E> + 'a,
        F: FnOnce() -> Fut + 'a,
        Fut: Future<Output = Result<T, E>> + 'a,
    {
        let inner = &self.engine.inner;
        inner.run::<K, T, E, P, Plain<F>>(self, Plain(op, ()))
    }

    /// [`Call::run_with_outcome`], with the copier of a `Clone` value type (the
    /// attribute's), so hits clone a copy kept in this process instead of decoding; and
    /// a call answered before anything runs (a local hit, a refusal) answered now, as
    /// `Ok`, rather than by a future.
    ///
    /// For the attribute's generated code, which calls this as its function's future is
    /// first polled: a hit then builds, moves and polls none of the call's futures.
    pub(crate) fn answer_or_run_copying<T, E, F, Fut>(
        self,
        op: F,
        copier: Option<Copier<T>>,
        local: LocalTier,
    ) -> Result<Answer<T, E>, impl Future<Output = Answer<T, E>> + 'a>
    where
        K: 'a,
        T: Serialize + DeserializeOwned + 'a,
        E: From<Error> + 'a,
        P: ErrorPolicy<E> + 'a,
        F: FnOnce() -> Fut + 'a,
        Fut: Future<Output = Result<T, E>> + 'a,
    {
        let inner = &self.engine.inner;
        let op = Plain(op, copier);
        match inner.hit_or_request::<K, T, E, P, _>(self, &op, local) {
            Err(answer) => Ok(answer),
            // Boxed, as in `Inner::run`: the call's future holds a pointer, not the slower
            // paths' futures.
            Ok(req) => Err(Box::pin(
                inner.join_or_lead::<T, E, P, Plain<F, Option<Copier<T>>>>(req, op),
            )),
        }
    }

    /// Like [`Call::run`], but `op` runs on a task of its own, started at once, so it runs
    /// to its end and its result is stored even if the returned future is dropped (a
    /// client that went away, a timeout around the call): for operations that must never
    /// stop half-way. A retry that arrives meanwhile waits for it (or is refused, in
    /// reject mode) and then gets its result.
    ///
    /// The default, [`Call::run`], stops `op` with its caller and releases the key, so a
    /// retry runs it again; that suits operations that are safe to stop and redo.
    ///
    /// `op` and its values must be `Send + 'static` (it outlives the caller). A result
    /// already stored locally is returned without a task. A panic in `op` continues in
    /// the caller; a task cancelled because its runtime shut down is
    /// [`Error::Cancelled`], and a call made outside a tokio runtime is
    /// [`Error::Config`] ([`ConfigError::NoRuntime`](crate::ConfigError::NoRuntime)).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_runtime::Error> {
    /// use idempotent_runtime::Idempotency;
    /// use std::time::Duration;
    ///
    /// let idem = Idempotency::memory();
    /// let transfer = || async {
    ///     tokio::time::sleep(Duration::from_millis(50)).await; // debit, then credit
    ///     Ok::<_, idempotent_runtime::Error>("tr_1".to_owned())
    /// };
    /// // The caller gives up after 10 ms; the transfer still finishes, and is stored.
    /// let gave_up = tokio::time::timeout(
    ///     Duration::from_millis(10),
    ///     idem.call("transfer-1").scope("transfers").run_to_completion(transfer),
    /// )
    /// .await;
    /// assert!(gave_up.is_err());
    /// let again = idem.call("transfer-1").scope("transfers").run_to_completion(transfer).await?;
    /// assert_eq!(again, "tr_1");
    /// assert_eq!(idem.stats().executed, 1);
    /// # Ok(()) }
    /// ```
    pub fn run_to_completion<T, E, F, Fut>(
        self,
        op: F,
    ) -> impl Future<Output = Result<T, E>> + Send + 'static
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error> + Send + 'static,
        P: ErrorPolicy<E> + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.run_to_completion_with_outcome(op)
            .map(|answer| answer.map(|(value, _)| value))
    }

    /// Like [`Call::run_to_completion`], and says how the value was obtained.
    pub fn run_to_completion_with_outcome<T, E, F, Fut>(
        self,
        op: F,
    ) -> impl Future<Output = Result<(T, Outcome), E>> + Send + 'static
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error> + Send + 'static,
        P: ErrorPolicy<E> + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.run_to_completion_copying(op, None)
    }

    /// [`Call::run_to_completion_with_outcome`], with the copier of a `Clone` value type
    /// (see [`Call::answer_or_run_copying`]).
    pub(crate) fn run_to_completion_copying<T, E, F, Fut>(
        self,
        op: F,
        copier: Option<Copier<T>>,
    ) -> impl Future<Output = Result<(T, Outcome), E>> + Send + 'static
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error> + Send + 'static,
        P: ErrorPolicy<E> + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let inner = self.engine.inner.clone();
        let started = self.into_request::<F>().and_then(|req| {
            if let Some(answer) = inner.replay_local::<T, E, P>(&req, copier) {
                return Ok(Started::Done(answer));
            }
            let span = req.span.clone();
            let task = spawn_to_end(async move {
                inner
                    .join_or_lead::<T, E, P, Plain<F, Option<Copier<T>>>>(req, Plain(op, copier))
                    .await
            });
            task.map(Started::Running).inspect_err(|_| {
                // No runtime: the call is refused before anything ran.
                crate::observe::outcome(&span, crate::observe::OUTCOME_INVALID);
            })
        });
        async move {
            match started.map_err(E::from)? {
                Started::Done(answer) => answer,
                Started::Running(task) => task.join().await.map_err(E::from)?,
            }
        }
    }

    /// Resolves the call's settings against the engine's and formats its key. Runs when
    /// the call's future is first polled.
    pub(crate) fn into_request<F>(self) -> Result<Request, Error> {
        self.into_request_named(std::any::type_name::<F>())
    }

    /// Like [`Call::into_request`], with the default scope given.
    pub(crate) fn into_request_named(self, default_scope: &str) -> Result<Request, Error> {
        let scope = self.scope.as_deref().unwrap_or(default_scope);
        let store_kind = self.engine.inner.store_kind;
        let settings = self.settings();
        // The engine's own settings were checked when it was built.
        if self.ttl.is_some() || self.lease.is_some() {
            settings
                .check()
                .map_err(|e| refused(store_kind, Error::Config(e)))?;
        }
        let fingerprint = self
            .fingerprint
            .transpose()
            .map_err(|e| refused(store_kind, Error::Codec(e)))?;
        let key = self
            .key
            .into_store_key(scope, settings.max_key_len)
            .map_err(|e| refused(store_kind, Error::InvalidKey(e)))?;
        Ok(Request {
            span: CallSpan::new(&key, store_kind),
            labels: Labels::new(self.label, store_kind),
            key,
            fingerprint,
            settings,
            transactional: false,
            body_ended: AtomicBool::new(false),
        })
    }
}

impl<K, P> Call<'_, K, P> {
    /// The call's settings where it gave them, else the engine's.
    #[inline(always)]
    fn settings(&self) -> Settings {
        let defaults = self.engine.inner.defaults;
        Settings {
            ttl: self.ttl.unwrap_or(defaults.ttl),
            lease: self.lease.unwrap_or(defaults.lease),
            concurrency: self.concurrency.unwrap_or(defaults.concurrency),
            max_key_len: defaults.max_key_len,
        }
    }
}

/// A call refused before it had a key: its span says so, and ends.
#[cold]
fn refused(store_kind: &'static str, e: Error) -> Error {
    drop(invalid_call_span(store_kind));
    e
}

/// A call run to completion, once started: answered at once, or running on its task.
enum Started<T, E> {
    Done(Result<(T, Outcome), E>),
    Running(Detached<Result<(T, Outcome), E>>),
}

/// What a call's key can be: anything `Display`, formatted into its scope when the call
/// runs, or a key the `#[idempotent]` attribute prepared beforehand.
pub trait CallKey {
    /// The store key in `scope`, checked against `max_len` bytes.
    #[doc(hidden)]
    fn into_store_key(self, scope: &str, max_len: usize) -> Result<StoreKey, KeyError>;
}

impl<K: fmt::Display> CallKey for K {
    fn into_store_key(self, scope: &str, max_len: usize) -> Result<StoreKey, KeyError> {
        StoreKey::new(scope, &self, max_len)
    }
}

/// A key already formatted into its scope, so the hit path formats it once. Made by the
/// attribute's generated code; the call's scope setting does not apply to it.
#[doc(hidden)]
#[derive(Debug)]
pub struct PreparedKey {
    pub(crate) key: Result<StoreKey, KeyError>,
    /// The call has no key (an `Option` key that was `None`) and runs its body directly,
    /// without the engine (`on_missing_key = "run"`).
    pub(crate) direct: bool,
}

impl CallKey for PreparedKey {
    fn into_store_key(self, _scope: &str, _max_len: usize) -> Result<StoreKey, KeyError> {
        self.key
    }
}

impl<P> Call<'_, PreparedKey, P> {
    /// Whether the body runs without the engine (its key was absent and the function
    /// says to run then).
    pub(crate) fn runs_directly(&self) -> bool {
        self.key.direct
    }

    /// Answers the call from a completed result in the local tier, reading the call in
    /// place: a hit builds no [`Request`] and moves no call. `Missing` tells the request
    /// built after it that the local tier has nothing; `Unsure` that it must look itself.
    ///
    /// A call the request would refuse (a key, fingerprint or setting in error) is left
    /// to it, as is a call whose span a subscriber takes: the request makes the span and
    /// says there why the call ended.
    ///
    /// `finish` turns an answer into the caller's type where it is made (see
    /// `Inner::answer_local`).
    #[inline(always)]
    pub(crate) fn answer_locally<T, E, O>(
        &self,
        copier: Option<Copier<T>>,
        finish: impl FnOnce(Result<T, E>) -> O,
    ) -> Local<O>
    where
        T: DeserializeOwned,
        E: From<Error>,
        P: ErrorPolicy<E>,
    {
        if tracing::level_enabled!(tracing::Level::INFO) {
            return Local::Unsure;
        }
        let Ok(key) = &self.key.key else {
            return Local::Unsure;
        };
        let fingerprint = match &self.fingerprint {
            None => None,
            Some(Ok(fingerprint)) => Some(*fingerprint),
            Some(Err(_)) => return Local::Unsure,
        };
        if (self.ttl.is_some() || self.lease.is_some()) && self.settings().check().is_err() {
            return Local::Unsure;
        }
        let inner = &self.engine.inner;
        let labels = Labels::new(self.label.clone(), inner.store_kind);
        let seen = Seen {
            key,
            fingerprint,
            labels: &labels,
            span: &CallSpan::NONE,
        };
        inner.answer_local::<T, E, P, O>(seen, copier, finish)
    }

    /// Ends a call answered by [`Call::answer_locally`]: its key's buffer serves the
    /// thread's next key.
    ///
    /// Takes the buffer out where the call stands: taking the call by value would copy
    /// all of it first.
    #[inline(always)]
    pub(crate) fn answered_locally(&mut self) {
        // The call is dropped next; what it is left holding is never read.
        if let Ok(key) = std::mem::replace(&mut self.key.key, Err(KeyError::Empty)) {
            key.recycle();
        }
    }
}

/// Whether a call stores its `Err` results, chosen by [`Call::store_errors`].
///
/// Sealed: [`DiscardErrors`] and [`StoreErrors`] are the only policies.
pub trait ErrorPolicy<E>: sealed::Sealed {
    /// The encoded error to store, or `None` to store nothing.
    #[doc(hidden)]
    fn encode(err: &E, codec: Codec) -> Option<Result<Bytes, CodecError>>;
    /// A stored error, decoded.
    #[doc(hidden)]
    fn decode(bytes: &[u8], codec: Codec) -> Result<E, CodecError>;
}

/// The default: `Err` results are not stored, so a retry runs the operation again.
#[derive(Debug, Clone, Copy)]
pub enum DiscardErrors {}

/// `Err` results are stored and replayed like `Ok` ones.
#[derive(Debug, Clone, Copy)]
pub enum StoreErrors {}

impl<E> ErrorPolicy<E> for DiscardErrors {
    fn encode(_: &E, _: Codec) -> Option<Result<Bytes, CodecError>> {
        None
    }

    fn decode(_: &[u8], _: Codec) -> Result<E, CodecError> {
        // Another call with this key stored an error; this one cannot decode it.
        Err(CodecError::unexpected_stored_error())
    }
}

/// An error type that [`StoreErrors`] can store: `Serialize + DeserializeOwned`.
///
/// Its own trait only so that a type that falls short gets one message that says what
/// storing errors needs, rather than serde's advice to derive on whatever type it is
/// (the crate's own [`Error`](crate::Error) included, which is never stored).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be stored as an error (`cache_errors = true` or `Call::store_errors`)",
    label = "must implement `serde::Serialize` and `serde::de::DeserializeOwned`",
    note = "a function that stores its errors needs an error type of its own that derives `Serialize` and `Deserialize` and implements `From<idempotent_runtime::Error>`",
    note = "`idempotent_runtime::Error` itself is never stored: its refusals (a mismatch, a duplicate in progress, a store outage) belong to one call, not to the key"
)]
pub trait StorableError: Serialize + DeserializeOwned {}
#[diagnostic::do_not_recommend]
impl<E: Serialize + DeserializeOwned> StorableError for E {}

impl<E: StorableError> ErrorPolicy<E> for StoreErrors {
    fn encode(err: &E, codec: Codec) -> Option<Result<Bytes, CodecError>> {
        // Checked like values: an error that would not decode back is not stored as it
        // is (the engine stores the marker of an unstorable result instead).
        Some(codec.encode_checked(err))
    }

    fn decode(bytes: &[u8], codec: Codec) -> Result<E, CodecError> {
        codec.decode(bytes)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::DiscardErrors {}
    impl Sealed for super::StoreErrors {}
}
