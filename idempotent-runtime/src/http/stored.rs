//! A response as it is stored and replayed: status, every header in order (repeats kept),
//! and the body's bytes.

use ::http::header::{self, HeaderName};
use ::http::{HeaderMap, HeaderValue, Response, StatusCode};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

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

/// What the layer stores for a completed request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredResponse {
    status: u16,
    headers: Vec<(String, Octets)>,
    body: Octets,
}

impl StoredResponse {
    pub(crate) fn new(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Self {
        Self {
            status: status.as_u16(),
            headers: kept_headers(headers),
            body: Octets::new(body),
        }
    }

    /// The response to send: fresh, or marked as a replay.
    pub(crate) fn to_response(&self, replayed: bool) -> Response<Bytes> {
        let mut resp = Response::new(Bytes::copy_from_slice(self.body.as_bytes()));
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

/// The headers of a response to store: every one in order, repeats kept, less the
/// hop-by-hop ones and those `Connection` names.
pub(crate) fn kept_headers(headers: &HeaderMap) -> Vec<(String, Octets)> {
    let named_by_connection: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    // `HeaderMap::iter` yields each value of a repeated header in insertion order.
    headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            !HOP_BY_HOP.contains(&n) && !named_by_connection.iter().any(|c| c == n)
        })
        .map(|(name, value)| (name.as_str().to_owned(), Octets::new(value.as_bytes())))
        .collect()
}

/// Appends stored headers to `into`, in their order. A name or value that is no longer
/// valid (a record written by hand, say) is skipped rather than failing the replay.
pub(crate) fn restore_headers(stored: &[(String, Octets)], into: &mut HeaderMap) {
    for (name, value) in stored {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            into.append(n, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_their_order_and_repeats_and_lose_hop_by_hop_ones() {
        let mut h = HeaderMap::new();
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("location", HeaderValue::from_static("/payments/1"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        h.append("connection", HeaderValue::from_static("x-trace"));
        h.append("x-trace", HeaderValue::from_static("per-connection"));
        h.append("transfer-encoding", HeaderValue::from_static("chunked"));
        let stored = StoredResponse::new(StatusCode::CREATED, &h, b"{}");
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
        let stored = StoredResponse::new(StatusCode::OK, &HeaderMap::new(), &[0xff, 0, 1]);
        let back: StoredResponse =
            serde_json::from_str(&serde_json::to_string(&stored).unwrap()).unwrap();
        assert_eq!(back.to_response(false).body().as_ref(), &[0xff, 0, 1]);
    }
}
