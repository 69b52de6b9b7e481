//! An outside review of the per-runtime default engine (`default_engine.rs`): futures that
//! move between runtimes, runtimes that shut down with calls in flight or in a loop, the
//! guard task, `as_default` and the functions that run their body on a task of their own,
//! executors other than tokio, and servers whose workers are runtimes of their own.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

use idempotent_runtime::__private::runtime_has_a_default_engine;
use idempotent_runtime::{idempotent, Error, Idempotency};

/// Answers the value it is given: a replay answers an earlier call's value.
#[idempotent(key = id, scope = "review.echo")]
async fn echo(id: u32, value: u32) -> Result<u32, Error> {
    Ok(value)
}

static INNER_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = id, scope = "review.inner")]
async fn inner(id: u32, value: u32) -> Result<u32, Error> {
    INNER_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(value)
}

/// Its body runs on a task of its own (`on_cancel = "finish"`) and calls `inner`.
#[idempotent(key = id, scope = "review.outer_finish", on_cancel = "finish")]
async fn outer_finish(id: u32, value: u32) -> Result<u32, Error> {
    inner(id, value).await
}

/// The same, with the body run in place.
#[idempotent(key = id, scope = "review.outer_release")]
async fn outer_release(id: u32, value: u32) -> Result<u32, Error> {
    inner(id, value).await
}

/// Says it started, then waits for `release` (or forever).
#[idempotent(key = id, scope = "review.hold")]
async fn hold(
    id: u32,
    value: u32,
    started: mpsc::Sender<()>,
    release: Option<Arc<tokio::sync::Notify>>,
) -> Result<u32, Error> {
    let _ = started.send(());
    match release {
        Some(n) => n.notified().await,
        None => std::future::pending::<()>().await,
    }
    Ok(value)
}

static MEET_RUNS: AtomicU32 = AtomicU32::new(0);

/// Every execution meets the others at `barrier`: two executions pass, one alone times out.
#[idempotent(key = id, scope = "review.meet")]
async fn meet(id: u32, barrier: Arc<tokio::sync::Barrier>) -> Result<u32, Error> {
    MEET_RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(5), barrier.wait())
        .await
        .map(|_| 1)
        .map_err(|_| Error::Cancelled)
}

fn multi(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap()
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits for `cond`, up to 10 s.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::yield_now();
    }
}

// ---- 1. on_cancel = "finish" inside as_default ----

// The block's engine is the default of the calls it makes; a `finish` function runs its
// body on a task the library spawns, and the task-local does not go with it.
#[tokio::test]
async fn a_finish_functions_body_keeps_the_blocks_engine() {
    let mine = Idempotency::memory();
    let (direct, through_finish) = mine
        .as_default(async {
            let direct = inner(1001, 1).await.unwrap();
            // The body calls inner(1001, 2): within the block the key has a stored result.
            let through_finish = outer_finish(1001, 2).await.unwrap();
            (direct, through_finish)
        })
        .await;
    assert_eq!(direct, 1);
    assert_eq!(
        through_finish, 1,
        "inner ran a second time: the finish body used the runtime's engine, not the block's"
    );
}

// The control: the same with the body run in place.
#[tokio::test]
async fn a_release_functions_body_keeps_the_blocks_engine() {
    let mine = Idempotency::memory();
    let (direct, through) = mine
        .as_default(async {
            let direct = inner(1002, 1).await.unwrap();
            let through = outer_release(1002, 2).await.unwrap();
            (direct, through)
        })
        .await;
    assert_eq!((direct, through), (1, 1));
}

// ---- 2. futures that move between runtimes ----

#[test]
fn a_future_made_in_one_runtime_and_run_in_another_uses_the_second() {
    let (a, b) = (current_thread(), current_thread());
    #[allow(clippy::async_yields_async)] // the future is made in `a`, and not run there
    let fut = a.block_on(async { echo(2001, 1) });
    assert_eq!(b.block_on(fut).unwrap(), 1);
    assert_eq!(b.block_on(echo(2001, 2)).unwrap(), 1, "b's engine replays");
    assert_eq!(
        a.block_on(echo(2001, 3)).unwrap(),
        3,
        "a's engine never saw it"
    );
}

