//! Outside review of the local hit's `finish` closure (the decoded answer handed straight
//! into the caller's type): everything a hit says besides its value (counts, `outcome_of`,
//! the copy kept for a `Clone` value, errors, spans) must be as before. No subscriber is
//! set here (`local_hit_answers_traced.rs` compares the paths under one).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use idempotent_runtime::store::{Claim, Fence, MemoryStore, Store};
use idempotent_runtime::{
    idempotent, outcome_of, Codec, CodecErrorKind, Error, FencingToken, Fingerprint, Idempotency,
    Outcome, StoreKey, StoredResult,
};
use idempotent_tests::local_hit_fns::{counts, declined_fp, Declined};
use idempotent_tests::{block_on, block_on_threads};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Barrier, Notify};

// ---------------------------------------------------------------------------------------
// Shared types.

/// Another stored error type, which cannot decode `Declined::Card`.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Other {
    Code(u64),
    Engine(String),
}

impl From<Error> for Other {
    fn from(e: Error) -> Self {
        Other::Engine(format!("{e:?}"))
    }
}

/// Not `Clone`: its hits decode.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Receipt(u64);

// ---------------------------------------------------------------------------------------
// 1. Stored errors (`cache_errors = true`) answered by a local hit, for a `Clone` value
//    (copier) and one that decodes (none); readers that cannot decode the stored error.

#[idempotent(key = k, store = idem, scope = "rf.err", cache_errors = true)]
async fn declined_clone(idem: &Idempotency, runs: &AtomicU32, k: &str) -> Result<u32, Declined> {
    runs.fetch_add(1, Ordering::SeqCst);
    Err(Declined::Card)
}

#[idempotent(key = k, store = idem, scope = "rf.err", cache_errors = true)]
async fn declined_receipt(
    idem: &Idempotency,
    runs: &AtomicU32,
    k: &str,
) -> Result<Receipt, Declined> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(Receipt(1))
}

/// Does not store errors, so cannot read a stored one.
#[idempotent(key = k, store = idem, scope = "rf.err")]
async fn discarding(idem: &Idempotency, runs: &AtomicU32, k: &str) -> Result<u32, Declined> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(1)
}

/// Stores errors of another type.
#[idempotent(key = k, store = idem, scope = "rf.err", cache_errors = true)]
async fn other_error(idem: &Idempotency, runs: &AtomicU32, k: &str) -> Result<u32, Other> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(1)
}

