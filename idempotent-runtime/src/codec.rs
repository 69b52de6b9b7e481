//! How results become bytes in a store and back, chosen per engine.
//!
//! JSON (the default) is readable in Redis and PostgreSQL and tolerant of added fields.
//! Postcard is a compact binary format: smaller records and faster decoding, at the price
//! of readability, and its records only decode into the exact shape that wrote them.
//!
//! Every stored result starts with one byte that names the codec that wrote it (`J`, `P`),
//! so an engine never decodes another codec's bytes into a wrong value (JSON's `5` read
//! as Postcard is the number 53): such a record is
//! [`CodecErrorKind::WrongCodec`]. A third tag, `U`,
//! marks a result that ran but could not be stored faithfully
//! ([`CodecErrorKind::Unstorable`]), and a fourth, `T`, an operation that ended its own
//! transaction ([`Error::TransactionEnded`](crate::Error::TransactionEnded)).

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{CodecError, CodecErrorKind};

const JSON: u8 = b'J';
const POSTCARD: u8 = b'P';
const UNSTORABLE: u8 = b'U';
const TRANSACTION_ENDED: u8 = b'T';

/// The format of stored results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Codec {
    /// JSON through `serde_json` (the default).
    #[default]
    Json,
    /// Postcard, a compact binary format.
    Postcard,
}

impl Codec {
    fn tag(self) -> u8 {
        match self {
            Codec::Json => JSON,
            Codec::Postcard => POSTCARD,
        }
    }

    /// Whether `bytes` were written by this codec (they start with its tag).
    pub(crate) fn wrote(self, bytes: &[u8]) -> bool {
        bytes.first() == Some(&self.tag())
    }

    /// Encodes a fresh result for storage, behind the codec's tag.
    pub(crate) fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, CodecError> {
        let mut bytes = self.encode_vec(value)?;
        // The JSON encoder's buffer starts at 128 bytes; a record kept for a day should
        // not carry the spare capacity (measured: about 110 bytes a key at a million).
        bytes.shrink_to_fit();
        Ok(Bytes::from(bytes))
    }

    /// The encoding, in a buffer that may have spare capacity: for bytes that are
    /// compared, not kept.
    fn encode_vec<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        let encode_err = |e| CodecError::new(CodecErrorKind::Encode, e);
        Ok(match self {
            Codec::Json => {
                let mut buf = Vec::with_capacity(128);
                buf.push(JSON);
                serde_json::to_writer(&mut buf, value).map_err(encode_err)?;
                buf
            }
            Codec::Postcard => postcard::to_extend(value, vec![POSTCARD])
                .map_err(|e| CodecError::new(CodecErrorKind::Encode, e))?,
        })
    }

    /// Encodes a fresh result and checks that it decodes back to the same value, so that
    /// nothing is stored that would later replay as an error for its whole TTL, or as
    /// another value:
    /// - JSON writes a `NaN` as `null`, which no `f64` reads back, and `Some(None)` as
    ///   `null`, which reads back as `None`, and Postcard cannot skip a field (found before
    ///   encoding, by `fidelity`);
    /// - a type whose `Deserialize` does not mirror its `Serialize` (an untagged enum
    ///   whose first variant reads a later one's form, a field skipped when empty whose
    ///   default is not empty, any field skipped under Postcard) decodes to another value:
    ///   found by encoding what was decoded and comparing. The two encodings are compared
    ///   byte for byte first; when they differ only in order (a `HashMap` or `HashSet`
    ///   iterates in another order once decoded), their JSON forms are compared with
    ///   objects and arrays in any order.
    pub(crate) fn encode_checked<T: Serialize + DeserializeOwned>(
        self,
        value: &T,
    ) -> Result<Bytes, CodecError> {
        if let Some(loss) = crate::fidelity::loses(self, value) {
            return Err(CodecError::new(CodecErrorKind::Unstorable, loss));
        }
        let bytes = self.encode(value)?;
        let unstorable = |e| CodecError::new(CodecErrorKind::Unstorable, e);
        let back = self.decode::<T>(&bytes).map_err(unstorable)?;
        let again = self.encode_vec(&back).map_err(unstorable)?;
        if again != bytes[..] && !same_in_any_order(value, &back) {
            return Err(CodecError::new(
                CodecErrorKind::Unstorable,
                crate::fidelity::Loss::Changed,
            ));
        }
        Ok(bytes)
    }

    /// What is stored in place of a value that could not be: replays of it are
    /// [`CodecErrorKind::Unstorable`].
    pub(crate) fn unstorable() -> Bytes {
        Bytes::from_static(&[UNSTORABLE])
    }

    /// What is stored for an operation that ended its own transaction: replays of it are
    /// [`CodecErrorKind::TransactionEnded`].
    #[cfg(feature = "postgres")]
    pub(crate) fn transaction_ended() -> Bytes {
        Bytes::from_static(&[TRANSACTION_ENDED])
    }

    /// Decodes a stored result into the caller's type.
    pub(crate) fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        let body = match bytes.split_first() {
            Some((&tag, body)) if tag == self.tag() => body,
            Some((&UNSTORABLE, _)) => {
                return Err(CodecError::of_kind(CodecErrorKind::Unstorable));
            }
            Some((&TRANSACTION_ENDED, _)) => {
                return Err(CodecError::of_kind(CodecErrorKind::TransactionEnded));
            }
            _ => return Err(CodecError::of_kind(CodecErrorKind::WrongCodec)),
        };
        let decode_err = |e| CodecError::new(CodecErrorKind::Decode, e);
        match self {
            Codec::Json => serde_json::from_slice(body).map_err(decode_err),
            Codec::Postcard => {
                postcard::from_bytes(body).map_err(|e| CodecError::new(CodecErrorKind::Decode, e))
            }
        }
    }
}

