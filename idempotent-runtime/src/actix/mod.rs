//! The `Idempotency-Key` protocol for actix-web (feature `actix`): a middleware with the
//! rules of the tower layer, the table in [`http`](crate::http), built on the same
//! framework-free core, so that both read and write one store's records alike.
//!
//! ```
//! use actix_web::{web, App, HttpResponse};
//! use idempotent_runtime::{actix::IdempotencyMiddleware, Idempotency};
//!
//! # fn app() {
//! let engine = Idempotency::memory();
//! let app = App::new()
//!     .wrap(IdempotencyMiddleware::new(engine).require_key(true))
//!     .route("/payments", web::post().to(|| async { HttpResponse::Created().body("paid") }));
//! # let _ = app; }
//! ```
//!
//! Two things differ from the tower layer, both from actix-web itself: headers of
//! different names are stored in the order actix-web's header map keeps them (the values
//! of one header keep their order), and the handler runs to completion on a local task of
//! the worker that received the request (actix-web's services are not `Send`). A worker
//! that stops may drop a handler whose client went away where it is: then its key stays
//! claimed until its lease runs out (10 seconds by default), and a retry runs it again.

mod middleware;
mod service;

pub use middleware::{IdempotencyMiddleware, DEFAULT_MAX_BODY};
pub use service::IdempotencyService;