#[test]
fn stored_errors_on_local_hits_count_and_report_as_before() {
    block_on(async {
        let idem = Idempotency::memory();
        let runs = AtomicU32::new(0);
        let (first, how) = outcome_of(declined_clone(&idem, &runs, "e")).await;
        assert_eq!((first, how), (Err(Declined::Card), Some(Outcome::Executed)));
        for _ in 0..3 {
            // A replayed error reports nothing (documented limit of `outcome_of`).
            let (again, how) = outcome_of(declined_clone(&idem, &runs, "e")).await;
            assert_eq!((again, how), (Err(Declined::Card), None));
            let (again, how) = outcome_of(declined_receipt(&idem, &runs, "e")).await;
            assert_eq!((again, how), (Err(Declined::Card), None));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(counts(&idem.stats()), (1, 6, 0, 0, 0));

        // Readers that cannot decode the stored error: an engine error, nothing counted,
        // nothing reported, nothing run.
        let (d, how) = outcome_of(discarding(&idem, &runs, "e")).await;
        let d = d.unwrap_err();
        assert!(d.engine().starts_with("Codec("), "{d:?}");
        assert_eq!(how, None);
        let (o, how) = outcome_of(other_error(&idem, &runs, "e")).await;
        match o {
            Err(Other::Engine(s)) => assert!(s.starts_with("Codec("), "{s}"),
            o => panic!("{o:?}"),
        }
        assert_eq!(how, None);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(counts(&idem.stats()), (1, 6, 0, 0, 0));

        // The engine's API reads the same record alike.
        let api = idem
            .call("e")
            .scope("rf.err")
            .store_errors()
            .run_with_outcome(|| async { Ok::<u32, Declined>(0) })
            .await;
        assert_eq!(api, Err(Declined::Card));
        let api = idem
            .call("e")
            .scope("rf.err")
            .run_with_outcome(|| async { Ok::<u32, Declined>(0) })
            .await;
        assert_eq!(
            api.unwrap_err().engine(),
            discarding(&idem, &runs, "e").await.unwrap_err().engine()
        );
        assert_eq!(counts(&idem.stats()), (1, 7, 0, 0, 0));
    });
}

/// A stored error under another payload is refused as a mismatch (counted once, no
/// replay, no outcome); under its own payload, replayed.
#[test]
fn a_stored_error_with_another_payload_is_a_mismatch() {
    block_on(async {
        let idem = Idempotency::memory();
        let runs = AtomicU32::new(0);
        assert_eq!(declined_fp(&idem, &runs, "m", 1).await, Err(Declined::Card));
        let (bad, how) = outcome_of(declined_fp(&idem, &runs, "m", 2)).await;
        assert_eq!((bad.unwrap_err().engine(), how), ("Mismatch", None));
        assert_eq!(counts(&idem.stats()), (1, 0, 0, 1, 0));
        let (again, how) = outcome_of(declined_fp(&idem, &runs, "m", 1)).await;
        assert_eq!((again, how), (Err(Declined::Card), None));
        assert_eq!(counts(&idem.stats()), (1, 1, 0, 1, 0));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

// ---------------------------------------------------------------------------------------
// 2. Records planted in the store: markers, bad bytes, another codec's, stored errors
//    made of markers. Each answers the attribute's local hit and the engine's API alike:
//    the same error, nothing run, counted or reported; a `Clone` caller keeps no copy.

const PLANTED: &str = "rf.planted";

async fn plant(store: &MemoryStore, key: &str, result: StoredResult, fp: Option<u64>) {
    let k = StoreKey::new(PLANTED, key, 255).unwrap();
    let token = FencingToken::mint();
    let fp = fp.map(|v| Fingerprint::of(&v).unwrap());
    let claim = store.claim(&k, token, fp, Duration::from_secs(60)).await;
    assert_eq!(claim.unwrap(), Claim::Acquired);
    let fence = store
        .complete(&k, token, result, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(fence, Fence::Held);
}

static PLANTED_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = k, store = idem, scope = "rf.planted")]
async fn planted_u64(idem: &Idempotency, k: &str) -> Result<u64, Error> {
    PLANTED_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(1)
}

#[idempotent(key = k, store = idem, scope = "rf.planted")]
async fn planted_receipt(idem: &Idempotency, k: &str) -> Result<Receipt, Error> {
    PLANTED_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(Receipt(1))
}

#[idempotent(key = k, store = idem, scope = "rf.planted", cache_errors = true)]
async fn planted_err(idem: &Idempotency, k: &str) -> Result<u64, Declined> {
    PLANTED_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(1)
}

async fn api_planted(idem: &Idempotency, k: &str) -> Result<(u64, Outcome), Error> {
    idem.call(k)
        .scope(PLANTED)
        .run_with_outcome(|| async { Ok::<u64, Error>(1) })
        .await
}

fn kind(r: &Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(Error::Codec(e)) => format!("codec {:?}", e.kind()),
        Err(Error::TransactionEnded) => "transaction ended".into(),
        other => format!("{other:?}"),
    }
}

#[test]
fn planted_records_answer_local_hits_as_the_request_does() {
    block_on(async {
        let store = MemoryStore::new();
        let idem = Idempotency::new(store.clone());
        let ok = |b: &'static [u8]| StoredResult::Ok(bytes::Bytes::from_static(b));
        let err = |b: &'static [u8]| StoredResult::Err(bytes::Bytes::from_static(b));
        plant(&store, "t", ok(b"T"), None).await;
        plant(&store, "u", ok(b"U"), None).await;
        plant(&store, "d", ok(b"J{"), None).await;
        plant(&store, "p", ok(b"P\x05"), None).await;
        plant(&store, "et", err(b"T"), None).await;
        plant(&store, "eu", err(b"U"), None).await;
        plant(&store, "ed", err(b"J{"), None).await;
        plant(&store, "good", ok(b"J5"), None).await;
        plant(&store, "good-err", err(b"\"Card\""), None).await;
        plant(&store, "good-err-j", err(b"J\"Card\""), None).await;

        let want = [
            ("t", "transaction ended"),
            ("u", "codec Unstorable"),
            ("d", "codec Decode"),
            ("p", "codec WrongCodec"),
        ];
        for _ in 0..2 {
            for (key, expected) in want {
                let (a, how) = outcome_of(planted_u64(&idem, key)).await;
                assert_eq!((kind(&a), how), (expected.to_owned(), None), "{key}");
                let (b, how) = outcome_of(planted_receipt(&idem, key)).await;
                assert_eq!((kind(&b), how), (expected.to_owned(), None), "{key}");
                assert_eq!(kind(&api_planted(&idem, key).await), expected, "{key}");
            }
        }
        assert_eq!(counts(&idem.stats()), (0, 0, 0, 0, 0));
        // Stored errors that are markers or bad bytes, read with and without a policy
        // that stores errors.
        for key in ["et", "eu", "ed", "good-err"] {
            let (a, how) = outcome_of(planted_err(&idem, key)).await;
            let (b, how_b) = outcome_of(planted_u64(&idem, key)).await;
            let c = api_planted(&idem, key).await;
            let d = idem
                .call(key)
                .scope(PLANTED)
                .store_errors()
                .run_with_outcome(|| async { Ok::<u64, Declined>(1) })
                .await;
            assert_eq!((how, how_b), (None, None), "{key}");
            assert_eq!(kind(&b), kind(&c), "{key}");
            assert_eq!(a, d.map(|(v, _)| v), "{key}");
            let a = a.unwrap_err();
            match key {
                "et" => assert_eq!(a.engine(), "TransactionEnded"),
                "eu" => assert!(a.engine().contains("Unstorable"), "{a:?}"),
                // No tag: another codec's (WrongCodec).
                "good-err" => assert!(a.engine().contains("WrongCodec"), "{a:?}"),
                _ => assert!(a.engine().contains("Decode"), "{a:?}"),
            }
        }
        assert_eq!(counts(&idem.stats()), (0, 0, 0, 0, 0));
        // A stored error that decodes is a replay on each path.
        let (a, how) = outcome_of(planted_err(&idem, "good-err-j")).await;
        assert_eq!((a, how), (Err(Declined::Card), None));
        assert_eq!(counts(&idem.stats()), (0, 1, 0, 0, 0));
        // And a good record replays, with an outcome.
        let (a, how) = outcome_of(planted_u64(&idem, "good")).await;
        assert_eq!((a.unwrap(), how), (5, Some(Outcome::Replayed)));
        let (b, how) = outcome_of(planted_receipt(&idem, "good")).await;
        assert_eq!((b.unwrap(), how), (Receipt(5), Some(Outcome::Replayed)));
        assert_eq!(
            api_planted(&idem, "good").await.unwrap(),
            (5, Outcome::Replayed)
        );
        assert_eq!(counts(&idem.stats()), (0, 4, 0, 0, 0));
        assert_eq!(PLANTED_RUNS.load(Ordering::SeqCst), 0);
    });
}

// ---------------------------------------------------------------------------------------
// 3. The copy kept for a `Clone` value: only on an `Ok` answer, only when none is kept,
//    never from another codec's bytes, never on a mismatch.

/// A `{ id: u32 }` whose clones and decodes are counted in two statics of its own.
macro_rules! counted_type {
    ($name:ident, clones: $clones:ident, decodes: $decodes:ident) => {
        static $clones: AtomicU32 = AtomicU32::new(0);
        static $decodes: AtomicU32 = AtomicU32::new(0);

        #[derive(Debug, PartialEq, Serialize)]
        struct $name {
            id: u32,
        }

        impl Clone for $name {
            fn clone(&self) -> Self {
                $clones.fetch_add(1, Ordering::SeqCst);
                $name { id: self.id }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                struct Raw {
                    id: u32,
                }
                let raw = Raw::deserialize(d)?;
                $decodes.fetch_add(1, Ordering::SeqCst);
                Ok($name { id: raw.id })
            }
        }
    };
}

counted_type!(Counted, clones: COUNTED_CLONES, decodes: COUNTED_DECODES);

fn dc() -> (u32, u32) {
    (
        COUNTED_DECODES.load(Ordering::SeqCst),
        COUNTED_CLONES.load(Ordering::SeqCst),
    )
}

#[idempotent(key = k, store = idem, scope = "rf.counted", fingerprint = cents)]
async fn counted(idem: &Idempotency, k: &str, cents: u64) -> Result<Counted, Error> {
    Ok(Counted { id: cents as u32 })
}

/// One test for the counted type (its counters are process-wide).
#[test]
fn copies_are_kept_once_for_ok_answers_of_this_codec_only() {
    block_on(async {
        let store = MemoryStore::new();
        let json = Idempotency::new(store.clone());
        let post = Idempotency::builder()
            .store(store.clone())
            .codec(Codec::Postcard)
            .build()
            .unwrap();

        // A Postcard record read by the JSON engine: refused, nothing decoded or kept.
        counted(&post, "p", 1).await.unwrap();
        let base = dc();
        for _ in 0..2 {
            let (r, how) = outcome_of(counted(&json, "p", 1)).await;
            assert!(
                matches!(&r, Err(Error::Codec(e)) if e.kind() == CodecErrorKind::WrongCodec),
                "{r:?}"
            );
            assert_eq!(how, None);
        }
        assert_eq!(dc(), base, "no decode, no copy for another codec's bytes");
        // A mismatch before any copy: refused, nothing decoded or kept.
        let (r, how) = outcome_of(counted(&post, "p", 2)).await;
        assert!(matches!(r, Err(Error::Mismatch)), "{r:?}");
        assert_eq!(how, None);
        assert_eq!(dc(), base, "a mismatch decodes nothing and keeps no copy");
        // The first good hit decodes and keeps a copy (one clone); later ones clone it.
        let (r, how) = outcome_of(counted(&post, "p", 1)).await;
        assert_eq!(
            (r.unwrap(), how),
            (Counted { id: 1 }, Some(Outcome::Replayed))
        );
        assert_eq!(dc(), (base.0 + 1, base.1 + 1));
        for i in 0..3 {
            let (r, how) = outcome_of(counted(&post, "p", 1)).await;
            assert_eq!(
                (r.unwrap(), how),
                (Counted { id: 1 }, Some(Outcome::Replayed))
            );
            assert_eq!(dc(), (base.0 + 1, base.1 + 2 + i));
        }
        // With a copy kept: the JSON engine is still refused, and neither takes nor
        // replaces the copy.
        let before = dc();
        let r = counted(&json, "p", 1).await;
        assert!(matches!(r, Err(Error::Codec(_))), "{r:?}");
        assert_eq!(dc(), before);
        // A mismatch after the copy is kept: refused before the copy is cloned.
        let (r, how) = outcome_of(counted(&post, "p", 2)).await;
        assert!(matches!(r, Err(Error::Mismatch)), "{r:?}");
        assert_eq!(how, None);
        let after_mismatch = dc();
        assert_eq!(after_mismatch, before, "a mismatch clones nothing");
        // The copy is still the one kept: one clone a hit, no decode.
        let r = counted(&post, "p", 1).await.unwrap();
        assert_eq!(r, Counted { id: 1 });
        assert_eq!(dc(), (after_mismatch.0, after_mismatch.1 + 1));
        assert_eq!(counts(&post.stats()), (1, 5, 0, 2, 0));
        assert_eq!(counts(&json.stats()), (0, 0, 0, 0, 0));

        // A JSON record, first read by the Postcard engine (no copy), then by JSON.
        counted(&json, "j", 3).await.unwrap();
        let base = dc();
        assert!(matches!(counted(&post, "j", 3).await, Err(Error::Codec(_))));
        assert_eq!(dc(), base);
        assert_eq!(counted(&json, "j", 3).await.unwrap(), Counted { id: 3 });
        assert_eq!(dc(), (base.0 + 1, base.1 + 1));
        assert_eq!(counted(&json, "j", 3).await.unwrap(), Counted { id: 3 });
        assert_eq!(dc(), (base.0 + 1, base.1 + 2));
        assert!(matches!(counted(&post, "j", 3).await, Err(Error::Codec(_))));
        assert_eq!(dc(), (base.0 + 1, base.1 + 2));
        assert_eq!(counts(&json.stats()), (1, 2, 0, 0, 0));
        assert_eq!(counts(&post.stats()), (1, 5, 0, 2, 0));
    });
}

// ---------------------------------------------------------------------------------------
// 4. `outcome_of` over blocks of several calls and nested calls.

static NEST_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = k, store = idem, scope = "rf.leaf", fingerprint = cents)]
async fn leaf(idem: &Idempotency, k: &str, cents: u64) -> Result<u64, Error> {
    NEST_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(cents)
}

