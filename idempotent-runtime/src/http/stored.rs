//! A response as it is stored and replayed: status, every header in order (repeats kept),
//! and the body's bytes.

use serde::{Deserialize, Serialize};

#[cfg(any(feature = "tower", feature = "actix"))]
use super::problem::Problem;

/// The header a replayed response carries.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Hop-by-hop headers (RFC 9110, section 7.6.1): they describe one connection, not the
/// response, and are neither stored nor replayed. So are headers that `Connection` names.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether the HTTP layers store a response of `status` by default: every status but 5xx
/// and 429, after which a retry should run again (the failure may be transient).
///
/// ```
/// use idempotent_runtime::http::stored_by_default;
///
/// assert!(stored_by_default(201) && stored_by_default(404) && stored_by_default(422));
/// assert!(!stored_by_default(503) && !stored_by_default(429) && !stored_by_default(500));
/// ```
pub fn stored_by_default(status: u16) -> bool {
    !(status >= 500 || status == 429)
}

/// What the HTTP layers store for a handler that answered `status` with a response they
/// cannot store, or `None` when it can be read and stored: a stream (a `content_type`
/// among `streaming`, lower-case media types with parameters ignored, or a body of no
/// known `len`) or a body over `limit` bytes. The handler ran, so its key keeps this
/// problem ([`Problem::unreplayable_response`]) while its own response goes on as it
/// comes, and no retry runs it again.
#[cfg(any(feature = "tower", feature = "actix"))]
pub(crate) fn unstorable(
    status: u16,
    content_type: Option<&str>,
    len: Option<u64>,
    streaming: &[String],
    limit: usize,
) -> Option<StoredResponse> {
    let media = content_type
        .and_then(|ct| ct.split(';').next())
        .map(|media| media.trim().to_ascii_lowercase())
        .filter(|media| streaming.contains(media));
    let why = match (media, len) {
        (Some(media), _) => format!("it is a stream ({media})"),
        (None, None) => "its length was not known in advance: a stream".to_owned(),
        (None, Some(len)) if len > limit as u64 => format!("its body is over {limit} bytes"),
        (None, Some(_)) => return None,
    };
    Some(Problem::unreplayable_response(status, &why).to_stored())
}

/// Text when it is UTF-8 (a JSON body, most header values), bytes otherwise. Tagged,
/// not untagged, so that binary codecs (which cannot guess a variant) decode it too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Octets {
    Text(String),
    Bytes(Vec<u8>),
}

impl Octets {
    pub(crate) fn new(b: &[u8]) -> Self {
        match std::str::from_utf8(b) {
            Ok(s) => Octets::Text(s.to_owned()),
            Err(_) => Octets::Bytes(b.to_vec()),
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Octets::Text(s) => s.as_bytes(),
            Octets::Bytes(b) => b,
        }
    }
}

/// A response as the HTTP layers store and replay it: its status, every header in order
/// (repeats kept, hop-by-hop ones left out) and its body. The value a layer of your own
/// returns from the operation it runs through the engine (see the module docs), so that
/// its records and the tower layer's and actix middleware's are one format.
///
/// ```
/// use idempotent_runtime::http::StoredResponse;
///
/// let stored = StoredResponse::new(
///     201,
///     [("location", &b"/payments/1"[..]), ("connection", b"close")],
///     br#"{"id":1}"#,
/// );
/// assert_eq!(stored.status(), 201);
/// assert_eq!(stored.headers().collect::<Vec<_>>(), [("location", &b"/payments/1"[..])]);
/// assert_eq!(stored.body(), br#"{"id":1}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResponse {
    status: u16,
    headers: Vec<(String, Octets)>,
    body: Octets,
}

impl StoredResponse {
    /// The response to store: its status, its headers in order (names in any case; they
    /// are stored in lower case, and hop-by-hop ones are left out) and its body.
    pub fn new<'a, H>(status: u16, headers: H, body: &[u8]) -> Self
    where
        H: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        Self {
            status,
            headers: kept_headers(headers),
            body: Octets::new(body),
        }
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The headers, in their order, lower-case names; to send with
    /// [`IDEMPOTENT_REPLAYED`]` : true` added when the response is a replay.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()))
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        self.body.as_bytes()
    }
}

