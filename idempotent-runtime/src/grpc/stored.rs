//! A unary call's response as it is stored and replayed: HTTP status, headers (the initial
//! metadata), the body's frames, and the trailers (`grpc-status`, `grpc-message`, the
//! trailing metadata).

use std::pin::Pin;
use std::task::{Context, Poll};

use ::http::{HeaderMap, HeaderValue, Response, StatusCode};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde::{Deserialize, Serialize};

use crate::http::stored::{kept_http_headers, restore_headers, Octets};
use crate::http::IDEMPOTENT_REPLAYED;

/// What the layer stores for a completed call. A trailers-only answer (a status and no
/// message, as servers send errors) has its status in `headers` and no trailers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredCall {
    status: u16,
    headers: Vec<(String, Octets)>,
    body: Octets,
    trailers: Option<Vec<(String, Octets)>>,
}

impl StoredCall {
    /// What is stored for a call whose method ran but whose response cannot be stored
    /// (too large, or broken half-way): a status that says so, so that a retry or a
    /// duplicate waiting on the call does not run it again.
    pub(crate) fn unreplayable(why: &str) -> Self {
        let status = tonic::Status::failed_precondition(format!(
            "a call with this idempotency key ran, but its response cannot be replayed \
             ({why}); it was not run again"
        ));
        let resp: Response<()> = status.into_http();
        Self::new(resp.status(), resp.headers(), &[], None)
    }

    pub(crate) fn new(
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        trailers: Option<&HeaderMap>,
    ) -> Self {
        Self {
            status: status.as_u16(),
            headers: kept_http_headers(headers),
            body: Octets::new(body),
            trailers: trailers.map(kept_http_headers),
        }
    }

    /// The response to send: fresh, or marked as a replay in its initial metadata.
    pub(crate) fn to_response(&self, replayed: bool) -> Response<Buffered> {
        let trailers = self.trailers.as_ref().map(|stored| {
            let mut t = HeaderMap::with_capacity(stored.len());
            restore_headers(stored, &mut t);
            t
        });
        let body = self.body.as_bytes();
        let mut resp = Response::new(Buffered {
            data: (!body.is_empty()).then(|| Bytes::copy_from_slice(body)),
            trailers,
        });
        *resp.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let headers = resp.headers_mut();
        restore_headers(&self.headers, headers);
        if replayed {
            headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        resp
    }
}

/// A body read whole: its data, then its trailers.
#[derive(Debug, Default)]
pub(crate) struct Buffered {
    pub(crate) data: Option<Bytes>,
    pub(crate) trailers: Option<HeaderMap>,
}

impl Body for Buffered {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Never exact: trailers follow the data, and a layer outside (tonic-web) may add a
        // frame of its own; an exact size would become a `content-length` that cuts them off.
        let mut hint = SizeHint::new();
        hint.set_lower(self.data.as_ref().map_or(0, |d| d.len() as u64));
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn message_metadata_and_trailers_come_back_as_they_were() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        h.append("x-initial", HeaderValue::from_static("1"));
        h.append("x-initial", HeaderValue::from_static("2"));
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        t.insert("x-trailing-bin", HeaderValue::from_static("AAEC"));
        let body = [0u8, 0, 0, 0, 2, 0xff, 0x01];
        let stored = StoredCall::new(StatusCode::OK, &h, &body, Some(&t));
        for codec in ["json", "postcard"] {
            let back: StoredCall = match codec {
                "json" => serde_json::from_slice(&serde_json::to_vec(&stored).unwrap()).unwrap(),
                _ => postcard::from_bytes(&postcard::to_stdvec(&stored).unwrap()).unwrap(),
            };
            let resp = back.to_response(true);
            assert_eq!(resp.headers()[IDEMPOTENT_REPLAYED], "true");
            let initial: Vec<_> = resp.headers().get_all("x-initial").iter().collect();
            assert_eq!(initial, ["1", "2"]);
            let collected = resp.into_body().collect().await.unwrap();
            assert_eq!(collected.trailers(), Some(&t));
            assert_eq!(collected.to_bytes().as_ref(), &body);
        }
    }

    #[tokio::test]
    async fn a_trailers_only_answer_stays_one() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("5"));
        let stored = StoredCall::new(StatusCode::OK, &h, &[], None);
        let resp = stored.to_response(false);
        assert!(resp.headers().get(IDEMPOTENT_REPLAYED).is_none());
        assert_eq!(resp.headers()["grpc-status"], "5");
        assert!(resp.body().is_end_stream());
    }
}