#[idempotent(key = k, store = idem, scope = "rf.leaf")]
async fn leaf_receipt(idem: &Idempotency, k: &str) -> Result<Receipt, Error> {
    NEST_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(Receipt(0))
}

#[idempotent(key = k, store = idem, scope = "rf.leaf")]
async fn leaf_text(idem: &Idempotency, k: &str) -> Result<String, Error> {
    Ok(String::new())
}

#[idempotent(key = k, store = idem, scope = "rf.leaf-err", cache_errors = true)]
async fn leaf_err(idem: &Idempotency, k: &str) -> Result<u64, Declined> {
    Err(Declined::Card)
}

/// Its body makes a local hit of `leaf` (and a mismatching one).
#[idempotent(key = k, store = idem, scope = "rf.outer")]
async fn outer(idem: &Idempotency, k: &str) -> Result<u64, Error> {
    let _ = leaf(idem, "a", 999).await;
    let v = leaf(idem, "a", 1).await?;
    let _ = leaf_text(idem, "a").await;
    Ok(v + 100)
}

/// Its body opens a block of its own around a local hit, and returns what it reported.
#[idempotent(key = k, store = idem, scope = "rf.outer2")]
async fn outer_block(idem: &Idempotency, k: &str) -> Result<String, Error> {
    let (v, how) = outcome_of(leaf(idem, "a", 1)).await;
    v?;
    Ok(format!("{how:?}"))
}

