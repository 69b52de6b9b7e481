//! Idempotency for gRPC servers (feature `grpc`): a tower layer for tonic that makes the
//! unary methods it is given idempotent, by the rules of the `Idempotency-Key` HTTP layer
//! spoken in gRPC's terms.
//!
//! ```
//! # async fn demo() {
//! use idempotent_runtime::{grpc::GrpcIdempotencyLayer, Idempotency};
//!
//! let layer = GrpcIdempotencyLayer::new(Idempotency::memory())
//!     .method("/payments.Payments/Charge")
//!     .wait_for_in_flight();
//! // tonic::transport::Server::builder().layer(layer).add_service(..).serve(addr)
//! # let _ = layer; }
//! ```
//!
//! | Call | Answer |
//! |---|---|
//! | A method not listed (streaming ones included) | passed through untouched |
//! | No key | passed through, or `INVALID_ARGUMENT` with `require_key(true)` |
//! | A key that is empty, longer than 255 characters, repeated, or malformed | `INVALID_ARGUMENT` |
//! | A request over 4 MiB (configurable), or not made of whole gRPC frames | `RESOURCE_EXHAUSTED`, or `INVALID_ARGUMENT`; the method does not run |
//! | First call with a key | the method's response, stored: message, initial and trailing metadata, status |
//! | Same key, same method and request, after completion | the stored response as it was, plus `idempotent-replayed: true` in the initial metadata |
//! | Same key, another method or request | `FAILED_PRECONDITION` |
//! | Same key while the first call runs | `ABORTED` with a `grpc-retry-pushback-ms` trailer, or (with `wait_for_in_flight()`) the first call's response once it completes |
//! | The method's response is over 4 MiB (configurable with `max_response`), or breaks half-way | sent on to its caller as it comes (or `INTERNAL` if it broke); the key is kept, and a retry or a waiting duplicate gets `FAILED_PRECONDITION` saying it cannot be replayed, never a second run |
//! | The store does not answer | `UNAVAILABLE` with `grpc-retry-pushback-ms`; the method does not run |
//!
//! None of the layer's own answers is stored, so the key stays usable. Each is a
//! trailers-only gRPC status, which any gRPC client reads; never an HTTP problem body.
//!
//! **Key.** The `idempotency-key` metadata entry (configurable with `key_metadata`), read
//! by the HTTP layer's rules: an RFC 8941 string or a bare token, parameters ignored.
//!
//! **What is stored.** A unary response whose status is not one a retry should run again
//! for: `CANCELLED`, `UNKNOWN`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED`,
//! `INTERNAL`, `UNAVAILABLE`, `DATA_LOSS` and `UNIMPLEMENTED` are passed through and their
//! keys released (configurable with `store_codes`), as the HTTP layer does with 5xx and
//! 429. A stored error (`NOT_FOUND`, `FAILED_PRECONDITION`, ...) is replayed with its
//! message and metadata. A response without a `grpc-status` is stored as it is: the
//! method ran, and a retry gets the same answer.
//!
//! **Compression.** The method is asked for an uncompressed response (the request's
//! `grpc-accept-encoding` is removed), so the stored response suits every retry,
//! whatever compression its client accepts.
//!
//! **Fingerprint.** The method's path and the request's messages as sent (not their frame
//! headers). A compressed message is compared by its compressed bytes, so a retry must
//! compress as the first call did, as the same client library does.
//!
//! **Runs to completion.** The method runs on a task of its own: a client that cancels, or
//! whose deadline passes, stops neither the method nor the storing of its response, and a
//! retry gets that response.
//!
//! **Streaming methods** are not for this layer: it reads a call's whole request before
//! the method runs and its whole response before it answers. List unary methods only;
//! every other call passes through untouched.
//!
//! **gRPC-Web.** Layer tonic-web's `GrpcWebLayer` before (outside) this one, so that it
//! sees gRPC calls: `Server::builder().accept_http1(true).layer(GrpcWebLayer::new())
//! .layer(idempotency)`. In the other order a keyed gRPC-Web call is refused with
//! `INTERNAL` naming the mistake, and the method does not run.
//!
//! **Scope.** Keys are shared by all clients, apart from the HTTP layer's, unless
//! `scope_with` reads a tenant from the call: then two tenants never share a key.

mod frames;
mod layer;
mod service;
mod status;
mod stored;

pub use layer::{GrpcIdempotencyLayer, DEFAULT_MAX_MESSAGE};
pub use service::GrpcIdempotencyService;
