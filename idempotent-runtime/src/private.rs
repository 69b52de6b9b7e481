//! What the `#[idempotent]` attribute's generated code calls. Not a public API: names
//! and signatures here change without notice.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

use futures_util::future::Either;
use futures_util::FutureExt as _;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::call::{Call, ErrorPolicy, PreparedKey};
use crate::copy::Copier;
use crate::engine::{Idempotency, Local, LocalTier};
use crate::error::{CodecError, Error};
use crate::fingerprint::Fingerprint;
use crate::outcome::Report;
#[cfg(feature = "postgres")]
use futures_util::future::BoxFuture;
#[cfg(feature = "postgres")]
use sqlx::{Postgres, Transaction};

/// The engine of functions that name no `store`: their block's; in a test build of their
/// crate (`per_runtime`, the attribute passes `cfg!(test)`), their runtime's; else the
/// process's (see `default_engine.rs`).
pub fn default_engine(per_runtime: bool) -> Idempotency {
    crate::default_engine::current(per_runtime)
}

/// Whether runtime `id` has a default engine now, for the tests of their cleanup.
pub fn runtime_has_a_default_engine(id: tokio::runtime::Id) -> bool {
    crate::default_engine::has_one(id)
}

/// The engine `store` names, borrowed for the call (through `&self`, a shared-reference
/// argument or a static). A function rather than a typed `let`, against which clippy
/// would flag the user's `store = &*ENGINE` as an explicit auto-deref.
pub fn borrow(engine: &Idempotency) -> &Idempotency {
    engine
}

/// An owned handle, so the body may borrow `self` mutably after `store = &self.idem`.
pub fn engine(engine: &Idempotency) -> Idempotency {
    engine.clone()
}

/// The default scope of a function, from a closure written in its body: the closure's
/// type name holds the function's path with every generic argument and, in an impl, the
/// impl's type and trait (`<app::Stripe as app::Provider>::charge`, `app::load<u64>`), so
/// two impls or two instances of a generic never share records. The trailing
/// `::{{closure}}`s (the marker's, and the async body's) are cut off, and so are the
/// arguments of the function's `impl Trait` parameters, which rustc prints after its
/// `named` ones: `charge(order: impl Display)` called with a `&str` and with a `String` is
/// one operation. Without such parameters the scope is a slice of a `&'static str`: no
/// allocation.
pub fn default_scope<M>(_marker: &M, anonymous: usize) -> Cow<'static, str> {
    let mut name = std::any::type_name::<M>();
    while let Some(outer) = name.strip_suffix("::{{closure}}") {
        name = outer;
    }
    if anonymous == 0 {
        return Cow::Borrowed(name);
    }
    // The `impl Trait` arguments' types are the last ones, after the named parameters and
    // any rustc adds (`Self`, in a trait's default method).
    match generic_arguments(name) {
        Some((path, args)) if args.len() == anonymous => Cow::Borrowed(path),
        Some((path, args)) if args.len() > anonymous => {
            let kept = &args[..args.len() - anonymous];
            Cow::Owned(format!("{path}<{}>", kept.join(", ")))
        }
        // Not the shape expected: keep it all, which tells more apart, never less.
        _ => Cow::Borrowed(name),
    }
}

