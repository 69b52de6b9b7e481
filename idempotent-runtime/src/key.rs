//! The key a store sees: the caller's key inside its scope, validated once.

use std::fmt::{self, Write as _};

use sha2::{Digest, Sha256};

use crate::error::KeyError;

/// Separates scope from key in [`StoreKey::as_str`]; scopes may not contain it, which
/// keeps the joined form unambiguous.
pub const SCOPE_SEPARATOR: char = '|';

/// A validated key inside its scope, as handed to a [`Store`](crate::store::Store).
///
/// Held as one string (`scope|key`) so that the hit path allocates once.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreKey {
    joined: String,
    scope_len: usize,
}

impl StoreKey {
    /// Formats `key` into `scope` and checks both. `max_len` bounds the key's bytes.
    pub fn new(scope: &str, key: impl fmt::Display, max_len: usize) -> Result<Self, KeyError> {
        if scope.contains(SCOPE_SEPARATOR) {
            return Err(KeyError::ReservedCharInScope {
                scope: scope.to_owned(),
            });
        }
        let mut joined = String::with_capacity(scope.len() + 1 + 36);
        joined.push_str(scope);
        joined.push(SCOPE_SEPARATOR);
        // Writing into a String cannot fail unless the key's Display impl does.
        let _ = write!(joined, "{key}");
        let len = joined.len() - scope.len() - 1;
        if len == 0 {
            return Err(KeyError::Empty);
        }
        if len > max_len {
            return Err(KeyError::TooLong { len, max: max_len });
        }
        Ok(Self {
            joined,
            scope_len: scope.len(),
        })
    }

    /// The scope.
    pub fn scope(&self) -> &str {
        &self.joined[..self.scope_len]
    }

    /// The caller's key, without its scope.
    pub fn key(&self) -> &str {
        &self.joined[self.scope_len + 1..]
    }

    /// `scope|key`: unique per (scope, key) pair, for stores that keep one key column.
    pub fn as_str(&self) -> &str {
        &self.joined
    }

    /// A short, stable hash of scope and key for logs, so keys (which may carry customer
    /// data) never appear in them.
    pub fn digest(&self) -> KeyDigest {
        let hash = Sha256::digest(self.joined.as_bytes());
        let mut short = [0u8; 8];
        short.copy_from_slice(&hash[..8]);
        KeyDigest(u64::from_be_bytes(short))
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug output ends up in logs too: show the scope and the digest only.
        f.debug_struct("StoreKey")
            .field("scope", &self.scope())
            .field("key_digest", &self.digest())
            .finish()
    }
}

/// The first 64 bits of a key's SHA-256, printed as hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest(u64);

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_and_key_round_trip() {
        let k = StoreKey::new("payments", "order-7", 255).unwrap();
        assert_eq!(k.scope(), "payments");
        assert_eq!(k.key(), "order-7");
        assert_eq!(k.as_str(), "payments|order-7");
    }

    #[test]
    fn empty_and_long_keys_are_refused() {
        assert_eq!(StoreKey::new("s", "", 255), Err(KeyError::Empty));
        let long = "x".repeat(256);
        assert_eq!(
            StoreKey::new("s", &long, 255),
            Err(KeyError::TooLong { len: 256, max: 255 })
        );
        assert!(StoreKey::new("s", "x".repeat(255), 255).is_ok());
    }

    #[test]
    fn a_separator_in_the_scope_is_refused() {
        assert!(matches!(
            StoreKey::new("a|b", "c", 255),
            Err(KeyError::ReservedCharInScope { .. })
        ));
        // In the key it is fine: the scope ends at the first separator.
        let k = StoreKey::new("a", "b|c", 255).unwrap();
        assert_eq!((k.scope(), k.key()), ("a", "b|c"));
    }

    #[test]
    fn the_digest_hides_the_key_and_is_stable() {
        let k = StoreKey::new("s", "alice@example.com", 255).unwrap();
        let shown = format!("{k:?}");
        assert!(!shown.contains("alice"), "{shown}");
        // The digest depends on the key's text, not its type.
        let n = StoreKey::new("s", 42, 255).unwrap();
        assert_eq!(n.digest(), StoreKey::new("s", "42", 255).unwrap().digest());
        assert_ne!(n.digest(), StoreKey::new("t", "42", 255).unwrap().digest());
    }
}
