//! The engine's metrics through the `metrics` facade (feature `metrics`), read back from
//! `metrics-util`'s debugging recorder.
//!
//! Each test installs its own recorder for its own thread
//! ([`with_recorder`](idempotent_tests::recorded_metrics::with_recorder)) and runs on a
//! current-thread runtime inside it, so tests of this binary that run at once never see
//! each other's metrics, and every task a test spawns records into its recorder.
//! A snapshot takes the counters' values and resets them, so each step below checks what
//! it moved, and that nothing else moved.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::clock::ManualClock;
use idempotent_runtime::metrics as m;
use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{idempotent, Concurrency, Error, Idempotency, Outcome};
use idempotent_tests::recorded_metrics::{
    labels, moved, recorded, with_recorder, Moved, Sample, Value,
};
use idempotent_tests::FaultyStore;
use metrics_util::debugging::DebuggingRecorder;
use tokio::sync::oneshot;

fn ok(v: u32) -> impl FnOnce() -> std::future::Ready<Result<u32, Error>> {
    move || std::future::ready(Ok(v))
}

/// Lets every task that is ready run until it waits (a current-thread runtime runs the
/// tasks it was woken for before it comes back to this one).
async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

#[test]
fn a_stored_result_that_does_not_decode_is_no_replay() {
    with_recorder(|metrics| async move {
        let idem = Idempotency::memory();
        let call = || idem.call("order-7").scope("orders").metrics_scope("orders");
        call().run(ok(7)).await.unwrap();
        assert_eq!(metrics.counters(), vec![moved(m::EXECUTIONS, "orders", 1)]);

        // The same key read as another type: the caller gets a codec error, and neither
        // the counter nor the engine's figures say it was replayed.
        let wrong = call()
            .run(|| std::future::ready(Ok::<String, Error>("never runs".into())))
            .await;
        assert!(matches!(wrong, Err(Error::Codec(_))), "{wrong:?}");
        assert_eq!(metrics.counters(), Vec::<Moved>::new());
        assert_eq!(idem.stats().replayed, 0);

        // Read as its own type it replays, and counts.
        assert_eq!(call().run(ok(8)).await.unwrap(), 7);
        assert_eq!(metrics.counters(), vec![moved(m::REPLAYS, "orders", 1)]);
    });
}

#[test]
fn executions_replays_and_mismatches_move_their_counters_once_each() {
    with_recorder(|metrics| async move {
        let idem = Idempotency::memory();
        let call = |fp: &str| {
            idem.call("order-1")
                .scope("orders")
                .metrics_scope("orders")
                .fingerprint(fp)
        };

        let (_, how) = call("a").run_with_outcome(ok(1)).await.unwrap();
        assert_eq!(how, Outcome::Executed);
        assert_eq!(metrics.counters(), vec![moved(m::EXECUTIONS, "orders", 1)]);

        let (_, how) = call("a").run_with_outcome(ok(2)).await.unwrap();
        assert_eq!(how, Outcome::Replayed);
        assert_eq!(metrics.counters(), vec![moved(m::REPLAYS, "orders", 1)]);

        let refused = call("b").run(ok(3)).await;
        assert!(matches!(refused, Err(Error::Mismatch)), "{refused:?}");
        assert_eq!(metrics.counters(), vec![moved(m::MISMATCHES, "orders", 1)]);

        // The engine's own figures agree.
        let s = idem.stats();
        assert_eq!((s.executed, s.replayed, s.mismatched), (1, 1, 1));
    });
}

