//! The attribute's local hit, answered from the call as it stands, before its request is
//! built (when no `tracing` subscriber takes INFO): it must answer, refuse and count
//! exactly as the request's own path does, which the engine's API (`Call::run`) and a
//! subscriber at INFO still take. No test here sets a subscriber
//! (`local_hits_traced.rs` compares the paths under several).
//!
//! The refusals, copies, codecs, concurrency and Redis tests came from the outside review
//! of the change.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use idempotent_runtime::metrics as m;
use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{idempotent, outcome_of, Codec, Error, Idempotency, KeyError, Outcome};
use idempotent_tests::local_hit_fns::{charge, charge_as_text, counts, receipt, Receipt, SCOPE};
use idempotent_tests::recorded_metrics::{labels, with_recorder};
use idempotent_tests::{block_on, block_on_threads, FaultyStore, RedisHarness};
use tokio::sync::{mpsc, Notify};

/// Same scope and key, another `Clone` type that decodes the same JSON.
#[idempotent(key = order, store = idem, scope = "local-hits")]
async fn charge_u32(idem: &Idempotency, order: &str) -> Result<u32, Error> {
    Ok(0)
}

/// A fingerprint whose `Serialize` fails.
struct Unserializable;
impl serde::Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("no"))
    }
}

#[idempotent(key = order, store = idem, scope = "local-hits", fingerprint = Unserializable)]
async fn charge_bad_fp(idem: &Idempotency, runs: &AtomicU32, order: &str) -> Result<u64, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(1)
}

#[idempotent(key = order, store = idem, scope = "local-hits", on_missing_key = "fail")]
async fn charge_opt(
    idem: &Idempotency,
    runs: &AtomicU32,
    order: Option<&str>,
) -> Result<u64, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(1)
}

/// The same record through the engine's API (the request's own local look).
async fn api_u64(idem: &Idempotency, order: &str, cents: u64) -> Result<(u64, Outcome), Error> {
    idem.call(order)
        .scope(SCOPE)
        .fingerprint(&cents)
        .run_with_outcome(move || async move { Ok::<_, Error>(cents) })
        .await
}

