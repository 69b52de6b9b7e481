//! The key a store sees: the caller's key inside its scope, validated once.

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::error::{ConfigError, KeyError};

/// Separates scope from key in [`StoreKey::as_str`]; scopes may not contain it, which
/// keeps the joined form unambiguous.
pub const SCOPE_SEPARATOR: char = '|';

thread_local! {
    // The hit path would otherwise allocate a key buffer and free it again on every call:
    // a hit hands its buffer back here and the next key on this thread reuses it.
    static SPARE: Cell<String> = const { Cell::new(String::new()) };
}

/// Buffers larger than this are not kept, so one huge key cannot pin memory per thread.
const SPARE_MAX_CAPACITY: usize = 512;

/// A key's scope, and whether it is known to hold no [`SCOPE_SEPARATOR`]: a literal the
/// attribute checked when it was compiled ([`crate::__private::LiteralScope`]) need not
/// be searched again on every call.
#[derive(Clone, Copy)]
pub(crate) struct Scope<'a> {
    text: &'a str,
    checked: bool,
}

impl<'a> Scope<'a> {
    /// A scope to check.
    pub(crate) fn unchecked(text: &'a str) -> Self {
        Self {
            text,
            checked: false,
        }
    }

    /// A scope checked already.
    pub(crate) fn checked(text: &'a str) -> Self {
        Self {
            text,
            checked: true,
        }
    }
}

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
        Self::in_scope(Scope::unchecked(scope), &key, max_len)
    }

    /// [`StoreKey::new`] in a scope that may be known good already.
    pub(crate) fn in_scope(
        scope: Scope<'_>,
        key: &(impl fmt::Display + ?Sized),
        max_len: usize,
    ) -> Result<Self, KeyError> {
        Self::build(scope, max_len, |joined| {
            // Writing into a String cannot fail unless the key's Display impl does.
            let _ = write!(joined, "{key}");
        })
    }

    /// [`StoreKey::in_scope`] for a key that is text already: the same key, written
    /// without the formatting machinery (a `str`'s `Display` writes it unchanged).
    pub(crate) fn from_text(scope: Scope<'_>, key: &str, max_len: usize) -> Result<Self, KeyError> {
        Self::build(scope, max_len, |joined| joined.push_str(key))
    }

    fn build(
        Scope {
            text: scope,
            checked,
        }: Scope<'_>,
        max_len: usize,
        write_key: impl FnOnce(&mut String),
    ) -> Result<Self, KeyError> {
        if !checked && scope.contains(SCOPE_SEPARATOR) {
            return Err(KeyError::ReservedCharInScope {
                scope: scope.to_owned(),
            });
        }
        let mut joined = SPARE.try_with(Cell::take).unwrap_or_default();
        joined.reserve(scope.len() + 1 + 36);
        joined.push_str(scope);
        joined.push(SCOPE_SEPARATOR);
        write_key(&mut joined);
        let len = joined.len() - scope.len() - 1;
        let checked = if len == 0 {
            Err(KeyError::Empty)
        } else if len > max_len {
            Err(KeyError::TooLong { len, max: max_len })
        } else {
            Ok(())
        };
        if let Err(e) = checked {
            recycle(joined);
            return Err(e);
        }
        Ok(Self {
            joined,
            scope_len: scope.len(),
        })
    }

    /// Gives the key's buffer back for the next key made on this thread. For keys that
    /// are done with at once, as a hit's is.
    pub(crate) fn recycle(self) {
        recycle(self.joined);
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

    /// A short hash of scope and key for logs and spans, so keys (which may carry
    /// customer data) never appear in them; keyed with the process's digest secret (see
    /// [`KeyDigest`]), so a key that can be guessed cannot be found from its digest.
    pub fn digest(&self) -> KeyDigest {
        KeyDigest::of_joined(&self.joined)
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

fn recycle(mut buffer: String) {
    if buffer.capacity() <= SPARE_MAX_CAPACITY {
        buffer.clear();
        // Fails only while the thread is exiting; the buffer is then simply freed.
        let _ = SPARE.try_with(|spare| spare.set(buffer));
    }
}

/// What the crate's logs and spans show of a key: the first 64 bits of the SHA-256 of
/// a secret and the key in its scope, printed as hex.
///
/// Keys are often guessable (an order number, a message id, an e-mail address), and an
/// unkeyed hash of one can be reversed by hashing guesses; the secret prevents that.
/// It is, in order:
/// - the one given to [`KeyDigest::set_secret`] before the first digest;
/// - else the value of the environment variable [`DIGEST_SECRET_ENV`]
///   (`IDEMPOTENT_KEY_DIGEST_SECRET`), read at the first digest, if it is not empty (an
///   empty one counts as unset: one shared by every replica would key nothing);
/// - else one drawn at random for the process.
///
/// Set the same secret on every replica of a service to find one key's lines across
/// them, and to compute a key's digest elsewhere ([`StoreKey::digest`]) when a customer's
/// key must be looked up in the logs. With the random one, digests agree within one
/// process only. Keep the secret as secret as the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest(u64);

/// The environment variable the digest secret is read from: see [`KeyDigest`].
pub const DIGEST_SECRET_ENV: &str = "IDEMPOTENT_KEY_DIGEST_SECRET";

/// The process's digest secret, fixed at the first digest (or by `set_secret`).
static DIGEST_SECRET: OnceLock<[u8; 32]> = OnceLock::new();

impl KeyDigest {
    /// Sets the secret digests are keyed with (any bytes; hashed to 32), for the whole
    /// process. Call it at start-up, before any call, as digests made before would not
    /// match those made after: it fails with
    /// [`ConfigError::DigestSecretFixed`] once a digest was made or a secret set.
    ///
    /// ```
    /// use idempotent_runtime::{KeyDigest, StoreKey};
    ///
    /// KeyDigest::set_secret(b"shared by every replica")?;
    /// let key = StoreKey::new("payments", "order-7", 255)?;
    /// // The same on every process given this secret; not reversible without it.
    /// println!("grep the logs for key={}", key.digest());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_secret(secret: impl AsRef<[u8]>) -> Result<(), ConfigError> {
        let mut fixed = false;
        DIGEST_SECRET.get_or_init(|| {
            fixed = true;
            Sha256::digest(secret.as_ref()).into()
        });
        if fixed {
            Ok(())
        } else {
            Err(ConfigError::DigestSecretFixed)
        }
    }

    /// The digest of a key in its joined form, `scope|key` (what [`StoreKey::as_str`]
    /// gives), for stores that hold only that form.
    pub(crate) fn of_joined(joined: &str) -> Self {
        let hash = Sha256::new()
            .chain_update(digest_secret())
            .chain_update(joined.as_bytes())
            .finalize();
        let mut short = [0u8; 8];
        short.copy_from_slice(&hash[..8]);
        KeyDigest(u64::from_be_bytes(short))
    }
}

/// The secret of [`KeyDigest`], fixed on first use.
fn digest_secret() -> &'static [u8; 32] {
    DIGEST_SECRET.get_or_init(|| match std::env::var_os(DIGEST_SECRET_ENV) {
        Some(secret) if !secret.is_empty() => Sha256::digest(secret.as_encoded_bytes()).into(),
        _ => random_secret(),
    })
}