#[test]
fn a_coalesced_follower_is_counted_and_its_wait_is_timed() {
    with_recorder(|metrics| async move {
        let idem = Idempotency::memory();
        let (open, gate) = oneshot::channel::<()>();
        let (entered_tx, entered) = oneshot::channel::<()>();
        let leader = tokio::spawn({
            let idem = idem.clone();
            async move {
                idem.call("k")
                    .scope("jobs")
                    .metrics_scope("jobs")
                    .run_with_outcome(|| async move {
                        let _ = entered_tx.send(());
                        gate.await.expect("gate");
                        Ok::<_, Error>(7u32)
                    })
                    .await
            }
        });
        entered.await.expect("the leader runs");
        let follower = tokio::spawn({
            let idem = idem.clone();
            async move {
                idem.call("k")
                    .scope("jobs")
                    .metrics_scope("jobs")
                    .run_with_outcome(ok(8))
                    .await
            }
        });
        // The follower joins the leader's flight and waits; nothing is timed until it ends.
        settle().await;
        assert_eq!(metrics.counters(), vec![moved(m::EXECUTIONS, "jobs", 1)]);
        open.send(()).expect("the leader waits");
        assert_eq!(leader.await.unwrap().unwrap(), (7, Outcome::Executed));
        // Coalesced, not replayed: it had joined before the leader finished.
        assert_eq!(follower.await.unwrap().unwrap(), (7, Outcome::Coalesced));

        let samples = metrics.take();
        let coalesced: Vec<_> = samples.iter().filter(|s| s.name == m::COALESCED).collect();
        assert_eq!(coalesced.len(), 1, "{samples:?}");
        assert_eq!(coalesced[0].value, Value::Counter(1));
        assert_eq!(
            coalesced[0].labels,
            labels(&[("scope", "jobs"), ("store", "memory")])
        );
        let waits: Vec<_> = samples
            .iter()
            .filter(|s| s.name == m::WAIT_SECONDS)
            .collect();
        assert_eq!(waits.len(), 1, "one wait, of the follower: {samples:?}");
        assert_eq!(
            waits[0].labels,
            labels(&[
                ("scope", "jobs"),
                ("store", "memory"),
                ("via", "in_process")
            ])
        );
        match &waits[0].value {
            Value::Histogram(xs) => {
                assert_eq!(xs.len(), 1, "{xs:?}");
                assert!(xs[0] >= 0.0 && xs[0] < 60.0, "{xs:?}");
            }
            other => panic!("not a histogram: {other:?}"),
        }
    });
}

#[test]
fn a_duplicate_refused_in_flight_counts_a_rejection_and_waits_for_nothing() {
    with_recorder(|metrics| async move {
        let idem = Idempotency::memory();
        let (open, gate) = oneshot::channel::<()>();
        let (entered_tx, entered) = oneshot::channel::<()>();
        let leader = tokio::spawn({
            let idem = idem.clone();
            async move {
                idem.call("k")
                    .scope("reports")
                    .metrics_scope("reports")
                    .run(|| async move {
                        let _ = entered_tx.send(());
                        gate.await.expect("gate");
                        Ok::<_, Error>(1u32)
                    })
                    .await
            }
        });
        entered.await.expect("the leader runs");
        metrics.take();
        let refused = idem
            .call("k")
            .scope("reports")
            .metrics_scope("reports")
            .concurrency(Concurrency::Reject)
            .run(ok(2))
            .await;
        assert!(matches!(refused, Err(Error::InProgress)), "{refused:?}");
        assert_eq!(
            metrics.take(),
            vec![Sample {
                name: m::REJECTIONS.into(),
                labels: labels(&[("scope", "reports"), ("store", "memory")]),
                value: Value::Counter(1),
            }],
            "a rejection, and no wait"
        );
        open.send(()).expect("the leader waits");
        assert_eq!(leader.await.unwrap().unwrap(), 1);
    });
}