/// Refusals the request makes must still be made when the key already has a completed
/// local record: nothing runs, nothing is replayed or counted.
#[test]
fn refusals_are_made_on_a_key_with_a_local_hit() {
    block_on(async {
        let idem = Idempotency::memory();
        let runs = AtomicU32::new(0);
        charge(&idem, &runs, "k", 5).await.unwrap();
        let before = counts(&idem.stats());
        let bad = charge_bad_fp(&idem, &runs, "k").await;
        assert!(matches!(bad, Err(Error::Codec(_))), "{bad:?}");
        let missing = charge_opt(&idem, &runs, None).await;
        assert!(
            matches!(missing, Err(Error::InvalidKey(KeyError::Missing))),
            "{missing:?}"
        );
        let empty = charge(&idem, &runs, "", 5).await;
        assert!(
            matches!(empty, Err(Error::InvalidKey(KeyError::Empty))),
            "{empty:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(counts(&idem.stats()), before);
        // The Option key, present, hits the same record.
        assert_eq!(charge_opt(&idem, &runs, Some("k")).await.unwrap(), 5);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

/// Once a typed copy is kept (first hit), a mismatch is still refused, and counted once;
/// `outcome_of` reports the hit and nothing for the refusal.
#[test]
fn a_mismatch_after_the_copy_is_kept_is_refused_and_counted_once() {
    with_recorder(|metrics| async move {
        let idem = Idempotency::memory();
        let runs = AtomicU32::new(0);
        charge(&idem, &runs, "c", 100).await.unwrap();
        // First hit: decodes and keeps a copy. Second: clones it.
        assert_eq!(charge(&idem, &runs, "c", 100).await.unwrap(), 100);
        let (v, how) = outcome_of(charge(&idem, &runs, "c", 100)).await;
        assert_eq!((v.unwrap(), how), (100, Some(Outcome::Replayed)));
        metrics.take();
        let (bad, how) = outcome_of(charge(&idem, &runs, "c", 999)).await;
        assert!(matches!(bad, Err(Error::Mismatch)), "{bad:?}");
        assert_eq!(how, None);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(counts(&idem.stats()), (1, 2, 0, 1, 0));
        assert_eq!(
            metrics.counters(),
            vec![(
                m::MISMATCHES.into(),
                labels(&[("scope", SCOPE), ("store", "memory")]),
                1
            )]
        );
        // And through the engine's API: the same refusal.
        assert!(matches!(
            api_u64(&idem, "c", 999).await,
            Err(Error::Mismatch)
        ));
    });
}

/// A copy of one type is never handed to a caller of another: u32 decodes the record
/// (and keeps no copy over the u64 one), String fails to decode, both paths alike.
#[test]
fn copies_of_two_types_on_one_key() {
    block_on(async {
        let idem = Idempotency::memory();
        let runs = AtomicU32::new(0);
        charge(&idem, &runs, "t", 42).await.unwrap();
        for _ in 0..3 {
            assert_eq!(charge(&idem, &runs, "t", 42).await.unwrap(), 42);
            assert_eq!(charge_u32(&idem, "t").await.unwrap(), 42);
            assert!(matches!(
                charge_as_text(&idem, "t").await,
                Err(Error::Codec(_))
            ));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // 3 u64 hits + 3 u32 hits; undecodable ones count nothing.
        assert_eq!(counts(&idem.stats()), (1, 6, 0, 0, 0));
        assert_eq!(
            api_u64(&idem, "t", 42).await.unwrap(),
            (42, Outcome::Replayed)
        );
    });
}

/// An engine with another codec on the same store: the attribute's hit and the engine
/// API's answer alike (the same error, nothing counted, nothing run).
#[test]
fn another_codec_reading_a_json_record() {
    block_on(async {
        let store = MemoryStore::new();
        let json = Idempotency::builder().store(store.clone()).build().unwrap();
        let post = Idempotency::builder()
            .store(store.clone())
            .codec(Codec::Postcard)
            .build()
            .unwrap();
        let runs = AtomicU32::new(0);
        charge(&json, &runs, "p", 3).await.unwrap();
        receipt(&json, &runs, "p").await.unwrap();
        let a = charge(&post, &runs, "p", 3).await;
        let b = api_u64(&post, "p", 3).await;
        let c = receipt(&post, &runs, "p").await;
        assert_eq!(format!("{a:?}"), format!("{:?}", b.map(|(v, _)| v)));
        assert_eq!(runs.load(Ordering::SeqCst), 2, "{a:?} {c:?}");
        assert_eq!(counts(&post.stats()), (0, 0, 0, 0, 0), "{a:?} {c:?}");
    });
}

/// N callers on one key on a multi-threaded runtime: one execution, every caller
/// answered once, and the counts add up.
#[test]
fn many_callers_on_one_key_run_once() {
    block_on_threads(4, async {
        for round in 0..20 {
            let idem = Arc::new(Idempotency::memory());
            let runs = Arc::new(AtomicU32::new(0));
            let gate = Arc::new(Notify::new());
            let (entered_tx, mut entered) = mpsc::unbounded_channel();
            let key = format!("n-{round}");
            let mut tasks = Vec::new();
            for _ in 0..32 {
                let (idem, runs, gate, entered_tx, key) = (
                    idem.clone(),
                    runs.clone(),
                    gate.clone(),
                    entered_tx.clone(),
                    key.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    gated(&idem, &runs, &gate, &entered_tx, &key).await
                }));
            }
            entered.recv().await.unwrap();
            gate.notify_waiters();
            gate.notify_one();
            for t in tasks {
                assert_eq!(t.await.unwrap().unwrap(), 9);
            }
            // Hits after the end.
            for _ in 0..8 {
                assert_eq!(
                    gated(&idem, &runs, &gate, &entered_tx, &key).await.unwrap(),
                    9
                );
            }
            assert_eq!(runs.load(Ordering::SeqCst), 1);
            let s = idem.stats();
            assert_eq!(s.executed, 1);
            assert_eq!(s.executed + s.replayed + s.coalesced, 40, "{s:?}");
        }
    });
}

#[idempotent(key = key, store = idem, scope = "local-hits-gated")]
async fn gated(
    idem: &Idempotency,
    runs: &AtomicU32,
    gate: &Notify,
    entered: &mpsc::UnboundedSender<()>,
    key: &str,
) -> Result<u64, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    let opened = gate.notified();
    let _ = entered.send(());
    opened.await;
    Ok(9)
}

#[idempotent(key = key, store = idem, scope = "local-hits-ids")]
async fn next_id(idem: &Idempotency, runs: &AtomicU32, key: &str) -> Result<u32, Error> {
    Ok(runs.fetch_add(1, Ordering::SeqCst))
}

/// Hits racing `forget` on a multi-threaded runtime: an execution only follows a
/// forget, and every answer is a value some execution produced.
#[test]
fn hits_racing_forget_run_once_per_forget() {
    block_on_threads(4, async {
        let idem = Arc::new(Idempotency::memory());
        let runs = Arc::new(AtomicU32::new(0));
        next_id(&idem, &runs, "f").await.unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut hitters = Vec::new();
        for _ in 0..3 {
            let (idem, runs, stop) = (idem.clone(), runs.clone(), stop.clone());
            hitters.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let v = next_id(&idem, &runs, "f").await.unwrap();
                    assert!(v < runs.load(Ordering::SeqCst));
                    n += 1;
                    tokio::task::yield_now().await;
                }
                n
            }));
        }
        let mut forgotten = 0;
        for _ in 0..300 {
            if idem.forget("local-hits-ids", "f").await.unwrap() {
                forgotten += 1;
            }
            tokio::task::yield_now().await;
        }
        stop.store(true, Ordering::SeqCst);
        for h in hitters {
            h.await.unwrap();
        }
        let runs = runs.load(Ordering::SeqCst);
        assert!(runs <= forgotten + 1, "runs {runs}, forgotten {forgotten}");
        let s = idem.stats();
        assert_eq!(s.executed, runs as u64, "{s:?}");
    });
}

