//! The attribute's calls with no subscriber (answered before their request is built),
//! under an `EnvFilter` for another crate only, and under `idempotent_runtime=debug`
//! (the request's path, which makes the span): the same answers, runs and counts; where
//! the crate's spans are on, every call has one, with the outcome it was answered with.
//! One test, in a binary of its own: its subscribers raise the global level, which
//! would send other tests of the binary down the request's path.

use std::sync::atomic::{AtomicU32, Ordering};

use idempotent_runtime::{outcome_of, Idempotency};
use idempotent_tests::block_on;
use idempotent_tests::captured_spans::alike_under_subscribers;
use idempotent_tests::local_hit_fns::{charge, receipt};

async fn script() -> (Vec<String>, u32, (u64, u64, u64)) {
    let idem = Idempotency::memory();
    let runs = AtomicU32::new(0);
    let mut answers = Vec::new();
    for (order, cents) in [
        ("a", 1),
        ("a", 1),
        ("a", 1),
        ("a", 2),
        ("b", 3),
        ("a", 1),
        ("", 1),
    ] {
        answers.push(format!(
            "{:?}",
            outcome_of(charge(&idem, &runs, order, cents)).await
        ));
    }
    for _ in 0..3 {
        answers.push(format!(
            "{:?}",
            outcome_of(receipt(&idem, &runs, "r")).await
        ));
    }
    let s = idem.stats();
    (
        answers,
        runs.load(Ordering::SeqCst),
        (s.executed, s.replayed, s.mismatched),
    )
}

#[test]
fn filtered_subscribers_change_nothing_but_spans() {
    let (quiet, ours) = alike_under_subscribers(|| block_on(script()));
    assert_eq!(quiet.1, 3, "{quiet:?}");
    assert_eq!(quiet.2, (3, 5, 1), "{quiet:?}");

    let outcomes: Vec<Option<String>> = ours
        .calls()
        .iter()
        .map(|s| s.field("outcome").map(str::to_owned))
        .collect();
    let want: Vec<Option<String>> = [
        "executed", "replayed", "replayed", "mismatch", "executed", "replayed", "invalid",
        "executed", "replayed", "replayed",
    ]
    .iter()
    .map(|s| Some((*s).to_owned()))
    .collect();
    assert_eq!(outcomes, want);
}
