//! The middleware and its settings.

use std::fmt;
use std::future::{ready, Ready};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::Method;
use actix_web::HttpRequest;

use super::service::IdempotencyService;
use crate::engine::{Concurrency, Idempotency};
use crate::http::stored_by_default;

/// The largest request body read for the fingerprint, and the largest response stored, by
/// default: 1 MiB, as the tower layer's.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

type ScopeFn = Arc<dyn Fn(&HttpRequest) -> Option<String> + Send + Sync>;
type StatusFn = Arc<dyn Fn(u16) -> bool + Send + Sync>;

/// An actix-web middleware that makes requests carrying an `Idempotency-Key` header
/// idempotent (`App::new().wrap(..)`); see [the module docs](crate::actix).
#[derive(Clone)]
pub struct IdempotencyMiddleware {
    pub(crate) config: Config,
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) engine: Idempotency,
    pub(crate) methods: Vec<Method>,
    pub(crate) require_key: bool,
    pub(crate) max_key_len: usize,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) concurrency: Concurrency,
    pub(crate) retry_after: Duration,
    pub(crate) store_status: StatusFn,
    pub(crate) scope: Option<ScopeFn>,
    pub(crate) with_query: bool,
    pub(crate) streaming_types: Vec<String>,
    pub(crate) ttl: Option<Duration>,
}

impl fmt::Debug for IdempotencyMiddleware {
    // The closures have no Debug; the settings do.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("IdempotencyMiddleware")
            .field("methods", &c.methods)
            .field("require_key", &c.require_key)
            .field("max_key_len", &c.max_key_len)
            .field("max_request_body", &c.max_request_body)
            .field("max_response_body", &c.max_response_body)
            .field("concurrency", &c.concurrency)
            .field("retry_after", &c.retry_after)
            .field("with_query", &c.with_query)
            .field("streaming_types", &c.streaming_types)
            .field("ttl", &c.ttl)
            .finish_non_exhaustive()
    }
}

impl IdempotencyMiddleware {
    /// A middleware on `engine` with the tower layer's defaults: POST and PATCH, the key
    /// optional, 409 for a duplicate in flight, 1 MiB bodies, 5xx and 429 not stored.
    pub fn new(engine: Idempotency) -> Self {
        Self {
            config: Config {
                engine,
                methods: vec![Method::POST, Method::PATCH],
                require_key: false,
                max_key_len: crate::DEFAULT_MAX_KEY_LEN,
                max_request_body: DEFAULT_MAX_BODY,
                max_response_body: DEFAULT_MAX_BODY,
                concurrency: Concurrency::Reject,
                retry_after: Duration::from_secs(1),
                store_status: Arc::new(stored_by_default),
                scope: None,
                with_query: true,
                streaming_types: vec!["text/event-stream".to_owned()],
                ttl: None,
            },
        }
    }

    /// The methods made idempotent; other requests pass through.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// Whether a request without a key is refused (400) rather than passed through.
    pub fn require_key(mut self, required: bool) -> Self {
        self.config.require_key = required;
        self
    }

    /// The longest key accepted, in bytes.
    pub fn max_key_len(mut self, len: usize) -> Self {
        self.config.max_key_len = len;
        self
    }

    /// The largest request body read (for the fingerprint); a larger one is refused with
    /// 413 and the handler does not run.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.config.max_request_body = bytes;
        self
    }

    /// The largest response body stored (default 1 MiB). A larger response goes to its
    /// client as it comes and is not stored; the handler ran, so its key is kept: a
    /// retry, or a duplicate that waited, gets a 500 problem saying the response cannot
    /// be replayed
    /// ([`Problem::unreplayable_response`](crate::http::Problem::unreplayable_response)),
    /// never a second run.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.config.max_response_body = bytes;
        self
    }

    /// A duplicate that arrives while the first request runs waits for it and gets its
    /// response, instead of 409.
    pub fn wait_for_in_flight(mut self) -> Self {
        self.config.concurrency = Concurrency::Wait;
        self
    }

    /// The `Retry-After` of a 409 (in flight) or 503 (store down); one second by default.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.config.retry_after = after;
        self
    }

    /// Which response statuses are stored; by default all but 5xx and 429.
    pub fn store_status(mut self, store: impl Fn(u16) -> bool + Send + Sync + 'static) -> Self {
        self.config.store_status = Arc::new(store);
        self
    }

    /// Reads a tenant from each request (an authenticated account, say), so that two
    /// tenants never share a key; `None` puts the request in the shared scope.
    pub fn scope_with(
        mut self,
        scope: impl Fn(&HttpRequest) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.config.scope = Some(Arc::new(scope));
        self
    }

    /// Whether the query string is part of the fingerprint; on by default.
    pub fn fingerprint_query(mut self, include: bool) -> Self {
        self.config.with_query = include;
        self
    }

    /// Another media type whose responses are streams, sent on as they come and never
    /// stored (`text/event-stream` is one by default). Responses of unknown length always
    /// are. As for a response over the limit, the key is kept: a retry is told the
    /// response cannot be replayed and does not run the handler again.
    pub fn streaming_content_type(mut self, media_type: impl Into<String>) -> Self {
        self.config
            .streaming_types
            .push(media_type.into().to_ascii_lowercase());
        self
    }

    /// How long responses are replayed; the engine's TTL by default.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = Some(ttl);
        self
    }
}

impl<S, B> Transform<S, ServiceRequest> for IdempotencyMiddleware
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse;
    type Error = actix_web::Error;
    type Transform = IdempotencyService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(IdempotencyService::new(
            Rc::new(service),
            Rc::new(self.config.clone()),
        )))
    }
}
