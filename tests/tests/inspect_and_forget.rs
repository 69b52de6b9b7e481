//! `Idempotency::record` and `Idempotency::forget` through the engine and the attribute:
//! they address the key an `#[idempotent(scope = .., key = ..)]` call uses, forget drops
//! what this process keeps of the key (a typed value copy, a Redis local tier, the
//! in-process flight), and a forgotten key in progress fences its running holder.
//!
//! Concurrency waits on signals (a oneshot when a body starts, a `Notify` that lets it
//! end); the timeouts below only bound how long a broken build hangs.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use idempotent_runtime::store::{MemoryStore, RedisStore, Store, TooFewReplicas};
use idempotent_runtime::{
    idempotent, Error, Idempotency, KeyError, KeyState, Outcome, StoreKey, StoredResult,
};
use idempotent_tests::postgres::{fresh_store, postgres_url};
use idempotent_tests::redis_server::{redis_url, unique_prefix};
use idempotent_tests::redis_topology::sentinel_spec;
use idempotent_tests::transactions::{effects, insert, store_with_effects};
use idempotent_tests::FaultyStore;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};

/// How long a test waits for what must happen before calling the build broken.
const BOUND: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    id: usize,
    cents: u64,
}

static CHARGES: AtomicUsize = AtomicUsize::new(0);

/// A `Clone` value type: hits after the first are clones of a copy kept beside the record.
#[idempotent(scope = "inspect.charge", key = order, store = idem)]
async fn charge(idem: &Idempotency, order: u64, cents: u64) -> Result<Receipt, Error> {
    Ok(Receipt {
        id: CHARGES.fetch_add(1, Ordering::SeqCst),
        cents,
    })
}

static TRANSFERS: AtomicUsize = AtomicUsize::new(0);

/// A text key, written into the store key as it is.
#[idempotent(scope = "inspect.transfer", key = id, store = idem, fingerprint = cents)]
async fn transfer(idem: &Idempotency, id: &str, cents: u64) -> Result<usize, Error> {
    Ok(TRANSFERS.fetch_add(1, Ordering::SeqCst))
}

