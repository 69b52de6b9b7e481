//! Error responses as `application/problem+json` (RFC 9457).

use serde::Serialize;

use super::key::KeyProblem;
use super::stored::StoredResponse;
use crate::error::Error;

/// An answer the HTTP layers give before or instead of running the handler (a bad key,
/// a reused one, a duplicate in flight, the store down), as an `application/problem+json`
/// body (RFC 9457) with `type`, `title`, `status` and `detail`. Not stored, so the key
/// stays usable, except the two that stand for a handler that ran
/// ([`Problem::broken_response`], [`Problem::unreplayable_response`]): those are what its
/// key keeps.
///
/// ```
/// use idempotent_runtime::http::Problem;
/// use idempotent_runtime::Error;
///
/// let busy = Problem::from_engine(&Error::InProgress, 1);
/// assert_eq!(busy.status(), 409);
/// assert_eq!(busy.retry_after(), Some(1));
/// let body: serde_json::Value = serde_json::from_slice(&busy.body()).unwrap();
/// assert_eq!(body["status"], 409);
/// assert_eq!(Problem::CONTENT_TYPE, "application/problem+json");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    status: u16,
    slug: &'static str,
    title: &'static str,
    detail: String,
    retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

impl Problem {
    /// The `Content-Type` of [`Problem::body`].
    pub const CONTENT_TYPE: &'static str = "application/problem+json";

    fn new(
        status: u16,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            slug,
            title,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// 400 for a key that cannot be used.
    pub fn for_key(p: &KeyProblem) -> Self {
        let detail = match *p {
            KeyProblem::Missing => "this request requires an Idempotency-Key header".to_owned(),
            KeyProblem::Repeated => "send one Idempotency-Key header, not several".to_owned(),
            KeyProblem::Malformed => {
                "the Idempotency-Key must be a string (\"...\") or a bare token (letters, \
                 digits and !#$%&'*+-.^_`|~:/=), with optional structured-field parameters"
                    .to_owned()
            }
            KeyProblem::Empty => "the Idempotency-Key is empty".to_owned(),
            KeyProblem::TooLong { len, max } => {
                format!("the Idempotency-Key is {len} characters long; the limit is {max}")
            }
        };
        let (slug, title) = match p {
            KeyProblem::Missing => ("missing-key", "Idempotency-Key is missing"),
            _ => ("invalid-key", "Idempotency-Key is invalid"),
        };
        Self::new(400, slug, title, detail)
    }

    /// 413 for a request body over `limit` bytes.
    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            413,
            "body-too-large",
            "Request body too large",
            format!("an idempotent request's body may be at most {limit} bytes"),
        )
    }

    /// 400 for a request body that ended with an error.
    pub fn unreadable_body() -> Self {
        Self::new(
            400,
            "unreadable-body",
            "Request body could not be read",
            "the request body ended with an error before it was complete",
        )
    }

    /// 502 for a handler's response body that failed half-way. The handler ran, so this
    /// is what the layers store for its key ([`Problem::to_stored`]): a retry gets it
    /// again rather than running the handler a second time.
    pub fn broken_response() -> Self {
        Self::new(
            502,
            "broken-response",
            "The response could not be read",
            "the request ran, but its response body failed before it was complete; it cannot be \
             replayed, and the request is not run again with this key",
        )
    }

    /// 500 for a request that ran but whose response cannot be replayed: `answered` is the
    /// status the handler answered with, `why` says what the layer could not keep (a body
    /// over its limit, a stream). The handler's own response went to the caller that ran
    /// it; this is what the layers store for its key ([`Problem::to_stored`]), so that a
    /// retry, or a duplicate that waited, is told so rather than running the handler a
    /// second time. A server error, not a client's: the request was right, and a new key
    /// would run it again.
    ///
    /// ```
    /// use idempotent_runtime::http::Problem;
    ///
    /// let p = Problem::unreplayable_response(201, "its body is over 1048576 bytes");
    /// assert_eq!((p.status(), p.retry_after()), (500, None));
    /// let body: serde_json::Value = serde_json::from_slice(&p.body()).unwrap();
    /// assert_eq!(body["type"], "urn:idempotent:problem:unreplayable-response");
    /// assert!(body["detail"].as_str().unwrap().contains("answered 201"));
    /// ```
    pub fn unreplayable_response(answered: u16, why: &str) -> Self {
        Self::new(
            500,
            "unreplayable-response",
            "The response cannot be replayed",
            format!(
                "a request with this Idempotency-Key ran and answered {answered}, but its \
                 response cannot be replayed ({why}); it is not run again with this key"
            ),
        )
    }

    /// The problem for an engine refusal: 409 for a duplicate in flight and 503 for the
    /// store down (both with `retry_after` seconds), 422 for a reused key, 400 for an
    /// invalid one, 500 for anything else.
    pub fn from_engine(e: &Error, retry_after: u64) -> Self {
        match e {
            Error::InProgress => Self {
                retry_after: Some(retry_after),
                ..Self::new(
                    409,
                    "in-progress",
                    "A request with this Idempotency-Key is being processed",
                    "retry after the first request completes; it will then be replayed",
                )
            },
            Error::Mismatch => Self::new(
                422,
                "key-reused",
                "Idempotency-Key reused with a different request",
                "this key was used with another method, path or body; use a new key for a new request",
            ),
            Error::InvalidKey(k) => Self::new(
                400,
                "invalid-key",
                "Idempotency-Key is invalid",
                k.to_string(),
            ),
            Error::Store(_) => Self {
                retry_after: Some(retry_after),
                ..Self::new(
                    503,
                    "store-unavailable",
                    "Idempotency store unavailable",
                    "the request was not processed; retry it with the same key",
                )
            },
            _ => Self::new(
                500,
                "internal",
                "Idempotency processing failed",
                "the request's idempotency record could not be processed",
            ),
        }
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The seconds to send in `Retry-After`, where a retry can succeed.
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }

    /// The `application/problem+json` body.
    pub fn body(&self) -> Vec<u8> {
        let body = Body {
            kind: format!("urn:idempotent:problem:{}", self.slug),
            title: self.title,
            status: self.status,
            detail: &self.detail,
        };
        // Serializing a struct of strings and a number cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// The problem as a response to store for its key, for a problem that stands for a
    /// request that ran (see [`Problem::broken_response`] and
    /// [`Problem::unreplayable_response`]).
    pub fn to_stored(&self) -> StoredResponse {
        let retry_after = self.retry_after.map(|s| s.to_string());
        let mut headers: Vec<(&str, &[u8])> = vec![("content-type", Self::CONTENT_TYPE.as_bytes())];
        if let Some(secs) = &retry_after {
            headers.push(("retry-after", secs.as_bytes()));
        }
        StoredResponse::new(self.status, headers, &self.body())
    }

    /// The response.
    #[cfg(feature = "tower")]
    pub(crate) fn into_response(self) -> ::http::Response<bytes::Bytes> {
        use ::http::{header, HeaderValue, Response, StatusCode};
        let mut resp = Response::new(bytes::Bytes::from(self.body()));
        *resp.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(Self::CONTENT_TYPE),
        );
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