/// Whether `a` and `b` serialize to the same JSON, objects and arrays compared in any
/// order. When either cannot be written as JSON (a map with structured keys), there is no
/// telling, and they count as the same: the check refuses only what it has shown changed.
fn same_in_any_order<T: Serialize>(a: &T, b: &T) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => unordered(&a) == unordered(&b),
        _ => true,
    }
}

/// A JSON value's text with the members of every object and the elements of every array
/// sorted by their own text.
fn unordered(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut members: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), unordered(v)))
                .collect();
            members.sort_unstable();
            format!("{{{}}}", members.join(","))
        }
        Value::Array(items) => {
            let mut items: Vec<String> = items.iter().map(unordered).collect();
            items.sort_unstable();
            format!("[{}]", items.join(","))
        }
        scalar => scalar.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Receipt {
        id: String,
        cents: u64,
        tags: Vec<String>,
    }

    #[test]
    fn both_codecs_round_trip_and_postcard_is_smaller() {
        let r = Receipt {
            id: "pay_1".into(),
            cents: 4999,
            tags: vec!["a".into()],
        };
        let json = Codec::Json.encode(&r).unwrap();
        let post = Codec::Postcard.encode(&r).unwrap();
        assert_eq!(Codec::Json.decode::<Receipt>(&json).unwrap(), r);
        assert_eq!(Codec::Postcard.decode::<Receipt>(&post).unwrap(), r);
        assert!(
            post.len() < json.len() / 2,
            "{} vs {}",
            post.len(),
            json.len()
        );
    }

    #[test]
    fn a_record_of_the_other_codec_is_refused_by_its_tag() {
        // Untagged, JSON's `5` is the byte 53, which Postcard reads as the number 53.
        let json = Codec::Json.encode(&5u8).unwrap();
        let err = Codec::Postcard.decode::<u8>(&json).unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::WrongCodec);
        let post = Codec::Postcard.encode(&5u8).unwrap();
        let err = Codec::Json.decode::<u8>(&post).unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::WrongCodec);
        let err = Codec::Json.decode::<u8>(b"").unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::WrongCodec);
    }

    #[test]
    fn values_that_do_not_decode_back_are_unstorable() {
        let err = Codec::Json.encode_checked(&f64::NAN).unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::Unstorable);
        let mut tuple_keys = std::collections::HashMap::new();
        tuple_keys.insert((1, 2), 3);
        let err = Codec::Json.encode_checked(&tuple_keys).unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::Encode);
        // Hash collections decode in another order, and are the same value.
        let set: std::collections::HashSet<u32> = (0..64).collect();
        assert!(Codec::Json.encode_checked(&set).is_ok());
        assert!(Codec::Postcard.encode_checked(&set).is_ok());
        let map: std::collections::HashMap<String, u32> =
            (0..64).map(|i| (i.to_string(), i)).collect();
        assert!(Codec::Json.encode_checked(&map).is_ok());
        assert!(Codec::Postcard.encode_checked(&map).is_ok());
        // An untagged enum whose first variant reads the second's form: another value.
        #[derive(serde::Serialize, serde::Deserialize)]
        #[serde(untagged)]
        enum Num {
            Float(f64),
            Int(i64),
        }
        let err = Codec::Json.encode_checked(&Num::Int(5)).unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::Unstorable);
        assert!(Codec::Json.encode_checked(&Num::Float(5.5)).is_ok());
        let err = Codec::Json.encode_checked(&Some(None::<u8>)).unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::Unstorable);
        assert!(Codec::Postcard.encode_checked(&Some(None::<u8>)).is_ok());
        assert!(Codec::Postcard.encode_checked(&Some(f64::NAN)).is_ok());
        let err = Codec::Json.decode::<u8>(&Codec::unstorable()).unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::Unstorable);
        assert!(Codec::Json.encode_checked(&1.5f64).is_ok());
    }
}
