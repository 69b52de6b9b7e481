//! The memory store at capacity: claims in progress are never evicted (a full store
//! refuses a new claim instead), fresh results are kept and the least recently used leave
//! first, and every eviction before its TTL is counted and logged.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::clock::ManualClock;
use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{Concurrency, Error, Idempotency, Outcome, StoreErrorKind};
use tokio::sync::{Barrier, Semaphore};

const CAPACITY: u64 = 100;

fn full_store() -> MemoryStore {
    MemoryStore::builder().capacity(CAPACITY).build()
}

/// Completes `n` keys named `fill-{i}` on `idem`.
async fn fill(idem: &Idempotency, n: u32) {
    for i in 0..n {
        let v: u32 = idem
            .call(format!("fill-{i}"))
            .scope("full")
            .run(|| async move { Ok::<_, Error>(i) })
            .await
            .expect("fill");
        assert_eq!(v, i);
    }
}

/// `n` operations in flight on `idem`, keys `busy-0..n` in scope `full`, each counted in
/// `runs` once inside its body; they return their index once `Busy::finish` lets them.
struct Busy {
    // Permits, not a notification: a body that reaches the gate after it opened still
    // passes.
    gate: Arc<Semaphore>,
    running: Vec<tokio::task::JoinHandle<Result<u32, Error>>>,
}

