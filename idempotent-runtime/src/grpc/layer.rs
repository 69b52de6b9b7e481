//! The layer and its settings.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::http::request::Parts;
use tonic::Code;
use tower::Layer;

use super::service::GrpcIdempotencyService;
use crate::engine::{Concurrency, Idempotency};
use crate::http::IDEMPOTENCY_KEY;

/// The largest request and the largest response the layer buffers by default: 4 MiB, the
/// default limit on a message that gRPC servers and clients (tonic's included) accept.
pub const DEFAULT_MAX_MESSAGE: usize = 4 * 1024 * 1024;

type CodeFn = Arc<dyn Fn(Code) -> bool + Send + Sync>;
type ScopeFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// A tower layer that makes the unary gRPC methods it is given idempotent, for tonic
/// servers (`Server::builder().layer(..)`); see [the module docs](crate::grpc).
#[derive(Clone)]
pub struct GrpcIdempotencyLayer {
    pub(crate) config: Config,
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) engine: Idempotency,
    pub(crate) methods: HashSet<String>,
    pub(crate) key_metadata: String,
    pub(crate) require_key: bool,
    pub(crate) max_key_len: usize,
    pub(crate) max_request: usize,
    pub(crate) max_response: usize,
    pub(crate) concurrency: Concurrency,
    pub(crate) retry_after: Duration,
    pub(crate) store_code: CodeFn,
    pub(crate) scope: Option<ScopeFn>,
    pub(crate) ttl: Option<Duration>,
}

impl fmt::Debug for GrpcIdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("GrpcIdempotencyLayer")
            .field("methods", &c.methods)
            .field("key_metadata", &c.key_metadata)
            .field("require_key", &c.require_key)
            .field("max_key_len", &c.max_key_len)
            .field("max_request", &c.max_request)
            .field("max_response", &c.max_response)
            .field("concurrency", &c.concurrency)
            .field("retry_after", &c.retry_after)
            .field("ttl", &c.ttl)
            .finish_non_exhaustive()
    }
}

/// The codes a retry should run again for, as HTTP's 5xx and 429 are: the failure may be
/// transient (`UNAVAILABLE`, `RESOURCE_EXHAUSTED`, `ABORTED`, `DEADLINE_EXCEEDED`), or
/// says nothing about whether the method did its work (`INTERNAL`, `UNKNOWN`,
/// `CANCELLED`, `DATA_LOSS`, `UNIMPLEMENTED`).
fn stored_by_default(code: Code) -> bool {
    !matches!(
        code,
        Code::Cancelled
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
            | Code::Unimplemented
    )
}

impl GrpcIdempotencyLayer {
    /// A layer on `engine` that makes no method idempotent yet: name them with
    /// [`method`](Self::method) or [`methods`](Self::methods).
    pub fn new(engine: Idempotency) -> Self {
        Self {
            config: Config {
                engine,
                methods: HashSet::new(),
                key_metadata: IDEMPOTENCY_KEY.to_owned(),
                require_key: false,
                max_key_len: crate::DEFAULT_MAX_KEY_LEN,
                max_request: DEFAULT_MAX_MESSAGE,
                max_response: DEFAULT_MAX_MESSAGE,
                concurrency: Concurrency::Reject,
                retry_after: Duration::from_secs(1),
                store_code: Arc::new(stored_by_default),
                scope: None,
                ttl: None,
            },
        }
    }

    /// Makes a unary method idempotent, named by its path as it goes over the wire,
    /// `/package.Service/Method` (tonic's generated `SERVICE_NAME` constant is the
    /// `package.Service` part). Calls of other methods, streaming ones included, pass
    /// through untouched.
    ///
    /// Only unary methods belong here: the layer reads a call's whole request before the
    /// method runs and its whole response before answering, which a client-streaming or
    /// bidirectional call would wait on forever.
    pub fn method(mut self, path: impl Into<String>) -> Self {
        self.config.methods.insert(path.into());
        self
    }

    /// [`method`](Self::method) for each of `paths`.
    pub fn methods<P: Into<String>>(mut self, paths: impl IntoIterator<Item = P>) -> Self {
        self.config
            .methods
            .extend(paths.into_iter().map(Into::into));
        self
    }

    /// The metadata entry that carries the key; `idempotency-key` by default. gRPC
    /// metadata names are lowercase ASCII.
    pub fn key_metadata(mut self, name: impl Into<String>) -> Self {
        self.config.key_metadata = name.into().to_ascii_lowercase();
        self
    }

    /// Whether a call of a listed method without a key is refused (`INVALID_ARGUMENT`)
    /// rather than run without idempotency; off by default.
    pub fn require_key(mut self, required: bool) -> Self {
        self.config.require_key = required;
        self
    }

    /// The longest key accepted, in bytes; [`DEFAULT_MAX_KEY_LEN`](crate::DEFAULT_MAX_KEY_LEN) (255) by default.
    pub fn max_key_len(mut self, len: usize) -> Self {
        self.config.max_key_len = len;
        self
    }

    /// The largest request the layer reads, in bytes, frames included; a larger one is
    /// refused with `RESOURCE_EXHAUSTED` and the method does not run.
    pub fn max_request(mut self, bytes: usize) -> Self {
        self.config.max_request = bytes;
        self
    }

    /// The largest response the layer stores, in bytes, frames included; a larger one is
    /// sent on to its caller as it comes and not stored. The method ran, so its key is
    /// kept: a retry, or a duplicate that waited, gets `FAILED_PRECONDITION` saying the
    /// response cannot be replayed, never a second run.
    pub fn max_response(mut self, bytes: usize) -> Self {
        self.config.max_response = bytes;
        self
    }

    /// A duplicate that arrives while the first call runs waits for it and gets its
    /// response, instead of `ABORTED`.
    pub fn wait_for_in_flight(mut self) -> Self {
        self.config.concurrency = Concurrency::Wait;
        self
    }

    /// The pause an `ABORTED` (in flight) or `UNAVAILABLE` (store down) answer asks for,
    /// in its `grpc-retry-pushback-ms` trailer, which gRPC clients with a retry policy
    /// honour; one second by default.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.config.retry_after = after;
        self
    }

    /// Which of the method's status codes are stored and replayed. By default every code
    /// but those a retry should run again for: `CANCELLED`, `UNKNOWN`,
    /// `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED`, `INTERNAL`, `UNAVAILABLE`,
    /// `DATA_LOSS` and `UNIMPLEMENTED` are passed through and their keys released.
    pub fn store_codes(mut self, store: impl Fn(Code) -> bool + Send + Sync + 'static) -> Self {
        self.config.store_code = Arc::new(store);
        self
    }

    /// Reads a tenant from each call (an authenticated account, say), so that two
    /// tenants never share a key; `None` puts the call in the shared scope.
    pub fn scope_with(
        mut self,
        scope: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.config.scope = Some(Arc::new(scope));
        self
    }

    /// How long responses are replayed; the engine's TTL by default.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = Some(ttl);
        self
    }
}

impl<S> Layer<S> for GrpcIdempotencyLayer {
    type Service = GrpcIdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcIdempotencyService::new(inner, Arc::new(self.config.clone()))
    }
}