/// The `Missing` hint found before the request may be stale: the key completed (in
/// another engine on the same store) after the look. The call must still claim in the
/// store and replay, never run.
#[test]
fn a_stale_missing_hint_still_claims_and_replays() {
    block_on_threads(2, async {
        let store = MemoryStore::new();
        let a = Arc::new(Idempotency::new(store.clone()));
        let b = Arc::new(Idempotency::new(store.clone()));
        let runs = Arc::new(AtomicU32::new(0));
        let gate = Arc::new(Notify::new());
        let (entered_tx, mut entered) = mpsc::unbounded_channel();
        let leader = {
            let (b, runs, gate, tx) = (b.clone(), runs.clone(), gate.clone(), entered_tx.clone());
            tokio::spawn(async move { gated(&b, &runs, &gate, &tx, "s").await })
        };
        entered.recv().await.unwrap();
        // `a`'s local look finds nothing (the key is in progress elsewhere), so it goes
        // on with `Missing`; it claims, finds the key held, and waits.
        let follower = {
            let (a, runs, gate, tx) = (a.clone(), runs.clone(), gate.clone(), entered_tx.clone());
            tokio::spawn(async move { outcome_of(gated(&a, &runs, &gate, &tx, "s")).await })
        };
        gate.notify_one();
        assert_eq!(leader.await.unwrap().unwrap(), 9);
        let (v, how) = follower.await.unwrap();
        assert_eq!((v.unwrap(), how), (9, Some(Outcome::Replayed)));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(counts(&a.stats()), (0, 1, 0, 0, 0));
        // And a hit now is local.
        assert_eq!(gated(&a, &runs, &gate, &entered_tx, "s").await.unwrap(), 9);
        assert_eq!(counts(&a.stats()), (0, 2, 0, 0, 0));
    });
}

/// A local tier holding an in-progress record (a broken store): the new path leaves it
/// to the request, which fails it once; with the fault gone, the call hits.
#[test]
fn a_broken_local_record_then_a_hit() {
    block_on(async {
        let store = FaultyStore::new(MemoryStore::new());
        let idem = Idempotency::new(store.clone());
        let runs = AtomicU32::new(0);
        charge(&idem, &runs, "b", 1).await.unwrap();
        store.set_misanswer(true);
        assert!(matches!(
            charge(&idem, &runs, "b", 1).await,
            Err(Error::Store(_))
        ));
        store.set_misanswer(false);
        assert_eq!(charge(&idem, &runs, "b", 1).await.unwrap(), 1);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(counts(&idem.stats()), (1, 1, 0, 0, 1));
    });
}