/// `path<A, B>` split into `path` and its top-level arguments `["A", "B"]`; `None` when the
/// name does not end in a generic argument list.
///
/// Scanned forwards, so that what is quoted (a `char` const argument such as `'>'`) is
/// skipped, and a function type's `->` is no bracket.
fn generic_arguments(name: &str) -> Option<(&str, Vec<&str>)> {
    let b = name.as_bytes();
    if b.last() != Some(&b'>') {
        return None;
    }
    // The start of the argument list open at each depth, and the commas at the depth of
    // the list that closes at the very end.
    let mut opens: Vec<usize> = Vec::new();
    let mut commas: Vec<Vec<usize>> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                // A char: `'x'`, `'\''` or `'\u{..}'`; skip to its closing quote.
                i += 1;
                if b.get(i) == Some(&b'\\') {
                    i += 1;
                }
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
            }
            b'<' | b'(' | b'[' => {
                opens.push(i);
                commas.push(Vec::new());
            }
            b'-' if b.get(i + 1) == Some(&b'>') => i += 1,
            b'>' | b')' | b']' => {
                let open = opens.pop()?;
                let inner = commas.pop()?;
                if i == b.len() - 1 {
                    if b[open] != b'<' {
                        return None;
                    }
                    let mut args = Vec::with_capacity(inner.len() + 1);
                    let mut start = open + 1;
                    for c in inner {
                        args.push(name[start..c].trim());
                        start = c + 1;
                    }
                    args.push(name[start..i].trim());
                    return Some((&name[..open], args));
                }
            }
            b',' => {
                if let Some(top) = commas.last_mut() {
                    top.push(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// A call on the key, formatted into its scope before the body moves the arguments.
/// `text` is what [`KeyPick`] found: the key itself where it is a string.
///
/// `scope` is the attribute's `scope = "..."` (a [`LiteralScope`]) or [`default_scope`]'s
/// (a `Cow<'static, str>`): chosen by code, never by a request, so it is also the `scope`
/// label of the call's metrics (feature `metrics`).
pub fn call<'a, K: KeyText + ?Sized>(
    engine: &'a Idempotency,
    scope: impl CallScope,
    key: &K,
    text: Option<&str>,
) -> Call<'a, PreparedKey> {
    let (scope, checked) = scope.into_scope();
    engine.call_prepared(scope, checked, key, text)
}

/// The attribute's `scope = "..."`, checked when the function is compiled: the attribute
/// makes it in a `const` block, where [`LiteralScope::new`] fails the build on a scope a
/// key cannot have. Calls then skip the check.
#[derive(Debug, Clone, Copy)]
pub struct LiteralScope(&'static str);

impl LiteralScope {
    /// The scope, if it is not empty and holds no `|` (which separates scope and key in
    /// a store key); else a panic, at compile time in a `const`.
    pub const fn new(scope: &'static str) -> Self {
        let bytes = scope.as_bytes();
        assert!(!bytes.is_empty(), "the scope must be non-empty");
        let mut i = 0;
        while i < bytes.len() {
            // `|` is ASCII: no byte of another UTF-8 character equals it.
            assert!(bytes[i] != b'|', "the scope must not contain `|`");
            i += 1;
        }
        Self(scope)
    }
}

/// What [`call`] takes as a scope: a [`LiteralScope`], known good, or a default scope,
/// which the call checks.
pub trait CallScope {
    /// The scope, and whether it is known to hold no `|`.
    fn into_scope(self) -> (Cow<'static, str>, bool);
}

impl CallScope for LiteralScope {
    fn into_scope(self) -> (Cow<'static, str>, bool) {
        (Cow::Borrowed(self.0), true)
    }
}

impl CallScope for Cow<'static, str> {
    fn into_scope(self) -> (Cow<'static, str>, bool) {
        (self, false)
    }
}

/// [`call`], for the key inside an `Option` key (`on_missing_key = ...`), whose
/// compile error names the `Option`'s content rather than suggesting `on_missing_key`,
/// which is given already.
pub fn call_present<'a, K: PresentKeyText + ?Sized>(
    engine: &'a Idempotency,
    scope: impl CallScope,
    key: &K,
    text: Option<&str>,
) -> Call<'a, PreparedKey> {
    let (scope, checked) = scope.into_scope();
    engine.call_prepared(scope, checked, key, text)
}

/// What the key inside an `Option` key must be: `Display`.
#[diagnostic::on_unimplemented(
    message = "`{Self}`, inside the `Option` key, cannot be an idempotency key: it does not implement `Display`",
    label = "the key present is written into the store key through `Display`",
    note = "with `on_missing_key`, the key is the content of `Some`; it must implement `Display`"
)]
pub trait PresentKeyText: fmt::Display {}
#[diagnostic::do_not_recommend]
impl<K: fmt::Display + ?Sized> PresentKeyText for K {}

