//! What a store keeps for one key: a claim in progress, or a completed result.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;

use crate::clock::Timestamp;
use crate::fingerprint::Fingerprint;

/// Proof of holding a claim. Every claim gets a token no other claim has, minted by the
/// engine before it asks the store ([`FencingToken::mint`]), so a holder whose lease ran
/// out can be told apart from the caller that took the key over: complete, renew and
/// release only act for the current token. Tokens are compared for equality only; their
/// order means nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

/// Spreads consecutive counter values over the whole 64-bit range. Odd, so multiplying by
/// it is a bijection modulo 2^64: distinct counter values give distinct tokens.
const SPREAD: u64 = 0x9E37_79B9_7F4A_7C15;

impl FencingToken {
    /// The token with this number.
    pub const fn new(n: u64) -> Self {
        Self(n)
    }

    /// The token's number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// A token unlike any other: unique within this process by construction (a counter,
    /// spread by an odd multiplier, over a per-process random base), and across processes
    /// but with a chance of about 2^-64 per pair of claims on one key. Neither clocks
    /// nor their skew play a part, so two processes that read the same microsecond, or a
    /// process whose clock lags, still mint different tokens.
    pub fn mint() -> Self {
        static BASE: OnceLock<u64> = OnceLock::new();
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let base = *BASE.get_or_init(|| {
            // `RandomState` is seeded from the operating system's randomness: no extra
            // dependency for 64 random bits drawn once per process.
            let mut h = RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.finish()
        });
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        Self(base.wrapping_add(n.wrapping_mul(SPREAD)))
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
        /// The token of the claim that stored it: a holder that completes again (its first
        /// answer lost on the way) is told it succeeded.
        token: FencingToken,
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

    /// The token of the claim that wrote the record: its holder, or its completer.
    pub fn token(&self) -> FencingToken {
        match self.state {
            RecordState::InProgress { token, .. } | RecordState::Completed { token, .. } => token,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            assert!(seen.insert(FencingToken::mint()));
        }
    }
}