// A leader first polled in runtime A and finished in runtime B: a follower in A waits for
// it (A's engine), the call completes, and A's engine is forgotten when A goes.
#[test]
fn a_leader_polled_first_in_one_runtime_and_finished_in_another() {
    let (a, b) = (multi(2), multi(2));
    let a_id = a.handle().id();
    let (started_tx, started_rx) = mpsc::channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let mut leader = Box::pin(hold(2002, 7, started_tx.clone(), Some(release.clone())));
    // Polled once in A.
    a.block_on(async {
        let waker = Waker::from(Arc::new(Noop));
        assert!(leader
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
    });
    started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // A follower in A.
    let follower = a.spawn(hold(2002, 8, started_tx.clone(), None));
    // The leader finishes in B.
    let led = b.spawn(leader);
    release.notify_one();
    assert_eq!(b.block_on(led).unwrap().unwrap(), 7);
    let followed = a.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), follower)
            .await
            .expect("the follower in A hangs")
            .unwrap()
            .unwrap()
    });
    assert_eq!(followed, 7, "the follower in A got the leader's value");
    drop(a);
    assert!(!runtime_has_a_default_engine(a_id));
}

// Two runtimes, one key, at once: two engines, two executions (documented). Nothing
// worse: neither waits for the other.
#[test]
fn two_runtimes_one_key_at_once_run_twice_and_neither_hangs() {
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let before = MEET_RUNS.load(Ordering::SeqCst);
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || current_thread().block_on(meet(2003, barrier)))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), 1);
    }
    assert_eq!(MEET_RUNS.load(Ordering::SeqCst) - before, 2);
}

// ---- 3. one runtime, many ways in ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_blocking_and_handle_block_on_share_the_runtimes_engine() {
    assert_eq!(echo(3001, 1).await.unwrap(), 1);
    let v =
        tokio::task::spawn_blocking(|| tokio::runtime::Handle::current().block_on(echo(3001, 2)))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(v, 1);
}

#[test]
fn a_local_set_shares_the_runtimes_engine() {
    let rt = current_thread();
    let local = tokio::task::LocalSet::new();
    let (a, b) = local.block_on(&rt, async {
        let a = tokio::task::spawn_local(echo(3002, 1))
            .await
            .unwrap()
            .unwrap();
        let b = echo(3002, 2).await.unwrap();
        (a, b)
    });
    assert_eq!((a, b), (1, 1));
}

// A fresh runtime, 64 tasks whose first calls race to create its engine: one engine.
#[test]
fn racing_first_uses_on_a_fresh_multi_thread_runtime_make_one_engine() {
    for round in 0..20u32 {
        let rt = multi(8);
        let barrier = Arc::new(tokio::sync::Barrier::new(64));
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let barrier = barrier.clone();
                rt.spawn(async move {
                    barrier.wait().await;
                    echo(3003 + round * 1000, i).await.unwrap()
                })
            })
            .collect();
        let values: Vec<u32> = rt.block_on(async {
            let mut v = Vec::new();
            for t in tasks {
                v.push(t.await.unwrap());
            }
            v
        });
        assert!(values.iter().all(|v| *v == values[0]), "{values:?}");
        let stats =
            rt.block_on(async { idempotent_runtime::__private::default_engine(true).stats() });
        assert_eq!(
            (stats.executed, stats.replayed + stats.coalesced),
            (1, 63),
            "round {round}"
        );
    }
}

// ---- 4. the guard task ----

/// In a test build, the task that forgets a runtime's engine with it counts among the
/// runtime's alive tasks, one per runtime (documented in `default_engine.rs`).
#[test]
fn the_guard_task_is_an_alive_task_of_the_runtime() {
    let rt = current_thread();
    assert_eq!(rt.metrics().num_alive_tasks(), 0);
    rt.block_on(echo(4001, 1)).unwrap();
    rt.block_on(echo(4002, 1)).unwrap();
    assert_eq!(
        rt.metrics().num_alive_tasks(),
        1,
        "one guard task for the runtime"
    );
}

#[test]
fn shutdown_timeout_is_not_held_up_by_the_guard() {
    let rt = multi(2);
    let id = rt.handle().id();
    rt.block_on(echo(4002, 1)).unwrap();
    let t = Instant::now();
    rt.shutdown_timeout(Duration::from_secs(30));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(!runtime_has_a_default_engine(id));
}

#[test]
fn shutdown_background_forgets_the_engine() {
    for flavor in ["current_thread", "multi_thread"] {
        let rt = if flavor == "current_thread" {
            current_thread()
        } else {
            multi(2)
        };
        let id = rt.handle().id();
        rt.block_on(echo(4003, 1)).unwrap();
        assert!(runtime_has_a_default_engine(id));
        rt.shutdown_background();
        wait_until(&format!("{flavor}: engine forgotten"), || {
            !runtime_has_a_default_engine(id)
        });
    }
}

