//! Each argument of `#[idempotent]` has the effect it documents.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use idempotent_runtime::clock::ManualClock;
use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{idempotent, Error, Idempotency};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

static RUNS: AtomicU32 = AtomicU32::new(0);

fn next() -> u32 {
    RUNS.fetch_add(1, Ordering::SeqCst)
}

fn manual() -> (ManualClock, Idempotency) {
    let clock = ManualClock::new();
    let idem = Idempotency::new(MemoryStore::builder().clock(clock.clone()).build());
    (clock, idem)
}

// ttl ----------------------------------------------------------------------------------

#[idempotent(key = k, store = idem, ttl = "1h")]
async fn hourly(idem: &Idempotency, k: u32) -> Result<u32, Error> {
    Ok(next())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_sets_how_long_a_result_is_replayed() {
    let (clock, idem) = manual();
    let first = hourly(&idem, 1).await.unwrap();
    clock.advance(Duration::from_secs(59 * 60));
    assert_eq!(hourly(&idem, 1).await.unwrap(), first);
    clock.advance(Duration::from_secs(2 * 60));
    assert_ne!(
        hourly(&idem, 1).await.unwrap(),
        first,
        "after the ttl the key is new"
    );
}

// lease --------------------------------------------------------------------------------

#[idempotent(key = k, store = idem, lease = "2s", concurrent = "reject")]
async fn short_lease(
    idem: &Idempotency,
    k: u32,
    gate: Option<oneshot::Receiver<()>>,
) -> Result<u32, Error> {
    if let Some(gate) = gate {
        let _ = gate.await;
    }
    Ok(next())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_sets_when_a_stalled_claim_may_be_taken_over() {
    let (clock, idem) = manual();
    let other = Idempotency::new(idem.store().clone());
    let (_never, gate) = oneshot::channel();
    let mut stalled = Box::pin(short_lease(&idem, 1, Some(gate)));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut stalled)
            .await
            .is_err()
    );
    assert!(matches!(
        short_lease(&other, 1, None).await,
        Err(Error::InProgress)
    ));
    // Three seconds: past a 2 s lease, well within the default 10 s one.
    clock.advance(Duration::from_secs(3));
    assert!(
        short_lease(&other, 1, None).await.is_ok(),
        "the lapsed claim was taken over"
    );
    drop(stalled);
}

// store --------------------------------------------------------------------------------

static ENGINE: LazyLock<Idempotency> = LazyLock::new(Idempotency::memory);

#[idempotent(key = k, store = &*ENGINE, scope = "args.static")]
async fn on_static(k: u32) -> Result<u32, Error> {
    Ok(next())
}