impl Busy {
    async fn start(idem: &Idempotency, n: u32, runs: &Arc<AtomicU32>) -> Self {
        let gate = Arc::new(Semaphore::new(0));
        let started = Arc::new(Barrier::new(n as usize + 1));
        let running = (0..n)
            .map(|i| {
                let (idem, gate, runs, started) =
                    (idem.clone(), gate.clone(), runs.clone(), started.clone());
                tokio::spawn(async move {
                    idem.call(format!("busy-{i}"))
                        .scope("full")
                        .run(|| async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            started.wait().await;
                            let _ = gate.acquire().await;
                            Ok::<_, Error>(i)
                        })
                        .await
                })
            })
            .collect();
        // Every body is inside: every claim is held.
        started.wait().await;
        Self { gate, running }
    }

    /// Lets the operations finish; each returned its own index.
    async fn finish(self) {
        self.gate.add_permits(self.running.len());
        for (i, t) in self.running.into_iter().enumerate() {
            assert_eq!(t.await.expect("task").expect("call"), i as u32);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_in_progress_survive_a_flood_of_results() {
    let store = full_store();
    let holder = Idempotency::new(store.clone());
    let other = Idempotency::new(store.clone());
    let runs = Arc::new(AtomicU32::new(0));
    // Half the store's room in operations in flight; the other half serves the flood.
    let busy = CAPACITY as u32 / 2;
    let running = Busy::start(&holder, busy, &runs).await;
    // Ten times the capacity in results passes through while they run.
    fill(&other, 10 * CAPACITY as u32).await;
    store.run_pending_tasks();
    // Every claim still holds: a duplicate from the other engine is refused, never run.
    for i in 0..busy {
        let dup = other
            .call(format!("busy-{i}"))
            .scope("full")
            .concurrency(Concurrency::Reject)
            .run(|| async { Ok::<_, Error>(u32::MAX) })
            .await;
        assert!(matches!(dup, Err(Error::InProgress)), "busy-{i}: {dup:?}");
    }
    running.finish().await;
    assert_eq!(runs.load(Ordering::SeqCst), busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_store_refuses_a_new_claim_and_runs_nothing() {
    let store = full_store();
    let idem = Idempotency::new(store.clone());
    let running = Busy::start(&idem, CAPACITY as u32, &Arc::default()).await;
    let ran = Arc::new(AtomicU32::new(0));
    let one_more = {
        let ran = ran.clone();
        idem.call("one-more")
            .scope("full")
            .run(|| async move {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(0u32)
            })
            .await
    };
    match one_more {
        Err(Error::Store(e)) => assert_eq!(e.kind(), StoreErrorKind::Full),
        other => panic!("expected a full store, got {other:?}"),
    }
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "nothing runs without a claim"
    );
    running.finish().await;
    // With the claims finished there is room again.
    assert!(idem
        .call("one-more")
        .scope("full")
        .run(|| async { Ok::<_, Error>(1u32) })
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fresh_results_are_kept_and_the_least_recently_used_leave_first() {
    let store = full_store();
    let idem = Idempotency::new(store.clone());
    let runs = Arc::new(AtomicU32::new(0));
    let call = |key: String| {
        let runs = runs.clone();
        idem.call(key)
            .scope("full")
            .run_with_outcome(move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(0u32)
            })
    };
    // Keys arrive, each retried at once, many times the capacity: the retry of a key
    // whose first call just ran is always a replay (moka's default admission filter
    // would refuse most fresh keys into a full cache, and run their retries again).
    for i in 0..20 * CAPACITY {
        let key = format!("k{i}");
        assert_eq!(call(key.clone()).await.expect("first").1, Outcome::Executed);
        store.run_pending_tasks();
        assert_eq!(
            call(key).await.expect("retry").1,
            Outcome::Replayed,
            "k{i} was dropped as it arrived"
        );
    }
    // The oldest are gone, least recently used first, and each eviction was counted.
    store.run_pending_tasks();
    let evicted = idem.stats().evicted;
    assert!(
        evicted >= 19 * CAPACITY,
        "{evicted} evictions for {} keys in a store of {CAPACITY}",
        20 * CAPACITY
    );
    assert_eq!(call("k0".into()).await.expect("k0").1, Outcome::Executed);
    let newest = format!("k{}", 20 * CAPACITY - 1);
    assert_eq!(call(newest).await.expect("newest").1, Outcome::Replayed);
}

/// Two engines on one store, as two services in a process would be, each key called on
/// both at once while results flood the store. A key may run again once its result was
/// evicted (the store is full, and says so in `evicted`), but never while it runs: its
/// claim is never evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engines_on_a_full_store_never_run_a_key_twice_at_once() {
    // Room for the 50 claims and the fills' own claims; the results overflow it.
    let store = MemoryStore::builder().capacity(2 * CAPACITY).build();
    let engines = [
        Idempotency::new(store.clone()),
        Idempotency::new(store.clone()),
    ];
    let running: Arc<Vec<AtomicU32>> = Arc::new((0..50).map(|_| AtomicU32::new(0)).collect());
    let overlaps = Arc::new(AtomicU32::new(0));
    let start = Arc::new(Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let (idem, start) = (engines[i % 2].clone(), start.clone());
            let (running, overlaps) = (running.clone(), overlaps.clone());
            let filler = engines[(i + 1) % 2].clone();
            tokio::spawn(async move {
                start.wait().await;
                let key = i / 2;
                idem.call(key)
                    .scope("full.two")
                    .run(|| async move {
                        if running[key].fetch_add(1, Ordering::SeqCst) > 0 {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        // Results flood the store while the body runs.
                        fill(&filler, 2 * CAPACITY as u32).await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        running[key].fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Error>(key)
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.expect("task").is_ok());
    }
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "a key ran on both engines at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_of_a_claim_in_progress_is_in_progress_even_when_full() {
    const CAPACITY: u64 = 4;
    let store = MemoryStore::builder().capacity(CAPACITY).build();
    let (holder, other) = (
        Idempotency::new(store.clone()),
        Idempotency::new(store.clone()),
    );
    let running = Busy::start(&holder, CAPACITY as u32, &Arc::default()).await;
    let dup = other
        .call("busy-0")
        .scope("full")
        .concurrency(Concurrency::Reject)
        .run(|| async { Ok::<_, Error>(u32::MAX) })
        .await;
    running.finish().await;
    assert!(
        matches!(dup, Err(Error::InProgress)),
        "a duplicate of a key in progress got {dup:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_clock_decides_when_results_expire() {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build();
    let idem = Idempotency::builder()
        .store(store.clone())
        .ttl(Duration::from_millis(200))
        .build()
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let op = |runs: Arc<AtomicU32>| {
        move || async move { Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst) + 1) }
    };
    assert_eq!(
        idem.call("k")
            .scope("edge.clock")
            .run(op(runs.clone()))
            .await
            .unwrap(),
        1
    );
    // The store's clock has not moved: the result is within its TTL. Bounded wait for
    // moka to drop it anyway (a correct store keeps it, and this wait times out).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        store.run_pending_tasks();
        if store.entry_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = idem
        .call("k")
        .scope("edge.clock")
        .run_with_outcome(op(runs.clone()))
        .await;
    assert!(
        matches!(again, Ok((1, Outcome::Replayed))),
        "the store's clock never moved, yet the result expired: {again:?} (evicted = {})",
        idem.stats().evicted
    );
}
