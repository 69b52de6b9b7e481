//! Outside review of the issue #17 (items 5-6) follow-up: one `outcome` per call span,
//! store errors counted by the operation that failed, keyed digests.
//!
//! Each test is a finding: it fails while the finding stands (or is `#[ignore]`d where
//! it documents a limit that predates the change).

use std::time::Duration;

use idempotent_runtime::metrics as m;
use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{Error, Idempotency};
use idempotent_tests::captured_spans::Spans;
use idempotent_tests::observed::observed;
use idempotent_tests::recorded_metrics::{counted, labels, with_recorder};
use idempotent_tests::{eventually, FaultyStore};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing_subscriber::layer::SubscriberExt as _;

const SCOPE: &str = "review17";
const BOUND: Duration = Duration::from_secs(30);

/// Every outcome the call spans of scope [`SCOPE`] were given, span by span.
fn outcomes(spans: &Spans) -> Vec<Vec<String>> {
    spans
        .calls()
        .iter()
        .filter(|c| c.field("scope") == Some(SCOPE))
        .map(|c| {
            c.recorded("outcome")
                .into_iter()
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

fn store_op(operation: &str) -> Vec<(String, String)> {
    labels(&[
        ("operation", operation),
        ("scope", "call"),
        ("store", "memory"),
    ])
}

// ---------------------------------------------------------------------------------------
// Finding 1: renewals made by the background completion retry (lease.rs `Retry::run`)
// fail without being counted. The change claims every failed store step is counted under
// its operation ("renew" included); these renewals are timed into
// `idempotent_store_seconds{operation="renew"}`, but a failure is neither in
// `idempotent_store_errors_total{operation="renew"}` nor in `Stats::store_errors`.
// ---------------------------------------------------------------------------------------

/// The store goes down as the body returns: the completion fails, and is retried in the
/// background with a renewal between attempts, each of which fails too. Every renewal
/// that reached the (down) store is a failed round trip and should be counted.
#[test]
fn renewals_failed_by_the_background_completion_retry_are_counted() {
    observed(|metrics| async move {
        let store = FaultyStore::new(MemoryStore::new());
        let idem = Idempotency::new(store.clone());
        let down = store.clone();
        let answer = idem
            .call("k")
            .scope(SCOPE)
            .lease(Duration::from_millis(300))
            .run(move || async move {
                down.set_down(true);
                Ok::<_, Error>(1u32)
            })
            .await;
        assert_eq!(answer.expect("the caller gets its value"), 1);
        // The retry gives up once the claim could have lapsed (a lease after its last
        // confirmation) and counts the result unstored.
        eventually(BOUND, "the background completion gives up", || {
            idem.stats().unstored == 1
        })
        .await;
        let renewals = store.renewals();
        assert!(renewals >= 1, "the retry renewed between its attempts");
        let samples = metrics.take();
        let completes = counted(&samples, m::STORE_ERRORS, &store_op("complete"));
        let renews = counted(&samples, m::STORE_ERRORS, &store_op("renew"));
        assert!(completes >= 2, "{samples:?}");
        assert_eq!(
            renews, renewals,
            "each of the {renewals} renewals failed against a store that is down; \
             counted: {renews} (complete errors: {completes})"
        );
        assert_eq!(
            idem.stats().store_errors,
            completes + renewals,
            "Stats::store_errors counts every failed round trip"
        );
    });
}

// ---------------------------------------------------------------------------------------
// Finding 2: a panic after the body returned, in the engine's own handling of its value
// (here the value's `Serialize`, called by `value_completion` before the completion),
// unwinds through `Unfinished` while `std::thread::panicking()`: the span gets no
// outcome at all. Before the change it said `executed` (recorded as the body returned).
// ---------------------------------------------------------------------------------------

/// A value whose serialisation panics.
#[derive(Debug, Deserialize)]
struct Bomb(#[allow(dead_code)] u32);

impl Serialize for Bomb {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("serialising a Bomb");
    }
}

#[test]
fn a_panic_while_storing_the_value_leaves_the_span_with_one_outcome() {
    let spans = observed(|_| async move {
        let idem = Idempotency::memory();
        let call = {
            let idem = idem.clone();
            tokio::spawn(async move {
                idem.call("k")
                    .scope(SCOPE)
                    .run(|| async { Ok::<_, Error>(Bomb(1)) })
                    .await
            })
        };
        let joined = tokio::time::timeout(BOUND, call).await.expect("ends");
        assert!(joined.expect_err("the panic").is_panic());
        assert_eq!(idem.stats().executed, 1);
    });
    assert_eq!(
        outcomes(&spans),
        [["executed"]],
        "the body ran; its span should say so once (it said `executed` before the change)"
    );
}

/// The same panic used to free the key although the body ran to its end, and a retry ran
/// it again (a limit older than the change). The key now keeps the marker of a value that
/// cannot be stored: the retry is refused, and the body does not run again.
#[test]
fn a_panic_while_storing_the_value_does_not_run_the_body_again() {
    with_recorder(|_| async move {
        let idem = Idempotency::memory();
        let runs = idempotent_tests::Runs::default();
        for _ in 0..2 {
            let idem = idem.clone();
            let runs = runs.clone();
            let _ = tokio::spawn(async move {
                idem.call("k")
                    .scope(SCOPE)
                    .run(move || async move {
                        runs.next();
                        Ok::<_, Error>(Bomb(1))
                    })
                    .await
            })
            .await;
        }
        assert_eq!(runs.count(), 1, "the body ran to its end once already");
        let retry = idem
            .call("k")
            .scope(SCOPE)
            .run(|| async { Ok::<_, Error>(1u32) })
            .await;
        assert!(matches!(retry, Err(Error::Codec(_))), "{retry:?}");
    });
}

/// In a transaction, the same panic comes before the commit: the transaction rolls back,
/// so nothing of the body took effect, and the key is freed for a retry, which runs.
#[test]
fn a_panic_while_storing_a_transactions_value_rolls_it_back_and_frees_the_key() {
    with_recorder(|_| async move {
        let store = idempotent_tests::transactions::store_with_effects().await;
        let idem = Idempotency::new(store.clone());
        let table = store.table().to_owned();
        let first = {
            let (idem, table) = (idem.clone(), table.clone());
            tokio::spawn(async move {
                idem.call("k")
                    .scope(SCOPE)
                    .run_in_transaction(|tx| {
                        Box::pin(async move {
                            idempotent_tests::transactions::insert(&table, "bomb", tx).await?;
                            Ok::<_, Error>(Bomb(1))
                        })
                    })
                    .await
            })
        };
        let joined = tokio::time::timeout(BOUND, first).await.expect("ends");
        assert!(joined.expect_err("the panic").is_panic());
        let retry = tokio::time::timeout(
            BOUND,
            idem.call("k").scope(SCOPE).run_in_transaction(|tx| {
                Box::pin(async move {
                    idempotent_tests::transactions::insert(&table, "retry", tx).await?;
                    Ok::<_, Error>(2u32)
                })
            }),
        )
        .await
        .expect("the key is not locked");
        assert_eq!(retry.expect("the retry runs"), 2);
        assert_eq!(
            idempotent_tests::transactions::effects(&store).await,
            ["retry"],
            "the panicked transaction rolled back"
        );
    });
}

// ---------------------------------------------------------------------------------------
// Finding 3: a call dropped while an unrelated panic unwinds (a sibling in the same
// `async` block or `join!` panics) gets no outcome: `Unfinished::drop` skips every drop
// made while the thread panics, not only the unwinding of its own operation's panic.
// ---------------------------------------------------------------------------------------

#[test]
fn a_call_dropped_by_a_siblings_panic_is_cancelled() {
    let spans = observed(|_| async move {
        let idem = Idempotency::memory();
        let task = {
            let idem = idem.clone();
            tokio::spawn(async move {
                let (started, body_started) = oneshot::channel();
                let call = idem.call("k").scope(SCOPE).run(move || async move {
                    let _ = started.send(());
                    std::future::pending::<Result<u32, Error>>().await
                });
                tokio::pin!(call);
                tokio::select! {
                    _ = &mut call => unreachable!("the body never ends"),
                    _ = body_started => {}
                }
                // Another part of the handler fails; `call` is dropped as this unwinds.
                panic!("a sibling of the call panics");
            })
        };
        let joined = tokio::time::timeout(BOUND, task).await.expect("ends");
        assert!(joined.expect_err("the panic").is_panic());
        assert_eq!(idem.stats().executed, 1);
        // The claim is released all the same: a retry runs.
        let again = tokio::time::timeout(
            BOUND,
            idem.call("k")
                .scope("review17-retry")
                .run(|| async { Ok::<_, Error>(2u32) }),
        )
        .await
        .expect("not locked");
        assert_eq!(again.expect("ran"), 2);
    });
    assert_eq!(
        outcomes(&spans),
        [["cancelled"]],
        "the call was dropped before its answer, not by its own operation's panic"
    );
}

// Finding 4 (tests/tests/digest_secret.rs failed when libtest ran single-threaded, as
// its child then printed `test child_prints_its_digest ... digest=<hex>` on one line) is
// covered there: its children now always run with `RUST_TEST_THREADS=1`.

// ---------------------------------------------------------------------------------------
// Held up (kept as regression tests): a `run_to_completion` whose caller is dropped
// keeps its body running, and its span gets the body's outcome, once.
// ---------------------------------------------------------------------------------------

#[test]
fn run_to_completion_with_its_caller_dropped_says_executed_once() {
    let spans = Spans::default();
    let seen = spans.clone();
    with_recorder(move |_| async move {
        let _spans =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(seen.clone()));
        let idem = Idempotency::memory();
        let (started, body_started) = oneshot::channel();
        let (go, gate) = oneshot::channel::<()>();
        let call = idem
            .call("k")
            .scope(SCOPE)
            .run_to_completion(move || async move {
                let _ = started.send(());
                let _ = gate.await;
                Ok::<_, Error>(1u32)
            });
        tokio::select! {
            _ = call => panic!("the body waits for go"),
            _ = body_started => {}
        }
        let _ = go.send(());
        eventually(BOUND, "the detached call records its outcome", || {
            outcomes(&seen).iter().any(|o| !o.is_empty())
        })
        .await;
        assert_eq!(idem.stats().executed, 1);
    });
    assert_eq!(outcomes(&spans), [["executed"]]);
}

/// A transactional call dropped while its body runs: `cancelled`, once; the key is free
/// for a retry, which runs and says `executed`.
#[test]
fn a_transactional_call_dropped_in_its_body_is_cancelled_and_its_key_freed() {
    use idempotent_tests::transactions::{effects, insert, store_with_effects};
    let spans = observed(|_| async move {
        let store = store_with_effects().await;
        let idem = Idempotency::new(store.clone());
        let table = store.table().to_owned();
        let (started, body_started) = oneshot::channel();
        let call = {
            let table = table.clone();
            let mut started = Some(started);
            idem.call("msg").scope(SCOPE).run_in_transaction(move |tx| {
                Box::pin(async move {
                    insert(&table, "first", tx).await?;
                    if let Some(s) = started.take() {
                        let _ = s.send(());
                    }
                    std::future::pending::<Result<u32, Error>>().await
                })
            })
        };
        tokio::select! {
            _ = call => panic!("the body never ends"),
            _ = body_started => {}
        }
        let retry = tokio::time::timeout(
            BOUND,
            idem.call("msg").scope(SCOPE).run_in_transaction(move |tx| {
                Box::pin(async move {
                    insert(&table, "retry", tx).await?;
                    Ok::<_, Error>(2u32)
                })
            }),
        )
        .await
        .expect("the key is freed");
        assert_eq!(retry.expect("ran"), 2);
        assert_eq!(effects(&store).await, ["retry"]);
        assert_eq!(idem.stats().executed, 2);
    });
    assert_eq!(outcomes(&spans), [vec!["cancelled"], vec!["executed"]]);
}

/// A leader cancelled in its body (or, `stalled`, held but no longer polled, with a short
/// lease), with a coalesced follower: the leader says `cancelled`, the follower (which
/// then leads, or takes the stalled leader's claim over, and runs) `executed`.
fn a_followers_leader_ends_without_answer(stalled: bool) {
    let spans = observed(|_| async move {
        let idem = Idempotency::memory();
        let (started, body_started) = oneshot::channel();
        let mut leader = Box::pin(
            idem.call("k")
                .scope(SCOPE)
                .lease(Duration::from_millis(300))
                .run(move || async move {
                    let _ = started.send(());
                    std::future::pending::<Result<u32, Error>>().await
                }),
        );
        tokio::select! {
            _ = &mut leader => unreachable!(),
            _ = body_started => {}
        }
        let follower = {
            let idem = idem.clone();
            tokio::spawn(async move {
                idem.call("k")
                    .scope(SCOPE)
                    .lease(Duration::from_millis(300))
                    .run_with_outcome(|| async { Ok::<_, Error>(2u32) })
                    .await
            })
        };
        // Let the follower join the leader's flight (it waits on it: nothing to signal).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let kept = if stalled { Some(leader) } else { None };
        let (value, how) = tokio::time::timeout(BOUND, follower)
            .await
            .expect("the follower ends")
            .expect("task")
            .expect("answered");
        assert_eq!((value, how), (2, idempotent_runtime::Outcome::Executed));
        assert_eq!(idem.stats().executed, 2);
        drop(kept);
    });
    let mut got = outcomes(&spans);
    got.sort();
    assert_eq!(got, [vec!["cancelled"], vec!["executed"]]);
}

#[test]
fn a_followers_leader_cancelled_gives_one_outcome_each() {
    a_followers_leader_ends_without_answer(false);
}

#[test]
fn a_followers_stalled_leader_taken_over_gives_one_outcome_each() {
    a_followers_leader_ends_without_answer(true);
}
