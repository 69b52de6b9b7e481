//! The service: reads the key and the request, then runs the method through the engine
//! and answers with its response, a replay, or a status.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::http::header::CONTENT_TYPE;
use ::http::{HeaderMap, HeaderName, Request, Response};
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tonic::Status;
use tower::Service;

use super::frames;
use super::layer::Config;
use super::status::{self, answer};
use super::stored::{Buffered, StoredCall};
use crate::engine::Outcome;
use crate::error::Error;
use crate::http::first_answer::FirstAnswer;
use crate::http::key::read_key_in;
use crate::http::scope::tenant_scope;
use crate::http::BoxError;

/// The request header in which a gRPC client lists the compressions it accepts.
const GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");

/// The layer's service over an inner service `S` (tonic's routes).
#[derive(Clone)]
pub struct GrpcIdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for GrpcIdempotencyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcIdempotencyService")
            .field("inner", &self.inner)
            .field("methods", &self.config.methods)
            .finish_non_exhaustive()
    }
}

impl<S> GrpcIdempotencyService<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Why the engine's operation gave no response to store.
enum Pass<E> {
    /// A response to send as it is and not store: its status is one a retry should run
    /// the method again for.
    Response(Response<tonic::body::Body>),
    /// The inner service failed.
    Inner(E),
    /// The engine refused (in flight, mismatch, store down).
    Engine(Error),
}

impl<E> From<Error> for Pass<E> {
    fn from(e: Error) -> Self {
        Pass::Engine(e)
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcIdempotencyService<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The service that was polled ready handles this call; a clone takes its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(handle(self.config.clone(), inner, req))
    }
}

/// The call passed to the inner service as it came.
async fn pass_through<S, ReqBody, ResBody>(
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Response<tonic::body::Body>, S::Error>
where
    S: Service<Request<tonic::body::Body>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let resp = inner.call(req.map(tonic::body::Body::new)).await?;
    Ok(resp.map(tonic::body::Body::new))
}

async fn handle<S, ReqBody, ResBody>(
    config: Arc<Config>,
    inner: S,
    req: Request<ReqBody>,
) -> Result<Response<tonic::body::Body>, S::Error>
where
    S: Service<Request<tonic::body::Body>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    if !config.methods.contains(req.uri().path()) {
        return pass_through(inner, req).await;
    }
    let key = match read_key_in(req.headers(), &config.key_metadata, config.max_key_len) {
        Ok(Some(key)) => key,
        Ok(None) if config.require_key => {
            let missing = crate::http::key::KeyProblem::Missing;
            return Ok(answer(
                status::key_problem(missing, &config.key_metadata),
                None,
            ));
        }
        Ok(None) => return pass_through(inner, req).await,
        Err(p) => return Ok(answer(status::key_problem(p, &config.key_metadata), None)),
    };
    if is_grpc_web(req.headers()) {
        // Outside tonic-web, the layer would see gRPC-Web's framing, with the status in the
        // body, and could neither compare nor keep its calls: a setup error, said loudly.
        let message = "the idempotency layer sees gRPC-Web calls: layer \
                       tonic_web::GrpcWebLayer before (outside) it";
        return Ok(answer(Status::internal(message), None));
    }
    let (mut parts, body) = req.into_parts();
    // A stored response must suit every retry, whatever compression it accepts: the
    // method is asked for an uncompressed one.
    parts.headers.remove(GRPC_ACCEPT_ENCODING);
    let bytes = match Limited::new(body, config.max_request).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            let message = format!(
                "an idempotent call's request may be at most {} bytes",
                config.max_request
            );
            return Ok(answer(Status::resource_exhausted(message), None));
        }
        Err(_) => {
            let message = "the request ended with an error before it was complete";
            return Ok(answer(Status::cancelled(message), None));
        }
    };
    let Some(messages) = frames::messages(&bytes) else {
        let message = "the request is not a sequence of whole gRPC messages";
        return Ok(answer(Status::invalid_argument(message), None));
    };
    let fp = frames::fingerprint(parts.uri.path(), &messages);
    let tenant = config.scope.as_ref().and_then(|f| f(&parts));
    let scope = tenant_scope("grpc", tenant.as_deref());
    let req = Request::from_parts(parts, tonic::body::Body::new(Full::new(bytes)));
    // The method runs to completion on a task of its own: a client that cancels (or whose
    // deadline passes) must not stop a method that may have made its side effect, nor
    // free its key for a retry to run it again. The retry waits for it (or gets
    // `ABORTED`) and replays it.
    let mut call = config
        .engine
        .call(key)
        .scope(scope)
        // The scope comes from the request; the label must not.
        .metrics_scope(crate::observe::GRPC_LABEL)
        .with_fingerprint(fp)
        .concurrency(config.concurrency);
    if let Some(ttl) = config.ttl {
        call = call.ttl(ttl);
    }
    let cfg = config.clone();
    let first = FirstAnswer::default();
    let slot = first.clone();
    let answered = call
        .run_to_completion_with_outcome(move || respond(cfg, inner, req, slot))
        .await;
    match answered {
        Ok((stored, Outcome::Executed)) => Ok(match first.take() {
            Some(resp) => resp,
            None => stored.to_response(false).map(tonic::body::Body::new),
        }),
        Ok((stored, _)) => Ok(stored.to_response(true).map(tonic::body::Body::new)),
        Err(Pass::Response(resp)) => Ok(resp),
        Err(Pass::Inner(e)) => Err(e),
        Err(Pass::Engine(e)) => Ok(status::from_engine(&e, config.retry_after)),
    }
}