#[test]
fn outcome_of_blocks_and_nested_calls_with_local_hits() {
    block_on(async {
        let idem = Idempotency::memory();
        assert_eq!(leaf(&idem, "a", 1).await.unwrap(), 1);
        assert_eq!(leaf_err(&idem, "a").await, Err(Declined::Card));
        // Twice, so that the second round hits the copy kept by the first.
        for _ in 0..2 {
            let (v, how) = outcome_of(async {
                let a = leaf(&idem, "a", 1).await.unwrap();
                let b = leaf_receipt(&idem, "a").await.unwrap();
                (a, b)
            })
            .await;
            // A newtype decodes from the same JSON: a hit of its own.
            assert_eq!((v, how), ((1, Receipt(1)), Some(Outcome::Replayed)));
            // The first call's refusal speaks for the block: nothing.
            let (v, how) = outcome_of(async {
                let bad = leaf(&idem, "a", 2).await;
                (bad.is_err(), leaf(&idem, "a", 1).await.unwrap())
            })
            .await;
            assert_eq!((v, how), ((true, 1), None));
            let (v, how) = outcome_of(async {
                let bad = leaf_text(&idem, "a").await;
                (bad.is_err(), leaf(&idem, "a", 1).await.unwrap())
            })
            .await;
            assert_eq!((v, how), ((true, 1), None));
            let (v, how) = outcome_of(async {
                let e = leaf_err(&idem, "a").await;
                (e, leaf(&idem, "a", 1).await.unwrap())
            })
            .await;
            assert_eq!((v, how), ((Err(Declined::Card), 1), None));
            // A block inside a block takes the call; the outer one reports nothing.
            let ((v, inner), how) = outcome_of(outcome_of(leaf(&idem, "a", 1))).await;
            assert_eq!((v.unwrap(), inner, how), (1, Some(Outcome::Replayed), None));
        }
        // An outer call that runs, with local hits (one refused, one undecodable) in
        // its body: executed. Its own hit: replayed.
        let (v, how) = outcome_of(outer(&idem, "o")).await;
        assert_eq!((v.unwrap(), how), (101, Some(Outcome::Executed)));
        let (v, how) = outcome_of(outer(&idem, "o")).await;
        assert_eq!((v.unwrap(), how), (101, Some(Outcome::Replayed)));
        // A block in a body that runs: its hit reports to it, the outer call executed.
        let (v, how) = outcome_of(outer_block(&idem, "o")).await;
        assert_eq!(
            (v.unwrap(), how),
            ("Some(Replayed)".to_owned(), Some(Outcome::Executed))
        );
        let (v, how) = outcome_of(outer_block(&idem, "o")).await;
        assert_eq!(
            (v.unwrap(), how),
            ("Some(Replayed)".to_owned(), Some(Outcome::Replayed))
        );
        assert_eq!(NEST_RUNS.load(Ordering::SeqCst), 1);
        let s = idem.stats();
        // leaf 1 + leaf_err 1 + outer 1 + outer_block 1 executions.
        assert_eq!(s.executed, 4, "{s:?}");
        // Per round: leaf x4 + leaf_receipt + leaf_err + leaf (inner block) = 7, 14 in
        // all; outer's body: 1 hit; outer's replay: 1; outer_block: its body's inner
        // hit, then its own replay (its body did not run).
        assert_eq!(s.replayed, 14 + 1 + 1 + 1 + 1, "{s:?}");
        // Per round 1; outer's body 1.
        assert_eq!(s.mismatched, 3, "{s:?}");
    });
}

