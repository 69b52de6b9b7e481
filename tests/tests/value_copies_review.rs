//! An outside review's attacks on typed in-process copies (hits of `Clone` values):
//! each looks for a wrong replay, a second execution, or a changed behaviour. Three of
//! them failed on the first version (a completion written over by an old record and its
//! copy; a copy answered to an engine of another codec; replays sharing state), and the
//! rest held.

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use idempotent_runtime::clock::{Clock, ManualClock, Timestamp};
use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{idempotent, Codec, CodecErrorKind, Error, Idempotency, StoreKey};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------
// 1. A Clone that shares state (interior mutability): a replay from a copy is a clone, so
//    callers would share it; `replay = "decode"` gives every caller a value of its own,
//    as the README says to do for such a type.

#[derive(Debug, Clone, Default)]
struct Basket(Arc<Mutex<Vec<u32>>>);

impl Serialize for Basket {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.lock().unwrap().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Basket {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Basket(Arc::new(Mutex::new(Vec::deserialize(d)?))))
    }
}

#[idempotent(key = k, store = idem, scope = "rv.basket", replay = "decode")]
async fn basket(idem: &Idempotency, k: u32) -> Result<Basket, Error> {
    Ok(Basket(Arc::new(Mutex::new(vec![1, 2, 3]))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_decode_gives_every_caller_a_value_of_its_own() {
    let idem = Idempotency::memory();
    basket(&idem, 1).await.unwrap();
    // First hit: decodes and keeps a copy.
    let a = basket(&idem, 1).await.unwrap();
    a.0.lock().unwrap().push(99); // caller A works on its own answer
                                  // Second hit: a clone of the copy.
    let b = basket(&idem, 1).await.unwrap();
    b.0.lock().unwrap().push(100); // caller B works on its own answer
    let c = basket(&idem, 1).await.unwrap();
    assert_eq!(
        *c.0.lock().unwrap(),
        vec![1, 2, 3],
        "a replay must be the stored result, untouched by other callers"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Two engines with different codecs over one memory store: the codec tag is meant to
//    make the other engine's records WrongCodec (codec.rs docs). A copy kept by the JSON
//    engine skips that check for the Postcard one.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    id: u32,
}

static RECEIPTS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = k, store = idem, scope = "rv.codec")]
async fn receipt(idem: &Idempotency, k: u32) -> Result<Receipt, Error> {
    Ok(Receipt {
        id: RECEIPTS.fetch_add(1, Ordering::SeqCst),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_codec_still_reads_the_record_as_wrong_codec() {
    let store = MemoryStore::new();
    let json = Idempotency::builder()
        .store(store.clone())
        .codec(Codec::Json)
        .build()
        .unwrap();
    let postcard = Idempotency::builder()
        .store(store.clone())
        .codec(Codec::Postcard)
        .build()
        .unwrap();
    // Without a copy: the Postcard engine refuses JSON's record.
    receipt(&json, 1).await.unwrap();
    match receipt(&postcard, 1).await {
        Err(Error::Codec(e)) => assert_eq!(e.kind(), CodecErrorKind::WrongCodec),
        other => panic!("baseline: expected WrongCodec, got {other:?}"),
    }
    // With a copy kept by the JSON engine's hits.
    receipt(&json, 2).await.unwrap();
    receipt(&json, 2).await.unwrap();
    receipt(&json, 2).await.unwrap();
    match receipt(&postcard, 2).await {
        Err(Error::Codec(e)) => assert_eq!(e.kind(), CodecErrorKind::WrongCodec),
        other => panic!("with a copy kept: expected WrongCodec as before, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// 3. A copy at the exact end of the TTL (ManualClock), and a copy after a later
//    completion of the same key.

static EDGE_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = k, store = idem, scope = "rv.edge", ttl = "10s")]
async fn edge(idem: &Idempotency, k: u32) -> Result<Receipt, Error> {
    Ok(Receipt {
        id: EDGE_RUNS.fetch_add(1, Ordering::SeqCst),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_copy_at_or_after_the_ttl_boundary() {
    let clock = ManualClock::new();
    let idem = Idempotency::new(MemoryStore::builder().clock(clock.clone()).build());
    let first = edge(&idem, 1).await.unwrap();
    assert_eq!(edge(&idem, 1).await.unwrap(), first);
    assert_eq!(edge(&idem, 1).await.unwrap(), first);
    clock.advance(Duration::from_millis(9_999));
    assert_eq!(edge(&idem, 1).await.unwrap(), first, "1 ms before the end");
    clock.advance(Duration::from_millis(1));
    let second = edge(&idem, 1).await.unwrap();
    assert_ne!(second, first, "at the end of the TTL the key runs again");
    assert_eq!(edge(&idem, 1).await.unwrap(), second);
    assert_eq!(edge(&idem, 1).await.unwrap(), second);
    assert_eq!(idem.stats().executed, 2);
}

// ---------------------------------------------------------------------------------------
// 4. Cached errors: a Clone Ok type, an error stored (cache_errors); hits must keep
//    replaying the error, never an Ok copy.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Declined {
    Card,
    Engine(String),
}

impl From<Error> for Declined {
    fn from(e: Error) -> Self {
        Declined::Engine(e.to_string())
    }
}

static ERR_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = k, store = idem, scope = "rv.err", cache_errors = true)]
async fn declined(idem: &Idempotency, k: u32) -> Result<u32, Declined> {
    ERR_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(Declined::Card)
}

#[idempotent(key = k, store = idem, scope = "rv.err", cache_errors = true)]
async fn same_scope_cached(idem: &Idempotency, k: u32) -> Result<u32, Declined> {
    Ok(7)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_error_is_never_answered_from_a_copy() {
    let idem = Idempotency::memory();
    for _ in 0..5 {
        assert_eq!(declined(&idem, 1).await, Err(Declined::Card));
        // Another function of the same Ok type and the same policy on the same key.
        assert_eq!(same_scope_cached(&idem, 1).await, Err(Declined::Card));
    }
    assert_eq!(ERR_RUNS.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------
// 5. Values that the encoder refuses (Unstorable): Some(None) and NaN. Every replay must
//    stay Unstorable; a copy must never turn one into a value.

#[idempotent(key = k, store = idem, scope = "rv.some_none")]
async fn some_none(idem: &Idempotency, k: u32) -> Result<Option<Option<u32>>, Error> {
    Ok(Some(None))
}

#[idempotent(key = k, store = idem, scope = "rv.nan")]
async fn nan(idem: &Idempotency, k: u32) -> Result<Option<f64>, Error> {
    Ok(Some(f64::NAN))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_values_stay_unstorable_on_every_hit() {
    let idem = Idempotency::memory();
    assert_eq!(some_none(&idem, 1).await.unwrap(), Some(None));
    assert!(nan(&idem, 1).await.unwrap().unwrap().is_nan());
    for _ in 0..4 {
        match some_none(&idem, 1).await {
            Err(Error::Codec(e)) => assert_eq!(e.kind(), CodecErrorKind::Unstorable),
            other => panic!("Some(None) replay: {other:?}"),
        }
        match nan(&idem, 1).await {
            Err(Error::Codec(e)) => assert_eq!(e.kind(), CodecErrorKind::Unstorable),
            other => panic!("NaN replay: {other:?}"),
        }
    }
    assert_eq!(idem.stats().executed, 2);
}

// ---------------------------------------------------------------------------------------
// 6. Keys: side effects once per call (hits included), and every string-ish type keys
//    the same record as the Display of the same text, numbers included.

static KEY_EVALS: AtomicU32 = AtomicU32::new(0);

fn made_key(id: u32) -> Cow<'static, str> {
    KEY_EVALS.fetch_add(1, Ordering::SeqCst);
    Cow::Owned(format!("{id}"))
}

static KEYED_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = made_key(id), store = idem, scope = "rv.keys")]
async fn by_cow(idem: &Idempotency, id: u32) -> Result<Receipt, Error> {
    Ok(Receipt {
        id: KEYED_RUNS.fetch_add(1, Ordering::SeqCst),
    })
}

#[idempotent(key = k, store = idem, scope = "rv.keys")]
async fn by_str_ref_ref(idem: &Idempotency, k: &&str) -> Result<Receipt, Error> {
    Ok(Receipt {
        id: KEYED_RUNS.fetch_add(1, Ordering::SeqCst),
    })
}

#[idempotent(key = k, store = idem, scope = "rv.keys")]
async fn by_string(idem: &Idempotency, k: String) -> Result<Receipt, Error> {
    Ok(Receipt {
        id: KEYED_RUNS.fetch_add(1, Ordering::SeqCst),
    })
}

#[idempotent(key = *k, store = idem, scope = "rv.keys")]
async fn by_deref_str(idem: &Idempotency, k: &str) -> Result<Receipt, Error> {
    Ok(Receipt {
        id: KEYED_RUNS.fetch_add(1, Ordering::SeqCst),
    })
}

#[idempotent(key = k, store = idem, scope = "rv.keys")]
async fn by_number(idem: &Idempotency, k: u64) -> Result<Receipt, Error> {
    Ok(Receipt {
        id: KEYED_RUNS.fetch_add(1, Ordering::SeqCst),
    })
}

#[idempotent(key = k, store = idem, scope = "rv.keys")]
async fn by_arc_str(idem: &Idempotency, k: Arc<str>) -> Result<Receipt, Error> {
    Ok(Receipt {
        id: KEYED_RUNS.fetch_add(1, Ordering::SeqCst),
    })
}

#[idempotent(key = k, store = idem, scope = "rv.keys")]
// A `&Cow` key on purpose: the key forms under test include it.
#[allow(clippy::ptr_arg)]
async fn by_ref_cow(idem: &Idempotency, k: &Cow<'_, str>) -> Result<Receipt, Error> {
    Ok(Receipt {
        id: KEYED_RUNS.fetch_add(1, Ordering::SeqCst),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_keys_of_every_form_are_one_record_and_evaluated_once() {
    let idem = Idempotency::memory();
    let first = by_cow(&idem, 42).await.unwrap();
    assert_eq!(KEY_EVALS.load(Ordering::SeqCst), 1);
    for _ in 0..3 {
        assert_eq!(by_cow(&idem, 42).await.unwrap(), first);
    }
    assert_eq!(
        KEY_EVALS.load(Ordering::SeqCst),
        4,
        "once per call, hits included"
    );
    assert_eq!(by_str_ref_ref(&idem, &"42").await.unwrap(), first);
    assert_eq!(by_string(&idem, "42".to_owned()).await.unwrap(), first);
    assert_eq!(by_deref_str(&idem, "42").await.unwrap(), first);
    assert_eq!(by_number(&idem, 42).await.unwrap(), first);
    assert_eq!(by_arc_str(&idem, Arc::from("42")).await.unwrap(), first);
    assert_eq!(
        by_ref_cow(&idem, &Cow::Borrowed("42")).await.unwrap(),
        first
    );
    // Non-ASCII and separator-like text, through the text path and the Display path.
    let weird = "ü|{}\u{0}x";
    let a = by_string(&idem, weird.to_owned()).await.unwrap();
    assert_eq!(by_arc_str(&idem, Arc::from(weird)).await.unwrap(), a);
    assert_eq!(KEYED_RUNS.load(Ordering::SeqCst), 2);
    // The stored key is exactly the Display one.
    let key = StoreKey::new("rv.keys", weird, 255).unwrap();
    assert!(idem.store().peek_completed(&key).is_some());
}

// ---------------------------------------------------------------------------------------
// 7. Many first hits racing keep_copy on a multi-threaded runtime, then a new completion
//    after the TTL (ManualClock): nobody may see the old value after the new one landed.

static MANY_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = k, store = idem, scope = "rv.many", ttl = "10s")]
async fn many(idem: &Idempotency, k: u32) -> Result<Receipt, Error> {
    Ok(Receipt {
        id: MANY_RUNS.fetch_add(1, Ordering::SeqCst),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_first_hits_then_a_new_completion() {
    let clock = ManualClock::new();
    let idem = Idempotency::new(MemoryStore::builder().clock(clock.clone()).build());
    for round in 0..50u32 {
        let first = many(&idem, round).await.unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (idem, start) = (idem.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    many(&idem, round).await.unwrap()
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), first);
        }
        clock.advance(Duration::from_secs(10));
        let second = many(&idem, round).await.unwrap();
        assert_ne!(second, first);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let idem = idem.clone();
                tokio::spawn(async move { many(&idem, round).await.unwrap() })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), second, "round {round}");
        }
    }
    assert_eq!(idem.stats().executed, 100);
}

// ---------------------------------------------------------------------------------------
// 8. keep_copy reads the entry, then puts (moka's and_compute_with is not atomic against
//    a plain insert). If the record's TTL ends and the key is claimed and completed again
//    between keep_copy's read and its put, the put writes the OLD record (with its copy)
//    over the NEW one, and the next retry runs the key again.
//
//    The clock models a hit whose thread read the time just before the TTL ended and was
//    preempted: each thread may see its own time (a thread-local), others the shared one.

#[derive(Debug)]
struct SplitClock {
    shared: AtomicU64,
}

thread_local! {
    static MY_NOW: Cell<Option<u64>> = const { Cell::new(None) };
}

impl Clock for SplitClock {
    fn now(&self) -> Timestamp {
        let ms = MY_NOW
            .with(Cell::get)
            .unwrap_or_else(|| self.shared.load(Ordering::SeqCst));
        Timestamp::from_millis(ms)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Run(u64);

static RACE_RUNS: AtomicU64 = AtomicU64::new(0);

#[idempotent(key = k, store = idem, scope = "rv.race", ttl = "10s")]
async fn raced(idem: &Idempotency, k: u64) -> Result<Run, Error> {
    Ok(Run(RACE_RUNS.fetch_add(1, Ordering::SeqCst)))
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct RunNoClone(u64);

static CONTROL_RUNS: AtomicU64 = AtomicU64::new(0);

#[idempotent(key = k, store = idem, scope = "rv.race_control", ttl = "10s")]
async fn raced_control(idem: &Idempotency, k: u64) -> Result<RunNoClone, Error> {
    Ok(RunNoClone(CONTROL_RUNS.fetch_add(1, Ordering::SeqCst)))
}

#[derive(Debug)]
struct SharedClock(Arc<SplitClock>);
impl Clock for SharedClock {
    fn now(&self) -> Timestamp {
        self.0.now()
    }
}

const T0: u64 = 1_000_000;
const LATER: u64 = T0 + 10_001;

/// Runs the race `iterations` times on fresh keys of `$f`; returns the failures, each as
/// (iteration, delay, old, new, retry, token found in the store at the old time).
macro_rules! race {
    ($f:ident, $scope:expr, $runs:ident) => {{
        let clock = Arc::new(SplitClock { shared: AtomicU64::new(T0) });
        let idem = Idempotency::new(
            MemoryStore::builder().clock(SharedClock(clock.clone())).build(),
        );
        let iterations: u64 = std::env::var("RACE_ITERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3000);
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut failures = Vec::new();
        for k in 0..iterations {
            clock.shared.store(T0, Ordering::SeqCst);
            let a = block($f(&idem, k)).unwrap();
            let store_key = StoreKey::new($scope, &k.to_string(), 255).unwrap();
            let a_token = idem.store().peek_completed(&store_key).map(|r| r.token());
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let delay = (seed >> 33) % 3000;
            let go = Arc::new(Barrier::new(2));
            let hit = {
                let (idem, go) = (idem.clone(), go.clone());
                std::thread::spawn(move || {
                    MY_NOW.with(|n| n.set(Some(T0))); // read the time before the TTL ended
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    go.wait();
                    for _ in 0..delay {
                        std::hint::spin_loop();
                    }
                    rt.block_on($f(&idem, k)).unwrap()
                })
            };
            let rerun = {
                let (idem, go) = (idem.clone(), go.clone());
                std::thread::spawn(move || {
                    MY_NOW.with(|n| n.set(Some(LATER))); // after the TTL
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    go.wait();
                    rt.block_on($f(&idem, k)).unwrap()
                })
            };
            let seen = hit.join().unwrap();
            let b = rerun.join().unwrap();
            assert_ne!(b, a);
            // The lagging hit may have started after the new completion landed and read it.
            assert!(seen == a || seen == b, "{seen:?}");
            // What the store holds, read at the old time (so an expired record shows).
            MY_NOW.with(|n| n.set(Some(T0)));
            let held = idem.store().peek_completed(&store_key).map(|r| r.token());
            MY_NOW.with(|n| n.set(None));
            clock.shared.store(LATER, Ordering::SeqCst);
            let runs = $runs.load(Ordering::SeqCst);
            let retry = block($f(&idem, k)).unwrap();
            if retry != b || $runs.load(Ordering::SeqCst) != runs {
                let which = if held == a_token { "the OLD record" } else { "another record" };
                failures.push(format!(
                    "iteration {k} (delay {delay}): old {a:?}, new {b:?}, retry got {retry:?} \
                     (ran again); before the retry the store held {} (old token {a_token:?}, held {held:?})", which
                ));
            }
        }
        (iterations, failures)
    }};
}

#[test]
fn keep_copy_never_writes_an_old_record_over_a_new_completion() {
    let (n, failures) = race!(raced, "rv.race", RACE_RUNS);
    assert!(
        failures.is_empty(),
        "{} of {n} iterations lost the new completion; first: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}

/// Control: the same race with a value that is not Clone (no copies, no keep_copy).
#[test]
fn control_without_copies_the_race_never_loses_a_completion() {
    let (n, failures) = race!(raced_control, "rv.race_control", CONTROL_RUNS);
    assert!(
        failures.is_empty(),
        "{} of {n} iterations lost the new completion; first: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}

// ---------------------------------------------------------------------------------------
// 9. Two engines sharing one store (Arc / clone) with different fingerprints on the same
//    key, through the copy path.

#[idempotent(key = k, store = idem, scope = "rv.fp", fingerprint = cents)]
async fn fp(idem: &Idempotency, k: u32, cents: u64) -> Result<Receipt, Error> {
    Ok(Receipt { id: cents as u32 })
}

#[idempotent(key = k, store = idem, scope = "rv.fp")]
async fn no_fp(idem: &Idempotency, k: u32) -> Result<Receipt, Error> {
    Ok(Receipt { id: 0 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprints_are_checked_on_the_copy_path_for_every_engine() {
    let store = Arc::new(MemoryStore::new());
    let one = Idempotency::new(store.clone());
    let two = Idempotency::new(store.clone());
    let first = fp(&one, 1, 500).await.unwrap();
    assert_eq!(fp(&one, 1, 500).await.unwrap(), first);
    assert_eq!(fp(&two, 1, 500).await.unwrap(), first);
    assert!(matches!(fp(&two, 1, 900).await, Err(Error::Mismatch)));
    assert!(matches!(fp(&one, 1, 900).await, Err(Error::Mismatch)));
    // No fingerprint on the caller: not compared (as before).
    assert_eq!(no_fp(&two, 1).await.unwrap(), first);
}
