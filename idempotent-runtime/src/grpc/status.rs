//! The layer's own answers, as gRPC statuses: never HTTP problem bodies, which a gRPC
//! client cannot read.

use std::time::Duration;

use ::http::{HeaderMap, HeaderValue, Response};
use tonic::{Code, Status};

use crate::error::Error;
use crate::http::key::KeyProblem;

/// The trailer in which gRPC clients with a retry policy read how long to wait.
const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// A trailers-only answer carrying `status`, and a pause to wait before retrying if given.
pub(crate) fn answer(status: Status, retry_after: Option<Duration>) -> Response<tonic::body::Body> {
    let mut resp: Response<tonic::body::Body> = status.into_http();
    if let Some(after) = retry_after {
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        resp.headers_mut()
            .insert(RETRY_PUSHBACK, HeaderValue::from(ms));
    }
    resp
}

/// The status for a key that cannot be used.
pub(crate) fn key_problem(p: KeyProblem, metadata: &str) -> Status {
    let message = match p {
        KeyProblem::Missing => format!("this method requires an `{metadata}` metadata entry"),
        KeyProblem::Repeated => format!("send one `{metadata}` metadata entry, not several"),
        KeyProblem::Malformed => format!(
            "the `{metadata}` must be a string (\"...\") or a bare token (letters, digits and \
             !#$%&'*+-.^_`|~:/=), with optional structured-field parameters"
        ),
        KeyProblem::Empty => format!("the `{metadata}` is empty"),
        KeyProblem::TooLong { len, max } => {
            format!("the `{metadata}` is {len} characters long; the limit is {max}")
        }
    };
    Status::invalid_argument(message)
}

/// The answer to an engine refusal, with the pause to ask for where a retry can succeed.
pub(crate) fn from_engine(e: &Error, retry_after: Duration) -> Response<tonic::body::Body> {
    match e {
        Error::InProgress => answer(
            Status::aborted(
                "a call with this idempotency key is in progress; retry after it completes \
                 and it will be replayed",
            ),
            Some(retry_after),
        ),
        Error::Mismatch => answer(
            Status::failed_precondition(
                "this idempotency key was used with another method or request; use a new key \
                 for a new request",
            ),
            None,
        ),
        Error::InvalidKey(k) => answer(Status::invalid_argument(k.to_string()), None),
        Error::Store(_) => answer(
            Status::unavailable(
                "the idempotency store did not answer; the call was not run; retry it with \
                 the same key",
            ),
            Some(retry_after),
        ),
        _ => answer(
            Status::internal("the call's idempotency record could not be processed"),
            None,
        ),
    }
}

/// The `grpc-status` in `headers` (trailers, or the headers of a trailers-only answer).
pub(crate) fn code_in(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get(Status::GRPC_STATUS)?;
    let text = value.to_str().ok()?;
    // `Code::from_bytes` reads any unknown number as `Unknown`; a value that is not a
    // number at all is no status.
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| Code::from_bytes(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_read_from_their_header() {
        let mut h = HeaderMap::new();
        assert_eq!(code_in(&h), None);
        h.insert("grpc-status", HeaderValue::from_static("0"));
        assert_eq!(code_in(&h), Some(Code::Ok));
        h.insert("grpc-status", HeaderValue::from_static("14"));
        assert_eq!(code_in(&h), Some(Code::Unavailable));
        for not_a_number in ["x", "", "1 "] {
            h.insert("grpc-status", HeaderValue::from_static(not_a_number));
            assert_eq!(code_in(&h), None, "{not_a_number:?}");
        }
    }

    #[test]
    fn refusals_that_a_retry_can_pass_ask_for_a_pause() {
        let busy = from_engine(&Error::InProgress, Duration::from_millis(1500));
        assert_eq!(busy.headers()["grpc-status"], "10");
        assert_eq!(busy.headers()[RETRY_PUSHBACK], "1500");
        let reused = from_engine(&Error::Mismatch, Duration::from_secs(1));
        assert_eq!(reused.headers()["grpc-status"], "9");
        assert!(reused.headers().get(RETRY_PUSHBACK).is_none());
        assert_eq!(reused.headers()["content-type"], "application/grpc");
    }
}
