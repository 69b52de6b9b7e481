//! Reading the `Idempotency-Key` header.
//!
//! The IETF draft makes the value an RFC 8941 structured-field item whose value is a
//! string (`"8e03978e-..."`); Stripe's clients send the key bare (`8e03978e-...`). Both are
//! accepted, and either may carry RFC 8941 parameters (`"8e03978e-...";v=1`), which are
//! checked against the grammar and then ignored: the key is the string or the bare text.
//!
//! A bare key is one or more RFC 9110 `tchar` (``!#$%&'*+-.^_`|~``, digits, letters)
//! plus `:`, `/` and `=`, so tokens, UUIDs and base64 or base64url keys all pass, while a
//! value with a space, a comma, a quote, brackets or other delimiters inside is refused
//! (400) rather than read as a key the client probably did not mean.
//!
//! The length limit applies to the key alone, without its parameters.

/// The header's name.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Why a request's key cannot be used; each is answered with 400 (`INVALID_ARGUMENT` over
/// gRPC) and the request does not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyProblem {
    /// No key, where the layer requires one.
    #[error("the request has no idempotency key, and one is required")]
    Missing,
    /// The header appears more than once.
    #[error("the idempotency key is sent more than once")]
    Repeated,
    /// Neither a structured-field string nor a bare key, or with malformed parameters.
    #[error(
        "the idempotency key must be a string (\"...\") or a bare token (letters, digits and \
         !#$%&'*+-.^_`|~:/=), with optional structured-field parameters"
    )]
    Malformed,
    /// The key is empty.
    #[error("the idempotency key is empty")]
    Empty,
    /// The key (without parameters) is `len` bytes long, over the limit `max`.
    #[error("the idempotency key is {len} characters long; the limit is {max}")]
    TooLong {
        /// The key's length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// The key in the values of a request's `Idempotency-Key` header (every value the
/// request carries, in any framework's header type), `Ok(None)` when there are none.
///
/// ```
/// use idempotent_runtime::http::{read_key, KeyProblem};
///
/// assert_eq!(read_key([&b"\"8e03978e\";v=1"[..]], 255), Ok(Some("8e03978e".to_owned())));
/// assert_eq!(read_key([&b"8e03978e"[..]], 255), Ok(Some("8e03978e".to_owned())));
/// assert_eq!(read_key([&b"a, b"[..]], 255), Err(KeyProblem::Malformed));
/// assert_eq!(read_key([&b"a"[..], b"b"], 255), Err(KeyProblem::Repeated));
/// assert_eq!(read_key(Vec::<&[u8]>::new(), 255), Ok(None));
/// ```
pub fn read_key<'a, I>(values: I, max_len: usize) -> Result<Option<String>, KeyProblem>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let mut values = values.into_iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyProblem::Repeated);
    }
    // Visible ASCII, spaces and tabs only, as a header value read as text.
    if !value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(KeyProblem::Malformed);
    }
    let text = value.trim_ascii();
    let key = parse(text).ok_or(KeyProblem::Malformed)?;
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

/// [`read_key`] of header `name` in an `http` header map (the gRPC layer's metadata
/// entry is configurable).
#[cfg(feature = "tower")]
pub(crate) fn read_key_in(
    headers: &::http::HeaderMap,
    name: &str,
    max_len: usize,
) -> Result<Option<String>, KeyProblem> {
    read_key(headers.get_all(name).iter().map(|v| v.as_bytes()), max_len)
}

/// The key in a trimmed header value: an sf-string or a bare key, then parameters;
/// `None` when the value is neither. An empty value gives an empty key, which the caller
/// refuses as empty rather than malformed.
fn parse(value: &[u8]) -> Option<String> {
    let (key, rest) = match value.split_first() {
        None => return Some(String::new()),
        Some((b'"', after)) => sf_string(after)?,
        Some(_) => {
            let len = value.iter().take_while(|&&b| is_bare_key_char(b)).count();
            if len == 0 {
                return None;
            }
            let (key, rest) = value.split_at(len);
            // Every byte of the key is ASCII, so this is a plain copy.
            (key.iter().copied().map(char::from).collect(), rest)
        }
    };
    parameters(rest)?;
    Some(key)
}