// ---------------------------------------------------------------------------------------
// 5. A hit that panics (a `Clone` or `Deserialize` of the caller's) gives the block's slot
//    back, as before: a retry in the same block reports; counts as before.

static PANIC_CLONE: AtomicBool = AtomicBool::new(false);
static PANIC_DECODE: AtomicBool = AtomicBool::new(false);

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Touchy(u64);

impl Clone for Touchy {
    fn clone(&self) -> Self {
        if PANIC_CLONE.load(Ordering::SeqCst) {
            panic!("clone refused");
        }
        Touchy(self.0)
    }
}

#[derive(Debug, PartialEq, Serialize)]
struct Fragile(u64);

impl<'de> Deserialize<'de> for Fragile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        if PANIC_DECODE.load(Ordering::SeqCst) {
            panic!("decode refused");
        }
        Ok(Fragile(v))
    }
}

#[idempotent(key = k, store = idem, scope = "rf.touchy")]
async fn touchy(idem: &Idempotency, k: &str) -> Result<Touchy, Error> {
    Ok(Touchy(4))
}

#[idempotent(key = k, store = idem, scope = "rf.fragile")]
async fn fragile(idem: &Idempotency, k: &str) -> Result<Fragile, Error> {
    Ok(Fragile(6))
}

/// In one `outcome_of` block: `call` with `flag` set, which must panic, then `call`
/// again with it cleared. The second call's answer, and what the block reports.
async fn panics_then_answers<T, Fut>(
    flag: &AtomicBool,
    call: impl Fn() -> Fut,
) -> (Result<T, Error>, Option<Outcome>)
where
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    flag.store(true, Ordering::SeqCst);
    outcome_of(async {
        let first = AssertUnwindSafe(call()).catch_unwind().await;
        assert!(first.is_err(), "the call panicked");
        flag.store(false, Ordering::SeqCst);
        call().await
    })
    .await
}