/// A key built from several arguments.
#[idempotent(scope = "inspect.bonus", key = format!("{user}:{day}"), store = idem)]
async fn bonus(idem: &Idempotency, user: u64, day: u32) -> Result<u32, Error> {
    Ok(day)
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Refused {
    Blocked,
    Engine(String),
}

impl From<Error> for Refused {
    fn from(e: Error) -> Self {
        Refused::Engine(e.to_string())
    }
}

#[idempotent(scope = "inspect.authorize", key = card, store = idem, cache_errors = true)]
async fn authorize(idem: &Idempotency, card: u64) -> Result<u32, Refused> {
    Err(Refused::Blocked)
}

#[tokio::test]
async fn record_shows_what_an_attribute_call_stored_under_its_scope_and_key() {
    let idem = Idempotency::memory();
    let first = charge(&idem, 42, 999).await.expect("charge");
    let rec = idem
        .record("inspect.charge", 42)
        .await
        .expect("record")
        .expect("the call's record");
    assert!(matches!(rec.state, KeyState::Completed { .. }), "{rec:?}");
    assert_eq!(rec.value::<Receipt>().expect("decodes"), Some(first));
    assert_eq!(rec.error::<Refused>().expect("no error"), None);
    assert_eq!(rec.lease_left(), None);
    assert!(!rec.time_left().is_zero() && rec.time_left() <= idempotent_runtime::DEFAULT_TTL);
    // Another scope, or another key, is another record.
    assert!(idem
        .record("inspect.other", 42)
        .await
        .expect("record")
        .is_none());
    assert!(idem
        .record("inspect.charge", 43)
        .await
        .expect("record")
        .is_none());

    // A text key, with its fingerprint; a key made of several arguments.
    let n = transfer(&idem, "t-1", 500).await.expect("transfer");
    let rec = idem
        .record("inspect.transfer", "t-1")
        .await
        .expect("record")
        .expect("the call's record");
    assert_eq!(rec.value::<usize>().expect("decodes"), Some(n));
    assert_eq!(
        rec.fingerprint,
        Some(idempotent_runtime::Fingerprint::of(&500u64).expect("fingerprint"))
    );
    bonus(&idem, 7, 20).await.expect("bonus");
    let rec = idem
        .record("inspect.bonus", "7:20")
        .await
        .expect("record")
        .expect("the call's record");
    assert_eq!(rec.value::<u32>().expect("decodes"), Some(20));

    // A stored error shows as one.
    assert_eq!(authorize(&idem, 4).await, Err(Refused::Blocked));
    let rec = idem
        .record("inspect.authorize", 4)
        .await
        .expect("record")
        .expect("the stored error");
    assert!(matches!(
        &rec.state,
        KeyState::Completed {
            result: StoredResult::Err(_),
            ..
        }
    ));
    assert_eq!(
        rec.error::<Refused>().expect("decodes"),
        Some(Refused::Blocked)
    );
    assert_eq!(rec.value::<u32>().expect("no value"), None);
    // Decoding into the wrong type fails as a replay would, naming the scope.
    match rec.error::<u64>() {
        Err(Error::Codec(e)) => assert_eq!(e.scope(), Some("inspect.authorize")),
        other => panic!("expected a codec error, got {other:?}"),
    }
}

#[tokio::test]
async fn after_forget_an_attribute_call_runs_its_body_again_and_no_copy_answers() {
    let idem = Idempotency::memory();
    let before = CHARGES.load(Ordering::SeqCst);
    let first = charge(&idem, 7, 100).await.expect("charge");
    // Two hits: the first decodes and keeps a typed copy, the second clones it.
    assert_eq!(charge(&idem, 7, 100).await.expect("hit"), first);
    assert_eq!(charge(&idem, 7, 100).await.expect("hit"), first);
    let key = StoreKey::new("inspect.charge", 7, 255).expect("key");
    assert!(matches!(
        idem.store().peek_completed_copy(&key),
        Some((_, Some(_)))
    ));

    assert!(idem.forget("inspect.charge", 7).await.expect("forget"));
    assert!(idem.store().peek_completed_copy(&key).is_none());
    assert!(idem
        .record("inspect.charge", 7)
        .await
        .expect("record")
        .is_none());
    let second = charge(&idem, 7, 100).await.expect("charge again");
    assert_ne!(second, first, "the body ran again, not a kept copy");
    assert_eq!(charge(&idem, 7, 100).await.expect("hit"), second);
    // Other tests of this binary charge too; this one made two executions.
    assert!(CHARGES.load(Ordering::SeqCst) - before >= 2);
    assert_eq!(idem.stats().executed, 2);

    // A text key is forgotten through the same text.
    let n = transfer(&idem, "t-9", 1).await.expect("transfer");
    assert!(idem
        .forget("inspect.transfer", "t-9")
        .await
        .expect("forget"));
    assert_ne!(transfer(&idem, "t-9", 1).await.expect("again"), n);
    // Nothing to forget any more under another key.
    assert!(!idem
        .forget("inspect.transfer", "t-8")
        .await
        .expect("forget"));
}

#[tokio::test]
async fn keys_and_scopes_a_call_would_refuse_are_refused() {
    let idem = Idempotency::memory();
    assert!(matches!(
        idem.record("a|b", "k").await,
        Err(Error::InvalidKey(KeyError::ReservedCharInScope { .. }))
    ));
    assert!(matches!(
        idem.forget("s", "").await,
        Err(Error::InvalidKey(KeyError::Empty))
    ));
    let long = "x".repeat(idempotent_runtime::DEFAULT_MAX_KEY_LEN + 1);
    assert!(matches!(
        idem.forget("s", &long).await,
        Err(Error::InvalidKey(KeyError::TooLong { .. }))
    ));
}

#[tokio::test]
async fn a_failing_store_fails_record_and_forget_and_they_are_retried() {
    let store = FaultyStore::new(MemoryStore::new());
    let idem = Idempotency::new(store.clone());
    idem.call("k")
        .scope("s")
        .run(|| async { Ok::<_, Error>(1u8) })
        .await
        .expect("call");
    store.set_down(true);
    assert!(matches!(idem.record("s", "k").await, Err(Error::Store(_))));
    assert!(matches!(idem.forget("s", "k").await, Err(Error::Store(_))));
    store.set_down(false);
    assert!(idem.record("s", "k").await.expect("record").is_some());
    assert!(idem.forget("s", "k").await.expect("forget"));
}

/// A body that says when it started and waits to be let go; it returns `value`.
fn parked(
    runs: Arc<AtomicUsize>,
    started: oneshot::Sender<()>,
    go: Arc<Notify>,
    value: &'static str,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<String, Error>> + Send>> {
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let _ = started.send(());
            go.notified().await;
            Ok(value.to_owned())
        })
    }
}