/// A byte of a bare key: an RFC 9110 `tchar`, or `:`, `/` or `=`, which tokens
/// (RFC 8941 allows `:` and `/` in them), UUIDs and base64 keys need.
fn is_bare_key_char(b: u8) -> bool {
    is_tchar(b) || matches!(b, b':' | b'/' | b'=')
}

/// An RFC 9110 `tchar`: a letter, a digit, or one of ``!#$%&'*+-.^_`|~``.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// An RFC 8941 string after its opening quote (section 4.2.5): printable ASCII, `\"` and
/// `\\` the only escapes. Gives the string and what follows its closing quote.
fn sf_string(mut rest: &[u8]) -> Option<(String, &[u8])> {
    let mut out = String::with_capacity(rest.len());
    loop {
        let (&c, after) = rest.split_first()?;
        rest = after;
        match c {
            b'\\' => {
                let (&e, after) = rest.split_first()?;
                if e != b'"' && e != b'\\' {
                    return None;
                }
                out.push(char::from(e));
                rest = after;
            }
            b'"' => return Some((out, rest)),
            b' '..=b'~' => out.push(char::from(c)),
            _ => return None,
        }
    }
}

/// RFC 8941 parameters (section 4.2.3.2), `*( ";" *SP param-key [ "=" bare-item ] )`,
/// filling all of `rest`. They are checked, not kept: the key is what identifies the
/// request, and a client that adds parameters to it means the same key.
fn parameters(mut rest: &[u8]) -> Option<()> {
    while let Some(after) = rest.strip_prefix(b";") {
        let start = after.iter().take_while(|&&b| b == b' ').count();
        let after = param_key(&after[start..])?;
        rest = match after.strip_prefix(b"=") {
            Some(value) => bare_item(value)?,
            None => after,
        };
    }
    rest.is_empty().then_some(())
}

/// `( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`; gives what follows.
fn param_key(rest: &[u8]) -> Option<&[u8]> {
    let (&first, after) = rest.split_first()?;
    if !(first.is_ascii_lowercase() || first == b'*') {
        return None;
    }
    let len = after
        .iter()
        .take_while(|&&b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.' | b'*')
        })
        .count();
    Some(&after[len..])
}

