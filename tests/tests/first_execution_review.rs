//! An outside review of the first-execution changes: attacks on the lazily made wake
//! channel, the first-wins landing, take-over, and the memory store's claim. Two of them
//! (a claim of a completed key holding a place, so that a new key beside it found the
//! store full) failed on the first version and pass now; the rest held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempotent_runtime::clock::ManualClock;
use idempotent_runtime::store::{Claim, Fence, MemoryStore, Store};
use idempotent_runtime::{
    Error, FencingToken, Idempotency, Outcome, StoreErrorKind, StoreKey, StoredResult,
};
use idempotent_tests::FaultyStore;
use tokio::sync::{oneshot, Barrier, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::timeout;

const NO_HANG: Duration = Duration::from_secs(20);

fn counter() -> Arc<AtomicU32> {
    Arc::new(AtomicU32::new(0))
}

/// A small deterministic generator for "random" points of cancellation.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below.max(1)
    }
}

async fn yields(n: u64) {
    for _ in 0..n {
        tokio::task::yield_now().await;
    }
}

async fn joined<T>(h: JoinHandle<T>, what: &str) -> T {
    timeout(NO_HANG, h)
        .await
        .unwrap_or_else(|_| panic!("hang: {what}"))
        .unwrap_or_else(|e| panic!("{what}: task failed: {e}"))
}

/// A caller of key `key` whose operation counts its run and returns `value`.
fn caller(
    idem: &Idempotency,
    key: String,
    runs: &Arc<AtomicU32>,
    value: u32,
) -> JoinHandle<Result<(u32, Outcome), Error>> {
    let (idem, runs) = (idem.clone(), runs.clone());
    tokio::spawn(async move {
        idem.call(key)
            .scope("review")
            .run_with_outcome(|| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(value)
            })
            .await
    })
}

// ---------------------------------------------------------------------------------------
// 1. Followers joining at every point relative to the landing.
// ---------------------------------------------------------------------------------------

/// Followers joining before the channel exists (while the leader runs), at the very
/// moment the leader lands (released by the same barrier as the gate), and after the
/// landing: all get the leader's value, the key runs once. No local tier, so the late
/// ones go through the flight map and the store's claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_joining_at_every_point_around_the_landing_get_the_leaders_value() {
    let store = FaultyStore::new(MemoryStore::new()).without_peek();
    let idem = Idempotency::new(store.clone());
    for i in 0..300u32 {
        let key = format!("around-{i}");
        let runs = counter();
        let (open, gate) = oneshot::channel::<()>();
        let (started_tx, started) = oneshot::channel::<()>();
        let leader = {
            let (idem, runs, key) = (idem.clone(), runs.clone(), key.clone());
            tokio::spawn(async move {
                idem.call(key)
                    .scope("review")
                    .run_with_outcome(|| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = started_tx.send(());
                        let _ = gate.await;
                        Ok::<_, Error>(i)
                    })
                    .await
            })
        };
        timeout(NO_HANG, started)
            .await
            .expect("leader started")
            .unwrap();
        // Before: some iterations have none, so the racing ones make the channel.
        let early: Vec<_> = (0..(i % 3))
            .map(|_| caller(&idem, key.clone(), &runs, u32::MAX))
            .collect();
        // Racing: released together with the gate.
        let racers = 6;
        let barrier = Arc::new(Barrier::new(racers + 1));
        let racing: Vec<_> = (0..racers)
            .map(|_| {
                let (idem, runs, key, barrier) =
                    (idem.clone(), runs.clone(), key.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    idem.call(key)
                        .scope("review")
                        .run_with_outcome(|| async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, Error>(u32::MAX)
                        })
                        .await
                })
            })
            .collect();
        barrier.wait().await;
        open.send(()).unwrap();
        let (v, how) = joined(leader, "leader").await.expect("leader ok");
        assert_eq!((v, how), (i, Outcome::Executed));
        let late: Vec<_> = (0..3)
            .map(|_| caller(&idem, key.clone(), &runs, u32::MAX))
            .collect();
        for (n, f) in early.into_iter().chain(racing).chain(late).enumerate() {
            let (v, _) = joined(f, &format!("iteration {i} follower {n}"))
                .await
                .expect("follower ok");
            assert_eq!(v, i, "iteration {i} follower {n} got another value");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "iteration {i} ran twice");
    }
    assert_eq!(idem.in_flight(), 0);
}