/// The Redis store's local tier: the first hit comes from Redis (and enters the tier),
/// later ones from the tier; copies, mismatches and counts as through the engine's API;
/// a forget clears the tier.
#[test]
fn redis_local_tier_hits() {
    with_recorder(|metrics| async move {
        let store = RedisHarness::new()
            .fresh_store()
            .await
            .with_local_cache(100);
        let idem = Idempotency::new(store.clone());
        let runs = AtomicU32::new(0);
        assert_eq!(charge(&idem, &runs, "r", 8).await.unwrap(), 8);
        for _ in 0..4 {
            let (v, how) = outcome_of(charge(&idem, &runs, "r", 8)).await;
            assert_eq!((v.unwrap(), how), (8, Some(Outcome::Replayed)));
        }
        assert_eq!(charge_u32(&idem, "r").await.unwrap(), 8);
        assert!(matches!(
            charge_as_text(&idem, "r").await,
            Err(Error::Codec(_))
        ));
        assert!(matches!(
            charge(&idem, &runs, "r", 9).await,
            Err(Error::Mismatch)
        ));
        assert!(matches!(api_u64(&idem, "r", 9).await, Err(Error::Mismatch)));
        assert_eq!(
            api_u64(&idem, "r", 8).await.unwrap(),
            (8, Outcome::Replayed)
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(counts(&idem.stats()), (1, 6, 0, 2, 0));
        let counters = metrics.counters();
        // The engine's API labels its calls `scope = "call"`.
        for (scope, n) in [(SCOPE, 5), ("call", 1)] {
            let replays = (
                m::REPLAYS.into(),
                labels(&[("scope", scope), ("store", "redis")]),
                n,
            );
            assert!(counters.contains(&replays), "{counters:?}");
        }
        assert!(idem.forget(SCOPE, "r").await.unwrap());
        assert_eq!(charge(&idem, &runs, "r", 9).await.unwrap(), 9);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    });
}

/// Hits of a `Clone` value and of one that decodes: the body ran once each, and every
/// hit is a replay, counted with the attribute's scope.
#[test]
fn a_local_hit_replays_once_counted_with_the_attribute_scope() {
    with_recorder(|metrics| async move {
        let idem = Idempotency::memory();
        let runs = AtomicU32::new(0);
        assert_eq!(charge(&idem, &runs, "o-1", 100).await.unwrap(), 100);
        metrics.take();
        for _ in 0..3 {
            assert_eq!(charge(&idem, &runs, "o-1", 100).await.unwrap(), 100);
            assert_eq!(receipt(&idem, &runs, "o-1").await.unwrap(), Receipt(7));
        }
        // The receipt ran once, on its first call; every other call was a hit.
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(counts(&idem.stats()), (2, 5, 0, 0, 0));
        let counters = metrics.counters();
        assert!(
            counters.contains(&(
                m::REPLAYS.into(),
                labels(&[("scope", SCOPE), ("store", "memory")]),
                3
            )),
            "{counters:?}"
        );
    });
}

/// A mismatch on the first hit, before any copy is kept (the record is decoded).
#[test]
fn a_local_hit_with_another_payload_is_refused_as_a_mismatch() {
    with_recorder(|metrics| async move {
        let idem = Idempotency::memory();
        let runs = AtomicU32::new(0);
        charge(&idem, &runs, "o-2", 100).await.unwrap();
        metrics.take();
        let answer = charge(&idem, &runs, "o-2", 999).await;
        assert!(matches!(answer, Err(Error::Mismatch)), "{answer:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(counts(&idem.stats()), (1, 0, 0, 1, 0));
        assert_eq!(
            metrics.counters(),
            vec![(
                m::MISMATCHES.into(),
                labels(&[("scope", SCOPE), ("store", "memory")]),
                1
            )]
        );
    });
}

/// A result stored by another type fails to decode: an error, and no replay counted.
#[test]
fn a_local_result_of_another_type_is_an_error_and_no_replay() {
    block_on(async {
        let idem = Idempotency::memory();
        let runs = AtomicU32::new(0);
        charge(&idem, &runs, "o-3", 100).await.unwrap();
        let answer = charge_as_text(&idem, "o-3").await;
        assert!(matches!(answer, Err(Error::Codec(_))), "{answer:?}");
        assert_eq!(counts(&idem.stats()), (1, 0, 0, 0, 0));
    });
}

/// A local tier that holds a record in progress as if completed is a broken store: the
/// call fails as a store error of the lookup, counted once, and nothing runs.
#[test]
fn a_local_record_in_the_wrong_state_is_one_store_error_of_the_lookup() {
    with_recorder(|metrics| async move {
        let store = FaultyStore::new(MemoryStore::new());
        let idem = Idempotency::new(store.clone());
        let runs = AtomicU32::new(0);
        store.set_misanswer(true);
        let answer = charge(&idem, &runs, "o-4", 100).await;
        assert!(matches!(answer, Err(Error::Store(_))), "{answer:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        assert_eq!(counts(&idem.stats()), (0, 0, 0, 0, 1));
        let counters = metrics.counters();
        let errors: Vec<_> = counters
            .iter()
            .filter(|(name, _, _)| name == m::STORE_ERRORS)
            .collect();
        assert_eq!(errors.len(), 1, "{counters:?}");
        assert!(
            errors[0]
                .1
                .contains(&("operation".to_owned(), "lookup".to_owned())),
            "{counters:?}"
        );
        assert_eq!(errors[0].2, 1, "{counters:?}");
    });
}
