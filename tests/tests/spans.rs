//! One `idempotent.call` span per call, with its scope, a digest of its key, its store and
//! its outcome; the body's own spans nest under it.
//!
//! Each test sets its own subscriber for its thread (`set_default`) and runs on a
//! current-thread runtime ([`with_spans`]), so tests of this binary that run at once
//! never see each other's spans.

use idempotent_runtime::{idempotent, Concurrency, Error, Idempotency, Outcome, StoreKey};
use idempotent_tests::captured_spans::{with_spans, Spans};
use tokio::sync::oneshot;
use tracing::Instrument as _;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Layer as _, SubscriberExt as _};

#[test]
fn each_call_has_a_span_with_its_scope_key_digest_store_and_outcome() {
    let secret = "customer-jane.doe@example.com";
    let spans = with_spans(|| async {
        let idem = Idempotency::memory();
        for _ in 0..2 {
            idem.call(secret)
                .scope("payments")
                .run(|| async { Ok::<_, Error>(1u32) })
                .await
                .unwrap();
        }
    });
    let calls = spans.calls();
    assert_eq!(calls.len(), 2, "one span per call: {calls:?}");
    let digest = StoreKey::new("payments", secret, 255)
        .unwrap()
        .digest()
        .to_string();
    for (span, outcome) in calls.iter().zip(["executed", "replayed"]) {
        assert_eq!(span.field("scope"), Some("payments"), "{span:?}");
        assert_eq!(span.field("key_digest"), Some(digest.as_str()), "{span:?}");
        assert_eq!(span.field("store"), Some("memory"), "{span:?}");
        assert_eq!(span.field("outcome"), Some(outcome), "{span:?}");
    }
    // The digest stands for the key, which appears nowhere.
    for span in spans.all() {
        for value in span.fields.values() {
            assert!(!value.contains("jane.doe"), "the key leaked: {span:?}");
        }
    }
}

#[test]
fn the_bodys_spans_nest_under_the_call_span() {
    let spans = with_spans(|| async {
        let idem = Idempotency::memory();
        idem.call("k")
            .scope("nesting")
            .run(|| {
                async {
                    tracing::info_span!("charge_card").in_scope(|| tracing::info!("charging"));
                    Ok::<_, Error>(1u32)
                }
                .instrument(tracing::info_span!("body"))
            })
            .await
            .unwrap();
        // A body on a task of its own (`run_to_completion`) nests under its call too.
        idem.call("k2")
            .scope("nesting")
            .run_to_completion(|| async {
                tracing::info_span!("detached_work").in_scope(|| ());
                Ok::<_, Error>(2u32)
            })
            .await
            .unwrap();
    });
    let all = spans.all();
    let index = |name: &str| all.iter().position(|s| s.name == name).unwrap();
    let (call, body, charge) = (
        index("idempotent.call"),
        index("body"),
        index("charge_card"),
    );
    assert_eq!(all[body].parent, Some(call), "{all:?}");
    assert_eq!(all[charge].parent, Some(body), "{all:?}");
    let detached = index("detached_work");
    let parent = all[detached].parent.expect("nested");
    assert_eq!(all[parent].name, "idempotent.call", "{all:?}");
    assert_eq!(all[parent].field("outcome"), Some("executed"));
}

#[idempotent(key = id, scope = "spans.attributed")]
async fn attributed(id: u64) -> Result<u64, Error> {
    tracing::info_span!("attributed_body").in_scope(|| ());
    Ok(id)
}

#[test]
fn an_attributed_function_has_a_call_span_its_body_nests_under() {
    let spans = with_spans(|| async {
        // A caller's span is the call span's parent.
        attributed(1)
            .instrument(tracing::info_span!("handler"))
            .await
            .unwrap();
    });
    let all = spans.all();
    let index = |name: &str| all.iter().position(|s| s.name == name).unwrap();
    let (handler, call, body) = (
        index("handler"),
        index("idempotent.call"),
        index("attributed_body"),
    );
    assert_eq!(all[call].parent, Some(handler), "{all:?}");
    assert_eq!(all[body].parent, Some(call), "{all:?}");
    assert_eq!(all[call].field("scope"), Some("spans.attributed"));
    assert_eq!(all[call].field("outcome"), Some("executed"));
}

