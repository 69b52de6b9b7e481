//! Failovers under load, on servers these tests start for themselves: a forced Sentinel
//! failover, and a killed Redis Cluster master. Every key runs once, and every key is
//! answered afterwards (none stays claimed by a write that was lost).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::store::RedisStore;
use idempotent_runtime::{Error, Idempotency, Outcome};
use idempotent_tests::redis_topology::{PrivateCluster, PrivateSentinelSet};
use tokio::time::Instant;

/// Keys the load may use; far more than it gets through.
const KEYS: usize = 100_000;
/// Keys run after the failover is over, before the load stops.
const AFTER: usize = 200;
/// Long enough that a claim whose holder lost its store for the length of a failover is
/// not taken over meanwhile; short enough that a claim whose write was refused frees its
/// key within the test.
const LEASE: Duration = Duration::from_secs(5);

struct Load {
    engines: [Idempotency; 2],
    runs: Vec<AtomicU32>,
    // Keys both callers got an answer for; a worker stops with one key taken but not run.
    answered: Vec<AtomicBool>,
    next: AtomicUsize,
    stop_after: AtomicUsize,
    failed_over: AtomicBool,
    errors: AtomicU32,
}

impl Load {
    fn new(engines: [Idempotency; 2]) -> Arc<Self> {
        Arc::new(Self {
            engines,
            runs: (0..KEYS).map(|_| AtomicU32::new(0)).collect(),
            answered: (0..KEYS).map(|_| AtomicBool::new(false)).collect(),
            next: AtomicUsize::new(0),
            stop_after: AtomicUsize::new(KEYS),
            failed_over: AtomicBool::new(false),
            errors: AtomicU32::new(0),
        })
    }

