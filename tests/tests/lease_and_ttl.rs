//! Leases, fencing and TTLs, on a manual clock: fast and deterministic.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::clock::ManualClock;
use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{Error, Idempotency, Outcome};
use tokio::sync::oneshot;

fn engines(clock: &ManualClock, n: usize) -> Vec<Idempotency> {
    let store = MemoryStore::builder().clock(clock.clone()).build();
    (0..n).map(|_| Idempotency::new(store.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_past_its_lease_cannot_overwrite_the_new_holders_result() {
    let clock = ManualClock::new();
    let e = engines(&clock, 3);
    let (resume, gate) = oneshot::channel::<()>();
    let (entered_tx, entered) = oneshot::channel::<()>();
    let slow = {
        let a = e[0].clone();
        tokio::spawn(async move {
            a.call("k")
                .scope("s")
                .run_with_outcome(|| async move {
                    let _ = entered_tx.send(());
                    let _ = gate.await;
                    Ok::<_, Error>("from the stalled holder".to_owned())
                })
                .await
        })
    };
    entered.await.unwrap();
    // The holder's process is frozen for longer than a lease: no renewal reaches the store.
    clock.advance(idempotent_runtime::DEFAULT_LEASE + Duration::from_secs(1));
    let (v, how) = e[1]
        .call("k")
        .scope("s")
        .run_with_outcome(|| async { Ok::<_, Error>("from the new holder".to_owned()) })
        .await
        .unwrap();
    assert_eq!(
        (v.as_str(), how),
        ("from the new holder", Outcome::Executed)
    );
    resume.send(()).unwrap();
    // The stalled holder ran, so its caller gets its own value; it is not stored.
    let (v, how) = slow.await.unwrap().unwrap();
    assert_eq!(
        (v.as_str(), how),
        ("from the stalled holder", Outcome::Executed)
    );
    assert_eq!(e[0].stats().lease_lost, 1);
    let replay: String = e[2]
        .call("k")
        .scope("s")
        .run(|| async { Ok::<_, Error>("third".to_owned()) })
        .await
        .unwrap();
    assert_eq!(replay, "from the new holder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_ttl_a_key_behaves_as_new() {
    let clock = ManualClock::new();
    let idem = &engines(&clock, 1)[0];
    let runs = Arc::new(AtomicU32::new(0));
    let call = |ttl: Duration| {
        let runs = runs.clone();
        idem.call("k")
            .scope("s")
            .ttl(ttl)
            .run_with_outcome(
                move || async move { Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst)) },
            )
    };
    let hour = Duration::from_secs(3600);
    assert_eq!(call(hour).await.unwrap(), (0, Outcome::Executed));
    clock.advance(hour - Duration::from_secs(1));
    assert_eq!(call(hour).await.unwrap(), (0, Outcome::Replayed));
    clock.advance(Duration::from_secs(2));
    assert_eq!(call(hour).await.unwrap(), (1, Outcome::Executed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_ttl_is_a_day() {
    let clock = ManualClock::new();
    let idem = &engines(&clock, 1)[0];
    let runs = Arc::new(AtomicU32::new(0));
    let call = || {
        let runs = runs.clone();
        idem.call("k")
            .scope("s")
            .run(move || async move { Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst)) })
    };
    assert_eq!(call().await.unwrap(), 0);
    clock.advance(Duration::from_secs(24 * 3600 - 60));
    assert_eq!(call().await.unwrap(), 0);
    clock.advance(Duration::from_secs(120));
    assert_eq!(call().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_is_bounded() {
    let store = MemoryStore::builder().capacity(100).build();
    let idem = Idempotency::new(store.clone());
    for i in 0..1_000u32 {
        let _: u32 = idem
            .call(i)
            .scope("s")
            .run(|| async move { Ok::<_, Error>(i) })
            .await
            .unwrap();
    }
    store.run_pending_tasks();
    assert!(
        store.entry_count() <= 100,
        "{} entries kept",
        store.entry_count()
    );
    assert!(store.entry_count() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_entries_expire_one_by_one() {
    let store = MemoryStore::new();
    let idem = Idempotency::new(store.clone());
    let short = Duration::from_millis(50);
    let _: u32 = idem
        .call("short")
        .scope("s")
        .ttl(short)
        .run(|| async { Ok::<_, Error>(1) })
        .await
        .unwrap();
    let _: u32 = idem
        .call("long")
        .scope("s")
        .run(|| async { Ok::<_, Error>(2) })
        .await
        .unwrap();
    store.run_pending_tasks();
    assert_eq!(store.entry_count(), 2);
    // moka's timer wheel evicts in ticks of about a second; wait for it, boundedly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.entry_count() > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(short).await;
        store.run_pending_tasks();
    }
    assert_eq!(
        store.entry_count(),
        1,
        "the short-lived entry left, the other stayed"
    );
    let (v, how) = idem
        .call("long")
        .scope("s")
        .run_with_outcome(|| async { Ok::<_, Error>(3u32) })
        .await
        .unwrap();
    assert_eq!((v, how), (2, Outcome::Replayed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_system_clock_a_result_is_not_replayed_after_its_ttl() {
    // The hit path of the default store trusts moka's per-entry expiry; check it holds.
    let idem = Idempotency::memory();
    let ttl = Duration::from_millis(40);
    let call = |v: u32| {
        idem.call("k")
            .scope("s")
            .ttl(ttl)
            .run_with_outcome(move || async move { Ok::<_, Error>(v) })
    };
    assert_eq!(call(1).await.unwrap(), (1, Outcome::Executed));
    assert_eq!(call(2).await.unwrap(), (1, Outcome::Replayed));
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(call(3).await.unwrap(), (3, Outcome::Executed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_shorter_than_a_third_of_its_lease_is_never_renewed() {
    let store = idempotent_tests::FaultyStore::new(MemoryStore::new());
    let lease = Duration::from_millis(300);
    let idem = Idempotency::builder()
        .store(store.clone())
        .lease(lease)
        .build()
        .unwrap();
    let body = |d: Duration| {
        move || async move {
            tokio::time::sleep(d).await;
            Ok::<u32, Error>(1)
        }
    };
    idem.call("short")
        .scope("s")
        .run(body(lease / 3 - Duration::from_millis(40)))
        .await
        .unwrap();
    assert_eq!(store.renewals(), 0);
    idem.call("long")
        .scope("s")
        .run(body(lease + Duration::from_millis(50)))
        .await
        .unwrap();
    // Every third of the lease while it runs: at 100, 200 and 300 ms (a late timer on a
    // busy machine may push the last past the body's end).
    assert!(
        (2..=3).contains(&store.renewals()),
        "{} renewals",
        store.renewals()
    );
}