/// What a key must be: `Display`, which writes it into the store key.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an idempotency key: it does not implement `Display`",
    label = "the key is written into the store key through `Display`",
    note = "an `Option` key needs `on_missing_key = \"run\"` or `on_missing_key = \"fail\"`, which say what a call without a key does"
)]
pub trait KeyText: fmt::Display {}
#[diagnostic::do_not_recommend]
impl<K: fmt::Display + ?Sized> KeyText for K {}

/// A key that may be absent: `Option<K>`, or a reference to one
/// (`on_missing_key = ...`).
#[diagnostic::on_unimplemented(
    message = "`on_missing_key` needs a key of type `Option<_>`; `{Self}` is not one",
    label = "not an `Option`",
    note = "leave `on_missing_key` out when every call has a key"
)]
pub trait OptionalKey {
    /// The key's type when present.
    type Key: ?Sized;
    /// The key, if present.
    fn as_key(&self) -> Option<&Self::Key>;
}

impl<K> OptionalKey for Option<K> {
    type Key = K;
    fn as_key(&self) -> Option<&K> {
        self.as_ref()
    }
}

impl<T: OptionalKey + ?Sized> OptionalKey for &T {
    type Key = T::Key;
    fn as_key(&self) -> Option<&T::Key> {
        (**self).as_key()
    }
}

/// The key of an `Option` key, if present.
pub fn optional_key<T: OptionalKey + ?Sized>(key: &T) -> Option<&T::Key> {
    key.as_key()
}

/// What a call whose `Option` key is `None` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKey {
    /// Runs its body directly, without idempotency.
    Run,
    /// Fails with [`Error::InvalidKey`] (of kind [`KeyError::Missing`](crate::KeyError::Missing)),
    /// running nothing.
    Fail,
}

/// A call without a key (`on_missing_key`).
pub fn call_without_key(engine: &Idempotency, missing: MissingKey) -> Call<'_, PreparedKey> {
    Call::new(
        engine,
        PreparedKey {
            key: Err(crate::error::KeyError::Missing),
            direct: missing == MissingKey::Run,
        },
    )
}

/// Finds out whether a key is a string (`str`, `String`, `Cow<str>` or a reference to
/// one), whose text can be copied into the store key as it is rather than written
/// through `Display`, which writes the same text at several times the cost. By method
/// resolution on the key's concrete type, as [`Pick`] does: `(&&KeyPick(&key)).text()`.
pub struct KeyPick<'k, K: ?Sized>(pub &'k K);

/// The key is a string: its text.
pub trait ViaStr {
    /// The key's text.
    fn text(&self) -> Option<&str>;
}

macro_rules! via_str {
    ($($ty:ty),*) => {$(
        impl ViaStr for &KeyPick<'_, $ty> {
            fn text(&self) -> Option<&str> {
                Some(self.0)
            }
        }
    )*};
}

via_str!(
    str,
    &str,
    &&str,
    String,
    &String,
    Cow<'_, str>,
    &Cow<'_, str>
);

/// Any other key: written through `Display`. Without bounds, so a key that is not
/// `Display` is reported once, where the call is made.
pub trait ViaDisplay {
    /// No text: the key is written through `Display`.
    fn text(&self) -> Option<&str>;
}

impl<K: ?Sized> ViaDisplay for KeyPick<'_, K> {
    fn text(&self) -> Option<&str> {
        None
    }
}

/// The fingerprint, taken before the body moves the arguments.
pub fn fingerprint<V: Serialize + ?Sized>(value: &V) -> Result<Fingerprint, CodecError> {
    Fingerprint::of(value)
}

/// Sets a fingerprint computed earlier.
pub fn with_fingerprint<'a, P>(
    call: Call<'a, PreparedKey, P>,
    fingerprint: Result<Fingerprint, CodecError>,
) -> Call<'a, PreparedKey, P> {
    call.fingerprint_result(fingerprint)
}