/// 1,000 concurrent callers of one key, over ten rounds, with an operation that only
/// yields (so its landing races the joining): one run and one value per round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_callers_over_ten_rounds_run_once_each_round() {
    let store = FaultyStore::new(MemoryStore::new()).without_peek();
    let idem = Idempotency::new(store.clone());
    for round in 0..10u32 {
        let runs = counter();
        let start = Arc::new(Barrier::new(1000));
        let tasks: Vec<_> = (0..1000u32)
            .map(|n| {
                let (idem, runs, start) = (idem.clone(), runs.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    idem.call(format!("thousand-{round}"))
                        .scope("review")
                        .run_with_outcome(|| async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            yields(u64::from(n % 7)).await;
                            Ok::<_, Error>(n)
                        })
                        .await
                })
            })
            .collect();
        let mut values = Vec::new();
        for t in tasks {
            values.push(joined(t, "caller").await.expect("ok").0);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "round {round}");
        assert!(
            values.iter().all(|v| *v == values[0]),
            "round {round}: different values"
        );
    }
    assert_eq!(idem.in_flight(), 0);
}

// ---------------------------------------------------------------------------------------
// 2. Cancellation of followers and leaders at each await.
// ---------------------------------------------------------------------------------------

/// Followers dropped at "random" points (the first one, which made the channel,
/// included) before and around the landing: the rest get the leader's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_cancelled_at_every_point_do_not_strand_the_rest() {
    let idem = Idempotency::new(FaultyStore::new(MemoryStore::new()).without_peek());
    let mut rng = Lcg(7);
    for i in 0..200u32 {
        let key = format!("cancel-f-{i}");
        let runs = counter();
        let gate = Arc::new(Semaphore::new(0));
        let (started_tx, started) = oneshot::channel::<()>();
        let leader = {
            let (idem, runs, key, gate) = (idem.clone(), runs.clone(), key.clone(), gate.clone());
            tokio::spawn(async move {
                idem.call(key)
                    .scope("review")
                    .run(|| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = started_tx.send(());
                        let _ = gate.acquire().await;
                        Ok::<_, Error>(i)
                    })
                    .await
            })
        };
        timeout(NO_HANG, started).await.unwrap().unwrap();
        let mut followers: Vec<_> = (0..10)
            .map(|_| caller(&idem, key.clone(), &runs, u32::MAX))
            .collect();
        // Drop some at varied points: before they subscribe, while they wait, as the
        // gate opens.
        let mut dropped = Vec::new();
        for (n, f) in followers.iter().enumerate() {
            if n == 0 || rng.next(2) == 0 {
                yields(rng.next(4)).await;
                f.abort();
                dropped.push(n);
            }
        }
        yields(rng.next(3)).await;
        gate.add_permits(1);
        assert_eq!(joined(leader, "leader").await.unwrap(), i);
        for (n, f) in followers.drain(..).enumerate() {
            match timeout(NO_HANG, f).await.expect("follower hangs") {
                Ok(r) => assert_eq!(r.unwrap().0, i, "iteration {i} follower {n}"),
                Err(e) => assert!(e.is_cancelled() && dropped.contains(&n)),
            }
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "iteration {i}");
    }
    assert_eq!(idem.in_flight(), 0);
}

