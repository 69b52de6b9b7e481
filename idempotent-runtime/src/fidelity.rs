//! Values that a codec would store as something else, found before they are stored.
//!
//! - JSON: `serde_json` writes a NaN or an infinite float as `null`, and `Some(x)` as plain
//!   `x`. So `Some(None)`, `Some(())`, `Some(f64::NAN)` and `Some` of a raw `null` are all
//!   written `null`, and read back as `None`: a replay would hand the caller another value
//!   than the one the operation returned. (A top-level NaN is caught anyway, since `null`
//!   does not decode into an `f64`; inside an `Option` it decodes, wrongly.)
//! - Postcard: fields carry no names, so a field skipped when serializing
//!   (`#[serde(skip_serializing_if = ..)]`) shifts every byte after it, and the rest may
//!   decode, without an error, into other fields.
//!
//! This walks the value's serde data model once, writing nothing, and names the first such
//! place. What it cannot see (a `Deserialize` that does not mirror its `Serialize`),
//! `Codec::encode_checked` finds by encoding what was decoded.
//!
//! Why not compare the value with its decoded copy: the types need not be `PartialEq`.

use std::fmt;

use serde::ser::{self, Impossible, Serialize, Serializer};

use crate::codec::Codec;

/// Where a value would not survive `codec`, or `None` when it would.
pub(crate) fn loses<T: Serialize + ?Sized>(codec: Codec, value: &T) -> Option<Loss> {
    value.serialize(Walk(codec)).err()
}

