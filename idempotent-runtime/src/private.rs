//! What the `#[idempotent]` attribute's generated code calls. Not a public API: names
//! and signatures here change without notice.

use std::fmt;
use std::future::Future;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::call::{Call, ErrorPolicy, PreparedKey};
use crate::engine::Idempotency;
use crate::error::{CodecError, Error};
use crate::fingerprint::Fingerprint;

/// The engine of functions that name no `store`: one per process, in memory.
pub fn default_engine() -> &'static Idempotency {
    static ENGINE: OnceLock<Idempotency> = OnceLock::new();
    ENGINE.get_or_init(Idempotency::memory)
}

/// An owned handle, so the body may borrow `self` mutably after `store = &self.idem`.
pub fn engine(engine: &Idempotency) -> Idempotency {
    engine.clone()
}

/// A call on the key, formatted into its scope before the body moves the arguments.
pub fn call<'a, K: fmt::Display + ?Sized>(
    engine: &'a Idempotency,
    scope: &str,
    key: &K,
) -> Call<'a, PreparedKey> {
    engine.call_prepared(scope, key)
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
impl<T: Serialize + DeserializeOwned> StoredValue for T {}

/// An error type that can carry the engine's refusals.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot carry `idempotent_runtime::Error`",
    label = "must implement `From<idempotent_runtime::Error>`",
    note = "refusals such as `Error::Mismatch` and `Error::InProgress` reach the caller through it"
)]
pub trait EngineError: From<Error> {}
impl<E: From<Error>> EngineError for E {}

/// Runs the function's body through the engine.
pub async fn run<R, P, F, Fut>(call: Call<'_, PreparedKey, P>, body: F) -> R
where
    R: IdempotentResult,
    R::Ok: StoredValue,
    R::Err: EngineError,
    P: ErrorPolicy<R::Err>,
    F: FnOnce() -> Fut,
    Fut: Future<Output = R>,
{
    R::from_result(
        call.run(move || async move { body().await.into_result() })
            .await,
    )
}
