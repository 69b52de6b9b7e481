//! An operation stored with `.store_errors()` (`cache_errors = true`) that ran and
//! returned an error the codec cannot store (one JSON would write as something else, such
//! as a `NaN`, or one whose `Serialize` panics) leaves the marker of an unstorable result
//! on its key, as an unstorable value does: the duplicate that waited for it, in this
//! process or another, and every retry for the TTL get `Error::Codec` (`Unstorable`),
//! and the operation never runs a second time. Before, the key was released: the
//! duplicates and the retries ran the operation again.
//!
//! In `run_in_transaction` the error's writes are rolled back before it is stored, so
//! nothing of the operation took effect, and there the key is still freed for a retry.
//!
//! Against every store: memory, Redis and PostgreSQL.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::{idempotent, CodecErrorKind, Error, Idempotency};
use idempotent_tests::{each_store, Runs};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};

const BOUND: Duration = Duration::from_secs(30);

/// The operation's own error. `Declined` with a `NaN` does not read back as itself (JSON
/// writes `null`); `Bomb`'s `Serialize` panics. `Engine` is what the engine's refusals
/// become, with whether the refusal was `Unstorable`.
#[derive(Debug, Deserialize)]
enum PayError {
    Declined { risk: f64 },
    Bomb,
    Engine { unstorable: bool, text: String },
}

impl Serialize for PayError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        enum Form<'a> {
            Declined { risk: f64 },
            Engine { unstorable: bool, text: &'a str },
        }
        match self {
            PayError::Declined { risk } => Form::Declined { risk: *risk }.serialize(s),
            PayError::Bomb => panic!("serialising a Bomb"),
            PayError::Engine { unstorable, text } => Form::Engine {
                unstorable: *unstorable,
                text,
            }
            .serialize(s),
        }
    }
}

impl From<Error> for PayError {
    fn from(e: Error) -> Self {
        PayError::Engine {
            unstorable: matches!(&e, Error::Codec(c) if c.kind() == CodecErrorKind::Unstorable),
            text: e.to_string(),
        }
    }
}

fn is_unstorable<T: std::fmt::Debug>(got: &Result<T, PayError>) -> bool {
    matches!(
        got,
        Err(PayError::Engine {
            unstorable: true,
            ..
        })
    )
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Bad {
    /// Returns `Declined { risk: NaN }`.
    Nan,
    /// Returns `Bomb`.
    Panics,
}

impl Bad {
    fn error(self) -> PayError {
        match self {
            Bad::Nan => PayError::Declined { risk: f64::NAN },
            Bad::Panics => PayError::Bomb,
        }
    }
}

type Body = Pin<Box<dyn Future<Output = Result<u32, PayError>> + Send>>;

/// A body that counts its run and returns `bad`'s error.
fn failing(runs: &Runs, bad: Bad) -> impl FnOnce() -> Body + Send + 'static {
    let runs = runs.clone();
    move || {
        Box::pin(async move {
            runs.next();
            Err(bad.error())
        })
    }
}

/// The first call's own answer: its error, or the panic of the error's `Serialize` (the
/// engine lets it go on to the caller, as for a value).
fn first_answer_ok(bad: Bad, joined: Result<Result<u32, PayError>, tokio::task::JoinError>) {
    match bad {
        Bad::Nan => {
            let got = joined.expect("no panic");
            assert!(
                matches!(got, Err(PayError::Declined { risk }) if risk.is_nan()),
                "the caller that ran it gets its own error: {got:?}"
            );
        }
        Bad::Panics => {
            let err = joined.expect_err("the panic goes on to the caller");
            assert!(err.is_panic(), "{err:?}");
        }
    }
}

