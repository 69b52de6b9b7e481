//! How each call ends, as its `idempotent.call` span and the metrics tell it: one outcome
//! per span, recorded as the call is answered (`cancelled` for a call dropped on its
//! way), and every failed store step counted under the operation that failed.
//!
//! Each test records metrics into a recorder of its own thread and spans into a
//! subscriber of its own thread, on a current-thread runtime, so tests of this binary
//! that run at once never see each other's.

use std::future::Future;
use std::task::{Context, Poll};
use std::time::Duration;

use idempotent_runtime::metrics as m;
use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{ConfigError, Error, Idempotency};
use idempotent_tests::captured_spans::Spans;
use idempotent_tests::observed::observed;
use idempotent_tests::recorded_metrics::{counted, labels, recorded, Sample};
use idempotent_tests::transactions::{effects, insert, store_with_effects};
use idempotent_tests::{eventually, FaultyStore, Stop};
use tokio::sync::oneshot;
use tracing_subscriber::layer::SubscriberExt as _;

const SCOPE: &str = "endings";
const BOUND: Duration = Duration::from_secs(30);

/// The labels of a store error or round trip of `operation`, on `store`, for calls made
/// without a metrics scope.
fn store_op(operation: &str, store: &str) -> Vec<(String, String)> {
    labels(&[
        ("operation", operation),
        ("scope", "call"),
        ("store", store),
    ])
}

/// The labels of a store round trip's time: no scope.
fn timed_op(operation: &str, store: &str) -> Vec<(String, String)> {
    labels(&[("operation", operation), ("store", store)])
}

/// How many store errors `samples` counted, by operation, on `store`.
fn store_errors(samples: &[Sample], store: &str) -> Vec<(String, u64)> {
    let mut by_op: Vec<(String, u64)> = samples
        .iter()
        .filter(|s| s.name == m::STORE_ERRORS)
        .filter(|s| s.labels.contains(&("store".to_owned(), store.to_owned())))
        .map(|s| {
            let op = s
                .labels
                .iter()
                .find(|(k, _)| k == "operation")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            (
                op,
                counted(std::slice::from_ref(s), m::STORE_ERRORS, &s.labels),
            )
        })
        .collect();
    by_op.sort();
    by_op
}

