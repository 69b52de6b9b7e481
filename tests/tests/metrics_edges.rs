//! The engine's metrics where the plain cases of `metrics.rs` do not reach: how long a
//! duplicate's recorded wait is (behind a call of this process, and behind another
//! engine's claim in the store), a body that panics, and a body that runs on after its
//! caller was dropped (`run_to_completion`). No test here sets a `tracing` subscriber.
//!
//! Each test waits on signals, never on a sleep: a sleep in a leader's body only sets
//! the least a wait can be, once its duplicate is known to wait.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use idempotent_runtime::metrics as m;
use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{Error, Idempotency, KeyState, Outcome};
use idempotent_tests::recorded_metrics::{
    counted, labels, moved, recorded, with_recorder, Moved, Sample,
};
use idempotent_tests::{eventually, FaultyStore, Runs};
use tokio::sync::oneshot;

/// How long a leader's body holds once its duplicate is known to wait: the least that
/// duplicate's recorded wait can be.
const HOLD: Duration = Duration::from_millis(50);

/// Long enough for anything of these tests to happen on a loaded machine.
const WITHIN: Duration = Duration::from_secs(20);

/// A future that says, on `parked`, the first time it waits (returns `Pending`).
struct Parked<F> {
    inner: Pin<Box<F>>,
    parked: Option<oneshot::Sender<()>>,
}

impl<F: Future> Parked<F> {
    fn new(inner: F, parked: oneshot::Sender<()>) -> Self {
        Self {
            inner: Box::pin(inner),
            parked: Some(parked),
        }
    }
}

impl<F: Future> Future for Parked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let polled = this.inner.as_mut().poll(cx);
        if polled.is_pending() {
            if let Some(parked) = this.parked.take() {
                let _ = parked.send(());
            }
        }
        polled
    }
}

/// `engine`'s call of `key` in `scope` (its metric scope too) with a body that says it
/// entered, then waits for `go` and holds for [`HOLD`] before it returns `value`; spawned.
fn spawn_leader(
    engine: &Idempotency,
    scope: &'static str,
    value: u32,
) -> (
    tokio::task::JoinHandle<Result<u32, Error>>,
    oneshot::Receiver<()>,
    oneshot::Sender<()>,
) {
    let (entered_tx, entered) = oneshot::channel::<()>();
    let (go, gate) = oneshot::channel::<()>();
    let engine = engine.clone();
    let leader = tokio::spawn(async move {
        engine
            .call("k")
            .scope(scope)
            .metrics_scope(scope)
            .run(|| async move {
                let _ = entered_tx.send(());
                gate.await.expect("go");
                tokio::time::sleep(HOLD).await;
                Ok::<_, Error>(value)
            })
            .await
    });
    (leader, entered, go)
}

/// `engine`'s duplicate of [`spawn_leader`]'s call, spawned; its answer comes with the
/// wall time its call took, and `parked` says when it first waited.
#[allow(clippy::type_complexity)]
fn spawn_duplicate(
    engine: &Idempotency,
    scope: &'static str,
) -> (
    tokio::task::JoinHandle<(Result<(u32, Outcome), Error>, Duration)>,
    oneshot::Receiver<()>,
) {
    let (parked_tx, parked) = oneshot::channel::<()>();
    let engine = engine.clone();
    let duplicate = tokio::spawn(async move {
        let started = Instant::now();
        let call = engine
            .call("k")
            .scope(scope)
            .metrics_scope(scope)
            .run_with_outcome(|| async { Ok::<_, Error>(0u32) });
        let answer = Parked::new(call, parked_tx).await;
        (answer, started.elapsed())
    });
    (duplicate, parked)
}

/// Checks that `samples` hold one wait of `scope`, via `via` and none via another, of
/// at least [`HOLD`] and at most `wall`.
fn one_wait_via(samples: &[Sample], scope: &str, via: &str, wall: Duration) {
    let waits = |via: &str| {
        recorded(
            samples,
            m::WAIT_SECONDS,
            &labels(&[("scope", scope), ("store", "memory"), ("via", via)]),
        )
    };
    let other = if via == m::VIA_STORE {
        m::VIA_IN_PROCESS
    } else {
        m::VIA_STORE
    };
    assert_eq!(waits(other), Vec::<f64>::new(), "{samples:?}");
    let waits = waits(via);
    assert_eq!(waits.len(), 1, "one wait: {samples:?}");
    let (least, most) = (HOLD.as_secs_f64(), wall.as_secs_f64());
    assert!(
        waits[0] >= least && waits[0] <= most,
        "the wait ({} s) is the leader's hold ({least} s) or more, and no more than the \
         duplicate's call ({most} s)",
        waits[0]
    );
}

#[test]
fn a_coalesced_duplicates_wait_is_at_least_the_leaders_hold_and_at_most_its_call() {
    with_recorder(|metrics| async move {
        let idem = Idempotency::memory();
        let (leader, entered, go) = spawn_leader(&idem, "waits", 7);
        entered.await.expect("the leader runs");
        let (duplicate, parked) = spawn_duplicate(&idem, "waits");
        // Its first wait is in the leader's flight: nothing before it waits on a memory
        // engine, and its wait starts as it joins.
        parked.await.expect("the duplicate waits");
        go.send(()).expect("the leader waits for go");
        assert_eq!(leader.await.unwrap().unwrap(), 7);
        let (answer, wall) = duplicate.await.unwrap();
        assert_eq!(answer.unwrap(), (7, Outcome::Coalesced));

        one_wait_via(&metrics.take(), "waits", m::VIA_IN_PROCESS, wall);
    });
}