#[test]
fn a_panicking_hit_gives_the_block_back() {
    block_on(async {
        let idem = Idempotency::memory();
        assert_eq!(touchy(&idem, "k").await.unwrap(), Touchy(4));
        assert_eq!(fragile(&idem, "k").await.unwrap(), Fragile(6));
        let base = idem.stats().replayed;

        // The first hit's copy (keep_copy's clone) panics.
        let (v, how) = panics_then_answers(&PANIC_CLONE, || touchy(&idem, "k")).await;
        assert_eq!((v.unwrap(), how), (Touchy(4), Some(Outcome::Replayed)));
        // The panicking hit was counted before its copy was made, as before.
        assert_eq!(idem.stats().replayed, base + 2);
        // A copy is kept now: a hit's clone of it panics, before anything is counted.
        let (v, how) = panics_then_answers(&PANIC_CLONE, || touchy(&idem, "k")).await;
        assert_eq!((v.unwrap(), how), (Touchy(4), Some(Outcome::Replayed)));
        assert_eq!(idem.stats().replayed, base + 3);

        // A decode that panics.
        let (v, how) = panics_then_answers(&PANIC_DECODE, || fragile(&idem, "k")).await;
        assert_eq!((v.unwrap(), how), (Fragile(6), Some(Outcome::Replayed)));
        assert_eq!(idem.stats().replayed, base + 4);
        assert_eq!(idem.stats().executed, 2);
    });
}

// ---------------------------------------------------------------------------------------
// 6. A call cancelled while its body runs (`on_cancel = "finish"`), then a retry in the
//    same block answered by a local hit: the retry reports.

#[idempotent(key = k, store = idem, scope = "rf.finish", on_cancel = "finish")]
async fn finishing(
    idem: &Idempotency,
    k: u32,
    gate: Arc<Notify>,
    entered: mpsc::UnboundedSender<()>,
) -> Result<u64, Error> {
    let opened = gate.notified();
    let _ = entered.send(());
    opened.await;
    Ok(77)
}

/// The same record, through the attribute's local hit (`run`, not `run_to_completion`).
#[idempotent(key = k, store = idem, scope = "rf.finish")]
async fn finished(idem: &Idempotency, k: u32) -> Result<u64, Error> {
    Ok(0)
}