#[test]
fn a_failing_store_counts_an_error_of_the_claim_and_runs_nothing() {
    with_recorder(|metrics| async move {
        let store = FaultyStore::new(MemoryStore::new());
        let idem = Idempotency::new(store.clone());
        store.set_down(true);
        let runs = Arc::new(AtomicU32::new(0));
        let failed = idem
            .call("k")
            .metrics_scope("payouts")
            .run(|| {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Error>(1u32) }
            })
            .await;
        assert!(matches!(failed, Err(Error::Store(_))), "{failed:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        let samples = metrics.take();
        let errors: Vec<_> = samples
            .iter()
            .filter(|s| s.name == m::STORE_ERRORS)
            .collect();
        assert_eq!(errors.len(), 1, "{samples:?}");
        assert_eq!(errors[0].value, Value::Counter(1));
        // The wrapper forwards its inner store's kind.
        assert_eq!(
            errors[0].labels,
            labels(&[
                ("operation", "claim"),
                ("scope", "payouts"),
                ("store", "memory")
            ])
        );
        assert!(
            !samples.iter().any(|s| s.name == m::EXECUTIONS),
            "{samples:?}"
        );
        // The failed claim's round trip is timed too.
        assert!(
            samples.iter().any(|s| s.name == m::STORE_SECONDS
                && s.labels == labels(&[("operation", "claim"), ("store", "memory")])),
            "{samples:?}"
        );
        assert_eq!(idem.stats().store_errors, 1);
    });
}

#[test]
fn store_round_trips_are_timed_by_operation() {
    with_recorder(|metrics| async move {
        let idem = Idempotency::memory();
        idem.call("ok").run(ok(1)).await.unwrap();
        let failed: Result<u32, Error> = idem
            .call("err")
            .run(|| async { Err(Error::Cancelled) })
            .await;
        assert!(failed.is_err());
        // A hit reads the memory store's local tier: no round trip.
        idem.call("ok").run(ok(2)).await.unwrap();

        let samples = metrics.take();
        let timed = |op: &str| -> usize {
            recorded(
                &samples,
                m::STORE_SECONDS,
                &labels(&[("operation", op), ("store", "memory")]),
            )
            .len()
        };
        // Two claims; the value completed, the error released.
        assert_eq!(
            (
                timed("claim"),
                timed("complete"),
                timed("release"),
                timed("renew")
            ),
            (2, 1, 1, 0),
            "{samples:?}"
        );
        // Calls of the API without a metrics scope are labelled "call".
        assert!(samples.contains(&Sample {
            name: m::EXECUTIONS.into(),
            labels: labels(&[("scope", m::CALL_SCOPE), ("store", "memory")]),
            value: Value::Counter(2),
        }));
    });
}

#[test]
fn results_evicted_before_their_ttl_are_counted() {
    with_recorder(|metrics| async move {
        let store = MemoryStore::builder().capacity(4).build();
        let idem = Idempotency::new(store.clone());
        for i in 0..40u32 {
            idem.call(i).run(ok(i)).await.unwrap();
            store.run_pending_tasks();
        }
        store.run_pending_tasks();
        let evicted = idem.stats().evicted;
        assert!(evicted >= 30, "{evicted}");
        let counted: Vec<_> = metrics
            .counters()
            .into_iter()
            .filter(|(name, ..)| name == m::EVICTIONS_BEFORE_TTL)
            .collect();
        assert_eq!(
            counted,
            vec![(
                m::EVICTIONS_BEFORE_TTL.to_owned(),
                labels(&[("store", "memory")]),
                evicted
            )]
        );
    });
}

#[test]
fn a_holder_whose_claim_was_taken_over_counts_a_lost_lease() {
    with_recorder(|metrics| async move {
        let clock = ManualClock::new();
        let store = MemoryStore::builder().clock(clock.clone()).build();
        let (stalled, other) = (Idempotency::new(store.clone()), Idempotency::new(store));
        let (resume, gate) = oneshot::channel::<()>();
        let (entered_tx, entered) = oneshot::channel::<()>();
        let slow = tokio::spawn({
            let stalled = stalled.clone();
            async move {
                stalled
                    .call("k")
                    .metrics_scope("transfers")
                    .run(|| async move {
                        let _ = entered_tx.send(());
                        gate.await.expect("gate");
                        Ok::<_, Error>(1u32)
                    })
                    .await
            }
        });
        entered.await.expect("the holder runs");
        // The holder stalls past its lease: another engine takes the key over and runs.
        clock.advance(idempotent_runtime::DEFAULT_LEASE + Duration::from_secs(1));
        let (_, how) = other
            .call("k")
            .metrics_scope("transfers")
            .run_with_outcome(ok(2))
            .await
            .unwrap();
        assert_eq!(how, Outcome::Executed);
        metrics.take();
        resume.send(()).expect("the holder waits");
        assert_eq!(slow.await.unwrap().unwrap(), 1);
        assert_eq!(
            metrics.counters(),
            vec![moved(m::LEASES_LOST, "transfers", 1)]
        );
        assert_eq!(stalled.stats().lease_lost, 1);
    });
}

