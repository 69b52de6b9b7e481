//! What makes two requests "the same request" for a key: method, path, query and body.
//!
//! A JSON body is compared by value, through its canonical text ([`canonical_json`]):
//! field order, whitespace and string escapes do not matter, while every number is
//! compared by its exact text and duplicate keys are never merged. Any other body, and a
//! JSON body with no canonical text (invalid, a repeated key, nested too deep), is
//! compared by its bytes.

use sha2::{Digest, Sha256};

use super::canonical_json;
use crate::error::{CodecError, CodecErrorKind};
use crate::fingerprint::Fingerprint;

/// Whether a `Content-Type` says the body is JSON (`application/json` or `*/*+json`).
fn is_json(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || m.ends_with("+json")
        })
        .unwrap_or(false)
}

/// The fingerprint of a request, for [`Call::with_fingerprint`](crate::Call::with_fingerprint):
/// its method, path, query (`None` to leave it out) and body, read by the rules of the
/// module docs, the same for every framework (so that the tower layer, the actix
/// middleware and a layer of your own agree on one store).
///
/// It is the SHA-256 of the canonical JSON of
/// `{"body":{TAG:BODY},"method":..,"path":..,"query":..}`, where the tag says how the body
/// is compared: `"Json"` with its canonical text, or `"Sha256"` with the hex digest of its
/// bytes. The tag keeps a byte-compared body from ever matching a JSON-compared one. These
/// are the bytes [`Fingerprint::of`] hashes for that shape, so requests fingerprinted by
/// earlier releases (through a `serde_json::Value`) still match unless their body was one
/// of the lossy cases; they are written out by hand because a `Value` would pass the
/// canonical text's numbers through `f64` again.
///
/// ```
/// use idempotent_runtime::http::fingerprint_request;
///
/// let json = Some("application/json");
/// let a = fingerprint_request("POST", "/pay", None, json, br#"{"a":1,"b":2}"#).unwrap();
/// let b = fingerprint_request("POST", "/pay", None, json, br#"{ "b":2, "a":1 }"#).unwrap();
/// let c = fingerprint_request("POST", "/pay", None, json, br#"{"a":1,"b":3}"#).unwrap();
/// assert_eq!(a, b);
/// assert_ne!(a, c);
/// ```
pub fn fingerprint_request(
    method: &str,
    path: &str,
    query: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Fingerprint, CodecError> {
    let canonical = if is_json(content_type) {
        canonical_json::canonical(body)
    } else {
        None
    };
    let (tag, body) = match canonical {
        Some(text) => ("Json", text),
        None => {
            let hex: String = Sha256::digest(body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            ("Sha256", format!("\"{hex}\""))
        }
    };
    let query = match query {
        Some(q) => json_string(q)?,
        None => "null".to_owned(),
    };
    let mut hasher = Sha256::new();
    for piece in [
        "{\"body\":{",
        &json_string(tag)?,
        ":",
        &body,
        "},\"method\":",
        &json_string(method)?,
        ",\"path\":",
        &json_string(path)?,
        ",\"query\":",
        &query,
        "}",
    ] {
        hasher.update(piece.as_bytes());
    }
    Ok(Fingerprint::from_bytes(hasher.finalize().into()))
}

/// [`fingerprint_request`] of an `http` request's head.
#[cfg(feature = "tower")]
pub(crate) fn of_request(
    parts: &::http::request::Parts,
    body: &[u8],
    with_query: bool,
) -> Result<Fingerprint, CodecError> {
    let content_type = parts
        .headers
        .get(::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let query = parts.uri.query().filter(|_| with_query);
    fingerprint_request(
        parts.method.as_str(),
        parts.uri.path(),
        query,
        content_type,
        body,
    )
}

/// `s` as a JSON string, encoded as everywhere in fingerprints (by serde_json).
fn json_string(s: &str) -> Result<String, CodecError> {
    serde_json::to_string(s).map_err(|e| CodecError::new(CodecErrorKind::Fingerprint, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use serde_json::Value;

    fn fp_q(method: &str, uri: &str, ct: &str, body: &str, with_query: bool) -> Fingerprint {
        let (path, query) = match uri.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (uri, None),
        };
        let query = query.filter(|_| with_query);
        fingerprint_request(method, path, query, Some(ct), body.as_bytes()).unwrap()
    }

    #[cfg(feature = "tower")]
    #[test]
    fn an_http_request_is_read_as_its_parts() {
        for (uri, with_query) in [("/p?b=2&a=1", true), ("/p?b=2", false), ("/p", true)] {
            let (parts, ()) = ::http::Request::builder()
                .method("PATCH")
                .uri(uri)
                .header("content-type", "application/json; charset=utf-8")
                .body(())
                .unwrap()
                .into_parts();
            let body = r#"{"x": [1, 2]}"#;
            assert_eq!(
                of_request(&parts, body.as_bytes(), with_query).unwrap(),
                fp_q(
                    "PATCH",
                    uri,
                    "application/json; charset=utf-8",
                    body,
                    with_query
                )
            );
        }
    }

    fn fp(method: &str, uri: &str, ct: &str, body: &str) -> Fingerprint {
        fp_q(method, uri, ct, body, true)
    }

    fn json(body: &str) -> Fingerprint {
        fp("POST", "/p", "application/json", body)
    }

    /// The fingerprint of `body` compared by its bytes.
    fn bytes(body: &str) -> Fingerprint {
        fp("POST", "/p", "application/octet-stream", body)
    }

    #[test]
    fn json_field_order_and_spacing_do_not_matter() {
        let a = fp(
            "POST",
            "/p",
            "application/json",
            r#"{"amount":5,"currency":"EUR"}"#,
        );
        let b = fp(
            "POST",
            "/p",
            "application/json; charset=utf-8",
            "{ \"currency\": \"EUR\", \"amount\": 5 }",
        );
        assert_eq!(a, b);
    }

    #[test]
    fn reserialisations_of_one_payload_match() {
        assert_eq!(
            json(r#"{"a":{"b":{"c":{"y":2,"x":1},"z":[3]},"w":0},"v":null}"#),
            json(r#"{"v":null,"a":{"w":0,"b":{"z":[3],"c":{"x":1,"y":2}}}}"#),
            "key order at depth 3"
        );
        assert_eq!(
            json("{\"a\":[1,2],\"b\":\"s\"}"),
            json(" {\n\t\"a\" : [ 1 , 2 ] ,\r\n \"b\" : \"s\" } \n"),
            "whitespace"
        );
        assert_eq!(
            json(r#"{"\u0041":"\u0041"}"#),
            json(r#"{"A":"A"}"#),
            "escapes"
        );
    }

    #[test]
    fn numbers_beyond_f64_and_long_decimals_are_told_apart() {
        assert_ne!(
            json(r#"{"n":18446744073709551616}"#),
            json(r#"{"n":18446744073709551617}"#)
        );
        assert_ne!(
            json(r#"{"n":0.1000000000000000000001}"#),
            json(r#"{"n":0.1}"#)
        );
    }

    #[test]
    fn duplicate_keys_are_compared_by_bytes() {
        let dup = r#"{"to":"alice","to":"mallory"}"#;
        assert_ne!(json(dup), json(r#"{"to":"mallory"}"#));
        assert_eq!(json(dup), bytes(dup));
        assert_ne!(json(dup), json(r#"{"to":"mallory","to":"alice"}"#));
    }

    #[test]
    fn invalid_or_too_deep_json_is_compared_by_bytes() {
        let invalid = r#"{"a":1,}"#;
        assert_eq!(json(invalid), bytes(invalid));
        assert_ne!(json(invalid), json(r#"{"a":1 ,}"#));
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(json(&deep), bytes(&deep));
    }

    #[test]
    fn a_byte_compared_body_never_matches_a_json_compared_one() {
        // The same bytes, one body compared as JSON and the other by its bytes.
        assert_ne!(json(r#"{"a":1}"#), bytes(r#"{"a":1}"#));
    }

    #[test]
    fn method_path_query_and_body_do() {
        let base = fp("POST", "/p?x=1", "application/json", r#"{"a":1}"#);
        assert_ne!(
            base,
            fp("PATCH", "/p?x=1", "application/json", r#"{"a":1}"#)
        );
        assert_ne!(base, fp("POST", "/q?x=1", "application/json", r#"{"a":1}"#));
        assert_ne!(base, fp("POST", "/p?x=2", "application/json", r#"{"a":1}"#));
        assert_ne!(base, fp("POST", "/p?x=1", "application/json", r#"{"a":2}"#));
        // Not JSON: compared byte for byte.
        assert_ne!(
            fp("POST", "/p", "text/plain", "{\"a\":1}"),
            fp("POST", "/p", "text/plain", "{ \"a\":1}")
        );
    }

    /// The shape earlier releases fingerprinted with [`Fingerprint::of`], through a `Value`.
    #[derive(Serialize)]
    struct OldShape<'a> {
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        body: OldBody,
    }

    #[derive(Serialize)]
    enum OldBody {
        Json(Value),
        Sha256(String),
    }

    #[test]
    fn fingerprints_of_earlier_releases_still_match() {
        let old = |path: &str, query: Option<&str>, body: OldBody| {
            Fingerprint::of(&OldShape {
                method: "POST",
                path,
                query,
                body,
            })
            .unwrap()
        };
        let body = r#"{"amount":12.5,"to":{"name":"\u00e9\"x\"","ids":[1,-2,null,true]}}"#;
        let value: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            fp("POST", "/p%20q?x=1&y", "application/json", body),
            old("/p%20q", Some("x=1&y"), OldBody::Json(value.clone()))
        );
        assert_eq!(
            fp_q("POST", "/p?x=1", "application/json", body, false),
            old("/p", None, OldBody::Json(value))
        );
        let hex = Sha256::digest(body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            fp("POST", "/p", "text/plain", body),
            old("/p", None, OldBody::Sha256(hex))
        );
    }
}
