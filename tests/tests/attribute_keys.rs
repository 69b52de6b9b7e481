//! Keys the attribute takes on purpose (`key = const ...`), `Option` keys
//! (`on_missing_key`), and the outcome of one attributed call (`outcome_of`).
//!
//! Functions of this file name no `store`: this crate is built with `cfg(test)`, so each
//! `#[tokio::test]` has a default engine of its own, and equal keys in two tests do not meet.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use idempotent_runtime::{idempotent, outcome_of, Error, Idempotency, KeyError, Outcome};
use idempotent_tests::Runs;
use tokio::sync::{oneshot, Notify};

#[idempotent(key = request_key, on_missing_key = "run", scope = "keys.charge")]
async fn charge(request_key: Option<String>, runs: Runs) -> Result<u32, Error> {
    Ok(runs.next())
}

#[idempotent(key = &req.key, on_missing_key = "fail", scope = "keys.refund")]
async fn refund(req: Refund, runs: Runs) -> Result<u32, Error> {
    Ok(runs.next())
}

struct Refund {
    key: Option<String>,
}

#[idempotent(key = id, on_missing_key = "run", on_cancel = "finish", scope = "keys.finish")]
async fn settle(id: Option<u64>, runs: Runs) -> Result<u32, Error> {
    Ok(runs.next())
}

