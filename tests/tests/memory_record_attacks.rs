//! Outside review of the memory store's records (written for #15's one-buffer layout,
//! kept as the regression suite of any layout): every result length around the record's
//! boundaries, fingerprints, stored errors, tokens and TTLs, read back byte for byte
//! through every answer of the store; and every scenario run on a memory store given to
//! the engine as it is AND wrapped (in a `FaultyStore` with no fault set, with and
//! without its local tier, or in an `Arc`): all must answer, count and keep copies alike. A copy kept
//! beside a result must never be served for a newer result of the key.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use idempotent_runtime::clock::{Clock, ManualClock};
use idempotent_runtime::store::{Claim, Fence, MemoryStore, Store};
use idempotent_runtime::{
    idempotent, outcome_of, Codec, CodecErrorKind, Error, FencingToken, Fingerprint, Idempotency,
    Outcome, Record, RecordState, StoreKey, StoredResult, DEFAULT_MAX_KEY_LEN,
};
use idempotent_tests::local_hit_fns::{counts, declined_fp, Declined};
use idempotent_tests::{block_on, block_on_threads, FaultyStore};
use serde::{Deserialize, Serialize};

/// The ways to build an engine over a memory store: given as it is, or wrapped so the
/// engine sees only the trait (`FaultyStore`, no fault set; `Bare` hides the local tier,
/// so its hits all go through `claim`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    New,
    BuilderStore,
    Memory,
    DefaultBuilder,
    ArcStore,
    ArcDyn,
    Forward,
    Bare,
}

const ALL_VIAS: [Via; 8] = [
    Via::New,
    Via::BuilderStore,
    Via::Memory,
    Via::DefaultBuilder,
    Via::ArcStore,
    Via::ArcDyn,
    Via::Forward,
    Via::Bare,
];

/// The vias that take a store (so that a clock can be set, and records shared).
const STORE_VIAS: [Via; 6] = [
    Via::New,
    Via::BuilderStore,
    Via::ArcStore,
    Via::ArcDyn,
    Via::Forward,
    Via::Bare,
];

fn engine_over(via: Via, store: MemoryStore, codec: Codec, ttl: Duration) -> Idempotency {
    let b = Idempotency::builder().codec(codec).ttl(ttl);
    match via {
        Via::New => {
            assert!(codec == Codec::Json && ttl == idempotent_runtime::DEFAULT_TTL);
            Idempotency::new(store)
        }
        Via::BuilderStore => b.store(store).build().unwrap(),
        Via::ArcStore => b.store(Arc::new(store)).build().unwrap(),
        Via::ArcDyn => b.store(Arc::new(store) as Arc<dyn Store>).build().unwrap(),
        Via::Forward => b.store(FaultyStore::new(store)).build().unwrap(),
        Via::Bare => b
            .store(FaultyStore::new(store).without_peek())
            .build()
            .unwrap(),
        Via::Memory | Via::DefaultBuilder => unreachable!(),
    }
}

/// A new memory store, and an engine over it built `via`, with the default codec and TTL.
fn default_engine_over(via: Via) -> (MemoryStore, Idempotency) {
    let store = MemoryStore::new();
    let idem = engine_over(
        via,
        store.clone(),
        Codec::Json,
        idempotent_runtime::DEFAULT_TTL,
    );
    (store, idem)
}

fn engine(via: Via) -> Idempotency {
    match via {
        Via::Memory => Idempotency::memory(),
        Via::DefaultBuilder => Idempotency::builder().build().unwrap(),
        Via::New => Idempotency::new(MemoryStore::new()),
        v => engine_over(
            v,
            MemoryStore::new(),
            Codec::Json,
            idempotent_runtime::DEFAULT_TTL,
        ),
    }
}

fn key(scope: &str, k: &str) -> StoreKey {
    StoreKey::new(scope, k, DEFAULT_MAX_KEY_LEN).unwrap()
}

// ---------------------------------------------------------------------------------------
// 1. The store's own answers after the layout change: claim's `Completed`, inspect,
//    peek_completed(_copy), through the store, an `Arc` and a forwarding wrapper.

fn fp(seed: u8) -> Fingerprint {
    let mut b = [0u8; 32];
    for (i, x) in b.iter_mut().enumerate() {
        *x = seed.wrapping_mul(31).wrapping_add(i as u8);
    }
    Fingerprint::from_bytes(b)
}

