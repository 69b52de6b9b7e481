//! Concurrent duplicates: coalesced, rejected, or mismatched; and leaders that fail,
//! panic, are cancelled or stall never strand their followers nor lock their key.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{Concurrency, Error, Idempotency, Outcome};
use idempotent_tests::FaultyStore;
use tokio::sync::{oneshot, Barrier};
use tokio::time::timeout;

const NO_HANG: Duration = Duration::from_secs(10);

fn counter() -> Arc<AtomicU32> {
    Arc::new(AtomicU32::new(0))
}

/// An operation that counts its runs, waits until `gate` opens, and returns `value`.
fn gated(
    runs: &Arc<AtomicU32>,
    gate: oneshot::Receiver<()>,
    value: u32,
) -> impl FnOnce() -> futures_util::future::BoxFuture<'static, Result<u32, Error>> {
    let runs = runs.clone();
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let _ = gate.await;
            Ok(value)
        })
    }
}

async fn wait_until_in_flight(idem: &Idempotency, n: usize) {
    timeout(NO_HANG, async {
        while idem.in_flight() < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the leader never started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_callers_execute_once_and_claim_once() {
    // No local tier: every call that is not coalesced would reach the store.
    let store = FaultyStore::new(MemoryStore::new()).without_peek();
    let idem = Idempotency::new(store.clone());
    let runs = counter();
    let start = Arc::new(Barrier::new(1000));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (idem, runs, start) = (idem.clone(), runs.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                idem.call("order-1000")
                    .scope("payments")
                    .run_with_outcome(|| async move {
                        let n = runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, Error>(format!("pay_{n}"))
                    })
                    .await
            })
        })
        .collect();
    let mut outcomes = (0, 0, 0);
    for t in tasks {
        let (value, how) = timeout(NO_HANG, t)
            .await
            .expect("no hang")
            .unwrap()
            .unwrap();
        assert_eq!(value, "pay_0");
        match how {
            Outcome::Executed => outcomes.0 += 1,
            Outcome::Coalesced => outcomes.1 += 1,
            Outcome::Replayed => outcomes.2 += 1,
            _ => unreachable!(),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(outcomes, (1, 999, 0), "(executed, coalesced, replayed)");
    assert_eq!(
        store.claims(),
        1,
        "followers wait on the leader, not on the store"
    );
    assert_eq!(idem.stats().coalesced, 999);
    assert_eq!(idem.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_reject_mode_a_duplicate_in_flight_gets_in_progress_at_once() {
    let idem = Idempotency::builder()
        .concurrency(Concurrency::Reject)
        .build()
        .unwrap();
    let runs = counter();
    let (open, gate) = oneshot::channel();
    let leader = {
        let idem = idem.clone();
        let op = gated(&runs, gate, 1);
        tokio::spawn(async move { idem.call("k").scope("s").run(op).await })
    };
    wait_until_in_flight(&idem, 1).await;
    let (_never, gate2) = oneshot::channel();
    let dup = timeout(
        Duration::from_secs(1),
        idem.call("k").scope("s").run(gated(&runs, gate2, 2)),
    )
    .await
    .expect("a rejected duplicate does not wait");
    assert!(matches!(dup, Err(Error::InProgress)), "{dup:?}");
    assert_eq!(idem.stats().rejected, 1);
    open.send(()).unwrap();
    assert_eq!(leader.await.unwrap().unwrap(), 1);
    // Once completed, the same call replays instead of being rejected.
    let (_never, gate3) = oneshot::channel();
    assert_eq!(
        idem.call("k")
            .scope("s")
            .run(gated(&runs, gate3, 3))
            .await
            .unwrap(),
        1
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_on_another_engine_is_rejected_in_reject_mode() {
    let store = MemoryStore::new();
    let a = Idempotency::new(store.clone());
    let b = Idempotency::new(store);
    let runs = counter();
    let (open, gate) = oneshot::channel();
    let leader = {
        let a = a.clone();
        let op = gated(&runs, gate, 1);
        tokio::spawn(async move { a.call("k").scope("s").run(op).await })
    };
    wait_until_in_flight(&a, 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (_never, gate2) = oneshot::channel();
    let dup = b
        .call("k")
        .scope("s")
        .concurrency(Concurrency::Reject)
        .run(gated(&runs, gate2, 2))
        .await;
    assert!(matches!(dup, Err(Error::InProgress)), "{dup:?}");
    open.send(()).unwrap();
    assert_eq!(leader.await.unwrap().unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_reused_with_another_fingerprint_is_refused_after_completion() {
    let idem = Idempotency::memory();
    let runs = counter();
    let (open, gate) = oneshot::channel();
    open.send(()).unwrap();
    let v = idem
        .call("k")
        .scope("s")
        .fingerprint(&("eur", 100))
        .run(gated(&runs, gate, 1))
        .await
        .unwrap();
    assert_eq!(v, 1);
    let (_o, gate) = oneshot::channel();
    let other = idem
        .call("k")
        .scope("s")
        .fingerprint(&("eur", 999))
        .run(gated(&runs, gate, 2))
        .await;
    assert!(matches!(other, Err(Error::Mismatch)), "{other:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(idem.stats().mismatched, 1);
    // The same payload still replays.
    let (_o, gate) = oneshot::channel();
    assert_eq!(
        idem.call("k")
            .scope("s")
            .fingerprint(&("eur", 100))
            .run(gated(&runs, gate, 3))
            .await
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_reused_with_another_fingerprint_is_refused_while_in_flight() {
    let store = MemoryStore::new();
    let idem = Idempotency::new(store.clone());
    let remote = Idempotency::new(store);
    let runs = counter();
    let (open, gate) = oneshot::channel();
    let leader = {
        let idem = idem.clone();
        let op = gated(&runs, gate, 1);
        tokio::spawn(async move { idem.call("k").scope("s").fingerprint("a").run(op).await })
    };
    wait_until_in_flight(&idem, 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for engine in [&idem, &remote] {
        let (_never, gate2) = oneshot::channel();
        let dup = timeout(
            Duration::from_secs(1),
            engine
                .call("k")
                .scope("s")
                .fingerprint("b")
                .run(gated(&runs, gate2, 2)),
        )
        .await
        .expect("a mismatch does not wait");
        assert!(matches!(dup, Err(Error::Mismatch)), "{dup:?}");
    }
    open.send(()).unwrap();
    assert_eq!(leader.await.unwrap().unwrap(), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Spawns `n` waiting followers of key `k` whose own operation returns `value`.
fn followers(
    idem: &Idempotency,
    runs: &Arc<AtomicU32>,
    n: usize,
    value: u32,
) -> Vec<tokio::task::JoinHandle<Result<u32, Error>>> {
    (0..n)
        .map(|_| {
            let idem = idem.clone();
            let runs = runs.clone();
            tokio::spawn(async move {
                idem.call("k")
                    .scope("s")
                    .run(|| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok(value)
                    })
                    .await
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_leader_does_not_strand_followers_or_lock_the_key() {
    let idem = Idempotency::memory();
    let runs = counter();
    let (_never, gate) = oneshot::channel();
    let leader = {
        let idem = idem.clone();
        let op = gated(&runs, gate, 1);
        tokio::spawn(async move { idem.call("k").scope("s").run(op).await })
    };
    wait_until_in_flight(&idem, 1).await;
    let waiting = followers(&idem, &runs, 20, 2);
    tokio::time::sleep(Duration::from_millis(20)).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    for f in waiting {
        let v = timeout(NO_HANG, f)
            .await
            .expect("follower stranded")
            .unwrap()
            .unwrap();
        assert_eq!(v, 2, "one follower took over and the rest share its value");
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the cancelled leader, then one follower"
    );
    assert_eq!(
        idem.call("k")
            .scope("s")
            .run(|| async { Ok::<u32, Error>(3) })
            .await
            .unwrap(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_leader_reaches_its_caller_and_does_not_strand_followers() {
    let idem = Idempotency::memory();
    let runs = counter();
    let (open, gate) = oneshot::channel::<()>();
    let leader = {
        let idem = idem.clone();
        let runs = runs.clone();
        tokio::spawn(async move {
            idem.call("k")
                .scope("s")
                .run(|| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.await;
                    if runs.load(Ordering::SeqCst) > 0 {
                        panic!("payment provider exploded");
                    }
                    Ok::<u32, Error>(1)
                })
                .await
        })
    };
    wait_until_in_flight(&idem, 1).await;
    let waiting = followers(&idem, &runs, 20, 2);
    tokio::time::sleep(Duration::from_millis(20)).await;
    open.send(()).unwrap();
    let err = leader.await.unwrap_err();
    assert!(err.is_panic());
    let msg = err.into_panic();
    assert_eq!(
        msg.downcast_ref::<&str>(),
        Some(&"payment provider exploded")
    );
    for f in waiting {
        assert_eq!(
            timeout(NO_HANG, f)
                .await
                .expect("follower stranded")
                .unwrap()
                .unwrap(),
            2
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_of_a_failed_leader_retry_and_one_runs_at_a_time() {
    let idem = Idempotency::memory();
    let runs = counter();
    let (open, gate) = oneshot::channel::<()>();
    let leader = {
        let idem = idem.clone();
        let runs = runs.clone();
        tokio::spawn(async move {
            idem.call("k")
                .scope("s")
                .run(|| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.await;
                    Err::<u32, Error>(Error::Mismatch)
                })
                .await
        })
    };
    wait_until_in_flight(&idem, 1).await;
    let waiting = followers(&idem, &runs, 10, 2);
    tokio::time::sleep(Duration::from_millis(20)).await;
    open.send(()).unwrap();
    assert!(leader.await.unwrap().is_err());
    for f in waiting {
        assert_eq!(
            timeout(NO_HANG, f)
                .await
                .expect("stranded")
                .unwrap()
                .unwrap(),
            2
        );
    }
    // The failed leader, then one follower whose success the rest share.
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_that_is_never_polled_again_does_not_block_followers_forever() {
    let lease = Duration::from_millis(200);
    let idem = Idempotency::builder().lease(lease).build().unwrap();
    let runs = counter();
    let (_never, gate) = oneshot::channel();
    let mut stalled = Box::pin(idem.call("k").scope("s").run(gated(&runs, gate, 1)));
    // Poll the leader into its body, then keep it alive but never poll it again.
    assert!(timeout(Duration::from_millis(50), &mut stalled)
        .await
        .is_err());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let waiting = followers(&idem, &runs, 5, 2);
    for f in waiting {
        let v = timeout(lease * 10, f)
            .await
            .expect("followers must not wait on a stalled leader forever");
        assert_eq!(v.unwrap().unwrap(), 2);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_fails_while_a_duplicate_waits_gives_it_a_store_error() {
    let store = FaultyStore::new(MemoryStore::new());
    let a = Idempotency::new(store.clone());
    let b = Idempotency::new(store.clone());
    let runs = counter();
    let (open, gate) = oneshot::channel();
    let leader = {
        let a = a.clone();
        let op = gated(&runs, gate, 1);
        tokio::spawn(async move { a.call("k").scope("s").run(op).await })
    };
    wait_until_in_flight(&a, 1).await;
    let dup = {
        let b = b.clone();
        let runs = runs.clone();
        tokio::spawn(async move {
            b.call("k")
                .scope("s")
                .run(|| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<u32, Error>(2)
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    store.set_down(true);
    let r = timeout(NO_HANG, dup).await.expect("no hang").unwrap();
    assert!(matches!(r, Err(Error::Store(_))), "{r:?}");
    store.set_down(false);
    open.send(()).unwrap();
    assert_eq!(leader.await.unwrap().unwrap(), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_of_a_stalled_leader_take_over_even_if_the_one_timing_it_is_cancelled() {
    let lease = Duration::from_millis(200);
    let idem = Idempotency::builder().lease(lease).build().unwrap();
    let runs = counter();
    let (_never, gate) = oneshot::channel();
    let mut stalled = Box::pin(idem.call("k").scope("s").run(gated(&runs, gate, 1)));
    assert!(timeout(Duration::from_millis(50), &mut stalled)
        .await
        .is_err());
    // The first follower times the leader; cancel it before the lease runs out.
    let timing = followers(&idem, &runs, 1, 2).remove(0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let others = followers(&idem, &runs, 5, 3);
    tokio::time::sleep(Duration::from_millis(20)).await;
    timing.abort();
    for f in others {
        let v = timeout(lease * 10, f)
            .await
            .expect("a follower must take the timing over");
        assert_eq!(v.unwrap().unwrap(), 3);
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the stalled leader, then one follower"
    );
    drop(stalled);
}
