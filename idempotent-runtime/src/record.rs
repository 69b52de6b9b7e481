//! What a store keeps for one key: a claim in progress, or a completed result.

use bytes::Bytes;

use crate::clock::Timestamp;
use crate::fingerprint::Fingerprint;

/// Proof of holding a claim. Every claim a store grants gets a new token, larger than any
/// it granted before for any key, so a holder whose lease ran out can be told apart from
/// the caller that took the key over: complete, renew and release only act for the
/// current token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// The token with this number.
    pub const fn new(n: u64) -> Self {
        Self(n)
    }

    /// The token's number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

/// The stored outcome of an operation, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredResult {
    /// The operation returned `Ok`; these are the encoded value's bytes.
    Ok(Bytes),
    /// The operation returned `Err` and the call stores errors; the encoded error's bytes.
    Err(Bytes),
}

impl StoredResult {
    /// Whether this is a stored error.
    pub fn is_err(&self) -> bool {
        matches!(self, StoredResult::Err(_))
    }

    /// The encoded bytes, whichever side they belong to.
    pub fn bytes(&self) -> &Bytes {
        match self {
            StoredResult::Ok(b) | StoredResult::Err(b) => b,
        }
    }
}

/// Where a key stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordState {
    /// A caller holds the key and is running the operation.
    InProgress {
        /// The holder's token.
        token: FencingToken,
        /// When the claim lapses unless renewed; after it, another caller may take over.
        lease_expires_at: Timestamp,
    },
    /// The operation finished and its result is kept for replay.
    Completed {
        /// The encoded result.
        result: StoredResult,
        /// When the result is forgotten and the key behaves as new.
        expires_at: Timestamp,
    },
}

/// One key's record: its state and the fingerprint of the payload that first claimed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The fingerprint the key was claimed with, if the call gave one.
    pub fingerprint: Option<Fingerprint>,
    /// In progress or completed.
    pub state: RecordState,
}

impl Record {
    /// Whether the record still counts at `now`: a claim within its lease, or a result
    /// within its TTL. A store treats a record that does not count as absent.
    pub fn is_live(&self, now: Timestamp) -> bool {
        match &self.state {
            RecordState::InProgress {
                lease_expires_at, ..
            } => now < *lease_expires_at,
            RecordState::Completed { expires_at, .. } => now < *expires_at,
        }
    }

    /// The time after which the record stops counting.
    pub fn ends_at(&self) -> Timestamp {
        match &self.state {
            RecordState::InProgress {
                lease_expires_at, ..
            } => *lease_expires_at,
            RecordState::Completed { expires_at, .. } => *expires_at,
        }
    }

    /// The holder's token, if the record is a claim in progress.
    pub fn holder(&self) -> Option<FencingToken> {
        match self.state {
            RecordState::InProgress { token, .. } => Some(token),
            RecordState::Completed { .. } => None,
        }
    }
}
