//! The `Idempotency-Key` HTTP layer (feature `tower`): a tower layer that makes POST and
//! PATCH requests carrying the header idempotent, the way the IETF draft "The
//! Idempotency-Key HTTP Header Field" and Stripe do. It drops into axum and hyper; for
//! tonic, use the `grpc` module (feature `grpc`), which speaks gRPC's trailers and codes.
//!
//! ```
//! # async fn demo() {
//! use axum::{routing::post, Router};
//! use idempotent_runtime::{http::IdempotencyLayer, Idempotency};
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { "paid" }))
//!     .layer(IdempotencyLayer::new(Idempotency::memory()).require_key(true));
//! # let _ = app; }
//! ```
//!
//! | Request | Answer |
//! |---|---|
//! | Another method than POST or PATCH (configurable) | passed through |
//! | No key | passed through, or 400 with `require_key(true)` |
//! | A key that is empty, longer than 255 characters, repeated, or malformed (see **Key**) | 400 |
//! | A body over 1 MiB (configurable) | 413; the handler does not run |
//! | First request with a key | the handler's response, stored |
//! | Same key, same request, after completion | the stored status, headers and body, plus `Idempotent-Replayed: true` |
//! | Same key, different method, path, query or body | 422 |
//! | Same key while the first request runs | 409 with `Retry-After`, or (with `wait_for_in_flight()`) the first request's response once it completes |
//! | The store does not answer | 503 with `Retry-After`; the handler does not run |
//!
//! Every error is `application/problem+json` (RFC 9457) with `type`, `title`, `status` and
//! `detail`; none is stored, so the key stays usable.
//!
//! **Key.** An RFC 8941 string (`"8e03978e-..."`, as the IETF draft has it) or a bare key
//! of RFC 9110 `tchar`, `:`, `/` and `=` (`8e03978e-...`, as Stripe's clients send it:
//! tokens, UUIDs, base64). RFC 8941 parameters may follow either (`"8e03978e-...";v=1`);
//! they are checked and ignored. Anything else, a space or a comma inside, say, is
//! malformed.
//!
//! **What is stored.** Responses whose status is not 5xx or 429 (configurable with
//! `store_status`): a retry after a server error or a rate limit runs the handler again,
//! since the failure may be transient. Every header is kept in order, repeated ones
//! included (two `Set-Cookie` stay two), except the hop-by-hop headers that describe one
//! connection ([`HOP_BY_HOP`], and any named by `Connection`).
//!
//! **What is passed through and not stored**, with its key released so a retry runs
//! again: a response of unknown length (streamed), one whose content type is marked as
//! streaming (`text/event-stream` by default), and one larger than the response limit.
//!
//! **Fingerprint.** Method, path, query (configurable) and body; a JSON body is compared
//! as canonical JSON, so field order, whitespace and string escapes do not matter, while
//! numbers are compared by their exact text (`1.0` and `1` differ, and so do numbers an
//! `f64` cannot tell apart). A body that is not JSON, or JSON with a repeated object key or
//! nested more than 32 levels deep, is compared by its bytes.
//!
//! **Scope.** Keys are shared by all clients unless `scope_with` reads a tenant from the
//! request (an authenticated account, say): then two tenants never share a key.

mod canonical_json;
mod fingerprint;
pub(crate) mod key;
mod layer;
mod problem;
pub(crate) mod scope;
mod service;
pub(crate) mod stored;

pub use key::IDEMPOTENCY_KEY;
pub use layer::{IdempotencyLayer, DEFAULT_MAX_BODY};
pub use service::{BoxError, IdempotencyService, ResponseBody};
pub use stored::{HOP_BY_HOP, IDEMPOTENT_REPLAYED};
