//! Reading the `Idempotency-Key` header.
//!
//! The IETF draft makes the value a structured-field string (`"8e03978e-..."`); Stripe's
//! clients send a bare token (`8e03978e-...`). Both are accepted.

use ::http::HeaderMap;

/// The header's name.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Why a request's key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyProblem {
    Missing,
    Repeated,
    Malformed,
    Empty,
    TooLong { len: usize, max: usize },
}

/// The key of a request, `Ok(None)` when it has none.
pub(crate) fn read_key(headers: &HeaderMap, max_len: usize) -> Result<Option<String>, KeyProblem> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyProblem::Repeated);
    }
    let text = value.to_str().map_err(|_| KeyProblem::Malformed)?.trim();
    let key = if let Some(quoted) = text.strip_prefix('"') {
        sf_string(quoted).ok_or(KeyProblem::Malformed)?
    } else {
        text.to_owned()
    };
    if key.is_empty() {
        return Err(KeyProblem::Empty);
    }
    if key.len() > max_len {
        return Err(KeyProblem::TooLong {
            len: key.len(),
            max: max_len,
        });
    }
    Ok(Some(key))
}

/// The rest of an RFC 8941 string after its opening quote: `\"` and `\\` are the only
/// escapes, printable ASCII only, and nothing may follow the closing quote.
fn sf_string(rest: &str) -> Option<String> {
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                e @ ('"' | '\\') => out.push(e),
                _ => return None,
            },
            '"' => return chars.as_str().is_empty().then_some(out),
            ' '..='~' => out.push(c),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::http::HeaderValue;

    fn key(v: &str) -> Result<Option<String>, KeyProblem> {
        let mut h = HeaderMap::new();
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_str(v).unwrap());
        read_key(&h, 255)
    }

    #[test]
    fn quoted_and_bare_keys_are_read() {
        assert_eq!(key("\"abc-123\"").unwrap().as_deref(), Some("abc-123"));
        assert_eq!(key("abc-123").unwrap().as_deref(), Some("abc-123"));
        assert_eq!(key(r#""a\"b\\c""#).unwrap().as_deref(), Some(r#"a"b\c"#));
    }

    #[test]
    fn bad_keys_are_refused() {
        assert_eq!(key("\"\""), Err(KeyProblem::Empty));
        assert_eq!(key("\"abc"), Err(KeyProblem::Malformed));
        assert_eq!(key("\"a\"b"), Err(KeyProblem::Malformed));
        assert_eq!(key(r#""a\nb""#), Err(KeyProblem::Malformed));
        assert_eq!(
            key(&"k".repeat(256)),
            Err(KeyProblem::TooLong { len: 256, max: 255 })
        );
        assert_eq!(read_key(&HeaderMap::new(), 255), Ok(None));
        let mut two = HeaderMap::new();
        two.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        two.append(IDEMPOTENCY_KEY, HeaderValue::from_static("b"));
        assert_eq!(read_key(&two, 255), Err(KeyProblem::Repeated));
    }
}
