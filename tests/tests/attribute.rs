//! `#[idempotent]` on every shape of function it accepts, on a multi-threaded runtime.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use idempotent_runtime::{idempotent, Error, Idempotency};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: String,
    items: Vec<String>,
    total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    order_id: String,
    n: u32,
}

static PLACED: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = order.id, ttl = "24h", fingerprint = (&order.items, order.total), scope = "attr.place")]
async fn place_order(order: Order) -> Result<Receipt, Error> {
    let n = PLACED.fetch_add(1, Ordering::SeqCst);
    Ok(Receipt {
        order_id: order.id,
        n,
    })
}

fn order(id: &str, total: u64) -> Order {
    Order {
        id: id.into(),
        items: vec!["book".into()],
        total,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_free_function_runs_once_per_key() {
    let first = place_order(order("o-1", 10)).await.unwrap();
    let again = place_order(order("o-1", 10)).await.unwrap();
    assert_eq!(first, again);
    let other = place_order(order("o-2", 10)).await.unwrap();
    assert_ne!(first.n, other.n);
    let tampered = place_order(order("o-1", 11)).await;
    assert!(matches!(tampered, Err(Error::Mismatch)), "{tampered:?}");
}

struct Service {
    idem: Idempotency,
    calls: AtomicU32,
    log: Vec<String>,
}

impl Service {
    #[idempotent(key = id, store = &self.idem)]
    async fn by_ref(&self, id: u64) -> Result<u32, Error> {
        Ok(self.calls.fetch_add(1, Ordering::SeqCst))
    }

    #[idempotent(key = format!("{}-{}", id, self.log.len()), store = &self.idem, concurrent = "reject")]
    async fn by_mut(&mut self, id: u64) -> Result<usize, Error> {
        self.log.push(format!("applied {id}"));
        Ok(self.log.len())
    }
}

/// A value receiver: the method consumes its command.
#[derive(Clone)]
struct Command {
    idem: Idempotency,
    id: u64,
}

impl Command {
    #[idempotent(key = self.id, store = &self.idem, scope = "attr.by_value")]
    async fn execute(self) -> Result<u64, Error> {
        Ok(self.id)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_method_taking_self_by_value_works() {
    let idem = Idempotency::memory();
    let cmd = Command {
        idem: idem.clone(),
        id: 5,
    };
    assert_eq!(cmd.clone().execute().await.unwrap(), 5);
    assert_eq!(cmd.execute().await.unwrap(), 5);
    assert_eq!((idem.stats().executed, idem.stats().replayed), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn methods_with_ref_and_mut_self_use_their_engine() {
    let mut svc = Service {
        idem: Idempotency::memory(),
        calls: AtomicU32::new(0),
        log: vec![],
    };
    assert_eq!(svc.by_ref(1).await.unwrap(), 0);
    assert_eq!(svc.by_ref(1).await.unwrap(), 0);
    assert_eq!(svc.by_ref(2).await.unwrap(), 1);
    assert_eq!(svc.by_mut(9).await.unwrap(), 1);
    assert_eq!(svc.idem.stats().executed, 3);
}

// --- shapes -------------------------------------------------------------------------

#[idempotent(key = key, scope = "attr.generic")]
async fn generic<T>(key: &str, value: T) -> Result<T, Error>
where
    T: Serialize + serde::de::DeserializeOwned + Send,
{
    Ok(value)
}

#[idempotent(key = label.to_string(), scope = "attr.impl_trait")]
async fn impl_trait_arg(label: impl std::fmt::Display + Send, n: u32) -> Result<u32, Error> {
    Ok(n)
}

#[idempotent(key = a, scope = "attr.patterns")]
async fn pattern_args((a, b): (u32, u32), Order { total, .. }: Order) -> Result<u64, Error> {
    Ok(u64::from(a + b) + total)
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum AppError {
    TooSmall,
    Engine(String),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Engine(e.to_string())
    }
}

fn parse(n: &str) -> Result<u32, AppError> {
    n.parse().map_err(|_| AppError::TooSmall)
}

#[idempotent(key = input, scope = "attr.early")]
async fn early_return_and_question_mark(input: &str) -> Result<u32, AppError> {
    let n = parse(input)?;
    if n < 10 {
        return Err(AppError::TooSmall);
    }
    Ok(n * 2)
}

type AppResult<T> = std::result::Result<T, AppError>;

#[idempotent(key = n, scope = "attr.alias")]
async fn user_alias(n: u32) -> AppResult<u32> {
    Ok(n)
}

#[idempotent(key = n, scope = "attr.anyhow")]
async fn anyhow_alias(n: u32) -> anyhow::Result<u32> {
    anyhow::ensure!(n > 0, "zero");
    Ok(n)
}

#[idempotent(key = n, scope = "attr.io")]
async fn io_alias(n: u32) -> std::io::Result<u32> {
    Ok(n)
}

/// Documented, and stacked with another attribute macro.
#[tracing::instrument(skip_all)]
#[idempotent(key = n, scope = "attr.traced_outer")]
pub async fn instrumented_outside(n: u32) -> Result<u32, Error> {
    tracing::info!("running");
    Ok(n)
}

#[idempotent(key = n, scope = "attr.traced_inner")]
#[tracing::instrument(skip_all)]
pub(crate) async fn instrumented_inside(n: u32) -> Result<u32, Error> {
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generic_impl_trait_and_pattern_arguments_work() {
    assert_eq!(generic("g", 5u8).await.unwrap(), 5);
    assert_eq!(generic("s", "x".to_owned()).await.unwrap(), "x");
    assert_eq!(impl_trait_arg("label", 3).await.unwrap(), 3);
    assert_eq!(
        impl_trait_arg("label", 4).await.unwrap(),
        3,
        "replayed by key"
    );
    assert_eq!(pattern_args((1, 2), order("p", 10)).await.unwrap(), 13);
    assert_eq!(
        pattern_args((1, 5), order("p", 10)).await.unwrap(),
        13,
        "replayed by key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn early_return_and_question_mark_keep_their_meaning() {
    assert_eq!(
        early_return_and_question_mark("x").await,
        Err(AppError::TooSmall)
    );
    assert_eq!(
        early_return_and_question_mark("3").await,
        Err(AppError::TooSmall)
    );
    assert_eq!(early_return_and_question_mark("21").await, Ok(42));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn result_aliases_are_accepted() {
    assert_eq!(user_alias(1).await, Ok(1));
    assert_eq!(anyhow_alias(2).await.unwrap(), 2);
    assert!(anyhow_alias(0).await.is_err());
    assert_eq!(io_alias(3).await.unwrap(), 3);
    assert_eq!(instrumented_outside(4).await.unwrap(), 4);
    assert_eq!(instrumented_inside(5).await.unwrap(), 5);
}

// --- traits -------------------------------------------------------------------------

trait Ledger {
    fn post(&self, entry: u64) -> impl std::future::Future<Output = Result<u32, Error>> + Send;
}

#[async_trait::async_trait]
trait BoxedLedger {
    async fn post(&self, entry: u64) -> Result<u32, Error>;
}

struct Books {
    idem: Idempotency,
    posted: AtomicU32,
}

impl Ledger for Books {
    #[idempotent(key = entry, store = &self.idem, scope = "native")]
    async fn post(&self, entry: u64) -> Result<u32, Error> {
        Ok(self.posted.fetch_add(1, Ordering::SeqCst))
    }
}

// `#[async_trait]` on the impl runs first and turns `post` into a function returning a
// boxed future; `#[idempotent]` then wraps the async block inside it.
#[async_trait::async_trait]
impl BoxedLedger for Books {
    #[idempotent(key = entry, store = &self.idem, scope = "boxed")]
    async fn post(&self, entry: u64) -> Result<u32, Error> {
        Ok(self.posted.fetch_add(1, Ordering::SeqCst))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trait_impls_native_and_through_async_trait() {
    let books = Arc::new(Books {
        idem: Idempotency::memory(),
        posted: AtomicU32::new(0),
    });
    assert_eq!(Ledger::post(&*books, 1).await.unwrap(), 0);
    assert_eq!(Ledger::post(&*books, 1).await.unwrap(), 0);
    assert_eq!(
        BoxedLedger::post(&*books, 1).await.unwrap(),
        1,
        "another scope"
    );
    assert_eq!(BoxedLedger::post(&*books, 1).await.unwrap(), 1);
    let dynamic: Arc<dyn BoxedLedger + Send + Sync> = books.clone();
    assert_eq!(dynamic.post(1).await.unwrap(), 1);
    assert_eq!(books.posted.load(Ordering::SeqCst), 2);
}

// Arguments named like the bindings the attribute generates: the generated code's names
// are hygienic, so neither side sees the other's.
#[idempotent(key = __idempotent_call, store = __idempotent_engine)]
async fn named_like_the_generated_code(
    __idempotent_engine: &Idempotency,
    __idempotent_call: u64,
    __idempotent_ret: u64,
) -> Result<u64, Error> {
    Ok(__idempotent_call * 100 + __idempotent_ret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_named_like_generated_bindings_keep_their_meaning() {
    let idem = Idempotency::memory();
    assert_eq!(
        named_like_the_generated_code(&idem, 3, 4).await.unwrap(),
        304
    );
    assert_eq!(
        named_like_the_generated_code(&idem, 3, 5).await.unwrap(),
        304,
        "the key is the argument `__idempotent_call`"
    );
    assert_eq!(
        named_like_the_generated_code(&idem, 4, 5).await.unwrap(),
        405
    );
}

static KEYS_MADE: AtomicU32 = AtomicU32::new(0);

fn counted_key(id: u64) -> String {
    KEYS_MADE.fetch_add(1, Ordering::SeqCst);
    format!("k-{id}")
}

#[idempotent(key = counted_key(id), store = idem, scope = "attr.keys")]
async fn by_made_key(idem: &Idempotency, id: u64) -> Result<u64, Error> {
    Ok(id)
}

#[idempotent(key = format_args!("k-{id}"), store = idem, scope = "attr.keys")]
async fn by_display_key(idem: &Idempotency, id: u64) -> Result<u64, Error> {
    Ok(id + 1000)
}

#[idempotent(key = name, store = idem, scope = "attr.keys")]
async fn by_str_key(idem: &Idempotency, name: &str) -> Result<u64, Error> {
    Ok(name.len() as u64 + 2000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_is_evaluated_once_and_strings_key_as_their_display_does() {
    let idem = Idempotency::memory();
    assert_eq!(by_made_key(&idem, 7).await.unwrap(), 7);
    assert_eq!(
        KEYS_MADE.load(Ordering::SeqCst),
        1,
        "one evaluation per call"
    );
    // A `String` key, a `Display` key and a `&str` key with the same text are one key.
    assert_eq!(by_display_key(&idem, 7).await.unwrap(), 7);
    assert_eq!(by_str_key(&idem, "k-7").await.unwrap(), 7);
    assert_eq!(by_str_key(&idem, "k-8").await.unwrap(), 2003);
    assert_eq!(by_made_key(&idem, 8).await.unwrap(), 2003);
    assert_eq!(KEYS_MADE.load(Ordering::SeqCst), 2);
}
