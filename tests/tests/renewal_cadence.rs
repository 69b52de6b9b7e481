//! How a holder spaces its renewals: a third of the lease apart, counted from when each
//! was sent (where the lease it confirms starts), so a store slow to answer does not push
//! every later renewal back, and the lease the store holds stays ahead of the clock by
//! two thirds of a lease however late the answers come.

use std::time::Duration;

use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{Error, Idempotency};
use idempotent_tests::{FaultyStore, Stop};
use tokio::time::Instant;

/// An engine with `lease` on a memory store behind a [`FaultyStore`].
fn engine(lease: Duration) -> (FaultyStore<MemoryStore>, Idempotency) {
    let store = FaultyStore::new(MemoryStore::new());
    let idem = Idempotency::builder()
        .store(store.clone())
        .lease(lease)
        .build()
        .unwrap();
    (store, idem)
}

// Paused time: the store's answer is late by exactly what the test says, and the next
// renewal's send time is read without a scheduler's delay in it.
#[tokio::test(start_paused = true)]
async fn a_renewal_answered_late_does_not_delay_the_next() {
    let lease = Duration::from_secs(3);
    let every = lease / 3;
    // Within the half of a third of the lease the engine waits for a renewal's answer.
    let late = Duration::from_millis(400);
    let (store, idem) = engine(lease);
    let mut first = store.hold(Stop::Renewal);
    let mut second = store.hold(Stop::Renewal);
    let mut third = store.hold(Stop::Renewal);
    let (done, finish) = tokio::sync::oneshot::channel::<()>();
    let call = tokio::spawn(async move {
        idem.call("cadence")
            .scope("renew")
            .run(|| async move {
                let _ = finish.await;
                Ok::<_, Error>(1u32)
            })
            .await
    });
    first.entered().await;
    let sent_first = Instant::now();
    tokio::time::sleep(late).await;
    first.open();
    second.entered().await;
    let sent_second = Instant::now();
    second.open();
    third.entered().await;
    let sent_third = Instant::now();
    third.open();
    let gap = sent_second - sent_first;
    assert!(
        gap >= every && gap < every + late / 4,
        "the renewal after one answered {late:?} late was sent {gap:?} after it, not {every:?}"
    );
    // A prompt answer keeps the same spacing.
    let gap = sent_third - sent_second;
    assert!(gap >= every && gap < every + late / 4, "{gap:?}");
    done.send(()).unwrap();
    assert_eq!(call.await.unwrap().unwrap(), 1);
    assert_eq!(store.renewals(), 3);
}

/// Every renewal asks the store for the whole lease the call runs under: while the
/// operation runs (in the caller's future, or on a task of its own), for a claim whose
/// answer came late, and while a completion the store fails is retried. One that asked for
/// less would let the key lapse under a live holder, and a duplicate run beside it.
#[tokio::test(start_paused = true)]
async fn every_renewal_asks_for_the_whole_lease() {
    let lease = Duration::from_secs(3);
    let (store, idem) = engine(lease);
    let slow = move || async move {
        tokio::time::sleep(lease + lease / 2).await;
        Ok::<_, Error>(1u32)
    };
    let call = |key: &'static str| idem.call(key).scope("renew-length");
    assert_eq!(call("in-caller").run(slow).await.unwrap(), 1);
    assert_eq!(call("on-a-task").run_to_completion(slow).await.unwrap(), 1);
    let while_running = store.renewals();
    assert!(while_running >= 6, "{while_running} renewals");

    // A claim answered after a third of the lease is renewed before the operation runs.
    let mut held = store.hold(Stop::ClaimAnswer);
    let late = {
        let idem = idem.clone();
        tokio::spawn(async move {
            idem.call("late-claim")
                .scope("renew-length")
                .run(|| async { Ok::<_, Error>(1u32) })
                .await
        })
    };
    held.entered().await;
    tokio::time::sleep(lease / 2).await;
    held.open();
    assert_eq!(late.await.unwrap().unwrap(), 1);
    assert!(
        store.renewals() > while_running,
        "the late claim was renewed"
    );

    // A completion that fails is retried in the background, and the claim renewed
    // meanwhile, until the store takes the result.
    store.set_completions_failing(true);
    let before = store.renewals();
    let ran = call("completion-failing").run(|| async { Ok::<_, Error>(7u32) });
    assert_eq!(ran.await.unwrap(), 7, "the caller gets its value");
    tokio::time::sleep(lease).await;
    assert!(
        store.renewals() > before,
        "the claim was renewed while completing"
    );
    store.set_completions_failing(false);
    let replayed = call("completion-failing").run(|| async { Ok::<_, Error>(8u32) });
    assert_eq!(replayed.await.unwrap(), 7, "stored once the store took it");
    let leases = store.renewal_leases();
    assert!(
        leases.iter().all(|l| *l == lease),
        "renewals asked for {leases:?}, not {lease:?} each"
    );
}
