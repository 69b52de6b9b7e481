//! The layer: configuration only, cheap to clone.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::http::request::Parts;
use ::http::{Method, StatusCode};

use super::service::IdempotencyService;
use crate::engine::{Concurrency, Idempotency};

type ScopeFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;
type StatusFn = Arc<dyn Fn(StatusCode) -> bool + Send + Sync>;

/// A tower layer that makes requests carrying an `Idempotency-Key` header idempotent.
/// See [the module docs](crate::http) for what it answers when.
#[derive(Clone, Debug)]
pub struct IdempotencyLayer {
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

impl fmt::Debug for Config {
    // The closures have no Debug; the settings do.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self;
        f.debug_struct("Config")
            .field("methods", &c.methods)
            .field("require_key", &c.require_key)
            .field("max_key_len", &c.max_key_len)
            .field("max_request_body", &c.max_request_body)
            .field("max_response_body", &c.max_response_body)
            .field("concurrency", &c.concurrency)
            .field("streaming_types", &c.streaming_types)
            .finish_non_exhaustive()
    }
}

/// The default limit on request bodies read for the fingerprint, and on stored responses.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

impl IdempotencyLayer {
    /// A layer on `engine` with the defaults: POST and PATCH, the key optional, 409 for a
    /// duplicate in flight, 1 MiB bodies, 5xx and 429 not stored.
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
                store_status: Arc::new(|s: StatusCode| {
                    super::stored::stored_by_default(s.as_u16())
                }),
                scope: None,
                with_query: true,
                streaming_types: vec!["text/event-stream".to_owned()],
                ttl: None,
            },
        }
    }

    /// The methods the layer applies to (default POST and PATCH); others pass through.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// Answer 400 to a request of a covered method without a key (default: let it through
    /// unprotected).
    pub fn require_key(mut self, required: bool) -> Self {
        self.config.require_key = required;
        self
    }

    /// The longest key accepted, in characters (default 255); longer gets 400.
    pub fn max_key_len(mut self, len: usize) -> Self {
        self.config.max_key_len = len;
        self
    }

    /// The largest request body read for the fingerprint (default 1 MiB). A larger one
    /// gets 413 and the handler does not run.
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

    /// Make a duplicate that arrives while the first request runs wait for it and get its
    /// response, instead of 409.
    pub fn wait_for_in_flight(mut self) -> Self {
        self.config.concurrency = Concurrency::Wait;
        self
    }

    /// The `Retry-After` of a 409 and a 503 (default 1 s).
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.config.retry_after = after;
        self
    }

    /// Which statuses are stored (default: all but 5xx and 429, which a retry should run
    /// again: the failure may be transient).
    pub fn store_status(
        mut self,
        store: impl Fn(StatusCode) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.config.store_status = Arc::new(store);
        self
    }

    /// Scopes keys by what `scope` reads from the request (the authenticated account, a
    /// tenant header), so two clients never share a key. `None` uses the shared scope.
    pub fn scope_with(
        mut self,
        scope: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.config.scope = Some(Arc::new(scope));
        self
    }

    /// Whether the query string is part of the fingerprint (default true).
    pub fn fingerprint_query(mut self, include: bool) -> Self {
        self.config.with_query = include;
        self
    }

    /// Responses of this content type are streamed to the client and never stored
    /// (default: `text/event-stream`). Responses of unknown length always are. As for a
    /// response over the limit, the key is kept: a retry is told the response cannot be
    /// replayed and does not run the handler again.
    pub fn streaming_content_type(mut self, media_type: impl Into<String>) -> Self {
        self.config
            .streaming_types
            .push(media_type.into().to_ascii_lowercase());
        self
    }

    /// How long responses are replayed (default: the engine's TTL).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = Some(ttl);
        self
    }
}

impl<S> tower::Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService::new(inner, Arc::new(self.config.clone()))
    }
}