/// 32 bytes from the operating system's randomness, through `RandomState` (whose keys
/// it seeds from there): no extra dependency for a secret drawn once per process.
fn random_secret() -> [u8; 32] {
    use std::hash::{BuildHasher, Hasher};
    let state = std::collections::hash_map::RandomState::new();
    let mut secret = [0u8; 32];
    for (i, chunk) in secret.chunks_exact_mut(8).enumerate() {
        let mut h = state.build_hasher();
        h.write_usize(i);
        h.write_u32(std::process::id());
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    // Spread over the whole digest input, not four related words.
    Sha256::digest(secret).into()
}

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
    fn text_keys_are_the_keys_their_display_writes() {
        for key in ["order-7", "", "ü|{}", &"x".repeat(256)] {
            assert_eq!(
                StoreKey::from_text(Scope::unchecked("s"), key, 255),
                StoreKey::new("s", key, 255)
            );
        }
        assert!(StoreKey::from_text(Scope::unchecked("a|b"), "k", 255).is_err());
        // A checked scope skips the search only: the key is the same.
        assert_eq!(
            StoreKey::from_text(Scope::checked("s"), "order-7", 255),
            StoreKey::new("s", "order-7", 255)
        );
        assert_eq!(
            StoreKey::in_scope(Scope::checked("s"), &7, 255),
            StoreKey::new("s", 7, 255)
        );
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
    fn a_reused_buffer_carries_nothing_over() {
        StoreKey::new("payments", "order-000000000000000000000001", 255)
            .unwrap()
            .recycle();
        let k = StoreKey::new("s", "k", 255).unwrap();
        assert_eq!(k.as_str(), "s|k");
        k.recycle();
        assert_eq!(StoreKey::new("s", "", 255), Err(KeyError::Empty));
        assert_eq!(StoreKey::new("t", 7, 255).unwrap().as_str(), "t|7");
        let huge = StoreKey::new("s", "x".repeat(1000), 2000).unwrap();
        huge.recycle();
        assert_eq!(StoreKey::new("s", "y", 255).unwrap().as_str(), "s|y");
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

    #[test]
    fn the_digest_is_keyed() {
        let k = StoreKey::new("s", "order-7", 255).unwrap();
        // Not the unkeyed hash a guess at the key would reproduce.
        let unkeyed = Sha256::digest(k.as_str().as_bytes());
        let mut short = [0u8; 8];
        short.copy_from_slice(&unkeyed[..8]);
        assert_ne!(k.digest(), KeyDigest(u64::from_be_bytes(short)));
        // The secret is fixed by the first digest: a later one is refused.
        assert_eq!(
            KeyDigest::set_secret(b"late"),
            Err(ConfigError::DigestSecretFixed)
        );
    }
}