/// Forgets a key whose leader is parked in its body while a caller of this process
/// follows it. The follower starts over at once and runs the body itself (it is not left
/// waiting on the parked leader); the leader, let go, gets its own value, but its
/// completion is fenced, so the key keeps the follower's result.
async fn forget_under_a_parked_leader(idem: Idempotency) {
    let scope = "inspect.parked";
    let runs = Arc::new(AtomicUsize::new(0));
    let (started, leader_started) = oneshot::channel();
    let go = Arc::new(Notify::new());
    let leader = {
        let idem = idem.clone();
        let body = parked(runs.clone(), started, go.clone(), "leader");
        tokio::spawn(async move { idem.call("pay-1").scope(scope).run_with_outcome(body).await })
    };
    tokio::time::timeout(BOUND, leader_started)
        .await
        .expect("the leader starts")
        .expect("the leader's body");
    let rec = idem
        .record(scope, "pay-1")
        .await
        .expect("record")
        .expect("the claim in progress");
    let lease_left = rec.lease_left().expect("in progress");
    assert!(!lease_left.is_zero() && lease_left <= idempotent_runtime::DEFAULT_LEASE);

    // A follower of this process, polled once: it has joined the leader's flight and
    // waits on it before the key is forgotten.
    let mut follower = {
        let idem = idem.clone();
        let runs = runs.clone();
        async move {
            idem.call("pay-1")
                .scope(scope)
                .run_with_outcome(|| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>("follower".to_owned())
                })
                .await
        }
        .boxed()
    };
    assert!((&mut follower).now_or_never().is_none(), "it waits");
    assert_eq!(idem.in_flight(), 1);

    assert!(idem.forget(scope, "pay-1").await.expect("forget"));
    let followed = tokio::time::timeout(BOUND, tokio::spawn(follower))
        .await
        .expect("the follower is not left waiting on the forgotten leader")
        .expect("task")
        .expect("call");
    assert_eq!(followed, ("follower".to_owned(), Outcome::Executed));
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    go.notify_one();
    let led = tokio::time::timeout(BOUND, leader)
        .await
        .expect("the leader ends")
        .expect("task")
        .expect("call");
    assert_eq!(led, ("leader".to_owned(), Outcome::Executed));
    assert_eq!(
        idem.stats().lease_lost,
        1,
        "the leader's completion was fenced"
    );
    let rec = idem
        .record(scope, "pay-1")
        .await
        .expect("record")
        .expect("the follower's result");
    assert_eq!(
        rec.value::<String>().expect("decodes").as_deref(),
        Some("follower")
    );
    assert_eq!(idem.in_flight(), 0);
}