#[test]
fn a_thousand_runtimes_leave_no_engine_behind() {
    let mut ids = Vec::new();
    for i in 0..1000u32 {
        let rt = match i % 4 {
            0 | 1 => current_thread(),
            _ => multi(1),
        };
        ids.push(rt.handle().id());
        rt.block_on(echo(4004, i)).unwrap();
        match i % 4 {
            0 | 2 => drop(rt),
            1 => rt.shutdown_timeout(Duration::from_secs(10)),
            _ => rt.shutdown_background(),
        }
    }
    wait_until("every engine forgotten", || {
        ids.iter().all(|id| !runtime_has_a_default_engine(*id))
    });
}

// ---- 5. a runtime that goes with calls in flight ----

#[test]
fn a_runtime_dropped_with_a_leader_and_a_follower_in_flight() {
    let rt = multi(2);
    let id = rt.handle().id();
    let engine = rt.block_on(async { idempotent_runtime::__private::default_engine(true) });
    let (started_tx, started_rx) = mpsc::channel();
    rt.spawn(hold(5001, 1, started_tx.clone(), None));
    started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    rt.spawn(hold(5001, 2, started_tx.clone(), None));
    let (dropped_tx, dropped_rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(rt);
        dropped_tx.send(()).unwrap();
    });
    dropped_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("dropping the runtime hangs");
    assert!(!runtime_has_a_default_engine(id));
    // The claim of the dropped leader: a caller that has the engine runs the key again
    // (nothing else can reach it now).
    let (tx, _rx) = mpsc::channel();
    let release = Arc::new(tokio::sync::Notify::new());
    release.notify_one();
    let v = current_thread().block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            engine.as_default(hold(5001, 3, tx, Some(release))),
        )
        .await
    });
    println!("after the runtime went, the engine's key 5001: {v:?}");
}

// A blocking task of a runtime that is being dropped (its workers, and the guard, gone)
// calls a function it called before: in a test build, the engine that stored the result
// was forgotten, and each call gets a new engine (documented in `default_engine.rs`; a
// service's build has the process's engine). No entry is left for the dead runtime.
#[test]
fn a_blocking_task_during_shutdown_gets_a_new_engine_per_call() {
    let rt = multi(2);
    let id = rt.handle().id();
    assert_eq!(rt.block_on(echo(5002, 1)).unwrap(), 1);
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (out_tx, out_rx) = mpsc::channel();
    rt.spawn_blocking(move || {
        go_rx.recv().unwrap();
        let h = tokio::runtime::Handle::current();
        let first = h.block_on(echo(5002, 2));
        let second = h.block_on(echo(5002, 3));
        out_tx.send((first, second)).unwrap();
    });
    let dropper = std::thread::spawn(move || drop(rt));
    wait_until("the guard dropped", || !runtime_has_a_default_engine(id));
    go_tx.send(()).unwrap();
    let (first, second) = out_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    dropper.join().unwrap();
    assert!(
        !runtime_has_a_default_engine(id),
        "an engine made during shutdown is kept for a dead runtime"
    );
    assert_eq!((first.unwrap(), second.unwrap()), (2, 3));
}

// ---- 6. as_default ----

#[tokio::test]
async fn nested_blocks_and_tasks_spawned_in_a_block() {
    let (outer, innermost) = (Idempotency::memory(), Idempotency::memory());
    let runtime = idempotent_runtime::__private::default_engine(true);
    outer
        .as_default(async {
            innermost
                .as_default(async { assert_eq!(echo(6001, 1).await.unwrap(), 1) })
                .await;
            assert_eq!(
                echo(6001, 2).await.unwrap(),
                2,
                "the outer block's engine again"
            );
            let spawned = tokio::spawn(echo(6001, 3)).await.unwrap().unwrap();
            assert_eq!(spawned, 3, "a spawned task has the runtime's engine");
        })
        .await;
    assert_eq!(innermost.stats().executed, 1);
    assert_eq!(outer.stats().executed, 1);
    assert_eq!(runtime.stats().executed, 1);
}

// ---- 7. outside tokio ----

/// A waker that does nothing, to poll a future once by hand.
struct Noop;
impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

// Outside tokio, `current_default()` is the process's engine, the same on every thread.
#[test]
fn outside_tokio_the_default_is_the_processs() {
    let a = Idempotency::current_default();
    let b = std::thread::spawn(Idempotency::current_default)
        .join()
        .unwrap();
    assert!(std::sync::Arc::ptr_eq(a.store(), b.store()));
}