#[test]
fn store_answers_every_layout_byte_for_byte() {
    block_on(async {
        let clock = ManualClock::new();
        let store = MemoryStore::builder().clock(clock.clone()).build();
        let stores: Vec<(&str, Box<dyn Store>)> = vec![
            ("memory", Box::new(store.clone())),
            ("arc", Box::new(Arc::new(store.clone()))),
            ("forward", Box::new(FaultyStore::new(store.clone()))),
        ];
        // Sizes around the fingerprint (32) and the trailer (17), and a large one.
        let mut bodies: Vec<Vec<u8>> = [0usize, 1, 2, 16, 17, 18, 31, 32, 33, 48, 49, 50, 64]
            .iter()
            .map(|&n| (0..n).map(|i| (i * 7 + 3) as u8).collect())
            .collect();
        bodies.push((0..3_000_001usize).map(|i| (i % 251) as u8).collect());
        // A body that ends like a trailer would (flags byte set).
        bodies.push(vec![0xff; 17]);
        let fps = [
            None,
            Some(Fingerprint::from_bytes([0; 32])),
            Some(fp(0xab)),
            Some(Fingerprint::from_bytes([0xff; 32])),
        ];
        let tokens = [
            FencingToken::new(0),
            FencingToken::new(u64::MAX),
            FencingToken::new(0x0102_0304_0506_0708),
            FencingToken::mint(),
        ];
        let ttls = [
            Duration::from_millis(1),
            Duration::from_secs(3600),
            idempotent_runtime::MAX_TTL,
        ];
        let mut n = 0u32;
        for (name, s) in &stores {
            for body in &bodies {
                for fpr in fps {
                    for is_err in [false, true] {
                        n += 1;
                        let k = key("atk.layout", &format!("k{n}"));
                        let token = tokens[n as usize % tokens.len()];
                        let ttl = ttls[n as usize % ttls.len()];
                        let lease = Duration::from_secs(30);
                        assert_eq!(
                            s.claim(&k, token, fpr, lease).await.unwrap(),
                            Claim::Acquired
                        );
                        let bytes = Bytes::from(body.clone());
                        let result = if is_err {
                            StoredResult::Err(bytes)
                        } else {
                            StoredResult::Ok(bytes)
                        };
                        let now = clock.now();
                        assert_eq!(
                            s.complete(&k, token, result.clone(), ttl).await.unwrap(),
                            Fence::Held
                        );
                        let expected = Record {
                            fingerprint: fpr,
                            state: RecordState::Completed {
                                token,
                                result: result.clone(),
                                expires_at: now.after(ttl),
                            },
                        };
                        let ctx = format!(
                            "{name} len {} fp {:?} err {is_err}",
                            body.len(),
                            fpr.is_some()
                        );
                        // claim of another caller: Completed with the very record.
                        match s
                            .claim(&k, FencingToken::mint(), None, lease)
                            .await
                            .unwrap()
                        {
                            Claim::Completed(rec) => assert_eq!(rec, expected, "{ctx}"),
                            other => panic!("{ctx}: {other:?}"),
                        }
                        // A retry of the completion is told it holds.
                        assert_eq!(
                            s.complete(&k, token, result.clone(), ttl).await.unwrap(),
                            Fence::Held,
                            "{ctx}"
                        );
                        // Another token's completion is fenced, and changes nothing.
                        assert_eq!(
                            s.complete(
                                &k,
                                FencingToken::mint(),
                                StoredResult::Ok(Bytes::from_static(b"X")),
                                ttl
                            )
                            .await
                            .unwrap(),
                            Fence::Lost,
                            "{ctx}"
                        );
                        let ins = s.inspect(&k).await.unwrap().expect("inspected");
                        assert_eq!(ins.record, expected, "{ctx}");
                        assert_eq!(ins.time_left, ttl, "{ctx}");
                        assert_eq!(s.peek_completed(&k), Some(expected.clone()), "{ctx}");
                        let (rec, copy) = s.peek_completed_copy(&k).expect("peeked");
                        assert_eq!(rec, expected, "{ctx}");
                        assert!(copy.is_none(), "{ctx}");
                        // The record handed out outlives the store's entry intact.
                        assert!(s.forget(&k).await.unwrap(), "{ctx}");
                        assert_eq!(rec, expected, "{ctx}");
                        assert!(s.peek_completed(&k).is_none(), "{ctx}");
                    }
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------
// 2. Every way of building an engine answers, counts and refuses alike.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Payment {
    id: String,
    cents: u64,
}

#[idempotent(key = k, store = idem, scope = "atk.pay", fingerprint = cents)]
async fn pay(idem: &Idempotency, runs: &AtomicU32, k: &str, cents: u64) -> Result<Payment, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(Payment {
        id: format!("pay_{k}"),
        cents,
    })
}

/// Same scope, not `Clone`: decodes.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct PaymentNc {
    id: String,
    cents: u64,
}

#[idempotent(key = k, store = idem, scope = "atk.pay", fingerprint = cents)]
async fn pay_nc(
    idem: &Idempotency,
    runs: &AtomicU32,
    k: &str,
    cents: u64,
) -> Result<PaymentNc, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(PaymentNc {
        id: String::new(),
        cents: 0,
    })
}

/// No fingerprint at all, on the same record.
#[idempotent(key = k, store = idem, scope = "atk.pay")]
async fn pay_nofp(idem: &Idempotency, runs: &AtomicU32, k: &str) -> Result<Payment, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(Payment {
        id: "nofp".into(),
        cents: 0,
    })
}

/// Runs one script of calls and says everything it saw.
async fn script(idem: &Idempotency) -> Vec<String> {
    let runs = AtomicU32::new(0);
    let mut seen = Vec::new();
    let mut log = |s: String| seen.push(s);
    // Each call's answer and outcome, as text.
    macro_rules! see {
        ($call:expr) => {
            log(format!("{:?}", outcome_of($call).await))
        };
    }
    // With a fingerprint.
    see!(pay(idem, &runs, "a", 100));
    for _ in 0..3 {
        see!(pay(idem, &runs, "a", 100));
        see!(pay_nc(idem, &runs, "a", 100));
    }
    // A mismatch, then good hits again.
    see!(pay(idem, &runs, "a", 101));
    see!(pay_nc(idem, &runs, "a", 101));
    see!(pay(idem, &runs, "a", 100));
    // A call without a fingerprint on a record with one: not compared.
    see!(pay_nofp(idem, &runs, "a"));
    // A record without a fingerprint, read by calls with one: not compared.
    see!(pay_nofp(idem, &runs, "b"));
    see!(pay(idem, &runs, "b", 5));
    see!(pay(idem, &runs, "b", 6));
    see!(pay_nc(idem, &runs, "b", 6));
    // A stored error with a fingerprint.
    for cents in [1, 1, 2, 1] {
        see!(declined_fp(idem, &runs, "e", cents));
    }
    // The engine's API, with a stored error: the same payload, then another.
    for cents in [1u64, 3] {
        let api = idem
            .call("e")
            .scope("rf.err-fp")
            .fingerprint(&cents)
            .store_errors()
            .run_with_outcome(|| async { Ok::<u64, Declined>(9) })
            .await;
        log(format!("api {api:?}"));
    }
    // Inspection.
    let rec = idem.record("atk.pay", "a").await.unwrap().unwrap();
    log(format!("value {:?}", rec.value::<Payment>()));
    log(format!("runs {}", runs.load(Ordering::SeqCst)));
    log(format!("counts {:?}", counts(&idem.stats())));
    // Forget, and the key runs again.
    log(format!("forgot {:?}", idem.forget("atk.pay", "a").await));
    see!(pay(idem, &runs, "a", 101));
    see!(pay(idem, &runs, "a", 101));
    see!(pay(idem, &runs, "a", 100));
    log(format!("runs {}", runs.load(Ordering::SeqCst)));
    log(format!("counts {:?}", counts(&idem.stats())));
    seen
}

#[test]
fn every_engine_construction_answers_alike() {
    block_on(async {
        let reference = script(&engine(Via::New)).await;
        // Sanity of the reference itself.
        assert!(reference[0].contains("Executed"), "{reference:?}");
        assert!(
            reference.iter().any(|l| l.contains("Mismatch")),
            "{reference:?}"
        );
        // The API's call replays the error the attribute's function stored.
        assert!(
            reference
                .iter()
                .any(|l| l.starts_with("api") && l.contains("Card")),
            "{reference:?}"
        );
        for via in ALL_VIAS {
            let seen = script(&engine(via)).await;
            for (i, (a, b)) in reference.iter().zip(&seen).enumerate() {
                assert_eq!(a, b, "{via:?}: line {i} differs");
            }
            assert_eq!(reference.len(), seen.len(), "{via:?}");
        }
    });
}

// ---------------------------------------------------------------------------------------
// 3. Large and small results, a stored error, another codec on one shared store.

#[idempotent(key = k, store = idem, scope = "atk.big", fingerprint = n)]
async fn big(idem: &Idempotency, runs: &AtomicU32, k: &str, n: usize) -> Result<String, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok((0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect())
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct BigNc(String);

#[idempotent(key = k, store = idem, scope = "atk.big", fingerprint = n)]
async fn big_nc(idem: &Idempotency, runs: &AtomicU32, k: &str, n: usize) -> Result<BigNc, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(BigNc(String::new()))
}

#[test]
fn large_and_tiny_results_replay_whole() {
    block_on(async {
        for via in ALL_VIAS {
            let idem = engine(via);
            let runs = AtomicU32::new(0);
            for n in [0usize, 1, 15, 16, 17, 31, 32, 33, 4 << 20] {
                let k = format!("k{n}");
                let want: String = (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
                let first = big(&idem, &runs, &k, n).await.unwrap();
                assert_eq!(first, want);
                for _ in 0..3 {
                    assert_eq!(big(&idem, &runs, &k, n).await.unwrap(), want, "{via:?} {n}");
                    assert_eq!(
                        big_nc(&idem, &runs, &k, n).await.unwrap(),
                        BigNc(want.clone()),
                        "{via:?} {n}"
                    );
                }
                assert!(matches!(
                    big(&idem, &runs, &k, n + 1).await,
                    Err(Error::Mismatch)
                ));
                let rec = idem.record("atk.big", &k).await.unwrap().unwrap();
                assert_eq!(rec.value::<String>().unwrap().as_deref(), Some(&*want));
            }
            assert_eq!(runs.load(Ordering::SeqCst), 9, "{via:?}");
            assert_eq!(counts(&idem.stats()), (9, 9 * 6, 0, 9, 0), "{via:?}");
        }
    });
}

/// Records written directly to the store that no codec wrote (empty, a bare byte):
/// refused alike however the store is given, never a panic.
#[test]
fn foreign_and_empty_records_are_refused_alike() {
    block_on(async {
        let mut reference: Option<Vec<String>> = None;
        for via in STORE_VIAS {
            let (store, idem) = default_engine_over(via);
            let mut seen = Vec::new();
            for (i, result) in [
                StoredResult::Ok(Bytes::new()),
                StoredResult::Err(Bytes::new()),
                StoredResult::Ok(Bytes::from_static(b"\x00")),
                StoredResult::Ok(Bytes::from_static(&[0xff; 17])),
            ]
            .into_iter()
            .enumerate()
            {
                let k = format!("raw{i}");
                let sk = key("atk.pay", &k);
                let t = FencingToken::mint();
                assert_eq!(
                    store
                        .claim(&sk, t, None, Duration::from_secs(9))
                        .await
                        .unwrap(),
                    Claim::Acquired
                );
                assert_eq!(
                    store
                        .complete(&sk, t, result, Duration::from_secs(60))
                        .await
                        .unwrap(),
                    Fence::Held
                );
                let runs = AtomicU32::new(0);
                for _ in 0..2 {
                    let r = outcome_of(pay(&idem, &runs, &k, 1)).await;
                    seen.push(format!("{r:?}"));
                    let r = outcome_of(pay_nc(&idem, &runs, &k, 1)).await;
                    seen.push(format!("{r:?}"));
                }
                assert_eq!(runs.load(Ordering::SeqCst), 0, "{via:?}");
            }
            seen.push(format!("{:?}", counts(&idem.stats())));
            match &reference {
                None => reference = Some(seen),
                Some(r) => assert_eq!(r, &seen, "{via:?}"),
            }
        }
    });
}

#[test]
fn two_codecs_share_one_store_alike_however_it_is_given() {
    block_on(async {
        let mut reference: Option<Vec<String>> = None;
        for via in [Via::BuilderStore, Via::ArcStore, Via::Forward, Via::Bare] {
            let store = MemoryStore::new();
            let ttl = idempotent_runtime::DEFAULT_TTL;
            let json = engine_over(via, store.clone(), Codec::Json, ttl);
            let post = engine_over(via, store.clone(), Codec::Postcard, ttl);
            let runs = AtomicU32::new(0);
            let mut seen = Vec::new();
            // JSON writes; JSON hits (keeps a copy); Postcard must still be refused.
            for (writer, reader, k) in [(&json, &post, "j"), (&post, &json, "p")] {
                seen.push(format!("{:?}", outcome_of(pay(writer, &runs, k, 1)).await));
                for _ in 0..2 {
                    let r = pay(reader, &runs, k, 1).await;
                    let wrong = matches!(&r, Err(Error::Codec(e)) if e.kind() == CodecErrorKind::WrongCodec);
                    assert!(wrong, "{via:?} {k}: {r:?}");
                    seen.push(format!("{r:?}"));
                    seen.push(format!("{:?}", outcome_of(pay(writer, &runs, k, 1)).await));
                    let r = pay_nc(reader, &runs, k, 1).await;
                    assert!(matches!(&r, Err(Error::Codec(_))), "{via:?} {k}: {r:?}");
                    // A mismatch is a mismatch, whatever the codec (checked first).
                    seen.push(format!("{:?}", outcome_of(pay(reader, &runs, k, 2)).await));
                    seen.push(format!("{:?}", outcome_of(pay(writer, &runs, k, 2)).await));
                }
            }
            seen.push(format!("runs {}", runs.load(Ordering::SeqCst)));
            seen.push(format!(
                "json {:?} post {:?}",
                counts(&json.stats()),
                counts(&post.stats())
            ));
            match &reference {
                None => reference = Some(seen),
                Some(r) => assert_eq!(r, &seen, "{via:?}"),
            }
        }
    });
}

// ---------------------------------------------------------------------------------------
// 4. A mismatch clones nothing (a panicking `Clone` included) and counts once.

static TRAP_CLONES: AtomicU32 = AtomicU32::new(0);
static TRAP_PANICS: AtomicBool = AtomicBool::new(false);

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Trap(u64);

impl Clone for Trap {
    fn clone(&self) -> Self {
        TRAP_CLONES.fetch_add(1, Ordering::SeqCst);
        if TRAP_PANICS.load(Ordering::SeqCst) {
            panic!("Trap cloned");
        }
        Trap(self.0)
    }
}

#[idempotent(key = k, store = idem, scope = "atk.trap", fingerprint = cents)]
async fn trap(idem: &Idempotency, k: &str, cents: u64) -> Result<Trap, Error> {
    Ok(Trap(cents))
}

#[test]
fn a_mismatch_clones_nothing_however_the_store_is_given() {
    block_on(async {
        for via in STORE_VIAS {
            let (_store, idem) = default_engine_over(via);
            TRAP_PANICS.store(false, Ordering::SeqCst);
            assert_eq!(trap(&idem, "t", 1).await.unwrap(), Trap(1));
            // First hit keeps a copy (the bare store has no tier: nothing kept).
            assert_eq!(trap(&idem, "t", 1).await.unwrap(), Trap(1));
            assert_eq!(trap(&idem, "t", 1).await.unwrap(), Trap(1));
            let before = (TRAP_CLONES.load(Ordering::SeqCst), counts(&idem.stats()));
            TRAP_PANICS.store(true, Ordering::SeqCst);
            for i in 0..5u64 {
                let r = trap(&idem, "t", 2 + i).await;
                assert!(matches!(r, Err(Error::Mismatch)), "{via:?}: {r:?}");
            }
            TRAP_PANICS.store(false, Ordering::SeqCst);
            let after = (TRAP_CLONES.load(Ordering::SeqCst), counts(&idem.stats()));
            assert_eq!(after.0, before.0, "{via:?}: a mismatch cloned");
            let (e, r, c, m, s) = before.1;
            assert_eq!(
                after.1,
                (e, r, c, m + 5, s),
                "{via:?}: mismatches counted once each"
            );
        }
    });
}

// ---------------------------------------------------------------------------------------
// 5. A record replaced between a hit's read and its `keep_copy`: the hit's copy must
//    never be kept beside the newer result.

/// The gate a `Gated` decode stops at, once armed: it says it arrived, then waits.
struct Gate {
    reached: std_mpsc::Sender<()>,
    go: std_mpsc::Receiver<()>,
}
static GATE: Mutex<Option<Gate>> = Mutex::new(None);

fn arm() -> (std_mpsc::Receiver<()>, std_mpsc::Sender<()>) {
    let (reached_tx, reached_rx) = std_mpsc::channel();
    let (go_tx, go_rx) = std_mpsc::channel();
    *GATE.lock().unwrap() = Some(Gate {
        reached: reached_tx,
        go: go_rx,
    });
    (reached_rx, go_tx)
}

#[derive(Debug, Clone, PartialEq)]
struct Gated(u64);

impl Serialize for Gated {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Gated {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        let gate = GATE.lock().unwrap().take();
        if let Some(g) = gate {
            g.reached.send(()).unwrap();
            g.go.recv().unwrap();
        }
        Ok(Gated(v))
    }
}

#[idempotent(key = k, store = idem, scope = "atk.race")]
async fn gated(idem: &Idempotency, runs: &AtomicU64, k: &str) -> Result<Gated, Error> {
    Ok(Gated(runs.fetch_add(1, Ordering::SeqCst) + 1))
}

/// The same record, decoded (no copy): what the record holds.
#[idempotent(key = k, store = idem, scope = "atk.race")]
async fn record_value(idem: &Idempotency, runs: &AtomicU64, k: &str) -> Result<u64, Error> {
    Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
}

#[derive(Debug, Clone, Copy)]
enum Meanwhile {
    /// `forget`, then a new execution.
    ForgetAndRerun,
    /// The TTL runs out (manual clock), then a new execution.
    ExpireAndRerun,
    /// `forget` only.
    Forget,
    /// `forget`, then a new execution still running when the hit keeps its copy.
    ForgetAndRunning,
    /// The key is re-completed by the store's own API with a new token.
    DirectReplace,
}

#[test]
fn a_stale_copy_is_never_kept_beside_a_newer_result() {
    let ttl = Duration::from_secs(60);
    for via in [Via::BuilderStore, Via::Forward, Via::ArcStore] {
        for what in [
            Meanwhile::ForgetAndRerun,
            Meanwhile::ExpireAndRerun,
            Meanwhile::Forget,
            Meanwhile::ForgetAndRunning,
            Meanwhile::DirectReplace,
        ] {
            let ctx = format!("{via:?} {what:?}");
            let clock = ManualClock::new();
            let store = MemoryStore::builder().clock(clock.clone()).build();
            let idem = engine_over(via, store.clone(), Codec::Json, ttl);
            let runs = Arc::new(AtomicU64::new(0));
            let encoded_two = json_bytes(2);
            block_on(async {
                assert_eq!(gated(&idem, &runs, "r").await.unwrap(), Gated(1), "{ctx}");
            });
            let (reached, go) = arm();
            let hitter = {
                let (idem, runs) = (idem.clone(), runs.clone());
                std::thread::spawn(move || block_on(outcome_of(gated(&idem, &runs, "r"))))
            };
            reached.recv().unwrap();
            // The hit has read record 1 and is decoding it. Meanwhile:
            let mut running = None;
            block_on(async {
                match what {
                    Meanwhile::ForgetAndRerun => {
                        assert!(idem.forget("atk.race", "r").await.unwrap());
                        assert_eq!(gated(&idem, &runs, "r").await.unwrap(), Gated(2), "{ctx}");
                    }
                    Meanwhile::ExpireAndRerun => {
                        clock.advance(ttl);
                        assert_eq!(gated(&idem, &runs, "r").await.unwrap(), Gated(2), "{ctx}");
                    }
                    Meanwhile::Forget => {
                        assert!(idem.forget("atk.race", "r").await.unwrap());
                    }
                    Meanwhile::ForgetAndRunning => {
                        assert!(idem.forget("atk.race", "r").await.unwrap());
                        let (started_tx, started_rx) = std_mpsc::channel::<()>();
                        let (finish_tx, finish_rx) = std_mpsc::channel::<()>();
                        let (idem, runs) = (idem.clone(), runs.clone());
                        running = Some((
                            std::thread::spawn(move || {
                                block_on(idem.call("r").scope("atk.race").run(move || async move {
                                    started_tx.send(()).unwrap();
                                    finish_rx.recv().unwrap();
                                    Ok::<_, Error>(Gated(runs.fetch_add(1, Ordering::SeqCst) + 1))
                                }))
                            }),
                            finish_tx,
                        ));
                        started_rx.recv().unwrap();
                    }
                    Meanwhile::DirectReplace => {
                        clock.advance(ttl);
                        let sk = key("atk.race", "r");
                        let t = FencingToken::mint();
                        assert_eq!(
                            store.claim(&sk, t, None, ttl).await.unwrap(),
                            Claim::Acquired
                        );
                        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                        assert_eq!(n, 2);
                        let encoded = encoded_two.clone();
                        assert_eq!(
                            store
                                .complete(&sk, t, StoredResult::Ok(encoded), ttl)
                                .await
                                .unwrap(),
                            Fence::Held
                        );
                    }
                }
            });
            go.send(()).unwrap();
            let (answer, how) = hitter.join().unwrap();
            // The hit read record 1 before it changed: its answer is record 1's.
            assert_eq!(
                (answer.unwrap(), how),
                (Gated(1), Some(Outcome::Replayed)),
                "{ctx}"
            );
            if let Some((thread, finish)) = running {
                finish.send(()).unwrap();
                assert_eq!(thread.join().unwrap().unwrap(), Gated(2), "{ctx}");
            }
            block_on(async {
                // What the record now holds, and what every hit must answer.
                let want = match what {
                    Meanwhile::Forget => {
                        let (r, how) = outcome_of(gated(&idem, &runs, "r")).await;
                        assert_eq!(
                            (r.unwrap(), how),
                            (Gated(2), Some(Outcome::Executed)),
                            "{ctx}"
                        );
                        2
                    }
                    _ => 2,
                };
                for i in 0..4 {
                    let (r, how) = outcome_of(gated(&idem, &runs, "r")).await;
                    assert_eq!(
                        (r.unwrap(), how),
                        (Gated(want), Some(Outcome::Replayed)),
                        "{ctx}: hit {i} answered another result than the record's"
                    );
                    assert_eq!(
                        record_value(&idem, &runs, "r").await.unwrap(),
                        want,
                        "{ctx}"
                    );
                }
                assert_eq!(runs.load(Ordering::SeqCst), want, "{ctx}: ran again");
            });
        }
    }
}

/// The JSON codec's encoding of `n`, as the engine writes it (read back from a record the
/// engine wrote, so the test need not know the codec's tag).
fn json_bytes(n: u64) -> Bytes {
    let store = MemoryStore::new();
    let idem = Idempotency::new(store.clone());
    block_on(async {
        idem.call("x")
            .scope("s")
            .run(|| async { Ok::<_, Error>(n) })
            .await
            .unwrap();
    });
    match store.peek_completed(&key("s", "x")).unwrap().state {
        RecordState::Completed {
            result: StoredResult::Ok(b),
            ..
        } => Bytes::copy_from_slice(&b),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// 6. TTL: the custom clock (checked on read) to the millisecond, and the system clock.

#[idempotent(key = k, store = idem, scope = "atk.ttl")]
async fn timed(idem: &Idempotency, runs: &AtomicU64, k: &str) -> Result<u64, Error> {
    Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
}

#[test]
fn a_result_expires_at_its_millisecond_alike() {
    block_on(async {
        let ttl = Duration::from_secs(10);
        for via in STORE_VIAS.into_iter().filter(|v| *v != Via::New) {
            let clock = ManualClock::new();
            let store = MemoryStore::builder().clock(clock.clone()).build();
            let idem = engine_over(via, store, Codec::Json, ttl);
            let runs = AtomicU64::new(0);
            assert_eq!(timed(&idem, &runs, "t").await.unwrap(), 1);
            assert_eq!(timed(&idem, &runs, "t").await.unwrap(), 1); // copy kept
            clock.advance(ttl - Duration::from_millis(1));
            let rec = idem.record("atk.ttl", "t").await.unwrap().unwrap();
            assert_eq!(rec.value::<u64>().unwrap(), Some(1));
            let (r, how) = outcome_of(timed(&idem, &runs, "t")).await;
            assert_eq!(
                (r.unwrap(), how),
                (1, Some(Outcome::Replayed)),
                "{via:?} 1ms before"
            );
            clock.advance(Duration::from_millis(1));
            assert!(
                idem.record("atk.ttl", "t").await.unwrap().is_none(),
                "{via:?}"
            );
            let (r, how) = outcome_of(timed(&idem, &runs, "t")).await;
            assert_eq!(
                (r.unwrap(), how),
                (2, Some(Outcome::Executed)),
                "{via:?} at expiry"
            );
            let (r, how) = outcome_of(timed(&idem, &runs, "t")).await;
            assert_eq!(
                (r.unwrap(), how),
                (2, Some(Outcome::Replayed)),
                "{via:?} new result"
            );
        }
    });
}

#[test]
fn a_result_expires_with_the_system_clock_alike() {
    block_on(async {
        let ttl = Duration::from_millis(200);
        for via in STORE_VIAS.into_iter().filter(|v| *v != Via::New) {
            let store = MemoryStore::new();
            let idem = engine_over(via, store.clone(), Codec::Json, ttl);
            let runs = AtomicU64::new(0);
            assert_eq!(timed(&idem, &runs, "t").await.unwrap(), 1);
            let _ = timed(&idem, &runs, "t").await.unwrap(); // keeps a copy, if in time
                                                             // Waits until the store says the key is gone, both to `inspect` (the store's
                                                             // clock) and to its local tier (moka's own expiry, which may end up to about a
                                                             // millisecond later: see the last test).
            let mut gone = false;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let sk = key("atk.ttl", "t");
            while std::time::Instant::now() < deadline {
                if idem.record("atk.ttl", "t").await.unwrap().is_none()
                    && store.peek_completed(&sk).is_none()
                {
                    gone = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(gone, "{via:?}");
            let (r, how) = outcome_of(timed(&idem, &runs, "t")).await;
            assert_eq!(
                (r.unwrap(), how),
                (2, Some(Outcome::Executed)),
                "{via:?} after expiry"
            );
        }
    });
}

// ---------------------------------------------------------------------------------------
// 7. Capacity evictions: a key answers its own result or runs again, never another's.

#[idempotent(key = k, store = idem, scope = "atk.cap")]
async fn own(idem: &Idempotency, runs: &AtomicU64, k: &str) -> Result<String, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(format!("v-{k}"))
}

#[test]
fn evictions_never_answer_another_keys_result() {
    block_on(async {
        for via in [Via::BuilderStore, Via::Forward] {
            let store = MemoryStore::builder().capacity(8).build();
            let idem = engine_over(
                via,
                store.clone(),
                Codec::Json,
                idempotent_runtime::DEFAULT_TTL,
            );
            let runs = AtomicU64::new(0);
            for round in 0..3 {
                for i in 0..200 {
                    let k = format!("k{}", (i * 7 + round) % 200);
                    assert_eq!(
                        own(&idem, &runs, &k).await.unwrap(),
                        format!("v-{k}"),
                        "{via:?}"
                    );
                    assert_eq!(
                        own(&idem, &runs, &k).await.unwrap(),
                        format!("v-{k}"),
                        "{via:?}"
                    );
                    if i % 16 == 0 {
                        store.run_pending_tasks();
                    }
                }
            }
            store.run_pending_tasks();
            assert!(store.entry_count() <= 8, "{via:?}: {}", store.entry_count());
            assert!(idem.stats().evicted > 0, "{via:?}");
        }
    });
}

// ---------------------------------------------------------------------------------------
// 8. Many threads hitting, re-running and forgetting one key: whenever the key is quiet,
//    a hit that clones a copy answers what the record holds.

#[idempotent(key = k, store = idem, scope = "atk.hot")]
async fn hot(idem: &Idempotency, runs: &AtomicU64, k: &str) -> Result<u64, Error> {
    Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct HotNc(u64);

#[idempotent(key = k, store = idem, scope = "atk.hot")]
async fn hot_nc(idem: &Idempotency, runs: &AtomicU64, k: &str) -> Result<HotNc, Error> {
    Ok(HotNc(runs.fetch_add(1, Ordering::SeqCst) + 1))
}

#[test]
fn many_threads_on_one_key_never_keep_a_stale_copy() {
    block_on_threads(6, async {
        for via in [Via::BuilderStore, Via::Forward] {
            for clocked in [false, true] {
                let clock = ManualClock::new();
                let store = if clocked {
                    MemoryStore::builder().clock(clock.clone()).build()
                } else {
                    MemoryStore::new()
                };
                let ttl = Duration::from_secs(60);
                let idem = engine_over(via, store, Codec::Json, ttl);
                let runs = Arc::new(AtomicU64::new(0));
                for round in 0..150 {
                    let mut tasks = Vec::new();
                    for t in 0..6u32 {
                        let (idem, runs, clock) = (idem.clone(), runs.clone(), clock.clone());
                        tasks.push(tokio::spawn(async move {
                            for i in 0..20u32 {
                                match (t + i + round) % 7 {
                                    0 if t == 0 => {
                                        idem.forget("atk.hot", "h").await.unwrap();
                                    }
                                    1 if t == 1 && clocked => clock.advance(ttl),
                                    2 | 4 => {
                                        let _ = hot_nc(&idem, &runs, "h").await;
                                    }
                                    _ => {
                                        hot(&idem, &runs, "h").await.unwrap();
                                    }
                                }
                                tokio::task::yield_now().await;
                            }
                        }));
                    }
                    for t in tasks {
                        t.await.unwrap();
                    }
                    // Quiet: the record, a decoding hit and a cloning hit agree.
                    let a = hot(&idem, &runs, "h").await.unwrap();
                    let b = hot(&idem, &runs, "h").await.unwrap();
                    let c = hot_nc(&idem, &runs, "h").await.unwrap();
                    let rec = idem.record("atk.hot", "h").await.unwrap().unwrap();
                    let r = rec.value::<u64>().unwrap().unwrap();
                    assert_eq!(
                        (a, b, c.0),
                        (r, r, r),
                        "{via:?} clocked {clocked} round {round}"
                    );
                }
                let s = idem.stats();
                assert_eq!(
                    s.executed,
                    runs.load(Ordering::SeqCst),
                    "{via:?}: each run counted once"
                );
            }
        }
    });
}
