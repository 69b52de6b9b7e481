//! Canonical JSON text of a request body: one text for every serialisation of a payload,
//! and never one text for two payloads that differ in meaning.
//!
//! The canonical text has object keys sorted (by their decoded text, bytewise) at every
//! depth, no insignificant whitespace, strings decoded and re-encoded by serde_json (so
//! `"\u0041"` and `"A"` agree), and every number, `true`, `false` and `null` exactly as
//! the body wrote it.
//!
//! Why not parse into `serde_json::Value` and write that: a `Value` holds numbers as `u64`,
//! `i64` or `f64`, so `18446744073709551616` and `18446744073709551617` (or `0.1` and
//! `0.1000000000000000000001`) become one number, and an object keeps only the last of
//! duplicate keys, so `{"to":"alice","to":"mallory"}` becomes `{"to":"mallory"}`. Either
//! collapse lets a key reused for a different request replay the first one's response.
//! serde_json's `arbitrary_precision` feature would keep the numbers, but it changes how
//! every crate in the user's build parses JSON; its `raw_value` feature, used here, only
//! adds a type.
//!
//! Why not RFC 8785 (JCS): it writes numbers through IEEE 754 doubles, the very collapse
//! to avoid. Keeping the number's text instead means `1.0` and `1` (or `1e2` and `100`)
//! differ: a retry that re-serialises its numbers differently is refused with 422, which is
//! the safe side; two different numbers are never taken for one.

use std::fmt;

use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::Deserializer as _;
use serde_json::value::RawValue;

/// How deep objects and arrays may nest; a deeper body has no canonical text. Each level
/// re-scans the text below it, so the work grows with the depth times the size; this
/// bounds it (and the recursion) while leaving room for any real payload.
pub(crate) const MAX_DEPTH: usize = 32;

/// The canonical text of the JSON document `body`, or `None` when there is none: the body
/// is not JSON, an object repeats a key (its meaning then depends on the reader), or it
/// nests deeper than [`MAX_DEPTH`]. The caller then compares the body by its bytes.
pub(crate) fn canonical(body: &[u8]) -> Option<String> {
    // Validates the whole document (syntax, escapes, UTF-8, nothing after it) without
    // recursion, whatever its depth.
    let raw: &RawValue = serde_json::from_slice(body).ok()?;
    let mut out = String::with_capacity(body.len());
    write_value(raw, MAX_DEPTH, &mut out)?;
    Some(out)
}

/// Appends the canonical text of `raw`, which may hold `depth_left` more levels of objects
/// and arrays.
fn write_value(raw: &RawValue, depth_left: usize, out: &mut String) -> Option<()> {
    // A `RawValue` is one validated value with no whitespace around it, so its first byte
    // says what it is.
    let text = raw.get();
    match text.as_bytes().first()? {
        b'{' => {
            let depth_left = depth_left.checked_sub(1)?;
            let mut entries = serde_json::Deserializer::from_str(text)
                .deserialize_map(Entries)
                .ok()?;
            // Stable or not does not matter: equal keys end the canonicalisation.
            entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            if entries
                .windows(2)
                .any(|pair| matches!(pair, [a, b] if a.0 == b.0))
            {
                return None;
            }
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(&key, out)?;
                out.push(':');
                write_value(value, depth_left, out)?;
            }
            out.push('}');
        }
        b'[' => {
            let depth_left = depth_left.checked_sub(1)?;
            let elements = serde_json::Deserializer::from_str(text)
                .deserialize_seq(Elements)
                .ok()?;
            out.push('[');
            for (i, value) in elements.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(value, depth_left, out)?;
            }
            out.push(']');
        }
        b'"' => {
            let decoded: String = serde_json::from_str(text).ok()?;
            write_string(&decoded, out)?;
        }
        // A number, `true`, `false` or `null`: its text is its meaning.
        _ => out.push_str(text),
    }
    Some(())
}

