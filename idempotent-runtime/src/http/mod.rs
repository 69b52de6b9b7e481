//! The `Idempotency-Key` HTTP protocol, the way the IETF draft "The Idempotency-Key HTTP
//! Header Field" and Stripe speak it: POST and PATCH requests carrying the header are made
//! idempotent. Three ways to use it, one set of rules (the table below):
//!
//! - `IdempotencyLayer` (feature `tower`), a tower layer for axum and hyper;
//! - the pieces every layer is made of, for any other framework (no feature needed):
//!   [`read_key`] parses the header, [`fingerprint_request`] fingerprints a request,
//!   [`StoredResponse`] is the response stored and replayed, [`Problem`] the error answer;
//!   see [A layer of your own](#a-layer-of-your-own);
//! - for tonic, the `grpc` module (feature `grpc`), which speaks gRPC's trailers and codes.
//!
#![cfg_attr(feature = "tower", doc = "```")]
#![cfg_attr(not(feature = "tower"), doc = "```ignore")]
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
//! | Same key while the first request runs | 409 with `Retry-After`, or (with `wait_for_in_flight()`) the first request's response once it completes (what its key keeps: for a response that cannot be stored, the 500 below) |
//! | The store does not answer | 503 with `Retry-After`; the handler does not run |
//!
//! Every error is `application/problem+json` (RFC 9457) with `type`, `title`, `status` and
//! `detail`; none is stored, so the key stays usable, except the two that stand for a
//! handler that ran (a response that breaks half-way, one that cannot be stored; below).
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
//! **A response body that breaks half-way** is answered with a 502 problem, and that
//! answer is what the key keeps: the handler ran, so a retry gets the 502 again rather
//! than running it a second time.
//!
//! **What is sent on as it comes and not stored**: a response of unknown length
//! (streamed), one whose content type is marked as streaming (`text/event-stream` by
//! default), and one larger than the response limit. The handler ran, so its key is kept
//! all the same: a retry, or a duplicate that waited, gets a 500 problem saying the
//! response cannot be replayed ([`Problem::unreplayable_response`]), never a second run.
//! As a stored response does, the response starts once that problem is stored.
//!
//! **Fingerprint.** Method, path, query (configurable) and body; a JSON body is compared
//! as canonical JSON, so field order, whitespace and string escapes do not matter, while
//! numbers are compared by their exact text (`1.0` and `1` differ, and so do numbers an
//! `f64` cannot tell apart). A body that is not JSON, or JSON with a repeated object key or
//! nested more than 32 levels deep, is compared by its bytes.
//!
//! **Scope.** Keys are shared by all clients unless `scope_with` reads a tenant from the
//! request (an authenticated account, say): then two tenants never share a key.