/// Whether a call is gRPC-Web (`application/grpc-web`, `application/grpc-web-text`, ...).
fn is_grpc_web(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/grpc-web")
        })
}

/// Runs the method and reads its whole response: one to store, or one to pass through.
///
/// Once the method has answered, its key is kept unless its status says a retry should
/// run it again: a response too large to store, or one that breaks half-way, is sent on
/// to this caller (through `first`) while a status saying it cannot be replayed is
/// stored, so that neither a retry nor a duplicate waiting on the call runs it twice.
async fn respond<S, ResBody>(
    config: Arc<Config>,
    mut inner: S,
    req: Request<tonic::body::Body>,
    first: FirstAnswer<Response<tonic::body::Body>>,
) -> Result<StoredCall, Pass<S::Error>>
where
    S: Service<Request<tonic::body::Body>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let resp = inner.call(req).await.map_err(Pass::Inner)?;
    let (parts, body) = resp.into_parts();
    let mut body = Box::pin(body);
    let mut chunks = VecDeque::new();
    let mut len = 0;
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(_) => {
                // The response broke after it began; nothing sensible remains to send
                // but an error.
                let message = "the method's response failed before it was complete";
                first.set(answer(Status::internal(message), None));
                return Ok(StoredCall::unreplayable("it broke before it was complete"));
            }
        };
        match frame.into_data() {
            Ok(data) => {
                len += data.len();
                chunks.push_back(data);
                if len > config.max_response {
                    // Too large to store: sent on as it comes, what was read first.
                    let rest = Prefixed {
                        prefix: chunks,
                        rest: body,
                    };
                    first.set(Response::from_parts(parts, tonic::body::Body::new(rest)));
                    let why = format!("it is over {} bytes", config.max_response);
                    return Ok(StoredCall::unreplayable(&why));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(t);
                }
            }
        }
    }
    let data = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop_front().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(len);
            chunks.iter().for_each(|c| all.extend_from_slice(c));
            all.freeze()
        }
    };
    // The status is in the trailers, or, for a trailers-only answer, in the headers. A
    // response without one is kept as it is: the method ran, and a retry gets the same.
    let code = trailers
        .as_ref()
        .and_then(status::code_in)
        .or_else(|| status::code_in(&parts.headers));
    if code.is_some_and(|c| !(config.store_code)(c)) {
        let body = Buffered {
            data: (!data.is_empty()).then_some(data),
            trailers,
        };
        let resp = Response::from_parts(parts, tonic::body::Body::new(body));
        return Err(Pass::Response(resp));
    }
    Ok(StoredCall::new(
        parts.status,
        &parts.headers,
        &data,
        trailers.as_ref(),
    ))
}

/// A body of which the first frames were read already: those, then the rest.
struct Prefixed<B> {
    prefix: VecDeque<Bytes>,
    rest: Pin<Box<B>>,
}

impl<B: Body<Data = Bytes>> Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(data) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        self.rest.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self.prefix.iter().map(|c| c.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(read));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(read));
        }
        hint
    }
}