#[idempotent(key = const "nightly-report", scope = "keys.nightly")]
async fn nightly(day: u32, runs: Runs) -> Result<(u32, u32), Error> {
    Ok((day, runs.next()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_option_key_that_is_some_is_a_key() {
    let runs = Runs::default();
    let first = charge(Some("k1".into()), runs.clone()).await.unwrap();
    let again = charge(Some("k1".into()), runs.clone()).await.unwrap();
    let other = charge(Some("k2".into()), runs.clone()).await.unwrap();
    assert_eq!((first, again, other), (1, 1, 2));
    assert_eq!(runs.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_runs_the_body_every_time_under_run() {
    let runs = Runs::default();
    let idem = Idempotency::memory();
    let answers = idem
        .as_default(async {
            let mut answers = Vec::new();
            for _ in 0..3 {
                let (answer, how) = outcome_of(charge(None, runs.clone())).await;
                assert_eq!(how, None, "no engine answered a call without a key");
                answers.push(answer.unwrap());
            }
            answers
        })
        .await;
    assert_eq!(answers, [1, 2, 3]);
    let stats = idem.stats();
    assert_eq!(
        (stats.executed, stats.replayed),
        (0, 0),
        "the engine saw nothing"
    );
    assert_eq!(idem.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_fails_under_fail_and_runs_nothing() {
    let runs = Runs::default();
    let err = refund(Refund { key: None }, runs.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidKey(KeyError::Missing)),
        "{err:?}"
    );
    assert_eq!(runs.count(), 0);
    // With a key the same function is idempotent.
    let key = || Refund {
        key: Some("r-9".into()),
    };
    assert_eq!(refund(key(), runs.clone()).await.unwrap(), 1);
    assert_eq!(refund(key(), runs.clone()).await.unwrap(), 1);
    assert_eq!(runs.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_option_key_under_on_cancel_finish() {
    let runs = Runs::default();
    assert_eq!(settle(Some(4), runs.clone()).await.unwrap(), 1);
    assert_eq!(settle(Some(4), runs.clone()).await.unwrap(), 1);
    assert_eq!(settle(None, runs.clone()).await.unwrap(), 2);
    assert_eq!(settle(None, runs.clone()).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_const_key_is_shared_by_every_call() {
    let runs = Runs::default();
    // What `key = "..."` would have done silently, said on purpose: the second day gets
    // the first day's report.
    assert_eq!(nightly(1, runs.clone()).await.unwrap(), (1, 1));
    assert_eq!(nightly(2, runs.clone()).await.unwrap(), (1, 1));
    assert_eq!(runs.count(), 1);
}

// --- outcome_of ---------------------------------------------------------------------

#[idempotent(key = id, scope = "outcomes.ship")]
async fn ship(id: u64, runs: Runs) -> Result<u32, Error> {
    Ok(runs.next())
}

#[idempotent(key = id, on_cancel = "finish", scope = "outcomes.finish")]
async fn ship_to_completion(id: u64, runs: Runs) -> Result<u32, Error> {
    Ok(runs.next())
}

/// A body that says it started, then waits to be let go.
#[idempotent(key = id, scope = "outcomes.parked")]
async fn parked(id: u64, started: Arc<Notify>, go: Arc<Notify>) -> Result<u64, Error> {
    started.notify_one();
    go.notified().await;
    Ok(id * 10)
}

#[idempotent(key = id, scope = "outcomes.inner")]
async fn inner(id: u64, runs: Runs) -> Result<u32, Error> {
    Ok(runs.next())
}

/// Calls `inner` with a key of its own: nested attributed calls.
#[idempotent(key = id, scope = "outcomes.outer")]
async fn outer(id: u64, inner_id: u64, runs: Runs) -> Result<u32, Error> {
    inner(inner_id, runs).await
}

#[derive(Debug, thiserror::Error, PartialEq)]
enum PayError {
    #[error("declined")]
    Declined,
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
}

/// `Error` is not `PartialEq`; the test compares kinds.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
struct IdempotencyError(String);

impl From<Error> for PayError {
    fn from(err: Error) -> Self {
        PayError::Idempotency(IdempotencyError(format!("{err:?}")))
    }
}

#[idempotent(key = id, fingerprint = cents, scope = "outcomes.pay")]
async fn pay(id: u64, cents: u64, decline: bool, runs: Runs) -> Result<u64, PayError> {
    runs.next();
    if decline {
        return Err(PayError::Declined);
    }
    Ok(cents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_of_says_executed_then_replayed() {
    let runs = Runs::default();
    let (first, how) = outcome_of(ship(1, runs.clone())).await;
    assert_eq!((first.unwrap(), how), (1, Some(Outcome::Executed)));
    let (again, how) = outcome_of(ship(1, runs.clone())).await;
    assert_eq!((again.unwrap(), how), (1, Some(Outcome::Replayed)));

    let (first, how) = outcome_of(ship_to_completion(1, runs.clone())).await;
    assert_eq!((first.unwrap(), how), (2, Some(Outcome::Executed)));
    let (again, how) = outcome_of(ship_to_completion(1, runs.clone())).await;
    assert_eq!((again.unwrap(), how), (2, Some(Outcome::Replayed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outcome_of_says_coalesced_for_a_duplicate_of_a_running_call() {
    let started = Arc::new(Notify::new());
    let go = Arc::new(Notify::new());
    let (done_tx, done_rx) = oneshot::channel();
    let leader = {
        let (started, go) = (started.clone(), go.clone());
        tokio::spawn(async move {
            let answer = outcome_of(parked(3, started, go)).await;
            let _ = done_tx.send(());
            answer
        })
    };
    started.notified().await;

    // Polled once by hand: the duplicate finds the leader in flight and waits on it. A
    // memory store answers at once, so the only await it can stop at is that wait.
    let mut follower = pin!(outcome_of(parked(
        3,
        Arc::new(Notify::new()),
        Arc::new(Notify::new())
    )));
    let first_poll = std::future::poll_fn(|cx| Poll::Ready(follower.as_mut().poll(cx))).await;
    assert!(
        first_poll.is_pending(),
        "the duplicate waits for the leader"
    );

    go.notify_one();
    done_rx.await.unwrap();
    let (value, how) = follower.await;
    assert_eq!((value.unwrap(), how), (30, Some(Outcome::Coalesced)));
    let (value, how) = leader.await.unwrap();
    assert_eq!((value.unwrap(), how), (30, Some(Outcome::Executed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_calls_do_not_change_the_outer_outcome() {
    let runs = Runs::default();
    // The inner key is stored first, so the nested call replays while the outer runs.
    assert_eq!(inner(50, runs.clone()).await.unwrap(), 1);
    let (value, how) = outcome_of(outer(5, 50, runs.clone())).await;
    assert_eq!((value.unwrap(), how), (1, Some(Outcome::Executed)));
    // And the other way round: the outer replays; its body (and the inner call) does not run.
    let (value, how) = outcome_of(outer(5, 51, runs.clone())).await;
    assert_eq!((value.unwrap(), how), (1, Some(Outcome::Replayed)));
    // A fresh inner key under a fresh outer key: both execute; the outer's is reported.
    let (value, how) = outcome_of(outer(6, 52, runs.clone())).await;
    assert_eq!((value.unwrap(), how), (2, Some(Outcome::Executed)));
    assert_eq!(runs.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_of_a_body_error_and_of_a_refusal() {
    let runs = Runs::default();
    // The body ran and failed: executed, and not stored, so a retry runs again.
    let (answer, how) = outcome_of(pay(8, 100, true, runs.clone())).await;
    assert_eq!(
        (answer, how),
        (Err(PayError::Declined), Some(Outcome::Executed))
    );
    let (answer, how) = outcome_of(pay(8, 100, false, runs.clone())).await;
    assert_eq!((answer, how), (Ok(100), Some(Outcome::Executed)));
    assert_eq!(runs.count(), 2);

    // Another payload under the key: refused before the body, so no outcome.
    let (answer, how) = outcome_of(pay(8, 999, false, runs.clone())).await;
    assert!(
        matches!(&answer, Err(PayError::Idempotency(e)) if e.0.contains("Mismatch")),
        "{answer:?}"
    );
    assert_eq!(how, None);
    assert_eq!(runs.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_that_makes_no_attributed_call_has_no_outcome() {
    let (value, how) = outcome_of(async { 7 }).await;
    assert_eq!((value, how), (7, None));
    // Only the first call in the block reports: a second one, replaying, does not
    // overwrite the first's outcome.
    let runs = Runs::default();
    let ((a, b), how) = outcome_of(async {
        let a = ship(90, runs.clone()).await.unwrap();
        let b = ship(90, runs.clone()).await.unwrap();
        (a, b)
    })
    .await;
    assert_eq!((a, b, how), (1, 1, Some(Outcome::Executed)));
}
