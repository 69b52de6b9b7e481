//! The one error type every fallible operation of the crate returns.
//!
//! Callers' own error types absorb it through `From<Error>`, so `run` can hand back the
//! user's `E` whether the operation itself failed or the idempotency machinery refused it.

use std::error::Error as StdError;
use std::fmt;

/// Why an idempotent call did not run its operation, or could not hand back its result.
///
/// Every variant except [`Error::Codec`] on a fresh result means the operation did **not**
/// run for this caller, so retrying later is safe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A duplicate arrived while the first call with this key was still running, and the
    /// call was set to reject duplicates rather than wait (`Concurrency::Reject`).
    #[error("a call with this idempotency key is already in progress")]
    InProgress,

    /// The key was used before with a different fingerprint (a different payload).
    /// Nothing ran.
    #[error("idempotency key reused with a different payload")]
    Mismatch,

    /// The key or scope cannot be used. Nothing ran.
    #[error("invalid idempotency key: {0}")]
    InvalidKey(#[from] KeyError),

    /// The store failed (unreachable, timed out, refused). The operation did not run:
    /// without the store there is no guarantee, so the engine fails closed. (One
    /// exception: a transactional call whose commit's outcome is unknown, of kind
    /// [`StoreErrorKind::CommitUnknown`].)
    #[error("idempotency store failed")]
    Store(#[from] StoreError),

    /// A result could not be encoded for storage, or a stored one could not be decoded.
    #[error("could not encode or decode a stored result")]
    Codec(#[from] CodecError),

    /// A setting is out of range (a TTL or lease a store cannot hold, say). Nothing ran.
    #[error("invalid idempotency setting: {0}")]
    Config(#[from] ConfigError),

    /// The operation's own task (see
    /// [`Call::run_to_completion`](crate::Call::run_to_completion)) was cancelled before it
    /// finished, because its runtime shut down. Whether the operation ran is unknown; its
    /// claim, if any, frees itself within one lease.
    #[error("the idempotent operation's task was cancelled before it finished")]
    Cancelled,

    /// The operation ran in a transaction (see
    /// [`Call::run_in_transaction`](crate::Call::run_in_transaction)) but its claim was
    /// taken over before it committed: its lease ran out without renewal (the task
    /// stalled, or the store was unreachable for a whole lease) and another caller
    /// claimed the key. The transaction was rolled back, so none of the operation's
    /// writes took effect; the key belongs to the other caller, and a retry gets its
    /// result.
    #[error(
        "the idempotency claim was taken over before the transaction committed; it was rolled back"
    )]
    LeaseLost,

    /// The operation run in a transaction (see
    /// [`Call::run_in_transaction`](crate::Call::run_in_transaction)) committed or rolled
    /// back that transaction itself (with a raw `COMMIT` or `ROLLBACK`), so its writes
    /// could not commit together with its result. Whether they took effect depends on
    /// what the operation did, so the key holds a marker for its TTL in place of the
    /// result, and retries get this error too rather than running again. A bug in the
    /// operation: use a savepoint (`tx.begin()`) to undo part of its work.
    #[error(
        "the operation ended its own transaction; its result could not be stored with its writes"
    )]
    TransactionEnded,
}

/// So that functions returning `std::io::Result<T>` can be idempotent. The kind says
/// whether a retry may succeed: `WouldBlock` for a duplicate in progress, `InvalidInput`
/// for a refused key or payload, `Other` for the rest.
impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::InProgress | Error::LeaseLost => std::io::ErrorKind::WouldBlock,
            Error::Mismatch | Error::InvalidKey(_) | Error::Config(_) => {
                std::io::ErrorKind::InvalidInput
            }
            Error::Store(_) | Error::Codec(_) | Error::Cancelled | Error::TransactionEnded => {
                std::io::ErrorKind::Other
            }
        };
        std::io::Error::new(kind, e)
    }
}

/// What is wrong with a key or scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key's text is empty.
    #[error("the key is empty")]
    Empty,
    /// The call has no key: its `Option` key was `None`, and the function says to fail
    /// then (`#[idempotent(on_missing_key = "fail")]`).
    #[error("the call has no idempotency key")]
    Missing,
    /// The key's text is longer than the engine allows.
    #[error("the key is {len} bytes long, more than the limit of {max}")]
    TooLong {
        /// The key's length in bytes.
        len: usize,
        /// The configured limit in bytes.
        max: usize,
    },
    /// The scope contains `|`, which separates scope from key in stored keys.
    #[error("the scope {scope:?} contains '|', which is reserved")]
    ReservedCharInScope {
        /// The offending scope.
        scope: String,
    },
}