//!
//! # A layer of your own
//!
//! For a framework this crate has no layer for: read the key, fingerprint the request, run
//! the handler through the engine, and answer with the stored response or a problem. Read
//! the request as the tower layer does (the query included, the first `Content-Type` as
//! visible ASCII) and its records are the same, so both can share one store.
//!
//! This one runs the handler in the caller's future, so a client that goes away stops
//! the handler and frees its key; the layers run it to completion instead, on a task of
//! its own (`Call::run_to_completion_with_outcome`, for handlers that are `Send`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::future::Future;
//! use idempotent_runtime::http::{
//!     fingerprint_request, read_key, request_scope, stored_by_default, Problem,
//!     StoredResponse, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED,
//! };
//! use idempotent_runtime::{Error, Idempotency, Outcome};
//!
//! /// A request and a response as some framework has them.
//! struct Req {
//!     method: String,
//!     path: String,
//!     query: Option<String>,
//!     headers: Vec<(String, Vec<u8>)>,
//!     body: Vec<u8>,
//! }
//! struct Resp { status: u16, headers: Vec<(String, Vec<u8>)>, body: Vec<u8> }
//!
//! /// Why the handler's response is not stored: it was not one to store, or the engine
//! /// refused the call.
//! enum Pass { Unstored(Resp), Engine(Error) }
//! impl From<Error> for Pass { fn from(e: Error) -> Self { Pass::Engine(e) } }
//!
//! fn problem(p: Problem) -> Resp {
//!     let mut headers = vec![("content-type".into(), Problem::CONTENT_TYPE.into())];
//!     if let Some(secs) = p.retry_after() {
//!         headers.push(("retry-after".into(), secs.to_string().into_bytes()));
//!     }
//!     Resp { status: p.status(), headers, body: p.body() }
//! }
//!
//! /// The values of a request's header `name`.
//! fn values<'a>(req: &'a Req, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
//!     req.headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| &v[..])
//! }
//!
//! async fn idempotent<F, Fut>(idem: &Idempotency, req: Req, handler: F) -> Resp
//! where
//!     F: FnOnce(Req) -> Fut,
//!     Fut: Future<Output = Resp>,
//! {
//!     let key = match read_key(values(&req, IDEMPOTENCY_KEY), 255) {
//!         Ok(Some(key)) => key,
//!         Ok(None) => return handler(req).await, // no key: not idempotent
//!         Err(p) => return problem(Problem::for_key(&p)),
//!     };
//!     // The first value, if it is visible ASCII (as `http::HeaderValue::to_str` reads it).
//!     let content_type = values(&req, "content-type")
//!         .next()
//!         .filter(|v| v.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)))
//!         .and_then(|v| std::str::from_utf8(v).ok());
//!     let (method, path, query) = (&req.method, &req.path, req.query.as_deref());
//!     let fp = fingerprint_request(method, path, query, content_type, &req.body)
//!         .expect("a request's text is JSON-encodable");
//!     let answer = idem
//!         .call(key)
//!         .scope(request_scope(None))
//!         .with_fingerprint(fp)
//!         .run_with_outcome(|| async move {
//!             let resp = handler(req).await;
//!             if !stored_by_default(resp.status) {
//!                 return Err(Pass::Unstored(resp)); // 5xx, 429: a retry runs again
//!             }
//!             let headers = resp.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()));
//!             Ok(StoredResponse::new(resp.status, headers, &resp.body))
//!         })
//!         .await;
//!     match answer {
//!         Ok((stored, outcome)) => {
//!             let mut headers: Vec<(String, Vec<u8>)> =
//!                 stored.headers().map(|(n, v)| (n.to_owned(), v.to_vec())).collect();
//!             if outcome != Outcome::Executed {
//!                 headers.push((IDEMPOTENT_REPLAYED.into(), b"true".to_vec()));
//!             }
//!             Resp { status: stored.status(), headers, body: stored.body().to_vec() }
//!         }
//!         Err(Pass::Unstored(resp)) => resp,
//!         Err(Pass::Engine(e)) => problem(Problem::from_engine(&e, 1)),
//!     }
//! }
//!
//! let idem = Idempotency::memory();
//! let request = |amount: &str| Req {
//!     method: "POST".into(),
//!     path: "/payments".into(),
//!     query: Some("currency=EUR".into()),
//!     headers: vec![
//!         ("Idempotency-Key".into(), b"\"k1\"".to_vec()),
//!         ("Content-Type".into(), b"application/json".to_vec()),
//!     ],
//!     body: format!(r#"{{"amount": {amount}}}"#).into_bytes(),
//! };
//! let pay = |_req: Req| async { Resp { status: 201, headers: vec![], body: b"paid".to_vec() } };
//! let first = idempotent(&idem, request("5"), pay).await;
//! let retry = idempotent(&idem, request("5"), pay).await;
//! let reused = idempotent(&idem, request("6"), pay).await;
//! assert_eq!((first.status, retry.status, reused.status), (201, 201, 422));
//! assert!(retry.headers.iter().any(|(n, _)| n == IDEMPOTENT_REPLAYED));
//! assert_eq!(idem.stats().executed, 1);
//! # }
//! ```

mod canonical_json;
mod fingerprint;
#[cfg(any(feature = "tower", feature = "actix"))]
pub(crate) mod first_answer;
pub(crate) mod key;
#[cfg(feature = "tower")]
mod layer;
mod problem;
pub(crate) mod scope;
#[cfg(feature = "tower")]
mod service;
pub(crate) mod stored;

pub use fingerprint::fingerprint_request;
pub use key::{read_key, KeyProblem, IDEMPOTENCY_KEY};
#[cfg(feature = "tower")]
pub use layer::{IdempotencyLayer, DEFAULT_MAX_BODY};
pub use problem::Problem;
pub use scope::request_scope;
#[cfg(feature = "tower")]
pub use service::{BoxError, IdempotencyService, ResponseBody};
pub use stored::{stored_by_default, StoredResponse, HOP_BY_HOP, IDEMPOTENT_REPLAYED};