/// Appends `s` as serde_json encodes it, the one encoding of each text.
fn write_string(s: &str, out: &mut String) -> Option<()> {
    out.push_str(&serde_json::to_string(s).ok()?);
    Some(())
}

/// Reads one object into its entries, duplicates kept and values left unparsed.
struct Entries;

impl<'de> Visitor<'de> for Entries {
    type Value = Vec<(String, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// Reads one array into its elements, left unparsed.
struct Elements;

impl<'de> Visitor<'de> for Elements {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut elements = Vec::new();
        while let Some(element) = seq.next_element()? {
            elements.push(element);
        }
        Ok(elements)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(body: &str) -> Option<String> {
        canonical(body.as_bytes())
    }

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn keys_are_sorted_at_every_depth_and_whitespace_dropped() {
        let a = r#"{"b":{"d":{"f":1,"e":[true,null,"x"]},"c":2},"a":-0.5e10}"#;
        let b = " {\n \"a\" : -0.5e10 ,\t\"b\" : { \"c\" : 2 , \"d\" : { \"e\" : [ true , null , \"x\" ] , \"f\" : 1 } } }\r\n";
        let expected = r#"{"a":-0.5e10,"b":{"c":2,"d":{"e":[true,null,"x"],"f":1}}}"#;
        assert_eq!(canon(a).as_deref(), Some(expected));
        assert_eq!(canon(b).as_deref(), Some(expected));
    }

    #[test]
    fn string_escapes_are_decoded_and_reencoded() {
        assert_eq!(canon(r#""\u0041""#), canon(r#""A""#));
        assert_eq!(
            canon(r#"{"\u0061":"\/\u00e9\ud83d\ude00"}"#).as_deref(),
            Some("{\"a\":\"/é😀\"}")
        );
        // Escapes that must stay escapes are written one way.
        assert_eq!(
            canon(r#"["\u0022\u005c\u000a\u0001"]"#).as_deref(),
            Some(r#"["\"\\\n\u0001"]"#)
        );
        assert_ne!(canon(r#""a""#), canon(r#""b""#));
    }

    #[test]
    fn numbers_keep_their_text() {
        assert_ne!(
            canon(r#"{"n":18446744073709551616}"#),
            canon(r#"{"n":18446744073709551617}"#)
        );
        assert_ne!(canon("0.1000000000000000000001"), canon("0.1"));
        assert_eq!(canon(" 1e400 ").as_deref(), Some("1e400"));
        // A false mismatch, accepted: never a collapse.
        assert_ne!(canon("1.0"), canon("1"));
    }

    #[test]
    fn duplicate_keys_have_no_canonical_text() {
        assert_eq!(canon(r#"{"to":"alice","to":"mallory"}"#), None);
        assert_eq!(
            canon(r#"{"a":{"to":1,"\u0074o":1}}"#),
            None,
            "same decoded key"
        );
        assert_eq!(canon(r#"[{"x":1},{"x":1,"y":2,"x":1}]"#), None);
    }

    #[test]
    fn invalid_json_has_no_canonical_text() {
        for bad in [
            "",
            "{",
            r#"{"a":1,}"#,
            "[1] [2]",
            "01",
            r#""\x""#,
            "NaN",
            "{'a':1}",
        ] {
            assert_eq!(canon(bad), None, "{bad:?}");
        }
        assert_eq!(canonical(b"\"\xff\""), None, "not UTF-8");
    }

    #[test]
    fn nesting_is_capped() {
        assert_eq!(canon(&nested(MAX_DEPTH)), Some(nested(MAX_DEPTH)));
        assert_eq!(canon(&nested(MAX_DEPTH + 1)), None);
        let deep_object = format!("{}1{}", r#"{"a":"#.repeat(200), "}".repeat(200));
        assert_eq!(canon(&deep_object), None);
        assert_eq!(canon(&nested(200)), None, "and no stack overflow");
        assert_eq!(canon(&nested(100_000)), None);
    }
}
