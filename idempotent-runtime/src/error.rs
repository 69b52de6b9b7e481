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
    /// without the store there is no guarantee, so the engine fails closed.
    #[error("idempotency store failed")]
    Store(#[from] StoreError),

    /// A result could not be encoded for storage, or a stored one could not be decoded.
    #[error("could not encode or decode a stored result")]
    Codec(#[from] CodecError),

    /// A setting is out of range (a zero TTL or lease, say). Nothing ran.
    #[error("invalid idempotency setting: {0}")]
    Config(#[from] ConfigError),
}

/// So that functions returning `std::io::Result<T>` can be idempotent. The kind says
/// whether a retry may succeed: `WouldBlock` for a duplicate in progress, `InvalidInput`
/// for a refused key or payload, `Other` for the rest.
impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::InProgress => std::io::ErrorKind::WouldBlock,
            Error::Mismatch | Error::InvalidKey(_) | Error::Config(_) => {
                std::io::ErrorKind::InvalidInput
            }
            Error::Store(_) | Error::Codec(_) => std::io::ErrorKind::Other,
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
    /// The time-to-live of stored results is zero.
    #[error("the TTL must be longer than zero")]
    ZeroTtl,
    /// The lease is zero: a claim would expire the moment it was taken.
    #[error("the lease must be longer than zero")]
    ZeroLease,
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
    #[source]
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl StoreError {
    /// A store failure caused by `source`, described by `context` (e.g. `"claim"`).
    pub fn new(context: &'static str, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self {
            context,
            source: Some(source.into()),
        }
    }

    /// A store failure with no underlying error (e.g. an answer of the wrong shape).
    pub fn msg(context: &'static str) -> Self {
        Self {
            context,
            source: None,
        }
    }

    /// What the store was doing when it failed.
    pub fn context(&self) -> &'static str {
        self.context
    }
}

/// A result that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub struct CodecError {
    kind: CodecErrorKind,
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
}

impl CodecError {
    pub(crate) fn new(kind: CodecErrorKind, source: impl StdError + Send + Sync + 'static) -> Self {
        Self {
            kind,
            source: Some(Box::new(source)),
        }
    }

    pub(crate) fn unexpected_stored_error() -> Self {
        Self {
            kind: CodecErrorKind::UnexpectedStoredError,
            source: None,
        }
    }

    /// Which step failed.
    pub fn kind(&self) -> CodecErrorKind {
        self.kind
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            CodecErrorKind::Encode => "could not encode the result",
            CodecErrorKind::Decode => "could not decode the stored result",
            CodecErrorKind::Fingerprint => "could not serialize the fingerprint value",
            CodecErrorKind::UnexpectedStoredError => {
                "the record holds a stored error, but this call does not store errors"
            }
        })
    }
}