/// A leader that holds its key until `gate` opens, a duplicate in the same process (it
/// waits on the leader) and one through a second engine on the same store (as another
/// process would: it waits on the store), then retries through both engines.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_error_that_cannot_be_stored_is_never_run_again() {
    for (name, store) in each_store().await {
        for bad in [Bad::Nan, Bad::Panics] {
            let here = Idempotency::builder()
                .store(store.clone())
                .build()
                .expect("engine");
            let there = Idempotency::builder()
                .store(store.clone())
                .lease(Duration::from_secs(5))
                .build()
                .expect("engine");
            let scope = format!("unstorable-errors-{bad:?}");
            let runs = Runs::default();
            let entered = Arc::new(Notify::new());
            let (open, gate) = oneshot::channel::<()>();
            let leader = {
                let (here, scope, runs, entered) =
                    (here.clone(), scope.clone(), runs.clone(), entered.clone());
                tokio::spawn(async move {
                    here.call("pay-1")
                        .scope(scope)
                        .store_errors()
                        .run(move || async move {
                            runs.next();
                            entered.notify_one();
                            let _ = gate.await;
                            Err::<u32, _>(bad.error())
                        })
                        .await
                })
            };
            entered.notified().await;
            let duplicate = |engine: &Idempotency| {
                let (engine, scope, runs) = (engine.clone(), scope.clone(), runs.clone());
                tokio::spawn(async move {
                    engine
                        .call("pay-1")
                        .scope(scope)
                        .store_errors()
                        .run(failing(&runs, bad))
                        .await
                })
            };
            let (local, remote) = (duplicate(&here), duplicate(&there));
            open.send(()).expect("the leader waits");
            let joined = tokio::time::timeout(BOUND, leader).await.expect("ends");
            first_answer_ok(bad, joined);
            for (who, task) in [("in this process", local), ("in another", remote)] {
                let got = tokio::time::timeout(BOUND, task)
                    .await
                    .expect("ends")
                    .expect("no panic");
                assert!(
                    is_unstorable(&got),
                    "{name}, {bad:?}: the duplicate {who} got {got:?}"
                );
            }
            for engine in [&here, &there] {
                let got = engine
                    .call("pay-1")
                    .scope(scope.clone())
                    .store_errors()
                    .run(failing(&runs, bad))
                    .await;
                assert!(is_unstorable(&got), "{name}, {bad:?}: a retry got {got:?}");
            }
            assert_eq!(runs.count(), 1, "{name}, {bad:?}: the operation ran again");
            assert_eq!(here.stats().unstored, 1, "{name}, {bad:?}");
            assert_eq!(here.stats().executed, 1, "{name}, {bad:?}");
        }
    }
}

/// The same through `run_to_completion`, whose operation runs in a task of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_to_completion_keeps_the_marker_too() {
    for (name, store) in each_store().await {
        for bad in [Bad::Nan, Bad::Panics] {
            let idem = Idempotency::builder()
                .store(store.clone())
                .build()
                .expect("engine");
            let scope = format!("unstorable-errors-detached-{bad:?}");
            let runs = Runs::default();
            let first = {
                let (idem, scope, runs) = (idem.clone(), scope.clone(), runs.clone());
                tokio::spawn(async move {
                    idem.call("pay-2")
                        .scope(scope)
                        .store_errors()
                        .run_to_completion(failing(&runs, bad))
                        .await
                })
            };
            let joined = tokio::time::timeout(BOUND, first).await.expect("ends");
            first_answer_ok(bad, joined);
            let retry = idem
                .call("pay-2")
                .scope(scope)
                .store_errors()
                .run_to_completion(failing(&runs, bad))
                .await;
            assert!(is_unstorable(&retry), "{name}, {bad:?}: {retry:?}");
            assert_eq!(runs.count(), 1, "{name}, {bad:?}: the operation ran again");
        }
    }
}

#[idempotent(key = id, store = idem, scope = "unstorable-errors-attr", cache_errors = true)]
async fn pay(idem: &Idempotency, id: &str, runs: &Runs, bad: Bad) -> Result<u32, PayError> {
    runs.next();
    Err(bad.error())
}

/// The attribute's `cache_errors = true` is `.store_errors()`: the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attribute_keeps_the_marker_too() {
    for (name, store) in each_store().await {
        let idem = Idempotency::builder().store(store).build().expect("engine");
        for (id, bad) in [("pay-nan", Bad::Nan), ("pay-bomb", Bad::Panics)] {
            let runs = Runs::default();
            let first = {
                let (idem, runs) = (idem.clone(), runs.clone());
                tokio::spawn(async move { pay(&idem, id, &runs, bad).await })
            };
            let joined = tokio::time::timeout(BOUND, first).await.expect("ends");
            first_answer_ok(bad, joined);
            for _ in 0..2 {
                let retry = pay(&idem, id, &runs, bad).await;
                assert!(is_unstorable(&retry), "{name}, {bad:?}: {retry:?}");
            }
            assert_eq!(runs.count(), 1, "{name}, {bad:?}: the operation ran again");
        }
    }
}

