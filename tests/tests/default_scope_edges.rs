//! The attribute's default scope with `impl Trait` arguments cut off. Each test
//! calls one function with the same key through two argument types (`&str`, then
//! `String`, or two closures): one operation, so it must run once.

use std::fmt::Display;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::LazyLock;

use idempotent_runtime::{idempotent, Error, Idempotency};

static ENGINE: LazyLock<Idempotency> = LazyLock::new(Idempotency::memory);

static CHAR_RUNS: AtomicU32 = AtomicU32::new(0);

/// A const `char` parameter (stable) whose value is a bracket: rustc prints
/// `f<'>', &str>`, and the bracket parser finds no opening `<`.
#[idempotent(key = order, store = &*ENGINE)]
async fn pay_in<const SIGN: char>(order: impl Display + Send) -> Result<u32, Error> {
    CHAR_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(1)
}

#[tokio::test]
async fn a_const_char_bracket_does_not_split_one_operation() {
    pay_in::<'>'>("o-1").await.unwrap();
    pay_in::<'>'>(String::from("o-1")).await.unwrap();
    assert_eq!(CHAR_RUNS.load(Ordering::SeqCst), 1, "one key, two runs");
}

static TRAIT_RUNS: AtomicU32 = AtomicU32::new(0);

trait Provider: Sync {
    /// A default method: its body is generic over `Self` too.
    #[idempotent(key = order, store = &*ENGINE)]
    async fn charge(&self, order: impl Display + Send) -> Result<u32, Error> {
        TRAIT_RUNS.fetch_add(1, Ordering::SeqCst);
        Ok(2)
    }
}

struct Stripe;
impl Provider for Stripe {}

#[tokio::test]
async fn a_trait_default_method_is_one_operation() {
    Stripe.charge("o-2").await.unwrap();
    Stripe.charge(String::from("o-2")).await.unwrap();
    assert_eq!(TRAIT_RUNS.load(Ordering::SeqCst), 1, "one key, two runs");
}

static GENERIC_IMPL_RUNS: AtomicU32 = AtomicU32::new(0);

struct Svc<T>(T);

impl<T: Sync> Svc<T> {
    #[idempotent(key = order, store = &*ENGINE)]
    async fn charge(&self, order: impl Display + Send) -> Result<u32, Error> {
        GENERIC_IMPL_RUNS.fetch_add(1, Ordering::SeqCst);
        Ok(3)
    }
}

#[tokio::test]
async fn a_method_of_a_generic_impl_is_one_operation() {
    let s = Svc(0u8);
    s.charge("o-3").await.unwrap();
    s.charge(String::from("o-3")).await.unwrap();
    assert_eq!(GENERIC_IMPL_RUNS.load(Ordering::SeqCst), 1);
}

static NESTED_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = id, store = &*ENGINE)]
async fn nested<T: Send>(
    id: u32,
    _tag: T,
    _items: Vec<impl Display + Send>,
    _log: impl Fn(u8) -> Vec<u8> + Send,
) -> Result<u32, Error> {
    NESTED_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(4)
}

#[tokio::test]
async fn nested_impl_and_fn_arguments_are_one_operation() {
    nested(4, 0u8, vec!["a"], |x| vec![x]).await.unwrap();
    nested(4, 0u8, vec![String::new()], |x| vec![x, x])
        .await
        .unwrap();
    assert_eq!(NESTED_RUNS.load(Ordering::SeqCst), 1);
    // A named type argument still tells operations apart.
    nested(4, 0u16, vec!["a"], |x| vec![x]).await.unwrap();
    assert_eq!(NESTED_RUNS.load(Ordering::SeqCst), 2);
}