/// The return types `#[idempotent]` accepts: `Result<T, E>` under any alias.
#[diagnostic::on_unimplemented(
    message = "`#[idempotent]` functions must return `Result<T, E>`, not `{Self}`",
    label = "not a `Result`",
    note = "aliases of `Result` such as `anyhow::Result<T>` or `std::io::Result<T>` are fine"
)]
pub trait IdempotentResult {
    /// The success type, stored and replayed.
    type Ok;
    /// The error type, which carries the engine's refusals.
    type Err;
    /// Into a plain `Result`.
    fn into_result(self) -> Result<Self::Ok, Self::Err>;
    /// Back from a plain `Result`.
    fn from_result(result: Result<Self::Ok, Self::Err>) -> Self;
}

impl<T, E> IdempotentResult for Result<T, E> {
    type Ok = T;
    type Err = E;
    fn into_result(self) -> Result<T, E> {
        self
    }
    fn from_result(result: Result<T, E>) -> Self {
        result
    }
}

/// A success type the engine can store.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be stored by `#[idempotent]`",
    label = "must implement `serde::Serialize` and `serde::de::DeserializeOwned`",
    note = "derive them: `#[derive(serde::Serialize, serde::Deserialize)]`"
)]
pub trait StoredValue: Serialize + DeserializeOwned {}
// One message for the value, not one per missing serde trait.
#[diagnostic::do_not_recommend]
impl<T: Serialize + DeserializeOwned> StoredValue for T {}

/// An error type that can carry the engine's refusals.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot carry `idempotent_runtime::Error`",
    label = "must implement `From<idempotent_runtime::Error>`",
    note = "refusals such as `Error::Mismatch` and `Error::InProgress` reach the caller through it"
)]
pub trait EngineError: From<Error> {}
// Without this, rustc follows the blanket impl to its `From<Error>` bound and reports the
// same missing impl a second time, in its own words.
#[diagnostic::do_not_recommend]
impl<E: From<Error>> EngineError for E {}

/// Finds out, for a function's return type `R`, whether hits may clone an in-process copy
/// of its value instead of decoding it: where `R::Ok` is `Clone + Send + Sync + 'static`.
/// By method resolution on the concrete type, so the user's type needs no new bound:
/// `(&&Pick::<R>::new()).copies()` finds [`ViaClone`] on `&Pick<R>` first when its bounds
/// hold, and [`ViaDecode`] on `Pick<R>` otherwise (a generic `T` without a `Clone`
/// bound, a type that is not `Clone`, a borrowed one).
pub struct Pick<R>(PhantomData<fn() -> R>);

impl<R> Pick<R> {
    /// The picker for `R`.
    pub const fn new() -> Self {
        Pick(PhantomData)
    }
}

impl<R> Default for Pick<R> {
    fn default() -> Self {
        Self::new()
    }
}

/// Hits of `R`'s value clone a copy kept in this process.
pub trait ViaClone {
    /// The copier's type.
    type Copies;
    /// The copier.
    fn copies(&self) -> Self::Copies;
}

impl<R> ViaClone for &Pick<R>
where
    R: IdempotentResult,
    R::Ok: Clone + Send + Sync + 'static,
{
    type Copies = Copies<R::Ok>;
    fn copies(&self) -> Copies<R::Ok> {
        Copies(Some(Copier::new()))
    }
}

/// Hits of `R`'s value decode it. Without bounds, so that a return type that is not a
/// `Result` is reported once, where the body runs, and not here again.
pub trait ViaDecode {
    /// The copier's type.
    type Copies;
    /// No copier.
    fn copies(&self) -> Self::Copies;
}

impl<R> ViaDecode for Pick<R> {
    type Copies = NoCopies;
    fn copies(&self) -> NoCopies {
        NoCopies
    }
}

/// The copier `replay = "clone"` demands.
pub fn clone_copies<R>() -> Copies<R::Ok>
where
    R: IdempotentResult,
    R::Ok: ClonedValue,
{
    Copies(Some(Copier::new()))
}