#[test]
fn outcomes_are_named_alike_for_coalesced_rejected_and_mismatched_calls() {
    let spans = with_spans(|| async {
        let idem = Idempotency::memory();
        let (open, gate) = oneshot::channel::<()>();
        let (entered_tx, entered) = oneshot::channel::<()>();
        let leader = tokio::spawn({
            let idem = idem.clone();
            async move {
                idem.call("k")
                    .scope("o")
                    .fingerprint("a")
                    .run_with_outcome(|| async move {
                        let _ = entered_tx.send(());
                        gate.await.expect("gate");
                        Ok::<_, Error>(1u32)
                    })
                    .await
            }
        });
        entered.await.unwrap();
        let follower = tokio::spawn({
            let idem = idem.clone();
            async move {
                idem.call("k")
                    .scope("o")
                    .fingerprint("a")
                    .run_with_outcome(|| async { Ok::<_, Error>(2u32) })
                    .await
            }
        });
        // The follower joins and waits (a current-thread runtime runs it to its wait).
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        let rejected = idem
            .call("k")
            .scope("o")
            .fingerprint("a")
            .concurrency(Concurrency::Reject)
            .run(|| async { Ok::<_, Error>(3u32) })
            .await;
        assert!(matches!(rejected, Err(Error::InProgress)), "{rejected:?}");
        open.send(()).unwrap();
        assert_eq!(leader.await.unwrap().unwrap().1, Outcome::Executed);
        assert_eq!(follower.await.unwrap().unwrap().1, Outcome::Coalesced);
        let mismatched = idem
            .call("k")
            .scope("o")
            .fingerprint("b")
            .run(|| async { Ok::<_, Error>(4u32) })
            .await;
        assert!(matches!(mismatched, Err(Error::Mismatch)), "{mismatched:?}");
        let invalid = idem
            .call("")
            .scope("o")
            .run(|| async { Ok::<_, Error>(5u32) })
            .await;
        assert!(matches!(invalid, Err(Error::InvalidKey(_))), "{invalid:?}");
    });
    let outcomes: Vec<Option<String>> = spans
        .calls()
        .iter()
        .map(|s| s.fields.get("outcome").cloned())
        .collect();
    let expected = ["executed", "coalesced", "rejected", "mismatch", "invalid"];
    assert_eq!(
        outcomes,
        expected.map(|o| Some(o.to_owned())).to_vec(),
        "in order of creation: leader, follower, rejected, mismatched, invalid"
    );
    // The same words as `Outcome::as_str`.
    assert_eq!(
        [
            Outcome::Executed.as_str(),
            Outcome::Replayed.as_str(),
            Outcome::Coalesced.as_str()
        ],
        ["executed", "replayed", "coalesced"]
    );
}

#[test]
fn a_store_that_fails_the_claim_marks_the_span() {
    let spans = with_spans(|| async {
        let store =
            idempotent_tests::FaultyStore::new(idempotent_runtime::store::MemoryStore::new());
        store.set_down(true);
        let idem = Idempotency::new(store);
        let failed = idem
            .call("k")
            .scope("down")
            .run(|| async { Ok::<_, Error>(1u32) })
            .await;
        assert!(matches!(failed, Err(Error::Store(_))), "{failed:?}");
    });
    let calls = spans.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].field("outcome"), Some("store_error"));
    assert_eq!(calls[0].field("store"), Some("memory"));
}

#[test]
fn a_body_that_panics_leaves_its_span_marked_executed() {
    let spans = with_spans(|| async {
        let idem = Idempotency::memory();
        let call = |panics: bool| {
            let idem = idem.clone();
            async move {
                idem.call("k")
                    .scope("panics")
                    .run(move || async move {
                        assert!(!panics, "the body panics");
                        Ok::<_, Error>(1u32)
                    })
                    .await
            }
        };
        let panicked = tokio::spawn(call(true)).await;
        assert!(panicked.unwrap_err().is_panic());
        // Its key was released: the retry runs.
        assert_eq!(call(false).await.unwrap(), 1);
    });
    let outcomes: Vec<_> = spans
        .calls()
        .iter()
        .map(|s| s.field("outcome").map(str::to_owned))
        .collect();
    assert_eq!(
        outcomes,
        [Some("executed".to_owned()), Some("executed".to_owned())],
        "the panicked call, then its retry"
    );
}

/// The `idempotent.call` spans a subscriber whose capture takes spans up to `level` saw
/// of one call (and its replay), run on a current-thread runtime under it.
fn call_spans_up_to(level: LevelFilter) -> usize {
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone().with_filter(level));
    let _default = tracing::subscriber::set_default(subscriber);
    idempotent_tests::block_on(async {
        let idem = Idempotency::memory();
        idem.call("k")
            .scope("levels")
            .run(|| async { Ok::<_, Error>(1u32) })
            .await
            .unwrap();
    });
    spans.calls().len()
}

#[test]
fn a_call_makes_its_span_at_info_and_none_for_a_subscriber_that_takes_warn_only() {
    assert_eq!(call_spans_up_to(LevelFilter::WARN), 0);
    assert_eq!(call_spans_up_to(LevelFilter::ERROR), 0);
    assert_eq!(call_spans_up_to(LevelFilter::OFF), 0);
    assert_eq!(call_spans_up_to(LevelFilter::INFO), 1);
    assert_eq!(call_spans_up_to(LevelFilter::TRACE), 1);
}
