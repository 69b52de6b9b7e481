//! Outside review of the local hit's `finish` closure, under subscribers: stored errors,
//! undecodable records (another type, a marker), mismatches before and after a copy is
//! kept, answered with no subscriber (the attribute's local hit), under a filter for
//! another crate, and under `idempotent_runtime=debug` (the request's path): the same
//! answers, outcomes and counts, and each call's span says how it ended. One test, in a
//! binary of its own: its subscribers raise the global level.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idempotent_runtime::store::{MemoryStore, Store};
use idempotent_runtime::{
    idempotent, outcome_of, Error, FencingToken, Idempotency, StoreKey, StoredResult,
};
use idempotent_tests::block_on;
use idempotent_tests::captured_spans::alike_under_subscribers;
use idempotent_tests::local_hit_fns::{counts, Declined};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Parcel {
    id: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Receipt(u64);

#[idempotent(key = k, store = idem, scope = "rft", fingerprint = cents)]
async fn parcel(
    idem: &Idempotency,
    runs: &AtomicU32,
    k: &str,
    cents: u64,
) -> Result<Parcel, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(Parcel { id: cents })
}

#[idempotent(key = k, store = idem, scope = "rft")]
async fn as_text(idem: &Idempotency, k: &str) -> Result<String, Error> {
    Ok(String::new())
}

#[idempotent(key = k, store = idem, scope = "rft")]
async fn receipt(idem: &Idempotency, runs: &AtomicU32, k: &str) -> Result<Receipt, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(Receipt(0))
}

#[idempotent(key = k, store = idem, scope = "rft.err", cache_errors = true)]
async fn declined(idem: &Idempotency, runs: &AtomicU32, k: &str) -> Result<Parcel, Declined> {
    runs.fetch_add(1, Ordering::SeqCst);
    Err(Declined::Card)
}

#[idempotent(key = k, store = idem, scope = "rft.err")]
async fn discarding(idem: &Idempotency, runs: &AtomicU32, k: &str) -> Result<Receipt, Declined> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(Receipt(0))
}

async fn plant(store: &MemoryStore, scope: &str, key: &str, bytes: &'static [u8]) {
    let k = StoreKey::new(scope, key, 255).unwrap();
    let token = FencingToken::mint();
    store
        .claim(&k, token, None, Duration::from_secs(60))
        .await
        .unwrap();
    let ok = StoredResult::Ok(bytes::Bytes::from_static(bytes));
    let _ = store
        .complete(&k, token, ok, Duration::from_secs(600))
        .await
        .unwrap();
}

async fn script() -> (Vec<String>, u32, (u64, u64, u64, u64, u64)) {
    let store = MemoryStore::new();
    let idem = Idempotency::new(store.clone());
    plant(&store, "rft", "marker", b"U").await;
    plant(&store, "rft", "ended", b"T").await;
    let runs = AtomicU32::new(0);
    let mut answers = Vec::new();
    macro_rules! note {
        ($call:expr) => {
            answers.push(format!("{:?}", outcome_of($call).await))
        };
    }
    note!(parcel(&idem, &runs, "a", 1)); // executed
    note!(parcel(&idem, &runs, "a", 2)); // mismatch before a copy
    note!(as_text(&idem, "a")); // undecodable
    note!(parcel(&idem, &runs, "a", 1)); // decodes, keeps a copy
    note!(parcel(&idem, &runs, "a", 1)); // clones the copy
    note!(parcel(&idem, &runs, "a", 2)); // mismatch after the copy
    note!(receipt(&idem, &runs, "a")); // another type, which cannot decode it
    note!(parcel(&idem, &runs, "marker", 1)); // a marker
    note!(parcel(&idem, &runs, "ended", 1)); // a marker
    note!(receipt(&idem, &runs, "marker"));
    note!(declined(&idem, &runs, "e")); // executed, error stored
    note!(declined(&idem, &runs, "e")); // replayed error
    note!(declined(&idem, &runs, "e"));
    note!(discarding(&idem, &runs, "e")); // cannot read a stored error
    note!(parcel(&idem, &runs, "a", 1));
    let s = idem.stats();
    (answers, runs.load(Ordering::SeqCst), counts(&s))
}

#[test]
fn subscribers_change_nothing_but_spans_on_errors_and_markers() {
    let (quiet, ours) = alike_under_subscribers(|| block_on(script()));
    assert_eq!(quiet.1, 2, "{quiet:?}");
    assert_eq!(quiet.2, (2, 5, 0, 2, 0), "{quiet:?}");

    let outcomes: Vec<String> = ours
        .calls()
        .iter()
        .map(|s| s.field("outcome").unwrap_or("-").to_owned())
        .collect();
    let want = [
        "executed",
        "mismatch",
        "undecodable",
        "replayed",
        "replayed",
        "mismatch",
        "undecodable",
        "undecodable",
        "undecodable",
        "undecodable",
        "executed",
        "replayed",
        "replayed",
        "undecodable",
        "replayed",
    ];
    assert_eq!(outcomes, want, "{quiet:?}");
}