#[test]
fn a_duplicate_on_another_engine_polls_the_store_and_its_wait_is_timed_via_store() {
    with_recorder(|metrics| async move {
        // Two engines over one store: their flights are apart, so the second engine's
        // duplicate finds the key claimed in the store, and polls it.
        let store = FaultyStore::new(MemoryStore::new());
        let (first, second) = (
            Idempotency::new(store.clone()),
            Idempotency::new(store.clone()),
        );
        let (leader, entered, go) = spawn_leader(&first, "polls", 9);
        entered.await.expect("the leader runs");
        assert_eq!(store.claims(), 1);
        let (duplicate, _parked) = spawn_duplicate(&second, "polls");
        // A duplicate's wait starts when its claim finds the key held, before it sleeps
        // and claims again: a third claim says it waits.
        eventually(WITHIN, "the duplicate claims again", || store.claims() >= 3).await;
        go.send(()).expect("the leader waits for go");
        assert_eq!(leader.await.unwrap().unwrap(), 9);
        let (answer, wall) = duplicate.await.unwrap();
        assert_eq!(answer.unwrap(), (9, Outcome::Replayed));

        let samples = metrics.take();
        one_wait_via(&samples, "polls", m::VIA_STORE, wall);
        assert_eq!(
            counted(
                &samples,
                m::REPLAYS,
                &labels(&[("scope", "polls"), ("store", "memory")])
            ),
            1,
            "{samples:?}"
        );
    });
}

/// Its span's outcome is checked in `spans.rs`: a subscriber set for one test's thread
/// here, where the other tests make calls with none, can miss the call span (`tracing`
/// caches a callsite's interest from the first thread that reaches it while a single
/// subscriber is set).
#[test]
fn a_body_that_panics_counts_one_execution_and_frees_its_key_for_a_retry() {
    with_recorder(|metrics| async move {
        let idem = Idempotency::memory();
        let runs = Runs::default();
        let call = |panics: bool| {
            let (idem, runs) = (idem.clone(), runs.clone());
            async move {
                idem.call("k")
                    .scope("panics")
                    .metrics_scope("panics")
                    .run_with_outcome(|| async move {
                        let n = runs.next();
                        assert!(!panics, "the body panics");
                        Ok::<_, Error>(n)
                    })
                    .await
            }
        };
        let panicked = tokio::spawn(call(true)).await;
        assert!(panicked.unwrap_err().is_panic());
        assert_eq!(runs.count(), 1);
        assert_eq!(metrics.counters(), vec![moved(m::EXECUTIONS, "panics", 1)]);
        // Released before the panic went on: nothing holds the key.
        assert!(idem.record("panics", "k").await.unwrap().is_none());

        // A retry runs the body again, at once (it waits for nobody).
        assert_eq!(call(false).await.unwrap(), (2, Outcome::Executed));
        let samples = metrics.take();
        assert_eq!(
            counted(
                &samples,
                m::EXECUTIONS,
                &labels(&[("scope", "panics"), ("store", "memory")])
            ),
            1,
            "{samples:?}"
        );
        assert!(
            !samples.iter().any(|s| s.name == m::WAIT_SECONDS),
            "{samples:?}"
        );
    });
}

#[test]
fn a_body_whose_caller_was_dropped_counts_one_execution_and_times_its_completion_when_it_ends() {
    with_recorder(|metrics| async move {
        let idem = Idempotency::memory();
        let (entered_tx, entered) = oneshot::channel::<()>();
        let (go, gate) = oneshot::channel::<()>();
        let caller = tokio::spawn({
            let idem = idem.clone();
            async move {
                idem.call("k")
                    .scope("detached")
                    .metrics_scope("detached")
                    .run_to_completion(|| async move {
                        let _ = entered_tx.send(());
                        gate.await.expect("go");
                        Ok::<_, Error>(5u32)
                    })
                    .await
            }
        });
        entered.await.expect("the body runs");
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());

        // The caller is gone; its body runs on, counted once, with nothing stored yet.
        let complete = labels(&[("operation", "complete"), ("store", "memory")]);
        let samples = metrics.take();
        assert_eq!(
            counted(
                &samples,
                m::EXECUTIONS,
                &labels(&[("scope", "detached"), ("store", "memory")])
            ),
            1,
            "{samples:?}"
        );
        assert_eq!(recorded(&samples, m::STORE_SECONDS, &complete).len(), 0);

        go.send(()).expect("the body still runs, waiting for go");
        let mut after = Vec::new();
        eventually(WITHIN, "the body's result is stored", || {
            after.extend(metrics.take());
            !recorded(&after, m::STORE_SECONDS, &complete).is_empty()
        })
        .await;
        let rec = idem.record("detached", "k").await.unwrap().expect("stored");
        assert!(matches!(rec.state, KeyState::Completed { .. }), "{rec:?}");
        assert_eq!(rec.value::<u32>().unwrap(), Some(5));
        after.extend(metrics.take());
        assert_eq!(
            recorded(&after, m::STORE_SECONDS, &complete).len(),
            1,
            "{after:?}"
        );
        assert!(!after.iter().any(|s| s.name == m::EXECUTIONS), "{after:?}");

        // A retry replays it.
        let (value, how) = idem
            .call("k")
            .scope("detached")
            .metrics_scope("detached")
            .run_with_outcome(|| async { Ok::<_, Error>(6u32) })
            .await
            .unwrap();
        assert_eq!((value, how), (5, Outcome::Replayed));
        let replayed: Vec<Moved> = metrics.counters();
        assert_eq!(replayed, vec![moved(m::REPLAYS, "detached", 1)]);
    });
}