/// Errors not stored (the default) are unchanged: the key is released, and a retry runs
/// the operation again, whatever the error's `Serialize` would do (it is never called).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_not_stored_still_free_the_key() {
    let idem = Idempotency::memory();
    let runs = Runs::default();
    for bad in [Bad::Nan, Bad::Panics, Bad::Nan] {
        let got = idem
            .call("pay-3")
            .scope("unstorable-errors-discarded")
            .run(failing(&runs, bad))
            .await;
        assert!(
            matches!(got, Err(PayError::Declined { .. } | PayError::Bomb)),
            "{got:?}"
        );
    }
    assert_eq!(runs.count(), 3);
    assert_eq!(idem.stats().unstored, 0);
}

/// In `run_in_transaction` an error is stored after its transaction rolled back: an error
/// that cannot be stored leaves nothing of the operation behind, and the key is freed, so
/// a retry runs (and writes) once more, never on top of the first one's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_transaction_the_writes_roll_back_and_the_key_is_freed() {
    use idempotent_tests::transactions::{effects, engine, insert, store_with_effects};

    for bad in [Bad::Nan, Bad::Panics] {
        let store = store_with_effects().await;
        let idem = engine(store.clone(), Duration::from_secs(30));
        let table = store.table().to_owned();
        let runs = Runs::default();
        for round in 0..2 {
            let call = {
                let (idem, table, runs) = (idem.clone(), table.clone(), runs.clone());
                tokio::spawn(async move {
                    idem.call("pay-4")
                        .scope("unstorable-errors-tx")
                        .store_errors()
                        .run_in_transaction(|tx| {
                            Box::pin(async move {
                                let who = format!("run-{}", runs.next());
                                insert(&table, &who, tx).await.map_err(PayError::from)?;
                                Err::<u32, _>(bad.error())
                            })
                        })
                        .await
                })
            };
            let joined = tokio::time::timeout(BOUND, call).await.expect("ends");
            first_answer_ok(bad, joined);
            assert_eq!(runs.count(), round + 1, "{bad:?}: the retry ran");
            assert!(effects(&store).await.is_empty(), "{bad:?}: rolled back");
        }
        assert_eq!(idem.stats().unstored, 0, "{bad:?}");
    }
}

/// A marker whose claim was taken over before it could be stored is not stored: its
/// execution counts in `lease_lost`, not in `unstored` too (`Stats::unstored` counts
/// results not stored although their claim was not taken over). Values and errors alike.
/// Before, the marker counted in `unstored` as it was made, before its completion.
#[tokio::test(flavor = "current_thread")]
async fn a_marker_whose_claim_was_taken_over_counts_once() {
    for as_error in [false, true] {
        let idem = Idempotency::builder()
            .store(idempotent_runtime::store::MemoryStore::new())
            .lease(Duration::from_millis(300))
            .build()
            .expect("engine");
        let entered = Arc::new(Notify::new());
        let (open, gate) = oneshot::channel::<()>();
        let body = {
            let entered = entered.clone();
            move || async move {
                entered.notify_one();
                let _ = gate.await;
                if as_error {
                    Err(Bad::Nan.error())
                } else {
                    Ok(f64::NAN)
                }
            }
        };
        let mut leader = Box::pin(idem.call("k").scope("lost").store_errors().run(body));
        tokio::select! {
            _ = &mut leader => unreachable!("the leader waits for its gate"),
            _ = entered.notified() => {}
        }
        // The leader is no longer polled: after a lease without its heartbeat, a caller
        // takes the key over and runs.
        let taken = idem
            .call("k")
            .scope("lost")
            .store_errors()
            .run(|| async { Ok::<f64, PayError>(1.0) })
            .await;
        assert!(matches!(taken, Ok(v) if v == 1.0), "{taken:?}");
        open.send(()).expect("the leader waits");
        let first = tokio::time::timeout(BOUND, leader).await.expect("ends");
        assert!(
            match &first {
                Ok(v) => v.is_nan(),
                Err(PayError::Declined { risk }) => risk.is_nan(),
                Err(_) => false,
            },
            "as_error {as_error}: the caller that ran gets its own answer: {first:?}"
        );
        let stats = idem.stats();
        assert_eq!(stats.lease_lost, 1, "as_error {as_error}: {stats:?}");
        assert_eq!(stats.unstored, 0, "as_error {as_error}: {stats:?}");
        assert_eq!(stats.executed, 2, "as_error {as_error}: {stats:?}");
    }
}