/// A value whose hits may clone a copy kept in this process.
#[diagnostic::on_unimplemented(
    message = "`replay = \"clone\"` needs a value that is `Clone + Send + Sync + 'static`; `{Self}` is not",
    label = "hits of this value cannot clone a copy",
    note = "derive `Clone`, or leave `replay` out (hits then decode the stored record)"
)]
pub trait ClonedValue: Clone + Send + Sync + 'static {}
impl<T: Clone + Send + Sync + 'static> ClonedValue for T {}

/// How hits of a `Clone` value type get their value: from a copy.
pub struct Copies<T>(Option<Copier<T>>);

/// Hits decode.
pub struct NoCopies;

/// What [`Pick`] found, as the engine takes it.
pub trait IntoCopier<T> {
    /// The copier, if hits clone.
    fn into_copier(self) -> Copies<T>;
}

impl<T> IntoCopier<T> for Copies<T> {
    fn into_copier(self) -> Copies<T> {
        self
    }
}

impl<T> IntoCopier<T> for NoCopies {
    fn into_copier(self) -> Copies<T> {
        Copies(None)
    }
}

/// Runs the function's body through the engine; `copies` is what [`Pick`] found for its
/// return type.
///
/// Called as the function's future is first polled: a call the engine answers before
/// anything runs (a local hit, a refusal) is answered here, as `Ok`, so a hit builds,
/// moves and polls none of the call's futures; else `Err` holds the future the generated
/// code awaits: the call's own future (boxed), mapped, rather than another `async fn`
/// around it, which would hold a second copy of the call.
#[allow(clippy::type_complexity)]
pub fn run<'a, R, P, C, F, Fut>(
    mut call: Call<'a, PreparedKey, P>,
    copies: C,
    body: F,
) -> Result<R, impl Future<Output = R> + 'a>
where
    R: IdempotentResult + 'a,
    R::Ok: StoredValue,
    R::Err: EngineError,
    P: ErrorPolicy<R::Err> + 'a,
    C: IntoCopier<R::Ok>,
    F: FnOnce() -> Fut + 'a,
    Fut: Future<Output = R> + 'a,
{
    if crate::switch::disabled() || call.runs_directly() {
        // No engine answers this call, so it has no outcome; its nested calls must not
        // report one for it either.
        let quiet = Report::claim();
        return Err(Either::Left(async move {
            let output = body().await;
            quiet.settle();
            output
        }));
    }
    let copier = copies.into_copier().0;
    let mut report = Report::claim();
    // A local hit is answered from the call as it is, before its request is built, and
    // made into `R` as it is decoded.
    let local = call.answer_locally::<R::Ok, R::Err, _>(
        copier,
        #[inline(always)]
        |answer| {
            report.replayed(answer.is_ok());
            Ok(R::from_result(answer))
        },
    );
    let local = match local {
        Local::Answered(done) => {
            call.answered_locally();
            return done;
        }
        Local::Missing => LocalTier::Missing,
        Local::Unsure => LocalTier::Unsure,
    };
    let started = report.started();
    let answered = call.answer_or_run_copying(
        move || {
            started.ran();
            async move { body().await.into_result() }
        },
        copier,
        local,
    );
    match answered {
        Ok(answer) => Ok(R::from_result(report.answered(answer))),
        Err(rest) => Err(Either::Right(
            rest.map(move |answer| R::from_result(report.answered(answer))),
        )),
    }
}