    /// Calls key `k` on `engine` until it answers, as a client that retries errors does.
    async fn call(self: &Arc<Self>, engine: usize, k: usize) -> (usize, Outcome) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let me = self.clone();
            let answer = self.engines[engine]
                .call(k)
                .scope("failover")
                .run_with_outcome(move || async move {
                    me.runs[k].fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok::<_, Error>(k)
                })
                .await;
            match answer {
                Ok(v) => return v,
                Err(e) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    assert!(
                        Instant::now() < deadline,
                        "key {k} still failing after 60 s: {e:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Runs fresh keys, each by two callers at once on the two engines, until `AFTER`
    /// keys past the failover.
    async fn worker(self: Arc<Self>) {
        loop {
            let k = self.next.fetch_add(1, Ordering::SeqCst);
            if k >= self.stop_after.load(Ordering::SeqCst) || k >= KEYS {
                return;
            }
            let (a, b) = tokio::join!(self.call(0, k), self.call(1, k));
            assert_eq!(
                (a.0, b.0),
                (k, k),
                "a key answered with another key's value"
            );
            self.answered[k].store(true, Ordering::SeqCst);
            if self.failed_over.load(Ordering::SeqCst) {
                let stop = self.next.load(Ordering::SeqCst) + AFTER;
                let _ = self.stop_after.compare_exchange(
                    KEYS,
                    stop,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
        }
    }

    /// Runs the load while `disturb` runs on a thread of its own, once `warm` keys are
    /// done; then checks every key ran once, and that `check` replays each.
    async fn run(
        self: &Arc<Self>,
        warm: usize,
        disturb: impl FnOnce() + Send + 'static,
        check: &Idempotency,
    ) {
        let workers: Vec<_> = (0..8)
            .map(|_| tokio::spawn(self.clone().worker()))
            .collect();
        let me = self.clone();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let watcher = tokio::spawn(async move {
            // Progress is a counter the workers move; looking at it is not a timing guess.
            while me.next.load(Ordering::SeqCst) < warm {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = started_tx.send(());
        });
        started.await.expect("the load reached its warm-up mark");
        watcher.await.expect("watcher");
        let keys_before = self.next.load(Ordering::SeqCst);
        tokio::task::spawn_blocking(disturb)
            .await
            .expect("the failover");
        let keys_during = self.next.load(Ordering::SeqCst) - keys_before;
        self.failed_over.store(true, Ordering::SeqCst);
        for w in workers {
            w.await.expect("worker");
        }
        let answered: Vec<usize> = (0..KEYS)
            .filter(|&k| self.answered[k].load(Ordering::SeqCst))
            .collect();
        let done = answered.len();
        assert!(
            keys_during > 0,
            "no key started while the failover ran: the test did not test it"
        );
        let twice: Vec<usize> = (0..KEYS)
            .filter(|&k| self.runs[k].load(Ordering::SeqCst) > 1)
            .collect();
        assert!(
            twice.is_empty(),
            "{} of {done} keys ran more than once: {:?}",
            twice.len(),
            &twice[..twice.len().min(20)]
        );
        // No key is left claimed: a fresh engine gets every stored result (waiting out
        // a lease where a claim's write was refused and its key left claimed).
        for &k in &answered {
            let deadline = Instant::now() + LEASE * 3;
            loop {
                match check
                    .call(k)
                    .scope("failover")
                    .run_with_outcome(|| async { Ok::<_, Error>(usize::MAX) })
                    .await
                {
                    Ok(answer) => {
                        assert_eq!(answer, (k, Outcome::Replayed), "key {k}");
                        break;
                    }
                    Err(e) => {
                        assert!(Instant::now() < deadline, "key {k}: {e:?}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        eprintln!(
            "{done} keys, {keys_during} started during the failover, {} call errors retried",
            self.errors.load(Ordering::Relaxed)
        );
    }
}

/// Warnings from the engine and the store (claims lapsing, primaries moving) go to the
/// test's output, shown when it fails.
fn log_warnings() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_test_writer()
        .try_init();
}

fn engine(store: RedisStore) -> Idempotency {
    Idempotency::builder()
        .store(store)
        .lease(LEASE)
        .build()
        .expect("engine")
}

async fn sentinel_store(set: &PrivateSentinelSet) -> RedisStore {
    RedisStore::connect_sentinel(set.sentinel_urls(), set.master_name())
        .await
        .expect("the private Sentinel set")
}

/// `SENTINEL FAILOVER` in the middle of a load from two engines (two processes' worth of
/// stores), each key sent by one caller to each: every key runs once, and none is stuck.
/// Writes count once the replica has them, so the promoted replica has every claim and
/// result that counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forced_sentinel_failover_under_load_runs_every_key_once() {
    log_warnings();
    let set = Arc::new(PrivateSentinelSet::start());
    let acks = |s: RedisStore| s.with_replica_acks(1, Duration::from_millis(500));
    let load = Load::new([
        engine(acks(sentinel_store(&set).await)),
        engine(acks(sentinel_store(&set).await)),
    ]);
    let old = set.primary_port();
    let failing = set.clone();
    let check = engine(sentinel_store(&set).await);
    load.run(100, move || failing.failover(), &check).await;
    assert_ne!(set.primary_port(), old, "the primary did not move");
}

/// After `+switch-master`, a store resolved before the failover writes to the new primary
/// at once, while the old one still accepts writes (a sentinel demotes it seconds later):
/// 20 keys run through it and through a store resolved afterwards run 20 bodies, not 40.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_follows_the_primary_as_soon_as_the_sentinels_switch() {
    let set = PrivateSentinelSet::start();
    let before = sentinel_store(&set).await;
    let old = format!("127.0.0.1:{}", set.primary_port());
    assert_eq!(before.connection().primary_address(), Some(old.clone()));
    let sentinel = set.sentinel_urls()[0].clone();
    let mut conn = redis::Client::open(sentinel.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Asked again while the sentinel is not ready for it (it refuses with INPROG or
    // NOGOODSLAVE until it has seen the replica fit).
    let deadline = Instant::now() + Duration::from_secs(60);
    while redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(set.master_name())
        .query_async::<String>(&mut conn)
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "no sentinel accepted the failover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while before.connection().primary_address() == Some(old.clone()) {
        assert!(
            Instant::now() < deadline,
            "the store did not follow the failover"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = sentinel_store(&set).await;
    assert_ne!(after.connection().primary_address(), Some(old));
    let runs = Arc::new(AtomicU32::new(0));
    let engines = [engine(before), engine(after)];
    for k in 0..20 {
        for idem in &engines {
            let runs = runs.clone();
            let v = idem
                .call(k)
                .scope("switch")
                .run(move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(k)
                })
                .await
                .expect("call after the switch");
            assert_eq!(v, k);
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 20);
}

/// A cluster master killed in the middle of a load: once its replica has taken over,
/// every key ran once and none is stuck. Each master has two replicas and writes count
/// once one has them, so the replica the cluster promotes (the most up to date one) has
/// every write that counted, and the shard still has a replica to acknowledge writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_cluster_master_under_load_runs_every_key_once() {
    log_warnings();
    let cluster = PrivateCluster::start(3, 2);
    let store = || async {
        RedisStore::connect_cluster(cluster.seeds())
            .await
            .expect("the private cluster")
    };
    let acks = |s: RedisStore| s.with_replica_acks(1, Duration::from_millis(500));
    let load = Load::new([engine(acks(store().await)), engine(acks(store().await))]);
    let check = engine(store().await);
    let victim = cluster.masters()[0];
    let cluster = Arc::new(std::sync::Mutex::new(cluster));
    let killer = cluster.clone();
    load.run(
        100,
        move || {
            let mut c = killer.lock().expect("cluster");
            c.kill(victim);
            c.wait_for_failover(victim);
        },
        &check,
    )
    .await;
    assert!(
        !cluster.lock().expect("cluster").masters().contains(&victim),
        "the killed master is still counted a master"
    );
}
