//! Fingerprints of request payloads, so a key reused for a different request is refused.
//!
//! A fingerprint is the SHA-256 of the payload's canonical JSON: object keys sorted at
//! every depth, no insignificant whitespace. Two payloads that differ only in field order
//! (a struct whose fields were reordered, a map with another iteration order) therefore get
//! the same fingerprint, and a retry is never refused for it.

use std::fmt;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{CodecError, CodecErrorKind};

/// The SHA-256 of a payload's canonical JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of `value`.
    ///
    /// ```
    /// use idempotent_runtime::Fingerprint;
    /// use serde_json::json;
    ///
    /// let a = Fingerprint::of(&json!({"amount": 100, "currency": "EUR"})).unwrap();
    /// let b = Fingerprint::of(&json!({"currency": "EUR", "amount": 100})).unwrap();
    /// let c = Fingerprint::of(&json!({"currency": "EUR", "amount": 101})).unwrap();
    /// assert_eq!(a, b);
    /// assert_ne!(a, c);
    /// ```
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Result<Self, CodecError> {
        let value = serde_json::to_value(value)
            .map_err(|e| CodecError::new(CodecErrorKind::Fingerprint, e))?;
        let mut hasher = Sha256::new();
        write_canonical(&value, &mut hasher);
        Ok(Self(hasher.finalize().into()))
    }

    /// A fingerprint from its 32 raw bytes, as a store read them back.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// Feeds `value` to the hasher as canonical JSON. Sorting here, not relying on
/// `serde_json::Map` being a `BTreeMap`, keeps fingerprints stable when some crate in the
/// build turns on serde_json's `preserve_order` feature.
fn write_canonical(value: &Value, out: &mut Sha256) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.update(b"{");
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.update(b",");
                }
                write_scalar(&Value::String(k.clone()), out);
                out.update(b":");
                write_canonical(v, out);
            }
            out.update(b"}");
        }
        Value::Array(items) => {
            out.update(b"[");
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.update(b",");
                }
                write_canonical(v, out);
            }
            out.update(b"]");
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &Value, out: &mut Sha256) {
    // Display of a scalar Value is its compact JSON text and cannot fail.
    out.update(value.to_string().as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_field_order_does_not_matter() {
        let a = json!({"order": {"items": [{"sku": "a", "qty": 1}], "total": 5}, "id": 1});
        let b = json!({"id": 1, "order": {"total": 5, "items": [{"qty": 1, "sku": "a"}]}});
        assert_eq!(Fingerprint::of(&a).unwrap(), Fingerprint::of(&b).unwrap());
    }

    #[test]
    fn array_order_and_types_do_matter() {
        let fp = |v: Value| Fingerprint::of(&v).unwrap();
        assert_ne!(fp(json!([1, 2])), fp(json!([2, 1])));
        assert_ne!(fp(json!({"a": 1})), fp(json!({"a": "1"})));
        assert_ne!(fp(json!({"a": null})), fp(json!({})));
    }

    #[test]
    fn key_text_cannot_forge_structure() {
        // Keys are written as escaped JSON strings, so a key holding JSON punctuation
        // cannot collide with a differently shaped object.
        let fp = |v: Value| Fingerprint::of(&v).unwrap();
        assert_ne!(fp(json!({"a\":1,\"b": 2})), fp(json!({"a": 1, "b": 2})));
    }

    #[test]
    fn unserializable_values_are_a_codec_error() {
        let mut bad = std::collections::HashMap::new();
        bad.insert(vec![1u8], 1);
        let err = Fingerprint::of(&bad).unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::Fingerprint);
    }
}