/// A setting the engine cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The time-to-live of stored results is shorter than
    /// [`MIN_TTL`](crate::MIN_TTL): stores keep time in milliseconds.
    #[error("the TTL is {got:?}; it must be at least {min:?}")]
    TtlTooShort {
        /// The TTL asked for.
        got: std::time::Duration,
        /// The shortest accepted.
        min: std::time::Duration,
    },
    /// The time-to-live is longer than [`MAX_TTL`](crate::MAX_TTL), past what every
    /// store can hold.
    #[error("the TTL is {got:?}; it must be at most {max:?} (100 years)")]
    TtlTooLong {
        /// The TTL asked for.
        got: std::time::Duration,
        /// The longest accepted.
        max: std::time::Duration,
    },
    /// The lease is shorter than [`MIN_LEASE`](crate::MIN_LEASE): renewals every third
    /// of it could not keep up, and a live holder would lose its key.
    #[error("the lease is {got:?}; it must be at least {min:?}")]
    LeaseTooShort {
        /// The lease asked for.
        got: std::time::Duration,
        /// The shortest accepted.
        min: std::time::Duration,
    },
    /// The lease is longer than [`MAX_TTL`](crate::MAX_TTL), past what every store can
    /// hold.
    #[error("the lease is {got:?}; it must be at most {max:?} (100 years)")]
    LeaseTooLong {
        /// The lease asked for.
        got: std::time::Duration,
        /// The longest accepted.
        max: std::time::Duration,
    },
    /// [`Call::run_to_completion`](crate::Call::run_to_completion) was called outside a
    /// tokio runtime, so there is nowhere to run the operation's own task.
    #[error("running to completion needs a tokio runtime")]
    NoRuntime,
    /// The call was made outside a tokio runtime whose timers are enabled
    /// (`Builder::enable_time`, or `enable_all`; `#[tokio::main]` and `#[tokio::test]`
    /// enable them). A claim is kept by timers (its lease is renewed on one, and each
    /// store round trip after it is bounded by one), so the call is refused before it
    /// claims its key: nothing ran. A result this process holds already is still
    /// replayed, which needs no timer. [`Idempotency::record`](crate::Idempotency::record)
    /// and [`Idempotency::forget`](crate::Idempotency::forget) are refused the same way.
    ///
    /// Tokio cannot be asked whether a runtime has timers: the engine makes one and
    /// catches the panic tokio raises without them. Its message goes through the panic
    /// hook, once per runtime without timers and thread; under `panic = "abort"` the
    /// process ends there, before anything is claimed. A call that began on a runtime with
    /// timers and is then polled on one without (a future moved between runtimes), or on
    /// one that is shutting down, is not covered: tokio panics at the engine's next timer,
    /// and the claim is given back as for an operation that panicked, even where the
    /// operation had finished.
    #[error(
        "the tokio runtime has no timers (build it with enable_time or enable_all); nothing ran"
    )]
    TimersDisabled,
    /// [`KeyDigest::set_secret`](crate::KeyDigest::set_secret) was called after the
    /// digest secret was fixed (by a digest made before, or an earlier call): digests
    /// would not match across the change. Set it at start-up, before any call.
    #[error("the key digest secret is already fixed; set it before the first call")]
    DigestSecretFixed,
    /// [`Call::run_in_transaction`](crate::Call::run_in_transaction) was called on an
    /// engine whose store keeps no transactions of the operation's database (only a
    /// [`PostgresStore`](crate::store::PostgresStore) does). Nothing ran.
    #[error("run_in_transaction needs an engine over a PostgresStore")]
    NotTransactional,
    /// [`Call::run_in_transaction`](crate::Call::run_in_transaction) was called inside the
    /// operation of another: its transaction would commit apart from the outer one (so
    /// the outer's rollback would not undo it), and with the store's transactions all
    /// taken by such outer calls it would wait forever. Pass the outer transaction down
    /// instead. Nothing ran.
    #[error("run_in_transaction inside the operation of another: pass the outer transaction down instead")]
    NestedTransaction,
    /// The maximum key length is zero: no key could be used.
    #[error("the maximum key length must be at least 1")]
    ZeroMaxKeyLen,
    /// A table name that is not a plain SQL identifier (letters, digits, `_`, at most 48
    /// bytes, not starting with a digit).
    #[error("invalid table name {0:?}: use letters, digits and '_' (at most 48), not starting with a digit")]
    InvalidTableName(String),
}

/// A failure inside a [`Store`](crate::store::Store): the source is kept for `source()`.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct StoreError {
    context: &'static str,
    kind: StoreErrorKind,
    #[source]
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