/// An RFC 8941 bare item (section 4.2.3.1): integer or decimal, string, token, byte
/// sequence or boolean. Gives what follows it.
fn bare_item(rest: &[u8]) -> Option<&[u8]> {
    let (&first, after) = rest.split_first()?;
    match first {
        b'-' | b'0'..=b'9' => number(rest),
        b'"' => sf_string(after).map(|(_, rest)| rest),
        b'*' | b'A'..=b'Z' | b'a'..=b'z' => {
            let len = after
                .iter()
                .take_while(|&&b| is_tchar(b) || matches!(b, b':' | b'/'))
                .count();
            Some(&after[len..])
        }
        b':' => {
            // Byte sequence: the base64 alphabet between colons. Its value is never
            // used, so it is checked against the grammar only, not decoded.
            let len = after
                .iter()
                .take_while(|&&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
                .count();
            after[len..].strip_prefix(b":")
        }
        b'?' => match after.split_first()? {
            (b'0' | b'1', rest) => Some(rest),
            _ => None,
        },
        _ => None,
    }
}

/// An RFC 8941 integer or decimal (section 4.2.4): `["-"] 1*15DIGIT`, or
/// `["-"] 1*12DIGIT "." 1*3DIGIT`. Gives what follows it.
fn number(rest: &[u8]) -> Option<&[u8]> {
    let rest = rest.strip_prefix(b"-").unwrap_or(rest);
    let digits = |s: &[u8]| s.iter().take_while(|b| b.is_ascii_digit()).count();
    let int = digits(rest);
    let after = &rest[int..];
    match after.strip_prefix(b".") {
        None => (1..=15).contains(&int).then_some(after),
        Some(fraction) => {
            let frac = digits(fraction);
            ((1..=12).contains(&int) && (1..=3).contains(&frac)).then_some(&fraction[frac..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(v: &str) -> Result<Option<String>, KeyProblem> {
        read_key([v.as_bytes()], 255)
    }

    fn read(v: &str) -> String {
        key(v)
            .unwrap_or_else(|p| panic!("{v:?}: {p:?}"))
            .unwrap_or_else(|| panic!("{v:?}: no key"))
    }

    #[test]
    fn quoted_and_bare_keys_are_read() {
        assert_eq!(read("\"abc-123\""), "abc-123");
        assert_eq!(read("abc-123"), "abc-123");
        assert_eq!(read(r#""a\"b\\c""#), r#"a"b\c"#);
        assert_eq!(
            read("\"has space\""),
            "has space",
            "a string may hold spaces"
        );
        assert_eq!(read("  \"k\"  "), "k", "the value is trimmed");
    }

    #[test]
    fn bare_keys_are_tokens_uuids_and_base64() {
        for k in [
            "8e03978e-40d5-43e8-bc93-6894a57f9324",
            "aGVsbG8rd29ybGQ/Zm9v+/==",
            "aGVsbG8td29ybGRfZm9v-_",
            "abc_DEF-123:/+=",
            "!#$%&'*+-.^_`|~",
            "0",
        ] {
            assert_eq!(read(k), k);
        }
    }

    #[test]
    fn parameters_are_checked_and_ignored() {
        assert_eq!(read("\"k\";x=1"), "k");
        assert_eq!(read("\"k\";a;b=?1;c=:aGk=:;d=1.5;e=tok"), "k");
        assert_eq!(read("k;x=1"), "k");
        assert_eq!(read("\"k\"; x=1;  *y.z-_9=-12.345"), "k", "SP after `;`");
        assert_eq!(read(r#""k";s="a;b=\"c\"";t=*T:/x;f=?0;e=::"#), "k");
        assert_eq!(read("\"k\";n=123456789012345;m=123456789012.123"), "k");
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            // Bare keys outside token syntax.
            "has space",
            "a,b",
            "k\"x",
            "k(1)",
            "<k>",
            "k@x",
            "k[1]",
            "k{1}",
            r"k\x",
            "k\tx",
            ";x=1",
            // Strings.
            "\"abc",
            "\"a\"b",
            r#""a\nb""#,
            // Parameters.
            "\"k\";X=1",
            "\"k\";",
            "\"k\" ;x=1",
            "\"k\";x=",
            "\"k\";x=1;",
            "\"k\";1x=1",
            "\"k\";x=1 y",
            "\"k\";x= 1",
            "\"k\";x=1.",
            "\"k\";x=1.2345",
            "\"k\";x=-",
            "\"k\";x=1234567890123456",
            "\"k\";x=1234567890123.1",
            "\"k\";x=?2",
            "\"k\";x=:a b:",
            "\"k\";x=:abc",
            "\"k\";x=\"abc",
            "\"k\";x=@1",
            "\"k\",\"l\"",
            "k;x=1;Y",
        ] {
            assert_eq!(key(bad), Err(KeyProblem::Malformed), "{bad:?}");
        }
        assert_eq!(key("kä"), Err(KeyProblem::Malformed));
        assert_eq!(key("\"kä\""), Err(KeyProblem::Malformed));
        // Unicode spaces are not trimmed away: they make the value malformed.
        assert_eq!(key("\u{a0}k"), Err(KeyProblem::Malformed));
    }

    #[test]
    fn empty_long_and_repeated_keys_are_refused() {
        assert_eq!(key("\"\""), Err(KeyProblem::Empty));
        assert_eq!(key(""), Err(KeyProblem::Empty));
        assert_eq!(key("\"\";x=1"), Err(KeyProblem::Empty));
        assert_eq!(
            key(&"k".repeat(256)),
            Err(KeyProblem::TooLong { len: 256, max: 255 })
        );
        // The limit is on the key, not on its parameters.
        let max = "k".repeat(255);
        assert_eq!(read(&format!("{max};x=1")), max);
        assert_eq!(read(&format!("\"{max}\";x=\"{max}\"")), max);
        assert_eq!(read_key(Vec::<&[u8]>::new(), 255), Ok(None));
        assert_eq!(read_key([&b"a"[..], b"b"], 255), Err(KeyProblem::Repeated));
    }
}
