//! The attribute's local hit, answered from the call as it stands, before its request is
//! built (when no `tracing` subscriber takes INFO): it must answer, count and refuse
//! exactly as the request's own path does, which a subscriber at INFO takes instead.
//!
//! No test here sets a subscriber (`local_hits_traced.rs` compares both paths).

use std::sync::atomic::{AtomicU32, Ordering};

use idempotent_runtime::metrics as m;
use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{idempotent, Error, Idempotency, Stats};
use idempotent_tests::recorded_metrics::{labels, with_recorder};
use idempotent_tests::{block_on, FaultyStore};

const SCOPE: &str = "local-hits";

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
        assert_eq!(counts(&idem.stats()), (2, 5, 0, 0));
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
        assert_eq!(counts(&idem.stats()), (1, 0, 1, 0));
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

#[test]
fn a_local_result_of_another_type_is_an_error_and_no_replay() {
    block_on(async {
        let idem = Idempotency::memory();
        let runs = AtomicU32::new(0);
        charge(&idem, &runs, "o-3", 100).await.unwrap();
        let answer = charge_as_text(&idem, "o-3").await;
        assert!(matches!(answer, Err(Error::Codec(_))), "{answer:?}");
        assert_eq!(counts(&idem.stats()), (1, 0, 0, 0));
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
        assert_eq!(counts(&idem.stats()), (0, 0, 0, 1));
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