/// A leader cancelled or panicking while followers join concurrently (released by the
/// same barrier): every follower gets a value, all the same one, and exactly one
/// follower runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cancelled_or_panicking_as_followers_join_strands_none() {
    let idem = Idempotency::new(FaultyStore::new(MemoryStore::new()).without_peek());
    for i in 0..200u32 {
        let key = format!("cancel-l-{i}");
        let panics = i % 2 == 0;
        let runs = counter();
        let gate = Arc::new(Notify::new());
        let (started_tx, started) = oneshot::channel::<()>();
        let leader = {
            let (idem, runs, key, gate) = (idem.clone(), runs.clone(), key.clone(), gate.clone());
            tokio::spawn(async move {
                idem.call(key)
                    .scope("review")
                    .run(|| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = started_tx.send(());
                        gate.notified().await;
                        if panics {
                            panic!("leader panics");
                        }
                        Ok::<_, Error>(u32::MAX)
                    })
                    .await
            })
        };
        timeout(NO_HANG, started).await.unwrap().unwrap();
        let barrier = Arc::new(Barrier::new(9));
        let followers: Vec<_> = (0..8u32)
            .map(|n| {
                let (idem, runs, key, barrier) =
                    (idem.clone(), runs.clone(), key.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    yields(u64::from(n % 3)).await;
                    idem.call(key)
                        .scope("review")
                        .run(|| async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, Error>(n)
                        })
                        .await
                })
            })
            .collect();
        barrier.wait().await;
        if panics {
            gate.notify_one();
            let e = timeout(NO_HANG, leader).await.unwrap().unwrap_err();
            assert!(e.is_panic());
        } else {
            leader.abort();
            let e = timeout(NO_HANG, leader).await.unwrap().unwrap_err();
            assert!(e.is_cancelled());
        }
        let mut values = Vec::new();
        for f in followers {
            values.push(joined(f, "follower").await.expect("follower ok"));
        }
        assert!(values.iter().all(|v| *v == values[0]), "{values:?}");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "iteration {i}: leader, then one follower"
        );
    }
    assert_eq!(idem.in_flight(), 0);
}

// ---------------------------------------------------------------------------------------
// 3. Stalled leaders: the timing role, its hand-over, and take-over.
// ---------------------------------------------------------------------------------------

const LEASE: Duration = Duration::from_millis(200);

fn leased() -> Idempotency {
    Idempotency::builder().lease(LEASE).build().unwrap()
}

/// A leader polled into its body and then never polled again.
async fn stall<'a>(
    idem: &'a Idempotency,
    key: &str,
    runs: &Arc<AtomicU32>,
    gate: Arc<Semaphore>,
    value: u32,
) -> std::pin::Pin<Box<impl std::future::Future<Output = Result<(u32, Outcome), Error>> + 'a>> {
    let runs = runs.clone();
    let mut stalled = Box::pin(idem.call(key.to_owned()).scope("review").run_with_outcome(
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let _ = gate.acquire().await;
            Ok::<_, Error>(value)
        },
    ));
    assert!(timeout(Duration::from_millis(50), &mut stalled)
        .await
        .is_err());
    stalled
}

/// The only follower times the stalled leader and is cancelled; no follower waits at
/// that moment. A follower that arrives later takes the role (it reads the flag; the
/// channel was made by the cancelled one) and takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lone_timing_follower_cancelled_then_a_later_one_takes_over() {
    let idem = leased();
    let runs = counter();
    let stalled = stall(&idem, "lone", &runs, Arc::new(Semaphore::new(0)), 1).await;
    let first = caller(&idem, "lone".into(), &runs, 2);
    tokio::time::sleep(LEASE / 2).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    let later = caller(&idem, "lone".into(), &runs, 3);
    let (v, how) = timeout(LEASE * 10, later)
        .await
        .expect("the later follower must take the timing over")
        .unwrap()
        .unwrap();
    assert_eq!((v, how), (3, Outcome::Executed));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    drop(stalled);
}

/// The timing role is handed over again and again: every follower of a stalled leader is
/// cancelled in turn, one every 3/4 lease (each in time to stop the one timing before it
/// takes over), until two remain; they finish, with one run among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_timing_role_survives_a_chain_of_cancelled_timers() {
    let idem = leased();
    let runs = counter();
    let stalled = stall(&idem, "chain", &runs, Arc::new(Semaphore::new(0)), 1).await;
    let mut all: Vec<_> = (0..8)
        .map(|n| caller(&idem, "chain".into(), &runs, 100 + n))
        .collect();
    while all.len() > 2 {
        tokio::time::sleep(LEASE * 3 / 4).await;
        // Whichever is timing, cancel the oldest (it most likely took the role first).
        let f = all.remove(0);
        f.abort();
        let _ = f.await;
    }
    let mut values = Vec::new();
    for f in all {
        let r = timeout(LEASE * 20, f).await.expect("stranded").unwrap();
        values.push(r.expect("ok").0);
    }
    assert_eq!(values[0], values[1]);
    assert!(runs.load(Ordering::SeqCst) >= 2);
    // One of the remaining followers, or one cancelled earlier mid-run, took over; a run
    // per take-over at most (the stalled leader, then a follower).
    assert!(
        runs.load(Ordering::SeqCst) <= 3,
        "runs = {}",
        runs.load(Ordering::SeqCst)
    );
    drop(stalled);
}

