//! The attribute's calls answered before their request is built (no `tracing`
//! subscriber takes INFO) and by the request's own path (one does): the same answers,
//! bodies run and counts. A binary of its own, so that no other test's calls run while
//! its subscriber is set.

use std::sync::atomic::{AtomicU32, Ordering};

use idempotent_runtime::{idempotent, Error, Idempotency, Stats};
use idempotent_tests::block_on;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt as _;

#[idempotent(key = order, store = idem, scope = "local-hits", fingerprint = cents)]
async fn charge(
    idem: &Idempotency,
    runs: &AtomicU32,
    order: &str,
    cents: u64,
) -> Result<u64, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(cents)
}

/// The same scope and key as [`charge`], read as another type.
#[idempotent(key = order, store = idem, scope = "local-hits")]
async fn charge_as_text(idem: &Idempotency, order: &str) -> Result<String, Error> {
    Ok(order.to_owned())
}

/// Not `Clone`: its hits decode the stored bytes rather than clone a kept copy.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Receipt(u64);

#[idempotent(key = order, store = idem, scope = "local-hits-receipts")]
async fn receipt(idem: &Idempotency, runs: &AtomicU32, order: &str) -> Result<Receipt, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(Receipt(7))
}

fn counts(s: &Stats) -> (u64, u64, u64, u64) {
    (s.executed, s.replayed, s.mismatched, s.store_errors)
}

/// The same calls, once answered before their request (no subscriber) and once by the
/// request's own path (a subscriber at INFO): the same answers, bodies run and counts.
#[test]
fn both_paths_give_the_same_answers_and_counts() {
    let script = || async {
        let idem = Idempotency::memory();
        let runs = AtomicU32::new(0);
        let mut answers = Vec::new();
        for (order, cents) in [("a", 1), ("a", 1), ("a", 2), ("b", 3), ("a", 1), ("b", 3)] {
            answers.push(format!("{:?}", charge(&idem, &runs, order, cents).await));
        }
        answers.push(format!("{:?}", charge_as_text(&idem, "a").await));
        for _ in 0..2 {
            answers.push(format!("{:?}", receipt(&idem, &runs, "r").await));
        }
        (answers, runs.load(Ordering::SeqCst), counts(&idem.stats()))
    };
    let quiet = block_on(script());
    let subscriber = tracing_subscriber::registry().with(LevelFilter::INFO);
    let observed = tracing::subscriber::with_default(subscriber, || block_on(script()));
    assert_eq!(quiet, observed);
    assert_eq!(quiet.1, 3, "{quiet:?}");
    assert_eq!(quiet.2, (3, 4, 1, 0), "{quiet:?}");
}