/// Forgets a key whose only caller is parked in its body: when it ends, its result is
/// not written back (the key stays new), and the next call runs the body.
async fn forget_under_a_lone_parked_holder(idem: Idempotency) {
    let scope = "inspect.lone";
    let runs = Arc::new(AtomicUsize::new(0));
    let (started, holder_started) = oneshot::channel();
    let go = Arc::new(Notify::new());
    let holder = {
        let idem = idem.clone();
        let body = parked(runs.clone(), started, go.clone(), "first");
        tokio::spawn(async move { idem.call("k").scope(scope).run(body).await })
    };
    tokio::time::timeout(BOUND, holder_started)
        .await
        .expect("the holder starts")
        .expect("the holder's body");
    assert!(idem.forget(scope, "k").await.expect("forget"));
    go.notify_one();
    let first = tokio::time::timeout(BOUND, holder)
        .await
        .expect("the holder ends")
        .expect("task")
        .expect("call");
    assert_eq!(first, "first", "the holder's caller gets its value");
    assert!(
        idem.record(scope, "k").await.expect("record").is_none(),
        "a forgotten claim's completion does not bring the key back"
    );
    assert_eq!(idem.stats().lease_lost, 1);
    let (second, how) = idem
        .call("k")
        .scope(scope)
        .run_with_outcome(|| async { Ok::<_, Error>("second".to_owned()) })
        .await
        .expect("call");
    assert_eq!((second.as_str(), how), ("second", Outcome::Executed));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_forget_under_a_parked_leader_frees_its_followers() {
    forget_under_a_parked_leader(Idempotency::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_a_forgotten_holder_does_not_store_its_result() {
    forget_under_a_lone_parked_holder(Idempotency::memory()).await;
}

async fn redis_store() -> RedisStore {
    RedisStore::connect(&redis_url())
        .await
        .expect("the test Redis (bash .ci/services)")
        .with_prefix(unique_prefix())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_forget_under_a_parked_leader_frees_its_followers() {
    forget_under_a_parked_leader(Idempotency::new(redis_store().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_a_forgotten_holder_does_not_store_its_result() {
    forget_under_a_lone_parked_holder(Idempotency::new(redis_store().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_forget_under_a_parked_leader_frees_its_followers() {
    forget_under_a_parked_leader(Idempotency::new(fresh_store(&postgres_url()).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_forgotten_holder_does_not_store_its_result() {
    forget_under_a_lone_parked_holder(Idempotency::new(fresh_store(&postgres_url()).await)).await;
}

/// With a local tier, a forgotten result leaves this process's tier too (and its typed
/// copy with it); a result too large for the small completion script shows like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_forget_clears_the_local_tier() {
    let store = redis_store().await.with_local_cache(100);
    let idem = Idempotency::new(store.clone());
    let runs = Arc::new(AtomicUsize::new(0));
    let big = "b".repeat(8 * 1024);
    let call = || {
        let (runs, big) = (runs.clone(), big.clone());
        idem.call("big")
            .scope("inspect.local")
            .run_with_outcome(move || async move {
                let n = runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(format!("{n}{big}"))
            })
    };
    let (first, how) = call().await.expect("call");
    assert_eq!(how, Outcome::Executed);
    // A claim finds the result in Redis and puts it in the local tier; then hits come
    // from there.
    assert_eq!(
        call().await.expect("call"),
        (first.clone(), Outcome::Replayed)
    );
    let key = StoreKey::new("inspect.local", "big", 255).expect("key");
    assert!(store.peek_completed(&key).is_some(), "in the local tier");
    let rec = idem
        .record("inspect.local", "big")
        .await
        .expect("record")
        .expect("stored");
    assert_eq!(rec.value::<String>().expect("decodes"), Some(first.clone()));

    assert!(idem.forget("inspect.local", "big").await.expect("forget"));
    assert!(
        store.peek_completed(&key).is_none(),
        "gone from the local tier"
    );
    let (second, how) = call().await.expect("call");
    assert_eq!(how, Outcome::Executed);
    assert_ne!(second, first);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A call run in a PostgreSQL transaction whose key is forgotten while it runs: its
/// completion, in its transaction, finds the claim gone, so the transaction rolls back
/// (none of its writes stay), its caller gets `Error::LeaseLost`, and the key stays new.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_forgotten_transaction_rolls_back() {
    let store = store_with_effects().await;
    let idem = Idempotency::new(store.clone());
    let table = store.table().to_owned();
    let (started, body_started) = oneshot::channel();
    let go = Arc::new(Notify::new());
    let call = {
        let (idem, go) = (idem.clone(), go.clone());
        tokio::spawn(async move {
            let mut started = Some(started);
            idem.call("msg-1")
                .scope("inspect.ledger")
                .run_in_transaction(|tx| {
                    Box::pin(async move {
                        insert(&table, "forgotten", tx).await?;
                        if let Some(s) = started.take() {
                            let _ = s.send(());
                        }
                        go.notified().await;
                        Ok::<_, Error>(1u32)
                    })
                })
                .await
        })
    };
    tokio::time::timeout(BOUND, body_started)
        .await
        .expect("the body starts")
        .expect("the body");
    assert!(idem
        .record("inspect.ledger", "msg-1")
        .await
        .expect("record")
        .is_some_and(|r| !r.is_completed()));
    assert!(idem
        .forget("inspect.ledger", "msg-1")
        .await
        .expect("forget"));
    go.notify_one();
    let answer = tokio::time::timeout(BOUND, call)
        .await
        .expect("the call ends")
        .expect("task");
    assert!(matches!(answer, Err(Error::LeaseLost)), "{answer:?}");
    assert!(effects(&store).await.is_empty(), "rolled back");
    assert!(idem
        .record("inspect.ledger", "msg-1")
        .await
        .expect("record")
        .is_none());
}

/// `record` reads the store, not this engine's memory: an engine beside it on the same
/// store (another process, in effect) sees the claim and the result, and its forget frees
/// the key for the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_engine_on_the_store_sees_and_forgets_the_key() {
    let store = fresh_store(&postgres_url()).await;
    let a = Idempotency::new(store.clone());
    let b = Idempotency::new(store);
    a.call("k")
        .scope("inspect.two")
        .run(|| async { Ok::<_, Error>(1u8) })
        .await
        .expect("call");
    let rec = b
        .record("inspect.two", "k")
        .await
        .expect("record")
        .expect("stored by the other engine");
    assert_eq!(rec.value::<u8>().expect("decodes"), Some(1));
    assert!(b.forget("inspect.two", "k").await.expect("forget"));
    let (v, how) = a
        .call("k")
        .scope("inspect.two")
        .run_with_outcome(|| async { Ok::<_, Error>(2u8) })
        .await
        .expect("call");
    assert_eq!((v, how), (2, Outcome::Executed));
}

/// The engine's store handle, as a trait object, forwards both operations.
#[tokio::test]
async fn the_store_handle_forwards_inspect_and_forget() {
    let idem = Idempotency::memory();
    idem.call("k")
        .scope("s")
        .run(|| async { Ok::<_, Error>(1u8) })
        .await
        .expect("call");
    let store: &Arc<dyn Store> = idem.store();
    let key = StoreKey::new("s", "k", 255).expect("key");
    assert!(store.inspect(&key).await.expect("inspect").is_some());
    assert!(store.forget(&key).await.expect("forget"));
    assert!(store.inspect(&key).await.expect("inspect").is_none());
}

/// With replica acks required, a forget waits for them as a completion does: one replica
/// acknowledges it on the test Sentinel set; when more are required than there are, the
/// forget is reported as not known to survive a failover (typed), although the primary
/// deleted the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_a_forget_waits_for_replicas_when_asked_to() {
    let (urls, name) = sentinel_spec();
    let plain = RedisStore::connect_sentinel(urls, &name)
        .await
        .expect("the test Sentinel set (bash .ci/services)")
        .with_prefix(unique_prefix());
    let acked = Idempotency::new(plain.clone().with_replica_acks(1, Duration::from_secs(2)));
    let strict = Idempotency::new(
        plain
            .clone()
            .with_replica_acks(2, Duration::from_millis(100)),
    );
    let stored = |idem: &Idempotency, key: &'static str| {
        let idem = idem.clone();
        async move {
            idem.call(key)
                .scope("inspect.acks")
                .run(|| async { Ok::<_, Error>(1u8) })
                .await
                .expect("call")
        }
    };
    stored(&acked, "a").await;
    assert!(acked
        .forget("inspect.acks", "a")
        .await
        .expect("acknowledged"));
    assert!(acked
        .record("inspect.acks", "a")
        .await
        .expect("record")
        .is_none());

    stored(&acked, "b").await;
    match strict.forget("inspect.acks", "b").await {
        Err(Error::Store(e)) => {
            let short = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<TooFewReplicas>())
                .unwrap_or_else(|| panic!("{e:?}"));
            assert_eq!((short.acked, short.wanted), (1, 2));
        }
        other => panic!("expected too few replicas, got {other:?}"),
    }
    assert!(strict
        .record("inspect.acks", "b")
        .await
        .expect("record")
        .is_none());
}