#[test]
fn a_retry_after_a_cancelled_call_in_the_same_block_reports_its_hit() {
    block_on_threads(2, async {
        let idem = Idempotency::memory();
        for (k, through_run) in [(1u32, true), (2, false)] {
            let gate = Arc::new(Notify::new());
            let (tx, mut entered) = mpsc::unbounded_channel();
            let (v, how) = outcome_of(async {
                {
                    let mut call = Box::pin(finishing(&idem, k, gate.clone(), tx.clone()));
                    tokio::select! {
                        _ = &mut call => panic!("the body waits on its gate"),
                        _ = entered.recv() => {}
                    }
                    // Dropped while its body runs on a task of its own.
                }
                gate.notify_one();
                // The body's completion lands in the background.
                loop {
                    let rec = idem.record("rf.finish", k).await.unwrap();
                    if rec.is_some_and(|r| r.is_completed()) {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                if through_run {
                    finished(&idem, k).await
                } else {
                    finishing(&idem, k, gate.clone(), tx.clone()).await
                }
            })
            .await;
            assert_eq!((v.unwrap(), how), (77, Some(Outcome::Replayed)));
        }
        assert_eq!(counts(&idem.stats()), (2, 2, 0, 0, 0));
    });
}

// ---------------------------------------------------------------------------------------
// 7. Many callers on a multi-threaded runtime, released at once on a completed key: every
//    hit replays and reports, every mismatch is refused and reports nothing, a stored
//    error replays and reports nothing; counts add up exactly.

static CONC_RUNS: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Big {
    id: u64,
    body: Vec<u64>,
}

#[idempotent(key = k, store = idem, scope = "rf.conc", fingerprint = cents)]
async fn conc_clone(idem: &Idempotency, k: u32, cents: u64) -> Result<Big, Error> {
    CONC_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(Big {
        id: cents,
        body: (0..256).collect(),
    })
}

#[idempotent(key = k, store = idem, scope = "rf.conc")]
async fn conc_receipt(idem: &Idempotency, k: u32) -> Result<Receipt, Error> {
    Ok(Receipt(0))
}

#[idempotent(key = k, store = idem, scope = "rf.conc-err", cache_errors = true)]
async fn conc_err(idem: &Idempotency, k: u32) -> Result<Big, Declined> {
    CONC_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(Declined::Card)
}

#[test]
fn many_callers_hit_report_and_count_exactly() {
    block_on_threads(4, async {
        let idem = Arc::new(Idempotency::memory());
        for k in 0..5u32 {
            conc_clone(&idem, k, 1).await.unwrap();
            assert_eq!(conc_err(&idem, k).await, Err(Declined::Card));
        }
        let callers = 48usize;
        let barrier = Arc::new(Barrier::new(callers));
        let mut tasks = Vec::new();
        for i in 0..callers {
            let (idem, barrier) = (idem.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let mut seen = (0u32, 0u32, 0u32, 0u32);
                for round in 0..20u32 {
                    let k = (i as u32 + round) % 5;
                    match (i + round as usize) % 4 {
                        0 | 1 => {
                            let (v, how) = outcome_of(conc_clone(&idem, k, 1)).await;
                            let v = v.unwrap();
                            assert_eq!(
                                (v.id, v.body.len(), how),
                                (1, 256, Some(Outcome::Replayed))
                            );
                            seen.0 += 1;
                        }
                        2 => {
                            let (v, how) = outcome_of(conc_clone(&idem, k, 2)).await;
                            assert!(matches!(v, Err(Error::Mismatch)), "{v:?}");
                            assert_eq!(how, None);
                            seen.1 += 1;
                        }
                        _ => {
                            let (v, how) = outcome_of(conc_err(&idem, k)).await;
                            assert_eq!((v, how), (Err(Declined::Card), None));
                            let (r, how) = outcome_of(conc_receipt(&idem, k)).await;
                            assert!(matches!(r, Err(Error::Codec(_))), "{r:?}");
                            assert_eq!(how, None);
                            seen.2 += 1;
                            seen.3 += 1;
                        }
                    }
                    tokio::task::yield_now().await;
                }
                seen
            }));
        }
        let mut total = (0u64, 0u64, 0u64);
        for t in tasks {
            let (hits, mismatches, errs, _) = t.await.unwrap();
            total.0 += hits as u64;
            total.1 += mismatches as u64;
            total.2 += errs as u64;
        }
        assert_eq!(CONC_RUNS.load(Ordering::SeqCst), 10);
        let s = idem.stats();
        assert_eq!(
            counts(&s),
            (10, total.0 + total.2, 0, total.1, 0),
            "{s:?} {total:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------
// 8. The Redis store's local tier: stored errors, copies and mismatches, as in memory.

static REDIS_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = k, store = idem, scope = "rf.redis", fingerprint = cents)]
async fn redis_parcel(idem: &Idempotency, k: &str, cents: u64) -> Result<Big, Error> {
    REDIS_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(Big {
        id: cents,
        body: vec![cents; 8],
    })
}

#[idempotent(key = k, store = idem, scope = "rf.redis")]
async fn redis_text(idem: &Idempotency, k: &str) -> Result<String, Error> {
    Ok(String::new())
}

#[idempotent(key = k, store = idem, scope = "rf.redis-err", cache_errors = true)]
async fn redis_declined(idem: &Idempotency, k: &str) -> Result<Big, Declined> {
    REDIS_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(Declined::Card)
}

#[test]
fn redis_local_tier_answers_errors_copies_and_mismatches_as_before() {
    block_on(async {
        let store = idempotent_tests::RedisHarness::new()
            .fresh_store()
            .await
            .with_local_cache(100);
        let idem = Idempotency::new(store.clone());
        let want = Big {
            id: 3,
            body: vec![3; 8],
        };
        let (v, how) = outcome_of(redis_parcel(&idem, "r", 3)).await;
        assert_eq!((v.unwrap(), how), (want.clone(), Some(Outcome::Executed)));
        // Before a copy, after it: mismatches refused, hits replayed; an undecodable
        // read in between changes nothing.
        for _ in 0..3 {
            let (v, how) = outcome_of(redis_parcel(&idem, "r", 4)).await;
            assert!(matches!(v, Err(Error::Mismatch)), "{v:?}");
            assert_eq!(how, None);
            let (v, how) = outcome_of(redis_text(&idem, "r")).await;
            assert!(matches!(v, Err(Error::Codec(_))), "{v:?}");
            assert_eq!(how, None);
            let (v, how) = outcome_of(redis_parcel(&idem, "r", 3)).await;
            assert_eq!((v.unwrap(), how), (want.clone(), Some(Outcome::Replayed)));
        }
        let (e, how) = outcome_of(redis_declined(&idem, "e")).await;
        assert_eq!((e, how), (Err(Declined::Card), Some(Outcome::Executed)));
        for _ in 0..3 {
            let (e, how) = outcome_of(redis_declined(&idem, "e")).await;
            assert_eq!((e, how), (Err(Declined::Card), None));
        }
        assert_eq!(REDIS_RUNS.load(Ordering::SeqCst), 2);
        assert_eq!(counts(&idem.stats()), (2, 6, 0, 3, 0));
    });
}

// ---------------------------------------------------------------------------------------
// 9. A copy of one type kept: a caller of another `Clone` type on the key decodes on
//    every hit and makes no copy of its own (one would only be refused by the store).

static FIRST_CLONES: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FirstType {
    id: u32,
}

impl Clone for FirstType {
    fn clone(&self) -> Self {
        FIRST_CLONES.fetch_add(1, Ordering::SeqCst);
        FirstType { id: self.id }
    }
}

// Decodes the same JSON as `FirstType`.
counted_type!(OtherType, clones: OTHER_CLONES, decodes: OTHER_DECODES);

#[idempotent(key = k, store = idem, scope = "rf.two-types")]
async fn first_type(idem: &Idempotency, k: &str) -> Result<FirstType, Error> {
    Ok(FirstType { id: 5 })
}

#[idempotent(key = k, store = idem, scope = "rf.two-types")]
async fn other_type(idem: &Idempotency, k: &str) -> Result<OtherType, Error> {
    Ok(OtherType { id: 6 })
}

#[test]
fn a_caller_of_another_type_makes_no_copy_beside_a_kept_one() {
    block_on(async {
        let idem = Idempotency::memory();
        assert_eq!(first_type(&idem, "k").await.unwrap(), FirstType { id: 5 });
        // The first hit keeps a copy of FirstType.
        assert_eq!(first_type(&idem, "k").await.unwrap(), FirstType { id: 5 });
        let first = FIRST_CLONES.load(Ordering::SeqCst);
        for i in 1..=3 {
            let (v, how) = outcome_of(other_type(&idem, "k")).await;
            assert_eq!(
                (v.unwrap(), how),
                (OtherType { id: 5 }, Some(Outcome::Replayed))
            );
            assert_eq!(OTHER_DECODES.load(Ordering::SeqCst), i, "decodes every hit");
            assert_eq!(OTHER_CLONES.load(Ordering::SeqCst), 0, "and copies nothing");
        }
        assert_eq!(FIRST_CLONES.load(Ordering::SeqCst), first);
        // FirstType's copy is still there: one clone a hit.
        assert_eq!(first_type(&idem, "k").await.unwrap(), FirstType { id: 5 });
        assert_eq!(FIRST_CLONES.load(Ordering::SeqCst), first + 1);
        assert_eq!(counts(&idem.stats()), (1, 5, 0, 0, 0));
    });
}