/// A follower takes over a stalled leader (its flight is replaced; the old one lands
/// Retry), more followers join the new flight, then the stalled leader is polled again
/// and finishes (its completion is refused; its late landing on the old flight is moot).
/// Everyone but the old leader gets the new leader's value; two runs in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn take_over_while_followers_wait_and_the_stalled_leader_comes_back() {
    let store = MemoryStore::new();
    let idem = Idempotency::builder()
        .store(store.clone())
        .lease(LEASE)
        .build()
        .unwrap();
    let runs = counter();
    let old_gate = Arc::new(Semaphore::new(0));
    let mut stalled = stall(&idem, "taken", &runs, old_gate.clone(), 1).await;
    let new_gate = Arc::new(Semaphore::new(0));
    let spawn_follower = |value: u32| {
        let (idem, runs, gate) = (idem.clone(), runs.clone(), new_gate.clone());
        tokio::spawn(async move {
            idem.call("taken")
                .scope("review")
                .run_with_outcome(|| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.acquire().await;
                    Ok::<_, Error>(value)
                })
                .await
        })
    };
    let mut followers: Vec<_> = (0..10).map(|n| spawn_follower(10 + n)).collect();
    // Wait until one of them took over and runs.
    timeout(LEASE * 20, async {
        while runs.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a follower takes over");
    followers.extend((0..5).map(|n| spawn_follower(50 + n)));
    tokio::time::sleep(Duration::from_millis(30)).await;
    // The stalled leader comes back and finishes.
    old_gate.add_permits(1);
    let (v, how) = timeout(NO_HANG, &mut stalled)
        .await
        .expect("old leader")
        .unwrap();
    assert_eq!((v, how), (1, Outcome::Executed));
    new_gate.add_permits(100);
    let mut values = Vec::new();
    for f in followers {
        values.push(joined(f, "follower").await.expect("ok").0);
    }
    assert!(values.iter().all(|v| *v == values[0]), "{values:?}");
    assert_ne!(values[0], 1);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let again = idem
        .call("taken")
        .scope("review")
        .run_with_outcome(|| async { Ok::<_, Error>(999u32) })
        .await
        .unwrap();
    assert_eq!(again, (values[0], Outcome::Replayed));
    assert_eq!(idem.in_flight(), 0);
}

/// After a take-over, the follower that took over is cancelled mid-run: the followers of
/// its new flight retry and one of them runs; none hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_follower_that_took_over_is_cancelled_and_the_rest_recover() {
    let idem = leased();
    let runs = counter();
    let stalled = stall(&idem, "taker", &runs, Arc::new(Semaphore::new(0)), 1).await;
    let taker: Arc<Mutex<Option<usize>>> = Arc::default();
    let first_gate = Arc::new(Notify::new());
    let handles: Vec<_> = (0..8usize)
        .map(|n| {
            let (idem, runs, taker, gate) = (
                idem.clone(),
                runs.clone(),
                taker.clone(),
                first_gate.clone(),
            );
            tokio::spawn(async move {
                idem.call("taker")
                    .scope("review")
                    .run_with_outcome(|| async move {
                        let run = runs.fetch_add(1, Ordering::SeqCst);
                        if run == 1 {
                            // The first follower to run: waits to be cancelled.
                            *taker.lock().unwrap() = Some(n);
                            gate.notified().await;
                        }
                        Ok::<_, Error>(n as u32)
                    })
                    .await
            })
        })
        .collect();
    let who = timeout(LEASE * 20, async {
        loop {
            if let Some(n) = *taker.lock().unwrap() {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a follower takes over");
    tokio::time::sleep(Duration::from_millis(20)).await;
    handles[who].abort();
    let mut values = Vec::new();
    for (n, h) in handles.into_iter().enumerate() {
        match timeout(NO_HANG, h)
            .await
            .expect("stranded after the taker was cancelled")
        {
            Ok(r) => values.push(r.expect("ok").0),
            Err(e) => assert!(e.is_cancelled() && n == who),
        }
    }
    assert_eq!(values.len(), 7);
    assert!(values.iter().all(|v| *v == values[0]), "{values:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "stalled leader, taker, one more"
    );
    drop(stalled);
}

// ---------------------------------------------------------------------------------------
// 4. The memory store's claim.
// ---------------------------------------------------------------------------------------

fn skey(k: &str) -> StoreKey {
    StoreKey::new("review", k, 255).unwrap()
}

/// A store of capacity 4 with one completed key and 3 claims in progress (one place
/// free). While one task asks for the completed key (through `Store::claim`, as a store
/// wrapper without a local tier makes the engine do), another claims and releases fresh
/// keys: the free place must always be there for it. Before 846627a the completed key
/// never took a place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_of_a_completed_key_never_take_the_last_free_place() {
    let store = MemoryStore::builder().capacity(4).build();
    let lease = Duration::from_secs(60);
    let ttl = Duration::from_secs(600);
    let done = skey("done");
    let t = FencingToken::mint();
    assert_eq!(
        store.claim(&done, t, None, lease).await.unwrap(),
        Claim::Acquired
    );
    let fence = store
        .complete(
            &done,
            t,
            StoredResult::Ok(bytes::Bytes::from_static(b"J1")),
            ttl,
        )
        .await
        .unwrap();
    assert_eq!(fence, Fence::Held);
    hold_claims(&store, "busy", lease).await;
    let stop = Arc::new(AtomicBool::new(false));
    let hitters: Vec<_> = (0..2)
        .map(|_| {
            let (store, stop, done) = (store.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match store.claim(&done, FencingToken::mint(), None, lease).await {
                        Ok(Claim::Completed(_)) => n += 1,
                        other => panic!("the completed key answered {other:?}"),
                    }
                }
                n
            })
        })
        .collect();
    let fulls = Arc::new(AtomicU64::new(0));
    let fresh = {
        let (store, fulls) = (store.clone(), fulls.clone());
        tokio::spawn(async move {
            for i in 0..200_000 {
                let k = skey(&format!("fresh-{i}"));
                let t = FencingToken::mint();
                match store.claim(&k, t, None, lease).await {
                    Ok(Claim::Acquired) => {
                        let _ = store.release(&k, t).await.unwrap();
                    }
                    Err(e) if e.kind() == StoreErrorKind::Full => {
                        fulls.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("fresh key answered {other:?}"),
                }
            }
        })
    };
    joined(fresh, "fresh").await;
    stop.store(true, Ordering::Relaxed);
    let mut hits = 0;
    for h in hitters {
        hits += joined(h, "hitter").await;
    }
    assert!(hits > 0);
    assert_eq!(
        fulls.load(Ordering::Relaxed),
        0,
        "a fresh key was refused as Full while a place was free ({hits} claims of the completed key ran beside)"
    );
}

/// The same through the engine: a store wrapper without a local tier (a metrics or
/// tracing wrapper that does not forward `peek_completed`) over a memory store of
/// capacity 4, three operations in flight, and hits of a completed key on one engine
/// while another engine runs fresh keys: the fresh keys must never get `Full`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hits_of_a_completed_key_through_a_wrapper_never_make_fresh_keys_full() {
    let inner = MemoryStore::builder().capacity(4).build();
    fresh_keys_beside_hits(FaultyStore::new(inner).without_peek()).await;
}

/// Contrast: the same on the memory store itself, whose local tier answers the hits
/// before any claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hits_of_a_completed_key_on_a_plain_memory_store_never_make_fresh_keys_full() {
    fresh_keys_beside_hits(MemoryStore::builder().capacity(4).build()).await;
}

