//! A call on a tokio runtime built without timers (`enable_time`) is refused before it
//! claims its key, on every store, whether it would lead, follow or run to completion:
//! nothing runs, and the key is left as it was, so a retry on a runtime with timers runs
//! the operation once. Before, tokio panicked as the engine made its first timer: after an
//! operation that finished at once (its completion's bound), or while one that awaited
//! was running (its lease's renewal), and the claim was given back with the work done or
//! half done; a retry ran it again.
//!
//! The engine makes a timer to find out, and catches tokio's panic: its message is printed
//! once per runtime without timers and thread.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::{idempotent, ConfigError, Error, Idempotency, Outcome};
use idempotent_tests::each_store;
use tokio::runtime::{Builder, Runtime};
use tokio::sync::{oneshot, Notify};

const BOUND: Duration = Duration::from_secs(30);

fn timed() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A runtime with I/O but no timers: what `Builder::new_current_thread().enable_io()`
/// gives a service that forgot `enable_time`.
fn without_timers() -> Runtime {
    Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime")
}

fn refused<T: std::fmt::Debug>(got: &Result<T, Error>) -> bool {
    matches!(got, Err(Error::Config(ConfigError::TimersDisabled)))
}

/// An operation that counts its runs and finishes at once, or after yielding once (so
/// that the engine's timers would be made while it runs).
fn counted(
    runs: &Arc<AtomicU32>,
    yields: bool,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<u32, Error>> + Send>> {
    let runs = Arc::clone(runs);
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            if yields {
                tokio::task::yield_now().await;
            }
            Ok(7)
        })
    }
}

#[test]
fn a_call_on_a_runtime_without_timers_runs_nothing_and_leaves_the_key_free() {
    let timed = timed();
    let bare = without_timers();
    for (name, store) in timed.block_on(each_store()) {
        let idem = Idempotency::builder().store(store).build().expect("engine");
        for yields in [false, true] {
            let scope = format!("no-timers-{yields}");
            let runs = Arc::new(AtomicU32::new(0));
            let call = || idem.call("k").scope(scope.clone());

            let got = bare.block_on(call().run(counted(&runs, yields)));
            assert!(refused(&got), "{name}, yields {yields}: {got:?}");
            // Made inside the runtime, where `run_to_completion` finds the runtime to spawn on.
            let got =
                bare.block_on(async { call().run_to_completion(counted(&runs, yields)).await });
            assert!(
                refused(&got),
                "{name}, yields {yields}, to completion: {got:?}"
            );
            assert_eq!(runs.load(Ordering::SeqCst), 0, "{name}: nothing ran");

            // The key was left free: the retry runs at once, once, and is then replayed.
            let first = timed.block_on(async {
                tokio::time::timeout(BOUND, call().run_with_outcome(counted(&runs, yields))).await
            });
            assert!(
                matches!(first, Ok(Ok((7, Outcome::Executed)))),
                "{name}, yields {yields}: {first:?}"
            );
            let again = timed.block_on(call().run_with_outcome(counted(&runs, yields)));
            assert!(
                matches!(again, Ok((7, Outcome::Replayed))),
                "{name}: {again:?}"
            );
            // Without timers, the stored result is replayed where this process holds it,
            // and refused where it would be read from the store; it never runs again.
            let bare_again = bare.block_on(call().run_with_outcome(counted(&runs, yields)));
            assert!(
                matches!(bare_again, Ok((7, Outcome::Replayed))) || refused(&bare_again),
                "{name}: {bare_again:?}"
            );
            assert_eq!(runs.load(Ordering::SeqCst), 1, "{name}: ran once");
            // Looking at or forgetting the key is refused too, not a panic of the store's
            // client (Redis and PostgreSQL bound their round trips with tokio's timers),
            // and leaves the record as it was.
            let looked = bare.block_on(idem.record(&scope, "k"));
            assert!(refused(&looked), "{name}: {looked:?}");
            let forgot = bare.block_on(idem.forget(&scope, "k"));
            assert!(refused(&forgot), "{name}: {forgot:?}");
            let kept = timed.block_on(call().run_with_outcome(counted(&runs, yields)));
            assert!(
                matches!(kept, Ok((7, Outcome::Replayed))),
                "{name}: {kept:?}"
            );
        }
    }
}