#[cfg(feature = "tower")]
impl StoredResponse {
    /// The response to store, from `http` types.
    pub(crate) fn from_http(
        status: ::http::StatusCode,
        headers: &::http::HeaderMap,
        body: &[u8],
    ) -> Self {
        Self {
            status: status.as_u16(),
            headers: kept_http_headers(headers),
            body: Octets::new(body),
        }
    }

    /// The response to send: fresh, or marked as a replay.
    pub(crate) fn to_response(&self, replayed: bool) -> ::http::Response<bytes::Bytes> {
        use ::http::{HeaderValue, Response, StatusCode};
        let mut resp = Response::new(bytes::Bytes::copy_from_slice(self.body.as_bytes()));
        *resp.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = resp.headers_mut();
        restore_headers(&self.headers, headers);
        if replayed {
            headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        resp
    }
}

/// The headers of a response to store: every one in order, repeats kept, names in lower
/// case, less the hop-by-hop ones and those `Connection` names.
pub(crate) fn kept_headers<'a, H>(headers: H) -> Vec<(String, Octets)>
where
    H: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    let all: Vec<(String, &[u8])> = headers
        .into_iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v))
        .collect();
    let named_by_connection: Vec<String> = all
        .iter()
        .filter(|(n, _)| n == "connection")
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    all.into_iter()
        .filter(|(n, _)| {
            !HOP_BY_HOP.contains(&n.as_str()) && !named_by_connection.iter().any(|c| c == n)
        })
        .map(|(n, v)| (n, Octets::new(v)))
        .collect()
}

/// [`kept_headers`] of an `http` header map, whose `iter` yields each value of a repeated
/// header in insertion order.
#[cfg(feature = "tower")]
pub(crate) fn kept_http_headers(headers: &::http::HeaderMap) -> Vec<(String, Octets)> {
    kept_headers(headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())))
}

/// Appends stored headers to `into`, in their order. A name or value that is no longer
/// valid (a record written by hand, say) is skipped rather than failing the replay.
#[cfg(feature = "tower")]
pub(crate) fn restore_headers(stored: &[(String, Octets)], into: &mut ::http::HeaderMap) {
    use ::http::header::{HeaderName, HeaderValue};
    for (name, value) in stored {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            into.append(n, v);
        }
    }
}

#[cfg(all(test, feature = "tower"))]
mod tests {
    use super::*;
    use ::http::{HeaderMap, HeaderValue, StatusCode};

    #[test]
    fn headers_keep_their_order_and_repeats_and_lose_hop_by_hop_ones() {
        let mut h = HeaderMap::new();
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("location", HeaderValue::from_static("/payments/1"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        h.append("connection", HeaderValue::from_static("x-trace"));
        h.append("x-trace", HeaderValue::from_static("per-connection"));
        h.append("transfer-encoding", HeaderValue::from_static("chunked"));
        let stored = StoredResponse::from_http(StatusCode::CREATED, &h, b"{}");
        let json = serde_json::to_string(&stored).unwrap();
        let back: StoredResponse = serde_json::from_str(&json).unwrap();
        let resp = back.to_response(true);
        assert_eq!(resp.status(), StatusCode::CREATED);
        let cookies: Vec<_> = resp.headers().get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(resp.headers()["location"], "/payments/1");
        for gone in ["connection", "x-trace", "transfer-encoding"] {
            assert!(resp.headers().get(gone).is_none(), "{gone} was replayed");
        }
        assert_eq!(resp.headers()[IDEMPOTENT_REPLAYED], "true");
    }

    #[test]
    fn binary_bodies_survive() {
        let stored = StoredResponse::from_http(StatusCode::OK, &HeaderMap::new(), &[0xff, 0, 1]);
        let back: StoredResponse =
            serde_json::from_str(&serde_json::to_string(&stored).unwrap()).unwrap();
        assert_eq!(back.to_response(false).body().as_ref(), &[0xff, 0, 1]);
    }
}