/// What kind of store failure a [`StoreError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store did not answer, or answered with an error (the usual kind).
    Failed,
    /// The store holds as many claims in progress as it can, and refused a new one rather
    /// than let an operation run without a claim it keeps.
    Full,
    /// An operation run in a transaction
    /// ([`Call::run_in_transaction`](crate::Call::run_in_transaction)) returned, and its
    /// commit was sent, but the database could not be asked whether it committed (the
    /// connection broke during the commit, and the database stayed unreachable). Its
    /// writes and its stored result took effect together or not at all: a retry replays
    /// the result if they did, and runs the operation again if they did not.
    CommitUnknown,
}

impl StoreError {
    /// A store failure caused by `source`, described by `context` (e.g. `"claim"`).
    pub fn new(context: &'static str, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self {
            context,
            kind: StoreErrorKind::Failed,
            source: Some(source.into()),
        }
    }

    /// A store failure with no underlying error (e.g. an answer of the wrong shape).
    pub fn msg(context: &'static str) -> Self {
        Self {
            context,
            kind: StoreErrorKind::Failed,
            source: None,
        }
    }

    /// A commit whose outcome could not be learned, described by `context`.
    #[cfg(feature = "postgres")]
    pub(crate) fn commit_unknown(
        context: &'static str,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self {
            context,
            kind: StoreErrorKind::CommitUnknown,
            source: Some(source.into()),
        }
    }

    /// A store that has no room for another claim, described by `context`.
    pub fn full(context: &'static str) -> Self {
        Self {
            context,
            kind: StoreErrorKind::Full,
            source: None,
        }
    }

    /// What the store was doing when it failed.
    pub fn context(&self) -> &'static str {
        self.context
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

/// A result that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub struct CodecError {
    kind: CodecErrorKind,
    // The scope of the record, once known: a record that stopped decoding after a deploy
    // is found by it.
    scope: Option<Box<str>>,
    #[source]
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

/// Which step of encoding or decoding failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecErrorKind {
    /// A fresh result could not be serialized.
    Encode,
    /// A stored result could not be deserialized into the caller's type.
    Decode,
    /// A fingerprint value could not be serialized.
    Fingerprint,
    /// The record holds a stored error, but this call does not store errors and so cannot
    /// decode one.
    UnexpectedStoredError,
    /// The record was written by another codec than this engine's (engines sharing a store
    /// must use the same one), or by no codec this version knows.
    WrongCodec,
    /// The operation ran, but its value could not be stored faithfully (the codec cannot
    /// encode it, what it encodes does not decode back, such as a `NaN` in JSON, or its
    /// `Serialize` panicked), nor could its error, for a call that stores errors. In its
    /// place the key holds a marker for its TTL, so a retry gets this error rather than
    /// running again or receiving something else.
    Unstorable,
    /// The operation ended the transaction it ran in itself; see
    /// [`Error::TransactionEnded`], which replays of such a record are reported as.
    TransactionEnded,
}

impl CodecError {
    pub(crate) fn new(kind: CodecErrorKind, source: impl StdError + Send + Sync + 'static) -> Self {
        Self {
            kind,
            scope: None,
            source: Some(Box::new(source)),
        }
    }

    pub(crate) fn of_kind(kind: CodecErrorKind) -> Self {
        Self {
            kind,
            scope: None,
            source: None,
        }
    }

    pub(crate) fn unexpected_stored_error() -> Self {
        Self::of_kind(CodecErrorKind::UnexpectedStoredError)
    }

    /// The error, naming the scope of the record it is about.
    pub(crate) fn in_scope(mut self, scope: &str) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Which step failed.
    pub fn kind(&self) -> CodecErrorKind {
        self.kind
    }

    /// The scope of the record, when the error is about a stored one.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            CodecErrorKind::Encode => "could not encode the result",
            CodecErrorKind::Decode => {
                "could not decode the stored result (did its type change? put a version in the scope)"
            }
            CodecErrorKind::Fingerprint => "could not serialize the fingerprint value",
            CodecErrorKind::UnexpectedStoredError => {
                "the record holds a stored error, but this call does not store errors"
            }
            CodecErrorKind::WrongCodec => "the stored result was written by another codec",
            CodecErrorKind::Unstorable => {
                "the operation ran, but its value (or error) could not be stored faithfully, so it cannot be replayed"
            }
            CodecErrorKind::TransactionEnded => {
                "the operation ended its own transaction, so its result was not stored with its writes"
            }
        })?;
        if let Some(scope) = &self.scope {
            write!(f, " (scope {scope:?})")?;
        }
        Ok(())
    }
}