/// The one `idempotent.call` span `spans` holds, and every outcome it was given.
fn only_outcomes(spans: &Spans) -> Vec<String> {
    let calls = spans.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    calls[0]
        .recorded("outcome")
        .into_iter()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_call_dropped_while_its_body_runs_is_cancelled() {
    let spans = observed(|metrics| async move {
        let idem = Idempotency::memory();
        let (started, body_started) = oneshot::channel();
        let call = idem.call("k").scope(SCOPE).run(move || async move {
            let _ = started.send(());
            std::future::pending::<Result<u32, Error>>().await
        });
        tokio::select! {
            _ = call => panic!("the body never ends"),
            _ = body_started => {}
        }
        let samples = metrics.take();
        assert_eq!(
            counted(
                &samples,
                m::EXECUTIONS,
                &labels(&[("scope", "call"), ("store", "memory")])
            ),
            1,
            "the body ran: {samples:?}"
        );
    });
    assert_eq!(only_outcomes(&spans), ["cancelled"]);
}

/// A caller dropped after its body returned, while its result is being stored: the span
/// says `cancelled` once, not `executed` and then `cancelled`.
#[test]
fn a_call_dropped_while_its_result_is_stored_gets_one_outcome() {
    let spans = observed(|_| async move {
        let store = FaultyStore::new(MemoryStore::new());
        let mut held = store.hold(Stop::Completion);
        let idem = Idempotency::new(store.clone());
        let call = idem
            .call("k")
            .scope(SCOPE)
            .run(|| async { Ok::<_, Error>(1u32) });
        tokio::select! {
            _ = call => panic!("the completion is held"),
            () = held.entered() => {}
        }
        assert_eq!(idem.stats().executed, 1);
    });
    assert_eq!(only_outcomes(&spans), ["cancelled"]);
}

#[test]
fn an_answered_call_records_its_outcome_once() {
    for (runs, expected) in [(1, "executed"), (2, "replayed")] {
        let spans = observed(|_| async move {
            let idem = Idempotency::memory();
            for _ in 1..runs {
                let _ = idem
                    .call("k")
                    .scope(SCOPE)
                    .run(|| async { Ok::<_, Error>(1u32) })
                    .await;
            }
            idem.call("k")
                .scope(SCOPE)
                .run(|| async { Ok::<_, Error>(1u32) })
                .await
                .expect("answered");
        });
        let calls = spans.calls();
        assert_eq!(calls.len(), runs, "{calls:?}");
        let last = calls.last().expect("a call");
        assert_eq!(last.recorded("outcome"), [expected]);
    }
}

/// A store that answers a claim as completed with a record in progress: the call fails
/// as a store error, counted under `claim`, and its span says so. Nothing runs.
#[test]
fn a_claim_answered_in_the_wrong_state_is_a_store_error() {
    let spans = observed(|metrics| async move {
        let store = FaultyStore::new(MemoryStore::new()).without_peek();
        store.set_misanswer(true);
        let idem = Idempotency::new(store);
        let answer = idem
            .call("k")
            .scope(SCOPE)
            .run(|| async { Ok::<_, Error>(1u32) })
            .await;
        assert!(matches!(answer, Err(Error::Store(_))), "{answer:?}");
        assert_eq!(idem.stats().executed, 0);
        let samples = metrics.take();
        assert_eq!(
            store_errors(&samples, "memory"),
            [("claim".to_owned(), 1)],
            "{samples:?}"
        );
    });
    assert_eq!(only_outcomes(&spans), ["store_error"]);
}

/// The same wrong state from the store's own copies in this process (no round trip):
/// counted under `lookup`.
#[test]
fn a_local_record_in_the_wrong_state_is_a_store_error() {
    let spans = observed(|metrics| async move {
        let store = FaultyStore::new(MemoryStore::new());
        store.set_misanswer(true);
        let idem = Idempotency::new(store);
        let answer = idem
            .call("k")
            .scope(SCOPE)
            .run(|| async { Ok::<_, Error>(1u32) })
            .await;
        assert!(matches!(answer, Err(Error::Store(_))), "{answer:?}");
        let samples = metrics.take();
        assert_eq!(
            store_errors(&samples, "memory"),
            [("lookup".to_owned(), 1)],
            "{samples:?}"
        );
    });
    assert_eq!(only_outcomes(&spans), ["store_error"]);
}

/// A claim answered after a third of its lease is renewed before it is used; a renewal
/// that fails there is a failed renewal, not a failed claim. The claim, which did land,
/// is released in the background; that release failing is counted too.
#[test]
fn a_late_claims_failed_renewal_counts_as_renew_and_its_failed_release_as_release() {
    let spans = observed(|metrics| async move {
        let store = FaultyStore::new(MemoryStore::new()).without_peek();
        let mut held = store.hold(Stop::ClaimAnswer);
        let idem = Idempotency::new(store.clone());
        let call = {
            let idem = idem.clone();
            tokio::spawn(async move {
                idem.call("k")
                    .scope(SCOPE)
                    .lease(Duration::from_millis(100))
                    .run(|| async { Ok::<_, Error>(1u32) })
                    .await
            })
        };
        held.entered().await;
        // Only a lower bound: the answer arrives after a third of the lease (33 ms).
        tokio::time::sleep(Duration::from_millis(50)).await;
        store.set_down(true);
        held.open();
        let answer = tokio::time::timeout(BOUND, call)
            .await
            .expect("the call ends")
            .expect("task");
        assert!(matches!(answer, Err(Error::Store(_))), "{answer:?}");
        assert_eq!(idem.stats().executed, 0);
        let mut errors = store_errors(&metrics.take(), "memory");
        assert!(
            errors.contains(&("renew".to_owned(), 1)),
            "the renewal failed: {errors:?}"
        );
        assert!(
            !errors.iter().any(|(op, _)| op == "claim"),
            "the claim itself did not fail: {errors:?}"
        );
        eventually(BOUND, "the background release is tried and fails", || {
            errors.extend(store_errors(&metrics.take(), "memory"));
            errors.iter().any(|(op, _)| op == "release")
        })
        .await;
    });
    assert_eq!(only_outcomes(&spans), ["store_error"]);
}

/// A renewal still in flight when the body returns is dropped; its time is recorded
/// all the same (the slowest renewals are the ones most often cut short).
#[test]
fn a_renewal_cut_short_when_the_body_returns_is_timed() {
    observed(|metrics| async move {
        let store = FaultyStore::new(MemoryStore::new());
        let mut held = store.hold(Stop::Renewal);
        let idem = Idempotency::new(store.clone());
        let (finish, finished) = oneshot::channel::<()>();
        let call = {
            let idem = idem.clone();
            tokio::spawn(async move {
                idem.call("k")
                    .scope(SCOPE)
                    .lease(Duration::from_millis(100))
                    .run(|| async move {
                        let _ = finished.await;
                        Ok::<_, Error>(1u32)
                    })
                    .await
            })
        };
        held.entered().await;
        let _ = finish.send(());
        let answer = tokio::time::timeout(BOUND, call)
            .await
            .expect("the call ends")
            .expect("task");
        assert_eq!(answer.expect("answered"), 1);
        let samples = metrics.take();
        let renewals = recorded(&samples, m::STORE_SECONDS, &timed_op("renew", "memory"));
        assert_eq!(renewals.len(), 1, "{samples:?}");
        assert_eq!(store.renewals(), 1);
    });
}

/// `record` and `forget` are store round trips like the others: timed, and counted
/// when they fail.
#[test]
fn inspecting_and_forgetting_are_timed_and_their_failures_counted() {
    observed(|metrics| async move {
        let store = FaultyStore::new(MemoryStore::new());
        let idem = Idempotency::new(store.clone());
        idem.call("k")
            .scope(SCOPE)
            .run(|| async { Ok::<_, Error>(1u32) })
            .await
            .expect("stored");
        metrics.take();
        assert!(idem.record(SCOPE, "k").await.expect("record").is_some());
        assert!(idem.forget(SCOPE, "k").await.expect("forget"));
        let samples = metrics.take();
        for op in ["inspect", "forget"] {
            let times = recorded(&samples, m::STORE_SECONDS, &timed_op(op, "memory"));
            assert_eq!(times.len(), 1, "{op}: {samples:?}");
        }
        assert!(store_errors(&samples, "memory").is_empty(), "{samples:?}");

        store.set_down(true);
        assert!(idem.record(SCOPE, "k").await.is_err());
        assert!(idem.forget(SCOPE, "k").await.is_err());
        let samples = metrics.take();
        assert_eq!(
            counted(&samples, m::STORE_ERRORS, &store_op("inspect", "memory")),
            1,
            "{samples:?}"
        );
        assert_eq!(
            counted(&samples, m::STORE_ERRORS, &store_op("forget", "memory")),
            1,
            "{samples:?}"
        );
    });
}

/// `run_to_completion` needs a runtime for its task: outside one, the call is refused,
/// and its span says `invalid`.
#[test]
fn running_to_completion_outside_a_runtime_is_invalid() {
    let spans = Spans::default();
    let _spans =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let idem = Idempotency::memory();
    let call = idem
        .call("k")
        .scope(SCOPE)
        .run_to_completion(|| async { Ok::<_, Error>(1u32) });
    let mut call = std::pin::pin!(call);
    let answer = match call
        .as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()))
    {
        Poll::Ready(answer) => answer,
        Poll::Pending => panic!("refused at once"),
    };
    assert!(
        matches!(answer, Err(Error::Config(ConfigError::NoRuntime))),
        "{answer:?}"
    );
    assert_eq!(only_outcomes(&spans), ["invalid"]);
}

