//! Make any async function safe to retry.
//!
//! Networks drop responses, clients and load balancers retry, queues redeliver: the same
//! intent arrives twice. `idempotent` runs an operation at most once per idempotency key,
//! replays its stored result to every retry, and makes duplicates that arrive while it
//! runs wait for it (or be refused), in this process and, with a shared store, in others.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_runtime::Error> {
//! use idempotent_runtime::{idempotent, Error};
//! use std::sync::atomic::{AtomicU32, Ordering};
//!
//! static CHARGES: AtomicU32 = AtomicU32::new(0);
//!
//! #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
//! struct Receipt { id: u32 }
//!
//! #[idempotent(key = order_id, ttl = "24h")]
//! async fn charge(order_id: u64, cents: u64) -> Result<Receipt, Error> {
//!     Ok(Receipt { id: CHARGES.fetch_add(1, Ordering::SeqCst) })
//! }
//!
//! let first = charge(42, 999).await?;
//! // The client never saw the answer and retries: the charge is not made again.
//! let again = charge(42, 999).await?;
//! assert_eq!(first, again);
//! assert_eq!(CHARGES.load(Ordering::SeqCst), 1);
//! # Ok(()) }
//! ```
//!
//! The same without the attribute, through the engine, which also says how each value was
//! obtained:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_runtime::Error> {
//! use idempotent_runtime::{Idempotency, Outcome};
//!
//! let idem = Idempotency::memory();
//! let charge = || async { Ok::<_, idempotent_runtime::Error>("ch_42".to_owned()) };
//! let (first, how) = idem.call("order-42").scope("charge").run_with_outcome(charge).await?;
//! assert_eq!(how, Outcome::Executed);
//! let (again, how) = idem.call("order-42").scope("charge").run_with_outcome(charge).await?;
//! assert_eq!((again, how), (first, Outcome::Replayed));
//! # Ok(()) }
//! ```
//!
//! # The `#[idempotent]` attribute
//! One line on an `async fn` that returns `Result<T, E>` (any alias of it, such as
//! `anyhow::Result<T>` or `std::io::Result<T>`), with `T: Serialize + DeserializeOwned`
//! and `E: From<idempotent_runtime::Error>`. The function is called as before. It works on
//! free functions, methods with `&self`, `&mut self` or `self`, generic functions, `impl
//! Trait` and pattern arguments, beside other attributes such as
//! `#[tracing::instrument]` (in either order), with early `return` and `?` in the body,
//! and in trait impls: native `async fn` in traits directly; with `#[async_trait]`, put
//! `#[async_trait]` on the impl block and `#[idempotent]` on the method, as below.
//!
//! | argument | meaning | default |
//! |---|---|---|
//! | `key = <expr>` | the idempotency key: an expression over the arguments, evaluated once before the body; any `Display` value. A string literal, or an expression that names no argument, is a compile error: every call would share one key | required |
//! | `key = const <expr>` | a key that does not come from the arguments, on purpose: one key shared by every call, or one read from elsewhere | |
//! | `on_missing_key = "run" \| "fail"` | for an `Option` key: when it is `None`, run the body directly without idempotency, or fail with [`Error::InvalidKey`] ([`KeyError::Missing`]) running nothing | an `Option` key without it is a compile error |
//! | `ttl = "24h"` | how long the result is replayed (a humantime string, checked at compile time) | the engine's (24 h) |
//! | `lease = "30s"` | how long a claim holds without renewal; bounds how long a crashed holder blocks the key | the engine's (10 s) |
//! | `store = <expr>` | the engine, an expression of type `&Idempotency` (`&self.idem`, an argument, `&*STATIC`) | one in-memory engine per process; per tokio runtime in the crate's own tests (`cfg(test)`), so they keep apart; or the one [`Idempotency::as_default`] gives a block |
//! | `scope = "name"` | the key's namespace | the function's path, with its impl's type and generic arguments |
//! | `fingerprint = <expr>` | any `Serialize` value; the key reused with another fingerprint gets `Error::Mismatch` | none |
//! | `cache_errors = true` | store `Err` results too (then `E` must be `Serialize + DeserializeOwned`) | `false` |
//! | `concurrent = "wait" \| "reject"` | a duplicate in flight waits for the first, or gets `Error::InProgress` | `"wait"` |
//! | `on_cancel = "release" \| "finish"` | a dropped caller stops the body and frees the key, or the body runs to its end on a task of its own ([`Call::run_to_completion`]; arguments must be `Send + 'static`) | `"release"` |
//! | `replay = "clone" \| "decode"` | how hits get their value: by cloning a typed copy kept in this process beside the record (for a `Clone + Send + Sync + 'static` value), or by decoding the record | `"clone"` where the return type is plainly such a type, `"decode"` otherwise |
//! | `transaction = tx` | with `store` naming an engine over a `PostgresStore`: run the body in a transaction of that store (feature `postgres`), reachable in the body as `tx: &mut sqlx::Transaction<'_, Postgres>`; its writes and the stored result commit together ([`Call::run_in_transaction`]) | none |
//! | `crate = "path"` | where the runtime is, for crates that re-export it | `::idempotent_runtime` |
//!
//! The default scope is the function's path as `std::any::type_name` writes it, with the
//! impl's type and the generic arguments (`app::orders::place`,
//! `<app::Stripe as app::Provider>::charge`, `app::load<u64>`), so two impls of one trait
//! and two instances of a generic never share records. It changes when the function is
//! moved or renamed, and records stored under the old one are then not found: give
//! functions whose records must survive a deploy an explicit `scope`, and a new one
//! (`"billing.invoice.v2"`) when the type they return changes.
//!
//! ## What it expands to
//! ```text
//! #[idempotent(key = order.id, ttl = "1h", fingerprint = order.total)]
//! async fn place(order: Order) -> Result<Receipt, Error> { body }
//! ```
//! becomes, give or take paths:
//! ```text
//! async fn place(order: Order) -> Result<Receipt, Error> {
//!     let __idempotent_engine = &__private::default_engine(cfg!(test));
//!     let __idempotent_call = {
//!         let __idempotent_key = &(order.id);
//!         __private::call(
//!             __idempotent_engine,
//!             __private::default_scope(&|| (), 0),
//!             __idempotent_key,
//!             (&&__private::KeyPick(__idempotent_key)).text(),
//!         )
//!     }
//!     .ttl(Duration::new(3600, 0));
//!     let __idempotent_call =
//!         __private::with_fingerprint(__idempotent_call, __private::fingerprint(&(order.total)));
//!     let __idempotent_rest = match __private::run::<Result<Receipt, Error>, _, _, _, _>(
//!         __idempotent_call,
//!         (&&__private::Pick::<Result<Receipt, Error>>::new()).copies(),
//!         move || async move {
//!             let __idempotent_ret: Result<Receipt, Error> = { body };
//!             __idempotent_ret
//!         },
//!     ) {
//!         Ok(__idempotent_answer) => return __idempotent_answer,
//!         Err(__idempotent_rest) => __idempotent_rest,
//!     };
//!     __idempotent_rest.await
//! }
//! ```
//! A `scope = "payments"` is passed as `const { __private::LiteralScope::new("payments") }`
//! in place of `default_scope`: checked when the function is compiled, not on each call.
//! Key and fingerprint are read before the body takes the arguments; the body runs as an
//! async block, so `return` and `?` keep their meaning. A call answered before anything
//! runs (a hit of a result stored in this process, a refusal) is answered by `run` at
//! once, with no future to poll; any other is the future in `Err`. The key is evaluated once; a key
//! that is a string (`&str`, `String`, `Cow<str>`) is copied into the store key as it
//! is (`KeyPick`), any other is written through `Display`, which gives the same text. Where
//! `Receipt` is `Clone + Send + Sync + 'static`, `Pick` hands the engine a way to copy it,
//! and hits after a key's first clone a typed copy kept beside the record instead of
//! decoding it; for any other type hits decode. Both are found by method resolution on
//! the concrete types, so the user's types need no new bound. Method resolution does not
//! see lifetimes, so a return type that may borrow or be generic (a lifetime, a reference,
//! `Self`, a type parameter of the function, or a name written like one, `T` or `T2`) is
//! left to decoding: `Pick` would choose the copy for it and then fail on the `'static`
//! a copy needs. `replay = "clone"` asks for copies outright (and says so if the type
//! cannot have them), `replay = "decode"` turns them off. A type-parameter of an impl
//! named otherwise (`Item`) that is `Clone + Send + Sync` without `'static` is the one
//! case this misreads: it fails to compile ("may not live long enough") until given
//! `'static` or `replay = "decode"`.
//!
//! A hit from a copy is a clone of the value the first hit decoded. For a type whose
//! `Clone` shares state (an `Arc<Mutex<..>>` inside), callers would share it, where
//! decoding gives each its own: use `replay = "decode"` for such a type. The `__idempotent_*` names are
//! hygienic (as `macro_rules!` locals): arguments of the same names neither see them nor
//! are shadowed by them. With `on_cancel = "finish"`, `__private::run_to_completion`,
//! a future awaited as it is, takes the place of `__private::run`; with `transaction = tx`,
//! `__private::run_in_transaction`, and the closure is
//! `move |tx| Box::pin(async move { .. })`. A `store` reached through `&self`,
//! a shared-reference argument or a static stays borrowed; one reached through `&mut self`,
//! `self` or an argument by value is first cloned into an owned handle (an `Arc` clone),
//! so the body may still move or mutate what it came from.
//!
//! ## Each argument
//! `key`, with any `Display` value:
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # use idempotent_runtime::{idempotent, Error};
//! #[idempotent(key = format!("{user}:{day}"))]
//! async fn daily_bonus(user: u64, day: u32) -> Result<u32, Error> { Ok(100) }
//! assert_eq!(daily_bonus(7, 20).await.unwrap(), 100);
//! # }
//! ```
//! `key = const`, for a key that is the same for every call on purpose (a literal or an
//! expression over no argument is refused without it):
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # use idempotent_runtime::{idempotent, Error};
//! #[idempotent(key = const "nightly-report")]
//! async fn nightly(day: u32) -> Result<u32, Error> { Ok(day) }
//! assert_eq!(nightly(1).await.unwrap(), 1);
//! assert_eq!(nightly(2).await.unwrap(), 1, "one key: the first day's report");
//! # }
//! ```
//! `on_missing_key`, for an `Option` key; [`outcome_of`] says how a call got its value:
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use idempotent_runtime::{idempotent, outcome_of, Error, KeyError, Outcome};
//!
//! #[idempotent(key = request_key, on_missing_key = "run")]
//! async fn charge(request_key: Option<String>, cents: u64) -> Result<u64, Error> { Ok(cents) }
//!
//! let (_, how) = outcome_of(charge(Some("k-1".into()), 5)).await;
//! assert_eq!(how, Some(Outcome::Executed));
//! let (_, how) = outcome_of(charge(Some("k-1".into()), 5)).await;
//! assert_eq!(how, Some(Outcome::Replayed));
//! // No key: the body runs directly, so no engine answered.
//! let (_, how) = outcome_of(charge(None, 5)).await;
//! assert_eq!(how, None);
//!
//! #[idempotent(key = request_key, on_missing_key = "fail")]
//! async fn refund(request_key: Option<String>, cents: u64) -> Result<u64, Error> { Ok(cents) }
//! assert!(matches!(refund(None, 5).await, Err(Error::InvalidKey(KeyError::Missing))));
//! # }
//! ```
//! `ttl` and `lease`:
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # use idempotent_runtime::{idempotent, Error};
//! #[idempotent(key = id, ttl = "7 days", lease = "5s")]
//! async fn export(id: u64) -> Result<String, Error> { Ok(format!("export-{id}.csv")) }
//! assert_eq!(export(1).await.unwrap(), "export-1.csv");
//! # }
//! ```
//! `store`, on a method of a service that owns its engine:
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use idempotent_runtime::{idempotent, Error, Idempotency};
//!
//! struct Payments { idem: Idempotency, made: std::sync::Mutex<Vec<u64>> }
//!
//! impl Payments {
//!     #[idempotent(key = order, store = &self.idem)]
//!     async fn pay(&self, order: u64) -> Result<usize, Error> {
//!         let mut made = self.made.lock().unwrap();
//!         made.push(order);
//!         Ok(made.len())
//!     }
//! }
//!
//! let p = Payments { idem: Idempotency::memory(), made: Default::default() };
//! assert_eq!(p.pay(1).await.unwrap(), 1);
//! assert_eq!(p.pay(1).await.unwrap(), 1);
//! assert_eq!(p.made.lock().unwrap().len(), 1);
//! # }
//! ```
//! `scope`, so that a rename keeps the records:
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # use idempotent_runtime::{idempotent, Error};
//! #[idempotent(key = id, scope = "billing.invoice.v1")]
//! async fn send_invoice(id: u64) -> Result<(), Error> { Ok(()) }
//! send_invoice(9).await.unwrap();
//! # }
//! ```
//! `fingerprint`, refusing a reused key with another payload:
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use idempotent_runtime::{idempotent, Error};
//!
//! #[idempotent(key = id, fingerprint = (&to, cents))]
//! async fn transfer(id: &str, to: String, cents: u64) -> Result<u64, Error> { Ok(cents) }
//!
//! assert_eq!(transfer("t-1", "bob".into(), 5).await.unwrap(), 5);
//! assert!(matches!(transfer("t-1", "eve".into(), 5).await, Err(Error::Mismatch)));
//! # }
//! ```
//! `cache_errors`, replaying a definitive failure instead of running again:
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use idempotent_runtime::{idempotent, Error};
//!
//! #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
//! enum Refused { Blocked, Engine(String) }
//! impl From<Error> for Refused {
//!     fn from(e: Error) -> Self { Refused::Engine(e.to_string()) }
//! }
//!
//! #[idempotent(key = card, cache_errors = true)]
//! async fn authorize(card: u64) -> Result<u32, Refused> { Err(Refused::Blocked) }
//!
//! assert_eq!(authorize(4).await, Err(Refused::Blocked));
//! assert_eq!(authorize(4).await, Err(Refused::Blocked)); // replayed, not run
//! # }
//! ```
//! `concurrent = "reject"`, for callers that prefer a fast refusal (HTTP 409) to waiting:
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # use idempotent_runtime::{idempotent, Error};
//! #[idempotent(key = job, concurrent = "reject")]
//! async fn rebuild_index(job: u64) -> Result<(), Error> { Ok(()) }
//! rebuild_index(1).await.unwrap();
//! # }
//! ```
//! `on_cancel = "finish"`, for a body that must never stop half-way (a transfer that
//! debits, then credits): it runs on a task of its own, so a caller that times out does
//! not stop it, and its result is stored for the retry:
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # use idempotent_runtime::{idempotent, Error};
//! #[idempotent(key = id, on_cancel = "finish")]
//! async fn transfer(id: u64, cents: u64) -> Result<u64, Error> { Ok(cents) }
//! assert_eq!(transfer(1, 500).await.unwrap(), 500);
//! # }
//! ```
//! `transaction = tx` (feature `postgres`), on an engine over a `PostgresStore`: the body's
//! writes and the stored result commit in one transaction, so a holder that dies before
//! its commit leaves none of its writes behind, and the retry applies them once. The body
//! reaches the transaction by the name given, and may borrow `&self` and the arguments:
#![cfg_attr(feature = "postgres", doc = "```")]
#![cfg_attr(not(feature = "postgres"), doc = "```ignore")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use idempotent_runtime::{idempotent, store::PostgresStore, Idempotency};
//!
//! #[derive(Debug, thiserror::Error)]
//! enum LedgerError {
//!     #[error(transparent)]
//!     Db(#[from] sqlx::Error),
//!     #[error(transparent)]
//!     Idempotency(#[from] idempotent_runtime::Error),
//! }
//!
//! struct Ledger { idem: Idempotency }
//!
//! impl Ledger {
//!     #[idempotent(key = msg_id, store = &self.idem, scope = "ledger.post", transaction = tx)]
//!     async fn post(&self, msg_id: &str, account: &str, cents: i64) -> Result<i64, LedgerError> {
//!         sqlx::query("INSERT INTO doc_postings (message_id, account, cents) VALUES ($1, $2, $3)")
//!             .bind(msg_id)
//!             .bind(account)
//!             .bind(cents)
//!             .execute(&mut **tx)
//!             .await?;
//!         Ok(cents)
//!     }
//! }
//!
//! # let url = std::env::var("IDEMPOTENT_TEST_POSTGRES")
//! #     .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
//! let store = PostgresStore::connect(&url).await?;
//! store.migrate().await?;
//! # sqlx::query("CREATE TABLE IF NOT EXISTS doc_postings (message_id text, account text, cents bigint)")
//! #     .execute(store.pool()).await?;
//! # let pool = store.pool().clone();
//! let ledger = Ledger { idem: Idempotency::new(store) };
//! # let id = format!("msg-{}-{:?}", std::process::id(), std::time::SystemTime::now());
//! # let msg_id = id.as_str();
//! assert_eq!(ledger.post(msg_id, "acct-7", 1250).await?, 1250);
//! assert_eq!(ledger.post(msg_id, "acct-7", 1250).await?, 1250); // replayed, not run
//! # let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM doc_postings WHERE message_id = $1")
//! #     .bind(msg_id).fetch_one(&pool).await?;
//! # assert_eq!(rows, 1);
//! # sqlx::query("DELETE FROM doc_postings WHERE message_id = $1").bind(msg_id).execute(&pool).await?;
//! # Ok(()) }
//! ```
//! `crate`, for a crate that re-exports the runtime:
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! mod framework {
//!     pub mod idem { pub use idempotent_runtime::*; }
//! }
//! use framework::idem::{idempotent, Error};
//!
//! #[idempotent(key = id, crate = "framework::idem")]
//! async fn handle(id: u64) -> Result<u64, Error> { Ok(id) }
//! assert_eq!(handle(3).await.unwrap(), 3);
//! # }
//! ```
//! With `#[async_trait]`, on the impl block, and `#[idempotent]` on the method:
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use idempotent_runtime::{idempotent, Error, Idempotency};
//!
//! #[async_trait::async_trait]
//! trait Handler { async fn handle(&self, id: u64) -> Result<u64, Error>; }
//!
//! struct H { idem: Idempotency }
//!
//! #[async_trait::async_trait]
//! impl Handler for H {
//!     #[idempotent(key = id, store = &self.idem)]
//!     async fn handle(&self, id: u64) -> Result<u64, Error> { Ok(id * 2) }
//! }
//!
//! let h: Box<dyn Handler + Send + Sync> = Box::new(H { idem: Idempotency::memory() });
//! assert_eq!(h.handle(4).await.unwrap(), 8);
//! # }
//! ```
//!
//! # The protocol
//! Every call goes through the same steps, written once in the engine for every store:
//! 1. **Check**: a result stored for the key within its TTL is decoded and returned
//!    (`Outcome::Replayed`), unless the call's fingerprint differs ([`Error::Mismatch`]).
//! 2. **Coalesce**: concurrent calls with one key in this process share one leader; the
//!    others wait for its result (`Outcome::Coalesced`), or get [`Error::InProgress`] in
//!    reject mode.
//! 3. **Claim**: the leader claims the key in the store, atomically, with a short lease
//!    and a fencing token the engine mints (unique without any clock). A claim whose
//!    caller is dropped before the answer is released by that token. A key held elsewhere is polled until it completes, is released,
//!    or its lease runs out and it can be taken over.
//! 4. **Run**: the operation runs while the claim is renewed every third of its lease, so
//!    a slow operation never loses its key and a crashed holder frees it within one lease.
//! 5. **Complete or release**: an `Ok` result is stored for the TTL (only by the current
//!    token); an `Err` releases the key so a retry runs again, unless the call stores
//!    errors; a panic or a cancellation releases it too. Each of these finishes even if
//!    the caller is dropped half-way (in the background), and a completion the store
//!    fails is retried until it is stored or the claim could have lapsed.
//!
//! # Stores and features
//! - [`store::MemoryStore`], the default: in this process, bounded, no server.
//! - `store::RedisStore` (feature `redis`) and `store::PostgresStore` (feature `postgres`):
//!   one guarantee across every process that shares the server; Redis as one server, a
//!   Redis Cluster or a primary behind Sentinel (`RedisStore::connect`,
//!   `connect_cluster`, `connect_sentinel`). On PostgreSQL,
//!   `Call::run_in_transaction` also commits the operation's own writes with its result,
//!   so they happen once even when the holder dies half-way.
//! - `http::IdempotencyLayer` (feature `tower`): the `Idempotency-Key` header protocol as
//!   a tower layer for axum and hyper.
//! - `grpc::GrpcIdempotencyLayer` (feature `grpc`): the same rules for the unary methods
//!   of a tonic (gRPC) server, in gRPC's status codes, metadata and trailers.
//! - `actix::IdempotencyMiddleware` (feature `actix`): the HTTP layer's rules as an
//!   actix-web middleware.
//! - `metrics` (feature `metrics`): metrics through the `metrics` crate's facade; see
//!   [Observability](#observability).
//!
//! Every store passes the same conformance suite; the protocol lives once, in the engine.
//!
//! # Keys and scopes
//! A key is anything `Display`: a `String`, an integer, a UUID. It lives in a scope, so
//! equal keys of two operations never collide. The scope defaults to the operation's
//! type name, which changes when code moves: give long-lived operations an explicit
//! [`Call::scope`].
//!
//! # Inspecting and forgetting a key
//! For support staff rather than code paths: [`Idempotency::record`] shows what a key
//! holds in the store (a claim in progress and its lease left, or the stored result and
//! its TTL left, as a [`KeyRecord`]), and [`Idempotency::forget`] deletes it so the next
//! call runs again, with what this process keeps of it (typed copies, a Redis local
//! tier, the in-process flight). Both take the scope and key a call uses:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_runtime::Error> {
//! use idempotent_runtime::{idempotent, Error, Idempotency, KeyState};
//!
//! #[idempotent(scope = "payments.charge", key = order, store = idem)]
//! async fn charge(idem: &Idempotency, order: u64) -> Result<String, Error> {
//!     Ok(format!("ch_{order}"))
//! }
//!
//! let idem = Idempotency::memory();
//! charge(&idem, 42).await?;
//! let rec = idem.record("payments.charge", 42).await?.expect("stored");
//! assert!(matches!(rec.state, KeyState::Completed { .. }));
//! assert_eq!(rec.value::<String>()?.as_deref(), Some("ch_42"));
//! assert!(idem.forget("payments.charge", 42).await?); // the next charge runs again
//! assert!(idem.record("payments.charge", 42).await?.is_none());
//! # Ok(()) }
//! ```
//!
//! A key forgotten while its operation runs does not stop it; its result is then not
//! stored (see [`Idempotency::forget`]).
//!
//! # Observability
//! [`Idempotency::stats`] counts executions, replays, coalesced calls, rejections,
//! mismatches and store errors. The engine emits `tracing` events at debug level naming
//! the scope and a hash of the key, never the key or any payload.
//!
//! Each call runs in a `tracing` span, `idempotent.call`, at INFO, which the operation's
//! own spans nest under. Its fields: `scope`; `key_digest`, a keyed hash of the key
//! ([`KeyDigest`], whose secret replicas share to match their lines), never the key;
//! `store`, the [`Store::kind`](store::Store::kind); and `outcome`, recorded once, as
//! the call is answered:
//!
//! | `outcome` | the call |
//! |---|---|
//! | `executed`, `replayed`, `coalesced` | got a value or error that way ([`Outcome::as_str`]) |
//! | `rejected` | was a duplicate refused with [`Error::InProgress`] |
//! | `mismatch` | was refused with [`Error::Mismatch`] |
//! | `store_error` | failed in the store before anything took effect |
//! | `undecodable` | found a stored result it cannot decode (another type or codec) |
//! | `invalid` | had a key or setting refused |
//! | `lease_lost` | ran in a transaction rolled back because its claim was taken over |
//! | `commit_unknown` | ran in a transaction whose commit could not be confirmed |
//! | `cancelled` | was dropped before its answer (its operation may have run) |
//!
//! The engine's events use the same words.
//!
//! With the feature `metrics`, the counters of [`Stats`], per scope, and histograms of
//! store round trips and of waits for a duplicate in flight are recorded through the
//! `metrics` crate's facade, for whatever exporter the process installs; the module
//! `metrics` names them and their labels, whose values only code chooses
//! ([`Call::metrics_scope`]).
// On docs.rs (nightly), each item gated on a feature says which one it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
#![deny(unreachable_pub)]

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;
#[cfg(feature = "actix")]
pub mod actix;
mod call;
pub mod clock;
pub mod codec;
mod copy;
mod default_engine;
mod detached;
mod engine;
mod error;
mod fidelity;
mod fingerprint;
mod flight;
#[cfg(feature = "grpc")]
pub mod grpc;
mod hasher;
pub mod http;
mod inspect;
mod key;
mod lease;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
mod observe;
mod outcome;
mod record;
mod stats;
pub mod store;
mod switch;
mod timers;
#[cfg(feature = "postgres")]
mod transaction;

/// Makes an `async fn` idempotent; see [the crate docs](crate#the-idempotent-attribute).
pub use idempotent_macros::idempotent;

pub use call::{Call, CallKey, DiscardErrors, ErrorPolicy, StorableError, StoreErrors};
pub use codec::Codec;
pub use engine::{
    Concurrency, Idempotency, IdempotencyBuilder, Outcome, DEFAULT_LEASE, DEFAULT_MAX_KEY_LEN,
    DEFAULT_TTL, MAX_TTL, MIN_LEASE, MIN_TTL,
};
pub use error::{
    CodecError, CodecErrorKind, ConfigError, Error, KeyError, StoreError, StoreErrorKind,
};
pub use fingerprint::Fingerprint;
pub use inspect::{KeyRecord, KeyState};
pub use key::{KeyDigest, StoreKey, DIGEST_SECRET_ENV, SCOPE_SEPARATOR};
pub use outcome::outcome_of;
pub use record::{FencingToken, Record, RecordState, StoredResult};
pub use stats::Stats;
pub use switch::DISABLED_ENV;
