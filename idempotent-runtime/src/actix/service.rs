//! The middleware's service: reads the key and the body, then runs the inner service
//! through the engine, on a task of its own, and answers with its response, a replay, or
//! a problem.

use std::cell::RefCell;
use std::rc::Rc;

use actix_web::body::{to_bytes_limited, BodySize, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpMessage, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use tokio::sync::oneshot;

use super::middleware::Config;
use crate::engine::Outcome;
use crate::error::Error;
use crate::http::first_answer::FirstAnswer;
use crate::http::stored::unstorable;
use crate::http::{
    fingerprint_request, read_key, request_scope, KeyProblem, Problem, StoredResponse,
    IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED,
};

/// The middleware's service over an inner service `S`.
pub struct IdempotencyService<S> {
    inner: Rc<S>,
    config: Rc<Config>,
}

impl<S> IdempotencyService<S> {
    pub(crate) fn new(inner: Rc<S>, config: Rc<Config>) -> Self {
        Self { inner, config }
    }
}

impl<S> std::fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyService").finish_non_exhaustive()
    }
}

/// Why the engine's operation gave no response to store.
enum Pass {
    /// A response to send as it is and not store: a status a retry should run again
    /// (5xx, 429 by default).
    Response(ServiceResponse),
    /// The inner service failed.
    Inner(actix_web::Error),
    /// The engine refused (in flight, mismatch, store down).
    Engine(Error),
}

impl From<Error> for Pass {
    fn from(e: Error) -> Self {
        Pass::Engine(e)
    }
}

impl<S, B> Service<ServiceRequest> for IdempotencyService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<ServiceResponse, actix_web::Error>>;

    actix_web::dev::forward_ready!(inner);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        Box::pin(handle(self.inner.clone(), self.config.clone(), req))
    }
}

/// A problem as the response to `req`.
fn problem(req: HttpRequest, p: &Problem) -> ServiceResponse {
    let status = StatusCode::from_u16(p.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = HttpResponse::build(status);
    resp.insert_header((header::CONTENT_TYPE, Problem::CONTENT_TYPE));
    if let Some(secs) = p.retry_after() {
        resp.insert_header((header::RETRY_AFTER, secs));
    }
    ServiceResponse::new(req, resp.body(p.body()))
}

/// A stored response to send: fresh, or marked as a replay.
fn stored_response(req: HttpRequest, stored: &StoredResponse, replayed: bool) -> ServiceResponse {
    let status = StatusCode::from_u16(stored.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = HttpResponse::build(status);
    for (name, value) in stored.headers() {
        // A name or value that is no longer valid (a record written by hand, say) is
        // skipped rather than failing the replay.
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            resp.append_header((n, v));
        }
    }
    if replayed {
        resp.insert_header((IDEMPOTENT_REPLAYED, "true"));
    }
    ServiceResponse::new(req, resp.body(Bytes::copy_from_slice(stored.body())))
}

async fn handle<S, B>(
    inner: Rc<S>,
    config: Rc<Config>,
    mut req: ServiceRequest,
) -> Result<ServiceResponse, actix_web::Error>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    if !config.methods.contains(req.method()) {
        return Ok(inner.call(req).await?.map_into_boxed_body());
    }
    let values = req.headers().get_all(IDEMPOTENCY_KEY).map(|v| v.as_bytes());
    let key = match read_key(values, config.max_key_len) {
        Ok(Some(key)) => key,
        Ok(None) if config.require_key => {
            let p = Problem::for_key(&KeyProblem::Missing);
            return Ok(problem(req.request().clone(), &p));
        }
        Ok(None) => return Ok(inner.call(req).await?.map_into_boxed_body()),
        Err(p) => return Ok(problem(req.request().clone(), &Problem::for_key(&p))),
    };
    let mut payload = req.take_payload();
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let p = match chunk {
            Ok(chunk) if body.len() + chunk.len() <= config.max_request_body => {
                body.extend_from_slice(&chunk);
                continue;
            }
            Ok(_) => Problem::body_too_large(config.max_request_body),
            Err(_) => Problem::unreadable_body(),
        };
        return Ok(problem(req.request().clone(), &p));
    }
    let body = body.freeze();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let query = req.uri().query().filter(|_| config.with_query);
    let path = req.uri().path();
    let fp = match fingerprint_request(req.method().as_str(), path, query, content_type, &body) {
        Ok(fp) => fp,
        Err(e) => {
            let p = Problem::from_engine(&Error::Codec(e), 1);
            return Ok(problem(req.request().clone(), &p));
        }
    };
    let tenant = config.scope.as_ref().and_then(|f| f(req.request()));
    let scope = request_scope(tenant.as_deref());
    req.set_payload(Payload::from(body));
    // The request goes to the handler only if it runs; a replay or a refusal answers it
    // here. (actix-web routes a request only while nothing else holds it, so it is not
    // cloned before the handler has it: it waits in `pending`, and the handler's copy
    // comes back in `answered`.)
    let pending = Rc::new(RefCell::new(Some(req)));
    let answered: Rc<RefCell<Option<HttpRequest>>> = Rc::default();
    // The handler runs to completion on a task of its own: a client that disconnects
    // (actix drops this future) must not stop a handler that may have made its side
    // effect, nor free its key for a retry to run it again. The retry waits for it (or
    // gets 409) and replays it. A local task: actix's services are not `Send`.
    let (tx, rx) = oneshot::channel();
    let cfg = config.clone();
    // The handler's own response, for this request, where it is not the one stored.
    let first = FirstAnswer::default();
    let (to_run, to_answer, to_send) = (pending.clone(), answered.clone(), first.clone());
    actix_web::rt::spawn(async move {
        let mut call = cfg
            .engine
            .call(key)
            .scope(scope)
            // The scope comes from the request; the label must not.
            .metrics_scope(crate::observe::HTTP_LABEL)
            .with_fingerprint(fp)
            .concurrency(cfg.concurrency);
        if let Some(ttl) = cfg.ttl {
            call = call.ttl(ttl);
        }
        let answer = call
            .run_with_outcome(|| {
                let req = to_run.borrow_mut().take();
                respond(cfg.clone(), inner, req, to_answer, to_send)
            })
            .await;
        let _ = tx.send(answer);
    });
    let answer = match rx.await {
        // The inner service's error (an inner middleware refusing the request, say) goes
        // on as it is, whether or not it left a request to answer.
        Ok(Err(Pass::Inner(e))) => return Err(e),
        other => other,
    };
    let unrun = pending.borrow_mut().take();
    let Some(http_req) = unrun
        .map(|req| req.into_parts().0)
        .or_else(|| answered.borrow_mut().take())
    else {
        // The handler took the request and ended without a response: it panicked (its
        // claim released, as the engine does for a panic), or the worker is stopping.
        return Err(actix_web::error::ErrorInternalServerError(
            "the handler ended without a response",
        ));
    };
    let retry_after = config.retry_after.as_secs().max(1);
    Ok(match answer {
        Ok(Ok((stored, Outcome::Executed))) => match first.take() {
            Some(resp) => resp,
            None => stored_response(http_req, &stored, false),
        },
        Ok(Ok((stored, _))) => stored_response(http_req, &stored, true),
        Ok(Err(Pass::Response(resp))) => resp,
        Ok(Err(Pass::Inner(e))) => return Err(e),
        Ok(Err(Pass::Engine(e))) => problem(http_req, &Problem::from_engine(&e, retry_after)),
        Err(_) => problem(http_req, &Problem::broken_response()),
    })
}

