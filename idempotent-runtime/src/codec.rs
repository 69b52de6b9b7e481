//! How results become bytes in a store and back, chosen per engine.
//!
//! JSON (the default) is readable in Redis and PostgreSQL and tolerant of added fields.
//! Postcard is a compact binary format: smaller records and faster decoding, at the price
//! of readability, and its records only decode into the exact shape that wrote them. Every
//! engine sharing a store must use the same codec: a record in another one does not
//! decode ([`Error::Codec`](crate::Error::Codec)).

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{CodecError, CodecErrorKind};

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
    /// Encodes a fresh result for storage.
    pub(crate) fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, CodecError> {
        let encoded =
            match self {
                Codec::Json => serde_json::to_vec(value)
                    .map_err(|e| CodecError::new(CodecErrorKind::Encode, e)),
                Codec::Postcard => postcard::to_stdvec(value)
                    .map_err(|e| CodecError::new(CodecErrorKind::Encode, e)),
            };
        let mut bytes = encoded?;
        // The JSON encoder's buffer starts at 128 bytes; a record kept for a day should
        // not carry the spare capacity (measured: about 110 bytes a key at a million).
        bytes.shrink_to_fit();
        Ok(Bytes::from(bytes))
    }

    /// Decodes a stored result into the caller's type.
    pub(crate) fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        match self {
            Codec::Json => serde_json::from_slice(bytes)
                .map_err(|e| CodecError::new(CodecErrorKind::Decode, e)),
            Codec::Postcard => {
                postcard::from_bytes(bytes).map_err(|e| CodecError::new(CodecErrorKind::Decode, e))
            }
        }
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
    fn a_record_of_the_other_codec_is_a_decode_error() {
        let json = Codec::Json.encode(&("x".to_owned(), 1u64)).unwrap();
        let err = Codec::Postcard
            .decode::<(String, u64, u64)>(&json)
            .unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::Decode);
    }
}
