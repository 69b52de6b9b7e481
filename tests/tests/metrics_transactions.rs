//! The metrics of `run_in_transaction`, on the test PostgreSQL: an execution counted
//! once, its commit timed as `operation="commit"` (the commit completes the claim: no
//! `complete` round trip), a replay counted; an operation's error counted as an
//! execution, with no commit. Each test makes a fresh table, so its keys are its own.

use std::time::Duration;

use idempotent_runtime::metrics as m;
use idempotent_runtime::Outcome;
use idempotent_tests::recorded_metrics::{counted, labels, recorded, with_recorder, Sample};
use idempotent_tests::transactions::{apply, effects, engine, insert, store_with_effects};

const SCOPE: &str = "ledger.metrics";

/// The labels of a call of the engine's API on PostgreSQL (no metric scope given).
fn of_call() -> Vec<(String, String)> {
    labels(&[("scope", m::CALL_SCOPE), ("store", "postgres")])
}

/// How many round trips of `operation` to PostgreSQL `samples` timed.
fn timed(samples: &[Sample], operation: &str) -> usize {
    recorded(
        samples,
        m::STORE_SECONDS,
        &labels(&[("operation", operation), ("store", "postgres")]),
    )
    .len()
}

#[test]
fn a_transactional_call_counts_one_execution_times_its_commit_and_counts_its_replay() {
    with_recorder(|metrics| async move {
        let store = store_with_effects().await;
        let idem = engine(store.clone(), Duration::from_secs(5));
        let t = store.table().to_owned();

        let first = apply(&idem, SCOPE, &t, "msg-1", "first", 7u32).await;
        assert_eq!(first.unwrap(), (7, Outcome::Executed));
        let samples = metrics.take();
        assert_eq!(
            counted(&samples, m::EXECUTIONS, &of_call()),
            1,
            "{samples:?}"
        );
        assert_eq!(timed(&samples, "commit"), 1, "{samples:?}");
        assert_eq!(timed(&samples, "complete"), 0, "{samples:?}");

        let again = apply(&idem, SCOPE, &t, "msg-1", "again", 8u32).await;
        assert_eq!(again.unwrap(), (7, Outcome::Replayed));
        let samples = metrics.take();
        assert_eq!(counted(&samples, m::REPLAYS, &of_call()), 1, "{samples:?}");
        assert_eq!(
            counted(&samples, m::EXECUTIONS, &of_call()),
            0,
            "{samples:?}"
        );
        assert_eq!(timed(&samples, "commit"), 0, "{samples:?}");
        assert_eq!(effects(&store).await, ["first"]);
    });
}

#[test]
fn an_operations_error_counts_an_execution_and_commits_nothing() {
    with_recorder(|metrics| async move {
        let store = store_with_effects().await;
        let idem = engine(store.clone(), Duration::from_secs(5));
        let t = store.table().to_owned();

        let declined = idem
            .call("msg-2")
            .scope(SCOPE)
            .run_in_transaction(|tx| {
                Box::pin(async {
                    insert(&t, "declined", tx).await?;
                    Err::<u32, _>(anyhow::anyhow!("insufficient funds"))
                })
            })
            .await;
        assert_eq!(declined.unwrap_err().to_string(), "insufficient funds");
        let samples = metrics.take();
        assert_eq!(
            counted(&samples, m::EXECUTIONS, &of_call()),
            1,
            "{samples:?}"
        );
        assert_eq!(timed(&samples, "commit"), 0, "{samples:?}");
        // The key was given back, for a retry to run.
        assert_eq!(timed(&samples, "release"), 1, "{samples:?}");
        assert!(effects(&store).await.is_empty());
    });
}