#[idempotent(key = k, scope = "args.default")]
async fn on_default(k: u32) -> Result<u32, Error> {
    Ok(next())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_selects_the_engine_and_the_default_is_the_tests_own() {
    let a = on_static(1).await.unwrap();
    assert_eq!(on_static(1).await.unwrap(), a);
    assert_eq!(ENGINE.stats().executed, 1);
    let b = on_default(1).await.unwrap();
    assert_eq!(on_default(1).await.unwrap(), b);
    assert_eq!(
        // This file is built with `cfg(test)`: its functions' default is this test's
        // runtime's engine.
        idempotent_runtime::__private::default_engine(true)
            .stats()
            .replayed,
        1
    );
}

// scope --------------------------------------------------------------------------------

/// A handler's context, taken by value, whose engine the body may consume with it.
struct Ctx {
    idem: Idempotency,
    seen: Vec<u32>,
}

#[idempotent(key = k, store = &ctx.idem, scope = "args.by_value")]
async fn consumes_its_context(ctx: Ctx, k: u32) -> Result<usize, Error> {
    let Ctx { idem, mut seen } = ctx;
    seen.push(k);
    drop(idem);
    Ok(seen.len())
}

#[idempotent(key = k, store = &ctx.idem, scope = "args.by_mut")]
async fn mutates_its_context(ctx: &mut Ctx, k: u32) -> Result<usize, Error> {
    ctx.seen.push(k);
    Ok(ctx.seen.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_may_borrow_an_argument_the_body_moves_or_mutates() {
    let idem = Idempotency::memory();
    let ctx = || Ctx {
        idem: idem.clone(),
        seen: vec![0],
    };
    assert_eq!(consumes_its_context(ctx(), 1).await.unwrap(), 2);
    assert_eq!(consumes_its_context(ctx(), 1).await.unwrap(), 2);
    let mut c = ctx();
    assert_eq!(mutates_its_context(&mut c, 1).await.unwrap(), 2);
    assert_eq!(mutates_its_context(&mut c, 1).await.unwrap(), 2);
    assert_eq!(
        c.seen,
        vec![0, 1],
        "the second call replays, its body does not run"
    );
}

#[idempotent(key = k, store = idem, scope = "shared")]
async fn shares_a(idem: &Idempotency, k: u32) -> Result<String, Error> {
    Ok("a".into())
}

#[idempotent(key = k, store = idem, scope = "shared")]
async fn shares_b(idem: &Idempotency, k: u32) -> Result<String, Error> {
    Ok("b".into())
}

#[idempotent(key = k, store = idem)]
async fn own_scope_a(idem: &Idempotency, k: u32) -> Result<String, Error> {
    Ok("a".into())
}

#[idempotent(key = k, store = idem)]
async fn own_scope_b(idem: &Idempotency, k: u32) -> Result<String, Error> {
    Ok("b".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_names_the_namespace_and_defaults_to_the_function_path() {
    let idem = Idempotency::memory();
    assert_eq!(shares_a(&idem, 1).await.unwrap(), "a");
    assert_eq!(shares_b(&idem, 1).await.unwrap(), "a", "one scope, one key");
    assert_eq!(own_scope_a(&idem, 1).await.unwrap(), "a");
    assert_eq!(
        own_scope_b(&idem, 1).await.unwrap(),
        "b",
        "default scopes differ per function"
    );
}

trait Provider {
    async fn charge(&self, idem: &Idempotency, order: u64) -> Result<String, Error>;
}

struct Stripe;
struct Paypal;

impl Provider for Stripe {
    #[idempotent(key = order, store = idem)]
    async fn charge(&self, idem: &Idempotency, order: u64) -> Result<String, Error> {
        Ok(format!("stripe-{order}"))
    }
}

impl Provider for Paypal {
    #[idempotent(key = order, store = idem)]
    async fn charge(&self, idem: &Idempotency, order: u64) -> Result<String, Error> {
        Ok(format!("paypal-{order}"))
    }
}

#[idempotent(key = id, store = idem)]
async fn load<T: Default + Serialize + serde::de::DeserializeOwned>(
    idem: &Idempotency,
    id: u64,
) -> Result<T, Error> {
    Ok(T::default())
}

struct Repo<T>(std::marker::PhantomData<T>);

impl<T: Default + Serialize + serde::de::DeserializeOwned + Send> Repo<T> {
    #[idempotent(key = id, store = idem)]
    async fn fetch(idem: &Idempotency, id: u64) -> Result<T, Error> {
        Ok(T::default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_scope_tells_every_impl_and_generic_instance_apart() {
    let idem = Idempotency::memory();
    assert_eq!(Stripe.charge(&idem, 42).await.unwrap(), "stripe-42");
    assert_eq!(
        Paypal.charge(&idem, 42).await.unwrap(),
        "paypal-42",
        "another impl of the trait is another scope"
    );
    assert_eq!(load::<u64>(&idem, 1).await.unwrap(), 0);
    assert_eq!(
        load::<String>(&idem, 1).await.unwrap(),
        "",
        "another instance of a generic function is another scope"
    );
    assert_eq!(Repo::<u8>::fetch(&idem, 1).await.unwrap(), 0);
    assert_eq!(Repo::<String>::fetch(&idem, 1).await.unwrap(), "");
    // The scope is the function's path with its impl and generic arguments, as
    // `std::any::type_name` writes them; a plain function's is its module path and name.
    let stored = |scope: &str, key: &str| {
        let key = idempotent_runtime::StoreKey::new(scope, key, 255).unwrap();
        idem.store().peek_completed(&key).is_some()
    };
    for scope in [
        "<attribute_args::Stripe as attribute_args::Provider>::charge",
        "<attribute_args::Paypal as attribute_args::Provider>::charge",
        "attribute_args::load<u64>",
        "attribute_args::load<alloc::string::String>",
        "attribute_args::Repo<u8>::fetch",
    ] {
        assert!(
            stored(scope, if scope.contains("charge") { "42" } else { "1" }),
            "{scope}"
        );
    }
    let other = Idempotency::memory();
    own_scope_a(&other, 5).await.unwrap();
    let key = idempotent_runtime::StoreKey::new("attribute_args::own_scope_a", "5", 255).unwrap();
    assert!(other.store().peek_completed(&key).is_some());
}

// fingerprint --------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct Transfer {
    id: String,
    to: String,
    cents: u64,
}

#[idempotent(key = t.id, store = idem, fingerprint = (&t.to, t.cents))]
async fn transfer(idem: &Idempotency, t: Transfer) -> Result<String, Error> {
    Ok(format!("sent {} to {}", t.cents, t.to))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprint_refuses_a_reused_key_with_another_payload() {
    let idem = Idempotency::memory();
    let t = |cents| Transfer {
        id: "t-1".into(),
        to: "bob".into(),
        cents,
    };
    assert_eq!(transfer(&idem, t(5)).await.unwrap(), "sent 5 to bob");
    assert_eq!(transfer(&idem, t(5)).await.unwrap(), "sent 5 to bob");
    assert!(matches!(transfer(&idem, t(6)).await, Err(Error::Mismatch)));
}

// cache_errors -------------------------------------------------------------------------

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Declined {
    Card,
    Engine(String),
}

impl From<Error> for Declined {
    fn from(e: Error) -> Self {
        Declined::Engine(e.to_string())
    }
}

#[idempotent(key = k, store = idem, cache_errors = true)]
async fn cached_error(idem: &Idempotency, k: u32, runs: &AtomicU32) -> Result<u32, Declined> {
    runs.fetch_add(1, Ordering::SeqCst);
    Err(Declined::Card)
}

#[idempotent(key = k, store = idem)]
async fn uncached_error(idem: &Idempotency, k: u32, runs: &AtomicU32) -> Result<u32, Declined> {
    runs.fetch_add(1, Ordering::SeqCst);
    Err(Declined::Card)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_errors_stores_errors_and_the_default_does_not() {
    let idem = Idempotency::memory();
    let (cached, uncached) = (AtomicU32::new(0), AtomicU32::new(0));
    for _ in 0..3 {
        assert_eq!(cached_error(&idem, 1, &cached).await, Err(Declined::Card));
        assert_eq!(
            uncached_error(&idem, 1, &uncached).await,
            Err(Declined::Card)
        );
    }
    assert_eq!(cached.load(Ordering::SeqCst), 1);
    assert_eq!(uncached.load(Ordering::SeqCst), 3);
}

// concurrent ---------------------------------------------------------------------------

#[idempotent(key = k, store = idem, concurrent = "reject")]
async fn rejecting(
    idem: &Idempotency,
    k: u32,
    gate: Option<oneshot::Receiver<()>>,
) -> Result<u32, Error> {
    if let Some(gate) = gate {
        let _ = gate.await;
    }
    Ok(1)
}

#[idempotent(key = k, store = idem, concurrent = "wait")]
async fn waiting(idem: &Idempotency, k: u32, runs: Arc<AtomicU32>) -> Result<u32, Error> {
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(runs.fetch_add(1, Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reject_refuses_duplicates_in_flight() {
    let idem = Idempotency::memory();
    let (open, gate) = oneshot::channel();
    let first = {
        let idem = idem.clone();
        tokio::spawn(async move { rejecting(&idem, 1, Some(gate)).await })
    };
    while idem.in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    assert!(matches!(
        rejecting(&idem, 1, None).await,
        Err(Error::InProgress)
    ));
    open.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_wait_coalesces_a_hundred_callers_into_one_execution() {
    let idem = Idempotency::memory();
    let runs = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (idem, runs) = (idem.clone(), runs.clone());
            tokio::spawn(async move { waiting(&idem, 7, runs).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 0);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

// crate --------------------------------------------------------------------------------

static THROUGH_SHIM: AtomicBool = AtomicBool::new(false);

/// A crate that re-exports the runtime under its own path, as a framework might.
mod shim {
    pub use idempotent_runtime::*;
    pub mod __private {
        pub use idempotent_runtime::__private::*;
        pub fn default_engine(per_runtime: bool) -> idempotent_runtime::Idempotency {
            super::super::THROUGH_SHIM.store(true, std::sync::atomic::Ordering::SeqCst);
            idempotent_runtime::__private::default_engine(per_runtime)
        }
    }
}

#[idempotent(key = k, crate = "crate::shim", scope = "args.crate", concurrent = "wait")]
async fn through_reexport(k: u32) -> Result<u32, Error> {
    Ok(k)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crate_points_the_generated_code_at_a_reexport() {
    assert_eq!(through_reexport(3).await.unwrap(), 3);
    assert!(THROUGH_SHIM.load(Ordering::SeqCst));
}

static DISPLAY_KEYED: LazyLock<Idempotency> = LazyLock::new(Idempotency::memory);
static CHARGES: AtomicU32 = AtomicU32::new(0);

/// A payment keyed by anything printable.
#[idempotent(key = order, store = &*DISPLAY_KEYED)]
async fn charge_any(order: impl std::fmt::Display + Send, cents: u64) -> Result<u64, Error> {
    CHARGES.fetch_add(1, Ordering::SeqCst);
    Ok(cents)
}

/// The key is the same text; only the Rust type that carried it differs (`&str` in the
/// first request, `String` in the retry, parsed from a queue message say). The arguments
/// of `impl Trait` parameters are left out of the default scope, so it is one operation.
#[tokio::test]
async fn the_same_key_through_an_impl_trait_argument_is_one_operation() {
    let first = charge_any("order-7", 500).await.unwrap();
    let retry = charge_any(String::from("order-7"), 500).await.unwrap();
    assert_eq!((first, retry), (500, 500));
    assert_eq!(
        CHARGES.load(Ordering::SeqCst),
        1,
        "charged once for one key"
    );
}