/// Three claims, `<prefix>-0..3`, held on `store` for `lease`.
async fn hold_claims(store: &MemoryStore, prefix: &str, lease: Duration) {
    for n in 0..3 {
        let key = skey(&format!("{prefix}-{n}"));
        let claim = store.claim(&key, FencingToken::mint(), None, lease).await;
        assert_eq!(claim.unwrap(), Claim::Acquired);
    }
}

/// On `wrapped` (a store of capacity 4): three operations in flight, two tasks hitting a
/// completed key, and 20,000 fresh keys on another engine, none of which may get `Full`.
async fn fresh_keys_beside_hits<S: Store + Clone>(wrapped: S) {
    let idem = Idempotency::new(wrapped.clone());
    assert_eq!(
        idem.call("done")
            .scope("review")
            .run(|| async { Ok::<_, Error>(1u32) })
            .await
            .unwrap(),
        1
    );
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(Barrier::new(4));
    let busy: Vec<_> = (0..3)
        .map(|n| {
            let (idem, gate, started) = (idem.clone(), gate.clone(), started.clone());
            tokio::spawn(async move {
                idem.call(format!("busy-{n}"))
                    .scope("review")
                    .run(|| async move {
                        started.wait().await;
                        let _ = gate.acquire().await;
                        Ok::<_, Error>(n)
                    })
                    .await
            })
        })
        .collect();
    started.wait().await;
    let stop = Arc::new(AtomicBool::new(false));
    let hitters: Vec<_> = (0..2)
        .map(|_| {
            let (idem, stop) = (idem.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let r = idem
                        .call("done")
                        .scope("review")
                        .run_with_outcome(|| async { Ok::<_, Error>(2u32) })
                        .await;
                    let r = r.unwrap();
                    assert!(
                        matches!(r, (1, Outcome::Replayed | Outcome::Coalesced)),
                        "{r:?}"
                    );
                    n += 1;
                }
                n
            })
        })
        .collect();
    let other = Idempotency::new(wrapped.clone());
    let mut fulls = 0u64;
    for i in 0..20_000u32 {
        let r = other
            .call(format!("fresh-{i}"))
            .scope("review")
            .run(|| async move { Err::<u32, Error>(Error::Mismatch) }) // not stored: frees the place
            .await;
        match r {
            Err(Error::Mismatch) => {}
            Err(Error::Store(e)) if e.kind() == StoreErrorKind::Full => fulls += 1,
            other => panic!("{other:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut hits = 0;
    for h in hitters {
        hits += joined(h, "hitter").await;
    }
    gate.add_permits(3);
    for b in busy {
        joined(b, "busy").await.unwrap();
    }
    assert!(hits > 0);
    assert_eq!(
        fulls, 0,
        "{fulls} of 20000 fresh calls got Full with a place free ({hits} hits of a completed key beside)"
    );
}

/// A full store (custom clock) answers a completed key with its result, refuses a fresh
/// one, and frees lapsed claims once their lease ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_store_answers_completed_keys_and_frees_lapsed_claims() {
    let clock = ManualClock::new();
    let store = MemoryStore::builder()
        .capacity(3)
        .clock(clock.clone())
        .build();
    let wrapped = FaultyStore::new(store.clone()).without_peek();
    let idem = Idempotency::builder()
        .store(wrapped)
        .ttl(Duration::from_secs(3600))
        .build()
        .unwrap();
    let done = idem
        .call("done")
        .scope("review")
        .run(|| async { Ok::<_, Error>(7u32) })
        .await
        .unwrap();
    assert_eq!(done, 7);
    let lease = Duration::from_secs(10);
    hold_claims(&store, "lapsing", lease).await;
    // Full: the completed key still answers with its result, through the claim.
    let hit = idem
        .call("done")
        .scope("review")
        .run_with_outcome(|| async { Ok::<_, Error>(8u32) })
        .await;
    assert!(matches!(hit, Ok((7, Outcome::Replayed))), "{hit:?}");
    let c = store
        .claim(&skey("done"), FencingToken::mint(), None, lease)
        .await;
    assert!(matches!(c, Ok(Claim::Completed(_))), "{c:?}");
    let fresh = idem
        .call("fresh")
        .scope("review")
        .run(|| async { Ok::<_, Error>(9u32) })
        .await;
    assert!(
        matches!(&fresh, Err(Error::Store(e)) if e.kind() == StoreErrorKind::Full),
        "{fresh:?}"
    );
    // The claims lapse: a sweep frees them.
    clock.advance(lease + Duration::from_secs(1));
    let fresh = idem
        .call("fresh")
        .scope("review")
        .run(|| async { Ok::<_, Error>(9u32) })
        .await;
    assert_eq!(fresh.unwrap(), 9);
    // A lapsed claim of the key itself, in a full store: re-claimed, not refused.
    for n in 0..3 {
        let c = store
            .claim(
                &skey(&format!("again-{n}")),
                FencingToken::mint(),
                None,
                lease,
            )
            .await
            .unwrap();
        assert_eq!(c, Claim::Acquired);
    }
    clock.advance(lease + Duration::from_secs(1));
    let c = store
        .claim(&skey("again-0"), FencingToken::mint(), None, lease)
        .await;
    assert!(matches!(c, Ok(Claim::Acquired)), "{c:?}");
    let c = store
        .claim(&skey("done"), FencingToken::mint(), None, lease)
        .await;
    assert!(matches!(c, Ok(Claim::Completed(_))), "{c:?}");
}

/// Results that expire on a custom clock: two engines share the store, and after each
/// expiry 60 concurrent callers (30 on each engine) run the key again exactly once and
/// all get the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_expiring_on_a_manual_clock_rerun_once_across_two_engines() {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build();
    let ttl = Duration::from_secs(5);
    let engine = || {
        Idempotency::builder()
            .store(store.clone())
            .ttl(ttl)
            .build()
            .unwrap()
    };
    let (a, b) = (engine(), engine());
    let runs = counter();
    for round in 1..=20u32 {
        let start = Arc::new(Barrier::new(60));
        let tasks: Vec<_> = (0..60)
            .map(|n| {
                let idem = if n % 2 == 0 { a.clone() } else { b.clone() };
                let (runs, start) = (runs.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    idem.call("expiring")
                        .scope("review")
                        .run(|| async move {
                            let r = runs.fetch_add(1, Ordering::SeqCst) + 1;
                            yields(3).await;
                            Ok::<_, Error>(r)
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(joined(t, "caller").await.unwrap(), round, "round {round}");
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            round,
            "round {round} ran twice"
        );
        clock.advance(ttl + Duration::from_secs(1));
    }
}

/// Two engines on one memory store, 100 keys, 10 callers of each key on each engine, all
/// at once: one run per key, one value per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engines_on_one_store_run_each_key_once() {
    let store = MemoryStore::new();
    let (a, b) = (
        Idempotency::new(store.clone()),
        Idempotency::new(store.clone()),
    );
    let runs: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let start = Arc::new(Barrier::new(2000));
    let tasks: Vec<_> = (0..2000u32)
        .map(|n| {
            let idem = if n % 2 == 0 { a.clone() } else { b.clone() };
            let (runs, start) = (runs.clone(), start.clone());
            let key = n % 100;
            tokio::spawn(async move {
                start.wait().await;
                let v = idem
                    .call(format!("two-{key}"))
                    .scope("review")
                    .run(|| async move {
                        *runs.lock().unwrap().entry(key).or_default() += 1;
                        yields(2).await;
                        Ok::<_, Error>(n)
                    })
                    .await;
                (key, v)
            })
        })
        .collect();
    let mut values: HashMap<u32, u32> = HashMap::new();
    for t in tasks {
        let (key, v) = joined(t, "caller").await;
        let v = v.expect("ok");
        assert_eq!(*values.entry(key).or_insert(v), v, "key {key}: two values");
    }
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), 100);
    assert!(runs.values().all(|r| *r == 1), "{runs:?}");
}

// ---------------------------------------------------------------------------------------
// 5. The codec's fidelity check.
// ---------------------------------------------------------------------------------------

/// A map whose second encoding orders its members differently is still stored and
/// replayed equal; a value that grows across the check's buffer (over 128 bytes) too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_reordered_or_past_the_first_buffer_are_stored_and_replayed() {
    let idem = Idempotency::memory();
    let map: HashMap<String, u32> = (0..200).map(|i| (format!("member-{i}"), i)).collect();
    let long = "x".repeat(4000);
    for (i, value) in [(0, map.clone()), (1, HashMap::new())] {
        let first = idem
            .call(format!("map-{i}"))
            .scope("review")
            .run(|| {
                let value = value.clone();
                async move { Ok::<_, Error>(value) }
            })
            .await
            .unwrap();
        let (again, how) = idem
            .call(format!("map-{i}"))
            .scope("review")
            .run_with_outcome(|| async { Ok::<_, Error>(HashMap::<String, u32>::new()) })
            .await
            .unwrap();
        assert_eq!(how, Outcome::Replayed);
        assert_eq!(first, again);
        assert_eq!(again, value);
    }
    let s = idem
        .call("long")
        .scope("review")
        .run(|| {
            let long = long.clone();
            async move { Ok::<_, Error>(long) }
        })
        .await
        .unwrap();
    let (r, how) = idem
        .call("long")
        .scope("review")
        .run_with_outcome(|| async { Ok::<_, Error>(String::new()) })
        .await
        .unwrap();
    assert_eq!((r.len(), how), (s.len(), Outcome::Replayed));
    let _ = AtomicUsize::new(0);
}