/// Outside any runtime (an executor of another crate) a call is refused without a panic
/// made to find out; on a runtime without timers, one panic per thread, whatever the
/// number of calls. The panic hook counts this test's thread's panics and hands every
/// panic on to the hook it replaced, so other tests' messages still print.
#[test]
fn refusals_panic_once_per_runtime_and_never_outside_one() {
    use futures_util::FutureExt as _;

    static PANICS: AtomicU32 = AtomicU32::new(0);
    let me = std::thread::current().id();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() == me {
            PANICS.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
    let idem = Idempotency::memory();
    let runs = Arc::new(AtomicU32::new(0));
    for _ in 0..5 {
        // No runtime: the engine answers on the first poll, so no executor is needed.
        let got = idem
            .call("k")
            .scope("no-runtime")
            .run(counted(&runs, false))
            .now_or_never()
            .expect("answered at once");
        assert!(refused(&got), "{got:?}");
    }
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "no panic outside a runtime"
    );
    let call_on = |rt: &Runtime, key: &str| {
        rt.block_on(
            idem.call(key)
                .scope("no-runtime")
                .run(counted(&runs, false)),
        )
    };
    let bare = without_timers();
    for _ in 0..5 {
        let got = call_on(&bare, "k");
        assert!(refused(&got), "{got:?}");
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 1, "one panic for five calls");
    // A thread that goes back and forth between a runtime with timers and one without.
    let timed = Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for _ in 0..3 {
        let got = call_on(&timed, "t");
        assert_eq!(got.ok(), Some(7));
        let got = call_on(&bare, "k");
        assert!(refused(&got), "{got:?}");
    }
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        1,
        "no more for going back and forth"
    );
    runs.store(0, Ordering::SeqCst);
    let other = without_timers();
    let got = call_on(&other, "k");
    assert!(refused(&got), "{got:?}");
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        2,
        "one more for another runtime"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[idempotent(key = id, store = idem, scope = "no-timers-attr")]
async fn charge(idem: &Idempotency, id: &str, runs: &AtomicU32) -> Result<u32, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    tokio::task::yield_now().await;
    Ok(7)
}

#[test]
fn the_attribute_on_a_multi_threaded_runtime_without_timers_runs_nothing() {
    let idem = Idempotency::memory();
    let runs = AtomicU32::new(0);
    let bare = Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let got = bare.block_on(async {
        let (idem, runs) = (idem.clone(), Arc::new(AtomicU32::new(0)));
        let on_worker = tokio::spawn({
            let runs = Arc::clone(&runs);
            async move { charge(&idem, "k", &runs).await }
        });
        let got = on_worker.await.expect("no panic on the worker");
        (got, runs.load(Ordering::SeqCst))
    });
    assert!(refused(&got.0), "{got:?}");
    assert_eq!(got.1, 0, "nothing ran on the worker");
    let got = bare.block_on(charge(&idem, "k", &runs));
    assert!(refused(&got), "{got:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let got = timed().block_on(charge(&idem, "k", &runs));
    assert_eq!(got.ok(), Some(7));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A duplicate on a runtime without timers, while the first call runs on one with them,
/// is refused rather than waiting (its wait is timed too); the first call is unaffected.
#[test]
fn a_duplicate_without_timers_is_refused_and_the_running_call_completes() {
    let timed = timed();
    let bare = without_timers();
    let idem = Idempotency::memory();
    let runs = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(Notify::new());
    let (started_tx, started) = oneshot::channel::<()>();
    let first = timed.spawn({
        let (idem, runs, gate) = (idem.clone(), Arc::clone(&runs), Arc::clone(&gate));
        async move {
            idem.call("k")
                .scope("no-timers-dup")
                .run_with_outcome(move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = started_tx.send(());
                    gate.notified().await;
                    Ok::<_, Error>(7)
                })
                .await
        }
    });
    timed.block_on(started).expect("the first call runs");
    let runs_dup = Arc::clone(&runs);
    let dup = bare.block_on(
        idem.call("k")
            .scope("no-timers-dup")
            .run(counted(&runs_dup, false)),
    );
    assert!(refused(&dup), "{dup:?}");
    gate.notify_one();
    let first = timed
        .block_on(async { tokio::time::timeout(BOUND, first).await })
        .expect("the first call ends")
        .expect("no panic");
    assert!(matches!(first, Ok((7, Outcome::Executed))), "{first:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
