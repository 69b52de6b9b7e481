//! Values that JSON would store as something else, found before they are stored.
//!
//! `serde_json` writes a NaN or an infinite float as `null`, and `Some(x)` as plain `x`. So
//! `Some(None)`, `Some(())` and `Some(f64::NAN)` are all written `null`, and read back as
//! `None`: a replay would hand the caller another value than the one the operation
//! returned. (A top-level NaN is caught anyway, since `null` does not decode into an
//! `f64`; inside an `Option` it decodes, wrongly.) This walks the value's serde data model
//! once, writing nothing, and names the first such place. Postcard tags options and
//! keeps floats bit for bit, so it needs no such walk.
//!
//! Why not compare the value with its decoded copy: the types need not be `PartialEq`, and
//! comparing their serialized forms reports every `HashSet` as changed (its order depends
//! on a per-instance random seed).

use std::fmt;

use serde::ser::{self, Impossible, Serialize, Serializer};

/// Where a value would not survive JSON, or `None` when it would.
pub(crate) fn json_loses<T: Serialize + ?Sized>(value: &T) -> Option<Loss> {
    value.serialize(Walk).err()
}

/// What JSON would lose.
#[derive(Debug)]
pub(crate) enum Loss {
    /// A NaN or an infinite float (written as `null`).
    NonFiniteFloat,
    /// `Some` of a value written as `null` (`None`, `()`, a unit struct, a NaN): read back
    /// as `None`.
    SomeOfNull,
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

/// Walks a value and fails at the first place JSON would lose.
struct Walk;

fn finite(v: f64) -> Result<(), Loss> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Loss::NonFiniteFloat)
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
        finite(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<(), Loss> {
        finite(v)
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
        if value.serialize(IsNull).is_ok() {
            return Err(Loss::SomeOfNull);
        }
        value.serialize(Walk)
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
        value.serialize(Walk)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Result<(), Loss> {
        value.serialize(Walk)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Walk, Loss> {
        Ok(Walk)
    }
    fn serialize_tuple(self, _: usize) -> Result<Walk, Loss> {
        Ok(Walk)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Walk, Loss> {
        Ok(Walk)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Walk, Loss> {
        Ok(Walk)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Walk, Loss> {
        Ok(Walk)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Walk, Loss> {
        Ok(Walk)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Walk, Loss> {
        Ok(Walk)
    }
}

/// The compound parts of a value: each element or field is walked in turn.
macro_rules! walk_each {
    ($($trait:ident :: $method:ident $(($key:ty))?),* $(,)?) => {$(
        impl ser::$trait for Walk {
            type Ok = ();
            type Error = Loss;
            fn $method<T: Serialize + ?Sized>(
                &mut self,
                $(_: $key,)?
                value: &T,
            ) -> Result<(), Loss> {
                value.serialize(Walk)
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
    SerializeStruct::serialize_field(&'static str),
    SerializeStructVariant::serialize_field(&'static str),
);

impl ser::SerializeMap for Walk {
    type Ok = ();
    type Error = Loss;
    // Keys JSON cannot write at all fail the encoding itself, which is checked apart.
    fn serialize_key<T: Serialize + ?Sized>(&mut self, _: &T) -> Result<(), Loss> {
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Loss> {
        value.serialize(Walk)
    }
    fn end(self) -> Result<(), Loss> {
        Ok(())
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
    type SerializeStruct = Impossible<(), NotNull>;
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
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, NotNull> {
        Err(NotNull)
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
        assert!(json_loses(&1.5f64).is_none());
        assert!(json_loses(&Some(0.0f32)).is_none());
        assert!(json_loses(&None::<Option<u8>>).is_none());
        assert!(json_loses(&Some(Some(1u8))).is_none());
        assert!(json_loses(&Some(vec![None::<u8>])).is_none());
        let tags: HashSet<String> = ["a".into(), "b".into(), "c".into()].into();
        let r = Receipt {
            id: "r".into(),
            risk: Some(0.1),
            tags,
        };
        assert!(json_loses(&r).is_none());
        assert!(json_loses(&HashMap::from([("k", Some(1u8))])).is_none());
    }

    #[test]
    fn what_json_loses_is_named() {
        assert!(matches!(json_loses(&f64::NAN), Some(Loss::NonFiniteFloat)));
        assert!(matches!(
            json_loses(&vec![1.0, f64::INFINITY]),
            Some(Loss::NonFiniteFloat)
        ));
        assert!(matches!(
            json_loses(&Some(None::<u8>)),
            Some(Loss::SomeOfNull)
        ));
        assert!(matches!(json_loses(&Some(())), Some(Loss::SomeOfNull)));
        assert!(matches!(json_loses(&Some(Unit)), Some(Loss::SomeOfNull)));
        assert!(matches!(
            json_loses(&Some(f32::NAN)),
            Some(Loss::SomeOfNull)
        ));
        assert!(matches!(
            json_loses(&Wrapper(Some(None))),
            Some(Loss::SomeOfNull)
        ));
        let r = Receipt {
            id: "r".into(),
            risk: Some(f64::NAN),
            tags: HashSet::new(),
        };
        assert!(matches!(json_loses(&r), Some(Loss::SomeOfNull)));
        assert!(matches!(
            json_loses(&HashMap::from([("k", Some(Some(None::<u8>)))])),
            Some(Loss::SomeOfNull)
        ));
    }
}
