//! A caller dropped at each await of the protocol: during the claim's round trip, while
//! the operation runs (with and without `run_to_completion`), and while the result is
//! being stored. Each case on every store: no second execution, no key left locked.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::store::Store;
use idempotent_runtime::{idempotent, Concurrency, Error, Idempotency, Outcome};
use idempotent_tests::{each_store, eventually, FaultyStore, Stop};
use tokio::sync::{oneshot, Notify};

/// Long enough that nothing in these tests waits it out: a key still claimed after a
/// cancellation would block its retry for this long.
const LEASE: Duration = Duration::from_secs(10);
const WITHIN: Duration = Duration::from_secs(5);

fn engine(store: &FaultyStore<Arc<dyn Store>>) -> Idempotency {
    Idempotency::builder()
        .store(store.clone())
        .lease(LEASE)
        .build()
        .expect("engine")
}

/// An operation that counts its runs and returns `value`.
fn counted(
    runs: &Arc<AtomicU32>,
    value: u32,
) -> impl FnOnce() -> futures_util::future::BoxFuture<'static, Result<u32, Error>> {
    let runs = runs.clone();
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(value)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_dropped_while_its_result_is_stored_still_stores_it() {
    for (name, inner) in each_store().await {
        let store = FaultyStore::new(inner).without_peek();
        let (first, retry) = (engine(&store), engine(&store));
        let runs = Arc::new(AtomicU32::new(0));
        let mut stopped = store.hold(Stop::Completion);
        let caller = {
            let op = counted(&runs, 1);
            tokio::spawn(async move { first.call("k").scope("cancel.complete").run(op).await })
        };
        // The operation has returned (its side effect is made); its completion is on the
        // way to the store when the caller goes away.
        stopped.entered().await;
        caller.abort();
        assert!(caller.await.is_err(), "{name}: the caller was cancelled");
        let got = tokio::time::timeout(
            WITHIN,
            retry
                .call("k")
                .scope("cancel.complete")
                .run_with_outcome(counted(&runs, 2)),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: the retry waited for a lease"));
        assert!(matches!(got, Ok((1, Outcome::Replayed))), "{name}: {got:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_completion_whose_answer_was_lost_is_retried_and_found_done() {
    for (name, inner) in each_store().await {
        let store = FaultyStore::new(inner).without_peek();
        let idem = engine(&store);
        let runs = Arc::new(AtomicU32::new(0));
        let mut lost = store.hold(Stop::CompletionAnswerLost);
        let got = idem
            .call("k")
            .scope("cancel.lost-answer")
            .run_with_outcome(counted(&runs, 1))
            .await;
        assert!(matches!(got, Ok((1, Outcome::Executed))), "{name}: {got:?}");
        lost.entered().await;
        // The retry in the background finds the result its first attempt stored, and
        // says so: the claim was not lost, nothing is left unstored.
        eventually(WITHIN, "the retried completion", || {
            store.completions() >= 2
        })
        .await;
        let again = engine(&store)
            .call("k")
            .scope("cancel.lost-answer")
            .run_with_outcome(counted(&runs, 2))
            .await;
        assert!(
            matches!(again, Ok((1, Outcome::Replayed))),
            "{name}: {again:?}"
        );
        let stats = idem.stats();
        assert_eq!(
            (stats.lease_lost, stats.unstored),
            (0, 0),
            "{name}: {stats:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_dropped_during_the_claim_round_trip_leaves_no_claim_behind() {
    for (name, inner) in each_store().await {
        let store = FaultyStore::new(inner).without_peek();
        let (first, other) = (engine(&store), engine(&store));
        let runs = Arc::new(AtomicU32::new(0));
        let mut stopped = store.hold(Stop::ClaimAnswer);
        let caller = {
            let op = counted(&runs, 1);
            tokio::spawn(async move { first.call("k").scope("cancel.claim").run(op).await })
        };
        // The claim is in the store; its answer never reaches the caller.
        stopped.entered().await;
        caller.abort();
        assert!(caller.await.is_err(), "{name}: the caller was cancelled");
        // The orphan claim is released in the background: a duplicate in reject mode
        // soon finds the key free, not "in progress" for a whole lease.
        let deadline = tokio::time::Instant::now() + WITHIN;
        let got = loop {
            let got = other
                .call("k")
                .scope("cancel.claim")
                .concurrency(Concurrency::Reject)
                .run_with_outcome(counted(&runs, 2))
                .await;
            match got {
                Err(Error::InProgress) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                got => break got,
            }
        };
        assert!(matches!(got, Ok((2, Outcome::Executed))), "{name}: {got:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{name}: only the retry ran");
    }
}

/// An operation that counts its runs, says it has started, then waits for `gate`.
fn gated(
    runs: &Arc<AtomicU32>,
    started: oneshot::Sender<()>,
    gate: &Arc<Notify>,
    value: u32,
) -> impl FnOnce() -> futures_util::future::BoxFuture<'static, Result<u32, Error>> + Send + 'static
{
    let (runs, gate) = (runs.clone(), gate.clone());
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let _ = started.send(());
            gate.notified().await;
            Ok(value)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_to_completion_finishes_and_stores_an_operation_whose_caller_went_away() {
    for (name, inner) in each_store().await {
        let store = FaultyStore::new(inner).without_peek();
        let (idem, other) = (engine(&store), engine(&store));
        let runs = Arc::new(AtomicU32::new(0));
        let gate = Arc::new(Notify::new());
        let (started_tx, started) = oneshot::channel();
        let caller = tokio::spawn(
            idem.call("k")
                .scope("cancel.finish")
                .run_to_completion(gated(&runs, started_tx, &gate, 1)),
        );
        started.await.expect("the operation starts");
        caller.abort();
        assert!(caller.await.is_err(), "{name}: the caller was cancelled");
        // Its duplicate, here and in another process, waits for it rather than run.
        let here = tokio::spawn(
            idem.call("k")
                .scope("cancel.finish")
                .run_to_completion_with_outcome(counted(&runs, 2)),
        );
        gate.notify_one();
        let got = tokio::time::timeout(WITHIN, here).await.expect("no hang");
        assert!(
            matches!(got, Ok(Ok((1, Outcome::Coalesced | Outcome::Replayed)))),
            "{name}: {got:?}"
        );
        let elsewhere = other
            .call("k")
            .scope("cancel.finish")
            .run_with_outcome(counted(&runs, 3))
            .await;
        assert!(
            matches!(elsewhere, Ok((1, Outcome::Replayed))),
            "{name}: {elsewhere:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn by_default_a_dropped_caller_stops_its_operation_and_frees_the_key() {
    let store =
        FaultyStore::new(Arc::new(idempotent_runtime::store::MemoryStore::new()) as Arc<dyn Store>);
    let idem = engine(&store);
    let runs = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(Notify::new());
    let (started_tx, started) = oneshot::channel();
    let caller = {
        let idem = idem.clone();
        let op = gated(&runs, started_tx, &gate, 1);
        tokio::spawn(async move { idem.call("k").scope("cancel.default").run(op).await })
    };
    started.await.expect("the operation starts");
    caller.abort();
    assert!(caller.await.is_err());
    let got = tokio::time::timeout(
        WITHIN,
        idem.call("k")
            .scope("cancel.default")
            .run_with_outcome(counted(&runs, 2)),
    )
    .await
    .expect("the key was released");
    assert!(matches!(got, Ok((2, Outcome::Executed))), "{got:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the stopped operation ran again"
    );
}

static FINISHING: std::sync::LazyLock<Idempotency> = std::sync::LazyLock::new(Idempotency::memory);

#[idempotent(key = id, store = &*FINISHING, on_cancel = "finish")]
async fn transfer(
    id: u64,
    runs: Arc<AtomicU32>,
    started: oneshot::Sender<()>,
    gate: Arc<Notify>,
) -> Result<u32, Error> {
    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
    let _ = started.send(());
    gate.notified().await;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_attribute_runs_to_completion_with_on_cancel_finish() {
    let runs = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(Notify::new());
    let (started_tx, started) = oneshot::channel();
    let caller = tokio::spawn(transfer(7, runs.clone(), started_tx, gate.clone()));
    started.await.expect("the body starts");
    caller.abort();
    assert!(caller.await.is_err());
    gate.notify_one();
    let (tx, _) = oneshot::channel();
    let again = tokio::time::timeout(WITHIN, transfer(7, runs.clone(), tx, gate.clone()))
        .await
        .expect("no hang");
    assert_eq!(again.expect("replayed"), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
