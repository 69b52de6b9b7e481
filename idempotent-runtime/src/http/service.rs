//! The service: reads the key and the body, then runs the inner service through the
//! engine and answers with its response, a replay, or a problem.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::http::header::CONTENT_TYPE;
use ::http::request::Parts;
use ::http::{Request, Response};
use bytes::Bytes;
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower::Service;

use super::fingerprint;
use super::first_answer::FirstAnswer;
use super::key::{read_key_in, KeyProblem, IDEMPOTENCY_KEY};
use super::layer::Config;
use super::problem::Problem;
use super::scope::request_scope;
use super::stored::{unstorable, StoredResponse};
use crate::engine::Outcome;
use crate::error::Error;

/// Errors of response bodies, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the layer gives: the handler's own (passed through) or a
/// buffered one (stored, replayed, or a problem).
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// The layer's service over an inner service `S`.
#[derive(Clone, Debug)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> IdempotencyService<S> {
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

/// Why the engine's operation gave no storable response.
enum Pass<E> {
    /// A response to send as it is and not store: a status a retry should run again
    /// (5xx, 429 by default).
    Response(Response<ResponseBody>),
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

fn full(resp: Response<Bytes>) -> Response<ResponseBody> {
    resp.map(|b| Full::new(b).map_err(|never| match never {}).boxed_unsync())
}

fn boxed<B>(resp: Response<B>) -> Response<ResponseBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    resp.map(|b| b.map_err(Into::into).boxed_unsync())
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The service that was polled ready handles this request; a clone takes its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(handle(self.config.clone(), inner, req))
    }
}

async fn handle<S, ReqBody, ResBody>(
    config: Arc<Config>,
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    if !config.methods.contains(req.method()) {
        return inner.call(req).await.map(boxed);
    }
    let key = match read_key_in(req.headers(), IDEMPOTENCY_KEY, config.max_key_len) {
        Ok(Some(key)) => key,
        Ok(None) if config.require_key => {
            return Ok(full(Problem::for_key(&KeyProblem::Missing).into_response()))
        }
        Ok(None) => return inner.call(req).await.map(boxed),
        Err(p) => return Ok(full(Problem::for_key(&p).into_response())),
    };
    let (parts, body) = req.into_parts();
    let bytes = match Limited::new(body, config.max_request_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(full(
                Problem::body_too_large(config.max_request_body).into_response(),
            ))
        }
        Err(_) => return Ok(full(Problem::unreadable_body().into_response())),
    };
    let fp = match fingerprint::of_request(&parts, &bytes, config.with_query) {
        Ok(fp) => fp,
        Err(e) => {
            return Ok(full(
                Problem::from_engine(&Error::Codec(e), 1).into_response(),
            ))
        }
    };
    let scope = scope(&config, &parts);
    let req = Request::from_parts(parts, ReqBody::from(bytes));
    // The handler runs to completion on a task of its own: a client that disconnects
    // (hyper drops this future) must not stop a handler that may have made its side
    // effect, nor free its key for a retry to run it again. The retry waits for it (or
    // gets 409) and replays it.
    let mut call = config
        .engine
        .call(key)
        .scope(scope)
        // The scope comes from the request; the label must not.
        .metrics_scope(crate::observe::HTTP_LABEL)
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
            None => full(stored.to_response(false)),
        }),
        Ok((stored, _)) => Ok(full(stored.to_response(true))),
        Err(Pass::Response(resp)) => Ok(resp),
        Err(Pass::Inner(e)) => Err(e),
        Err(Pass::Engine(e)) => {
            let retry_after = config.retry_after.as_secs().max(1);
            Ok(full(Problem::from_engine(&e, retry_after).into_response()))
        }
    }
}

/// The scope of a request's key: shared, or the tenant's that the extractor reads.
fn scope(config: &Config, parts: &Parts) -> String {
    request_scope(config.scope.as_ref().and_then(|f| f(parts)).as_deref())
}

/// Runs the handler and turns its response into one to store, or one to pass through.
///
/// Once the handler has answered with a status to store, its key is kept: a response
/// that cannot be stored (a stream, a body over the limit) goes on to this request as it
/// comes (through `first`) while a problem saying it cannot be replayed is stored, so
/// that neither a retry nor a duplicate waiting on the request runs the handler twice.
async fn respond<S, ReqBody, ResBody>(
    config: Arc<Config>,
    mut inner: S,
    req: Request<ReqBody>,
    first: FirstAnswer<Response<ResponseBody>>,
) -> Result<StoredResponse, Pass<S::Error>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let resp = inner.call(req).await.map_err(Pass::Inner)?;
    if !(config.store_status)(resp.status()) {
        return Err(Pass::Response(boxed(resp)));
    }
    let content_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let len = resp.body().size_hint().exact();
    let (streaming, limit) = (&config.streaming_types, config.max_response_body);
    if let Some(problem) = unstorable(resp.status().as_u16(), content_type, len, streaming, limit) {
        first.set(boxed(resp));
        return Ok(problem);
    }
    let (parts, body) = resp.into_parts();
    match Limited::new(body, config.max_response_body).collect().await {
        Ok(collected) => Ok(StoredResponse::from_http(
            parts.status,
            &parts.headers,
            &collected.to_bytes(),
        )),
        // The body broke (or outgrew the length it announced) after it was partly read:
        // nothing sensible remains to send but an error, and, since the handler ran, that
        // error is what its key keeps, so that no retry runs the handler again.
        Err(_) => Ok(Problem::broken_response().to_stored()),
    }
}