/// Runs the function's body through the engine on a task of its own
/// (`on_cancel = "finish"`): see [`Call::run_to_completion`].
pub fn run_to_completion<'a, R, P, C, F, Fut>(
    call: Call<'a, PreparedKey, P>,
    copies: C,
    body: F,
) -> impl Future<Output = R> + Send + 'static
where
    R: IdempotentResult + Send + 'static,
    R::Ok: StoredValue + Send + 'static,
    R::Err: EngineError + Send + 'static,
    P: ErrorPolicy<R::Err> + Send + 'static,
    C: IntoCopier<R::Ok>,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    if crate::switch::disabled() || call.runs_directly() {
        // Without the engine, still on a task of its own: `on_cancel = "finish"` promises
        // the body its end whether or not the call has a key.
        let quiet = Report::claim();
        let task = crate::detached::spawn_to_end(body());
        return Either::Left(async move {
            let joined = match task {
                Ok(task) => task.join().await,
                Err(e) => Err(e),
            };
            quiet.settle();
            joined.unwrap_or_else(|e| R::from_result(Err(e.into())))
        });
    }
    let copier = copies.into_copier().0;
    let report = Report::claim();
    let started = report.started();
    Either::Right(
        call.run_to_completion_copying(
            move || {
                started.ran();
                async move { body().await.into_result() }
            },
            copier,
        )
        .map(move |answer| R::from_result(report.answered(answer))),
    )
}

/// Runs the function's body through the engine in a transaction of its store
/// (`transaction = tx`): see [`Call::run_in_transaction`].
#[cfg(feature = "postgres")]
pub fn run_in_transaction<'a, R, P, F>(
    call: Call<'a, PreparedKey, P>,
    body: F,
) -> impl Future<Output = R> + 'a
where
    R: IdempotentResult + 'a,
    R::Ok: StoredValue,
    R::Err: EngineError,
    P: ErrorPolicy<R::Err> + 'a,
    F: for<'c> FnOnce(&'c mut Transaction<'a, Postgres>) -> BoxFuture<'c, R> + Send + 'a,
{
    let report = Report::claim();
    let started = report.started();
    call.run_in_transaction_with_outcome(move |tx| {
        started.ran();
        Box::pin(body(tx).map(R::into_result))
    })
    .map(move |answer| R::from_result(report.answered(answer)))
}

/// The body of an `#[async_trait]` method run in a transaction, bound to a `let` before
/// it is run: passed through here, the closure's signature is inferred from this bound.
#[cfg(feature = "postgres")]
pub fn transaction_body<'a, R, P, F>(_call: &Call<'a, PreparedKey, P>, body: F) -> F
where
    F: for<'c> FnOnce(&'c mut Transaction<'a, Postgres>) -> BoxFuture<'c, R> + Send + 'a,
{
    body
}

#[cfg(test)]
mod tests {
    use super::{generic_arguments, CallScope, LiteralScope};

    #[test]
    fn a_literal_scope_is_checked_once_and_passed_as_checked() {
        assert_eq!(
            LiteralScope::new("payments.charge").into_scope(),
            ("payments.charge".into(), true)
        );
        let default: std::borrow::Cow<'static, str> = "app::place".into();
        assert_eq!(default.into_scope(), ("app::place".into(), false));
    }

    #[test]
    #[should_panic(expected = "the scope must not contain `|`")]
    fn a_literal_scope_with_the_separator_is_refused() {
        let _ = LiteralScope::new("a|b");
    }

    #[test]
    #[should_panic(expected = "the scope must be non-empty")]
    fn an_empty_literal_scope_is_refused() {
        let _ = LiteralScope::new("");
    }

    #[test]
    fn generic_arguments_are_split_at_the_top_level_only() {
        assert_eq!(generic_arguments("m::f"), None);
        assert_eq!(generic_arguments("m::f<u8>"), Some(("m::f", vec!["u8"])));
        assert_eq!(
            generic_arguments("<m::S<u8> as m::T>::f<alloc::vec::Vec<(u8, u16)>, &str>"),
            Some((
                "<m::S<u8> as m::T>::f",
                vec!["alloc::vec::Vec<(u8, u16)>", "&str"]
            ))
        );
        assert_eq!(
            generic_arguments("m::f<fn(u8) -> u8, [u8; 3]>"),
            Some(("m::f", vec!["fn(u8) -> u8", "[u8; 3]"]))
        );
        assert_eq!(generic_arguments("m::S<u8>::f"), None);
        assert_eq!(
            generic_arguments("m::f<'>', '<', '\\'', &str>"),
            Some(("m::f", vec!["'>'", "'<'", "'\\''", "&str"]))
        );
    }
}