/// A call in a PostgreSQL transaction whose key is forgotten while it runs: the commit
/// finds the claim gone and rolls back, so nothing of it took effect; its span says
/// `lease_lost`, not `executed`, and the lost lease is counted.
#[test]
fn a_transaction_rolled_back_at_its_commit_is_lease_lost() {
    let spans = observed(|metrics| async move {
        let store = store_with_effects().await;
        let idem = Idempotency::new(store.clone());
        let table = store.table().to_owned();
        let (started, body_started) = oneshot::channel();
        let (go, gone) = oneshot::channel::<()>();
        let call = {
            let idem = idem.clone();
            tokio::spawn(async move {
                let mut started = Some(started);
                let mut gone = Some(gone);
                idem.call("msg-1")
                    .scope(SCOPE)
                    .run_in_transaction(|tx| {
                        Box::pin(async move {
                            insert(&table, "forgotten", tx).await?;
                            if let Some(s) = started.take() {
                                let _ = s.send(());
                            }
                            if let Some(g) = gone.take() {
                                let _ = g.await;
                            }
                            Ok::<_, Error>(1u32)
                        })
                    })
                    .await
            })
        };
        tokio::time::timeout(BOUND, body_started)
            .await
            .expect("the body starts")
            .expect("the body");
        assert!(idem.forget(SCOPE, "msg-1").await.expect("forget"));
        let _ = go.send(());
        let answer = tokio::time::timeout(BOUND, call)
            .await
            .expect("the call ends")
            .expect("task");
        assert!(matches!(answer, Err(Error::LeaseLost)), "{answer:?}");
        assert!(effects(&store).await.is_empty(), "rolled back");
        let samples = metrics.take();
        let call_labels = labels(&[("scope", "call"), ("store", "postgres")]);
        assert_eq!(
            counted(&samples, m::LEASES_LOST, &call_labels),
            1,
            "{samples:?}"
        );
        assert_eq!(
            counted(&samples, m::EXECUTIONS, &call_labels),
            1,
            "{samples:?}"
        );
        assert_eq!(
            recorded(&samples, m::STORE_SECONDS, &timed_op("begin", "postgres")).len(),
            1,
            "{samples:?}"
        );
        assert_eq!(
            recorded(&samples, m::STORE_SECONDS, &timed_op("commit", "postgres")).len(),
            1,
            "{samples:?}"
        );
    });
    let calls = spans.calls();
    let ours: Vec<_> = calls
        .iter()
        .filter(|c| c.field("scope") == Some(SCOPE))
        .collect();
    assert_eq!(ours.len(), 1, "{calls:?}");
    assert_eq!(ours[0].recorded("outcome"), ["lease_lost"]);
}