/// What a codec would lose.
#[derive(Debug)]
pub(crate) enum Loss {
    /// A NaN or an infinite float (written as `null`).
    NonFiniteFloat,
    /// `Some` of a value written as `null` (`None`, `()`, a unit struct, a NaN): read back
    /// as `None`.
    SomeOfNull,
    /// A struct field skipped when serializing, under a codec without field names.
    SkippedField(&'static str),
    /// The value decodes to another value (found by `Codec::encode_checked`, not by the
    /// walk).
    Changed,
    /// A custom `Serialize` implementation failed.
    Custom(String),
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loss::NonFiniteFloat => {
                f.write_str("a NaN or infinite float, which JSON writes as null")
            }
            Loss::SomeOfNull => {
                f.write_str("Some of a value JSON writes as null, which reads back as None")
            }
            Loss::SkippedField(name) => write!(
                f,
                "the field `{name}` is skipped when serializing, which shifts the fields after it under Postcard"
            ),
            Loss::Changed => f.write_str("the value decodes back as another value"),
            Loss::Custom(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Loss {}

impl ser::Error for Loss {
    fn custom<M: fmt::Display>(msg: M) -> Self {
        Loss::Custom(msg.to_string())
    }
}

/// Walks a value and fails at the first place its codec would lose.
#[derive(Clone, Copy)]
struct Walk(Codec);

impl Walk {
    fn float(self, v: f64) -> Result<(), Loss> {
        if self.0 == Codec::Json && !v.is_finite() {
            Err(Loss::NonFiniteFloat)
        } else {
            Ok(())
        }
    }
}

impl Serializer for Walk {
    type Ok = ();
    type Error = Loss;
    type SerializeSeq = Walk;
    type SerializeTuple = Walk;
    type SerializeTupleStruct = Walk;
    type SerializeTupleVariant = Walk;
    type SerializeMap = Walk;
    type SerializeStruct = Walk;
    type SerializeStructVariant = Walk;

    fn serialize_bool(self, _: bool) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_i8(self, _: i8) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_i16(self, _: i16) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_i32(self, _: i32) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_i64(self, _: i64) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_i128(self, _: i128) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_u8(self, _: u8) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_u16(self, _: u16) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_u32(self, _: u32) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_u64(self, _: u64) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_u128(self, _: u128) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result<(), Loss> {
        self.float(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<(), Loss> {
        self.float(v)
    }
    fn serialize_char(self, _: char) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_str(self, _: &str) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_none(self) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Loss> {
        if self.0 == Codec::Json && value.serialize(IsNull).is_ok() {
            return Err(Loss::SomeOfNull);
        }
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Loss> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Result<(), Loss> {
        value.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Walk, Loss> {
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Walk, Loss> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Walk, Loss> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Walk, Loss> {
        Ok(self)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Walk, Loss> {
        Ok(self)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Walk, Loss> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Walk, Loss> {
        Ok(self)
    }
}

/// The compound parts of a value: each element is walked in turn.
macro_rules! walk_each {
    ($($trait:ident :: $method:ident),* $(,)?) => {$(
        impl ser::$trait for Walk {
            type Ok = ();
            type Error = Loss;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Loss> {
                value.serialize(*self)
            }
            fn end(self) -> Result<(), Loss> {
                Ok(())
            }
        }
    )*};
}

walk_each!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
);

/// The named fields of a struct: each is walked in turn, and one skipped is a loss under
/// Postcard.
macro_rules! walk_fields {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Walk {
            type Ok = ();
            type Error = Loss;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                _: &'static str,
                value: &T,
            ) -> Result<(), Loss> {
                value.serialize(*self)
            }
            fn skip_field(&mut self, name: &'static str) -> Result<(), Loss> {
                match self.0 {
                    Codec::Postcard => Err(Loss::SkippedField(name)),
                    _ => Ok(()),
                }
            }
            fn end(self) -> Result<(), Loss> {
                Ok(())
            }
        }
    )*};
}

walk_fields!(SerializeStruct, SerializeStructVariant);

impl ser::SerializeMap for Walk {
    type Ok = ();
    type Error = Loss;
    // Keys JSON cannot write at all fail the encoding itself, which is checked apart.
    fn serialize_key<T: Serialize + ?Sized>(&mut self, _: &T) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Loss> {
        value.serialize(*self)
    }
    fn end(self) -> Result<(), Loss> {
        Ok(())
    }
}

/// The name under which serde_json serializes a `RawValue`: a struct of one field, its
/// text.
const RAW_VALUE: &str = "$serde_json::private::RawValue";

/// A `RawValue` seen by [`IsNull`]: null when its text is.
struct RawText {
    null: bool,
}

impl ser::SerializeStruct for RawText {
    type Ok = ();
    type Error = NotNull;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        _: &'static str,
        value: &T,
    ) -> Result<(), NotNull> {
        let text = serde_json::to_value(value).map_err(|_| NotNull)?;
        self.null = text.as_str().map(str::trim) == Some("null");
        Ok(())
    }
    fn end(self) -> Result<(), NotNull> {
        if self.null {
            Ok(())
        } else {
            Err(NotNull)
        }
    }
}

/// Succeeds when a value is written as JSON's `null`; fails (with [`NotNull`]) at once
/// otherwise, without walking into it.
struct IsNull;

#[derive(Debug)]
struct NotNull;

impl fmt::Display for NotNull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not null")
    }
}

impl std::error::Error for NotNull {}

impl ser::Error for NotNull {
    fn custom<M: fmt::Display>(_: M) -> Self {
        NotNull
    }
}

impl Serializer for IsNull {
    type Ok = ();
    type Error = NotNull;
    type SerializeSeq = Impossible<(), NotNull>;
    type SerializeTuple = Impossible<(), NotNull>;
    type SerializeTupleStruct = Impossible<(), NotNull>;
    type SerializeTupleVariant = Impossible<(), NotNull>;
    type SerializeMap = Impossible<(), NotNull>;
    type SerializeStruct = RawText;
    type SerializeStructVariant = Impossible<(), NotNull>;

    fn serialize_bool(self, _: bool) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_i8(self, _: i8) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_i16(self, _: i16) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_i32(self, _: i32) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_i64(self, _: i64) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_u8(self, _: u8) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_u16(self, _: u16) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_u32(self, _: u32) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_u64(self, _: u64) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_f32(self, v: f32) -> Result<(), NotNull> {
        self.serialize_f64(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<(), NotNull> {
        if v.is_finite() {
            Err(NotNull)
        } else {
            Ok(())
        }
    }
    fn serialize_char(self, _: char) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_str(self, _: &str) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_none(self) -> Result<(), NotNull> {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), NotNull> {
        value.serialize(IsNull)
    }
    fn serialize_unit(self) -> Result<(), NotNull> {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), NotNull> {
        Ok(())
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), NotNull> {
        value.serialize(IsNull)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), NotNull> {
        Err(NotNull)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, NotNull> {
        Err(NotNull)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, NotNull> {
        Err(NotNull)
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, NotNull> {
        Err(NotNull)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, NotNull> {
        Err(NotNull)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, NotNull> {
        Err(NotNull)
    }
    fn serialize_struct(
        self,
        name: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, NotNull> {
        // serde_json writes a `RawValue` as its text, which may be `null`.
        if name == RAW_VALUE {
            Ok(RawText { null: false })
        } else {
            Err(NotNull)
        }
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, NotNull> {
        Err(NotNull)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    #[derive(serde::Serialize)]
    struct Unit;

    #[derive(serde::Serialize)]
    struct Wrapper(Option<Option<u8>>);

    #[derive(serde::Serialize)]
    struct Receipt {
        id: String,
        risk: Option<f64>,
        tags: HashSet<String>,
    }

    #[test]
    fn what_json_keeps_passes() {
        assert!(loses(Codec::Json, &1.5f64).is_none());
        assert!(loses(Codec::Json, &Some(0.0f32)).is_none());
        assert!(loses(Codec::Json, &None::<Option<u8>>).is_none());
        assert!(loses(Codec::Json, &Some(Some(1u8))).is_none());
        assert!(loses(Codec::Json, &Some(vec![None::<u8>])).is_none());
        let tags: HashSet<String> = ["a".into(), "b".into(), "c".into()].into();
        let r = Receipt {
            id: "r".into(),
            risk: Some(0.1),
            tags,
        };
        assert!(loses(Codec::Json, &r).is_none());
        assert!(loses(Codec::Json, &HashMap::from([("k", Some(1u8))])).is_none());
    }

    #[test]
    fn what_postcard_loses_is_named() {
        #[derive(serde::Serialize)]
        struct Packed {
            #[serde(skip_serializing_if = "Option::is_none")]
            a: Option<u8>,
            b: u8,
        }
        let skipped = Packed { a: None, b: 1 };
        assert!(matches!(
            loses(Codec::Postcard, &skipped),
            Some(Loss::SkippedField("a"))
        ));
        assert!(loses(Codec::Json, &skipped).is_none());
        assert!(loses(Codec::Postcard, &Packed { a: Some(1), b: 1 }).is_none());
        assert!(loses(Codec::Postcard, &Some(None::<u8>)).is_none());
        assert!(loses(Codec::Postcard, &f64::NAN).is_none());
    }

    #[test]
    fn what_json_loses_is_named() {
        let raw = serde_json::value::RawValue::from_string("null".into()).unwrap();
        assert!(matches!(
            loses(Codec::Json, &Some(raw)),
            Some(Loss::SomeOfNull)
        ));
        let raw = serde_json::value::RawValue::from_string("1".into()).unwrap();
        assert!(loses(Codec::Json, &Some(raw)).is_none());
        assert!(matches!(
            loses(Codec::Json, &f64::NAN),
            Some(Loss::NonFiniteFloat)
        ));
        assert!(matches!(
            loses(Codec::Json, &vec![1.0, f64::INFINITY]),
            Some(Loss::NonFiniteFloat)
        ));
        assert!(matches!(
            loses(Codec::Json, &Some(None::<u8>)),
            Some(Loss::SomeOfNull)
        ));
        assert!(matches!(
            loses(Codec::Json, &Some(())),
            Some(Loss::SomeOfNull)
        ));
        assert!(matches!(
            loses(Codec::Json, &Some(Unit)),
            Some(Loss::SomeOfNull)
        ));
        assert!(matches!(
            loses(Codec::Json, &Some(f32::NAN)),
            Some(Loss::SomeOfNull)
        ));
        assert!(matches!(
            loses(Codec::Json, &Wrapper(Some(None))),
            Some(Loss::SomeOfNull)
        ));
        let r = Receipt {
            id: "r".into(),
            risk: Some(f64::NAN),
            tags: HashSet::new(),
        };
        assert!(matches!(loses(Codec::Json, &r), Some(Loss::SomeOfNull)));
        assert!(matches!(
            loses(Codec::Json, &HashMap::from([("k", Some(Some(None::<u8>)))])),
            Some(Loss::SomeOfNull)
        ));
    }
}