/// Runs the handler and turns its response into one to store, or one to pass through.
///
/// Once the handler has answered with a status to store, its key is kept: a response
/// that cannot be stored (a stream, a body over the limit) goes on to this request as it
/// comes (through `first`) while a problem saying it cannot be replayed is stored, so
/// that neither a retry nor a duplicate waiting on the request runs the handler twice.
async fn respond<S, B>(
    config: Rc<Config>,
    inner: Rc<S>,
    req: Option<ServiceRequest>,
    answered: Rc<RefCell<Option<HttpRequest>>>,
    first: FirstAnswer<ServiceResponse>,
) -> Result<StoredResponse, Pass>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    // The engine runs an operation once, so the request is there.
    let Some(req) = req else {
        let e = actix_web::error::ErrorInternalServerError("the request was already handled");
        return Err(Pass::Inner(e));
    };
    let resp = inner.call(req).await.map_err(Pass::Inner)?;
    // Routed: the request may be shared now.
    *answered.borrow_mut() = Some(resp.request().clone());
    if !(config.store_status)(resp.status().as_u16()) {
        return Err(Pass::Response(resp.map_into_boxed_body()));
    }
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let len = match resp.response().body().size() {
        BodySize::None => Some(0),
        BodySize::Sized(len) => Some(len),
        BodySize::Stream => None,
    };
    let (streaming, limit) = (&config.streaming_types, config.max_response_body);
    if let Some(problem) = unstorable(resp.status().as_u16(), content_type, len, streaming, limit) {
        first.set(resp.map_into_boxed_body());
        return Ok(problem);
    }
    let (_, resp) = resp.into_parts();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    match to_bytes_limited(resp.into_body(), config.max_response_body).await {
        Ok(Ok(bytes)) => Ok(StoredResponse::new(
            status,
            headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
            &bytes,
        )),
        // The body broke (or outgrew the length it announced) after it was partly read:
        // nothing sensible remains to send but an error, and, since the handler ran, that
        // error is what its key keeps, so that no retry runs the handler again.
        _ => Ok(Problem::broken_response().to_stored()),
    }
}
