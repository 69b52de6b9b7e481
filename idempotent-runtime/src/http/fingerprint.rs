//! What makes two requests "the same request" for a key: method, path, query and body.
//!
//! A JSON body is compared by value (canonical JSON: field order and whitespace do not
//! matter); any other body by its bytes.

use ::http::header::CONTENT_TYPE;
use ::http::request::Parts;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::CodecError;
use crate::fingerprint::Fingerprint;

#[derive(Serialize)]
struct Shape<'a> {
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    body: BodyShape,
}

#[derive(Serialize)]
enum BodyShape {
    Json(Value),
    Sha256(String),
}

fn is_json(parts: &Parts) -> bool {
    parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || m.ends_with("+json")
        })
        .unwrap_or(false)
}

/// The request's fingerprint.
pub(crate) fn of_request(
    parts: &Parts,
    body: &[u8],
    with_query: bool,
) -> Result<Fingerprint, CodecError> {
    let json = is_json(parts)
        .then(|| serde_json::from_slice::<Value>(body).ok())
        .flatten();
    let body = match json {
        Some(v) => BodyShape::Json(v),
        None => BodyShape::Sha256(
            Sha256::digest(body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        ),
    };
    Fingerprint::of(&Shape {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: if with_query { parts.uri.query() } else { None },
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::http::Request;

    fn fp(method: &str, uri: &str, ct: &str, body: &str) -> Fingerprint {
        let (parts, ()) = Request::builder()
            .method(method)
            .uri(uri)
            .header(CONTENT_TYPE, ct)
            .body(())
            .unwrap()
            .into_parts();
        of_request(&parts, body.as_bytes(), true).unwrap()
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
}