static ATTRIBUTE_ENGINE: std::sync::LazyLock<Idempotency> =
    std::sync::LazyLock::new(Idempotency::memory);

#[idempotent(key = id, scope = "billing.invoice", store = &*ATTRIBUTE_ENGINE)]
async fn invoice(id: u64) -> Result<u64, Error> {
    Ok(id)
}

#[idempotent(key = id, store = &*ATTRIBUTE_ENGINE)]
async fn unscoped(id: u64) -> Result<u64, Error> {
    Ok(id)
}

#[test]
fn the_attribute_labels_calls_with_its_scope_and_the_api_never_with_a_request_scope() {
    with_recorder(|metrics| async move {
        let id = std::process::id() as u64;
        invoice(id).await.unwrap();
        invoice(id).await.unwrap();
        unscoped(id).await.unwrap();
        let counters = metrics.counters();
        assert!(
            counters.contains(&(
                m::EXECUTIONS.into(),
                labels(&[("scope", "billing.invoice"), ("store", "memory")]),
                1
            )),
            "{counters:?}"
        );
        assert!(
            counters.contains(&(
                m::REPLAYS.into(),
                labels(&[("scope", "billing.invoice"), ("store", "memory")]),
                1
            )),
            "{counters:?}"
        );
        // Without a scope, the function's path, as its store key's scope.
        assert!(
            counters.contains(&(
                m::EXECUTIONS.into(),
                labels(&[("scope", "metrics::unscoped"), ("store", "memory")]),
                1
            )),
            "{counters:?}"
        );

        // A scope made from a request stays out of the labels.
        let idem = Idempotency::memory();
        idem.call("k")
            .scope(format!("tenant-{id}"))
            .run(ok(1))
            .await
            .unwrap();
        assert_eq!(
            metrics.counters(),
            vec![moved(m::EXECUTIONS, m::CALL_SCOPE, 1)]
        );
    });
}

#[test]
fn describe_gives_every_metric_a_unit_and_a_description() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        m::describe();
        // Only metrics recorded show in a snapshot: record one of each kind.
        metrics::counter!(m::EXECUTIONS).increment(1);
        metrics::histogram!(m::STORE_SECONDS).record(0.5);
    });
    let snapshot = snapshotter.snapshot().into_vec();
    assert_eq!(snapshot.len(), 2, "{snapshot:?}");
    for (key, unit, description, _) in snapshot {
        let name = key.key().name().to_owned();
        let expected = if name == m::EXECUTIONS {
            metrics::Unit::Count
        } else {
            metrics::Unit::Seconds
        };
        assert_eq!(unit, Some(expected), "{name}");
        assert!(description.is_some_and(|d| !d.is_empty()), "{name}");
    }
}

#[test]
fn the_http_layer_labels_its_calls_http_and_never_with_the_request_path() {
    use bytes::Bytes;
    use http::{header, Method, Request, Response, StatusCode};
    use http_body_util::Full;
    use idempotent_runtime::http::IdempotencyLayer;
    use tower::{Layer as _, ServiceExt as _};

    with_recorder(|metrics| async move {
        let svc = IdempotencyLayer::new(Idempotency::memory()).layer(tower::service_fn(
            |_req: Request<Full<Bytes>>| async {
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                    b"{\"paid\":true}",
                ))))
            },
        ));
        for _ in 0..2 {
            let req = Request::builder()
                .method(Method::POST)
                .uri("/payments/customer-42")
                .header("idempotency-key", "pay-1")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            let resp = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
        assert_eq!(
            metrics.counters(),
            vec![
                moved(m::EXECUTIONS, m::HTTP_SCOPE, 1),
                moved(m::REPLAYS, m::HTTP_SCOPE, 1)
            ]
        );
    });
}
