//! Error responses as `application/problem+json` (RFC 9457).

use ::http::{header, HeaderValue, Response, StatusCode};
use bytes::Bytes;
use serde::Serialize;

use super::key::KeyProblem;
use crate::error::Error;

/// A problem to answer with, before or instead of the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) status: StatusCode,
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
    fn new(
        status: StatusCode,
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

    pub(crate) fn key(p: KeyProblem) -> Self {
        let detail = match p {
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
        Self::new(StatusCode::BAD_REQUEST, slug, title, detail)
    }

    pub(crate) fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
            format!("an idempotent request's body may be at most {limit} bytes"),
        )
    }

    pub(crate) fn unreadable_body() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unreadable-body",
            "Request body could not be read",
            "the request body ended with an error before it was complete",
        )
    }

    pub(crate) fn broken_response() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "broken-response",
            "The response could not be read",
            "the handler's response body failed before it was complete; nothing was stored",
        )
    }

    /// The problem for an engine refusal.
    pub(crate) fn from_engine(e: &Error, retry_after: u64) -> Self {
        match e {
            Error::InProgress => Self {
                retry_after: Some(retry_after),
                ..Self::new(
                    StatusCode::CONFLICT,
                    "in-progress",
                    "A request with this Idempotency-Key is being processed",
                    "retry after the first request completes; it will then be replayed",
                )
            },
            Error::Mismatch => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "key-reused",
                "Idempotency-Key reused with a different request",
                "this key was used with another method, path or body; use a new key for a new request",
            ),
            Error::InvalidKey(k) => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid-key",
                "Idempotency-Key is invalid",
                k.to_string(),
            ),
            Error::Store(_) => Self {
                retry_after: Some(retry_after),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store-unavailable",
                    "Idempotency store unavailable",
                    "the request was not processed; retry it with the same key",
                )
            },
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Idempotency processing failed",
                "the request's idempotency record could not be processed",
            ),
        }
    }

    /// The response. Problem bodies are never stored.
    pub(crate) fn into_response(self) -> Response<Bytes> {
        let body = Body {
            kind: format!("urn:idempotent:problem:{}", self.slug),
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
        };
        // Serializing a struct of strings and a number cannot fail.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = Response::new(Bytes::from(bytes));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
