//! One `idempotent.call` span per call, with its scope, a digest of its key, its store and
//! its outcome; the body's own spans nest under it.
//!
//! Each test sets its own subscriber for its thread (`set_default`) and runs on a
//! current-thread runtime, so tests of this binary that run at once never see each
//! other's spans.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};

use idempotent_runtime::{idempotent, Concurrency, Error, Idempotency, Outcome, StoreKey};
use tokio::sync::oneshot;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Instrument as _, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;

/// A span as the recorder saw it: its name, its fields (all of them, as recorded last),
/// and the index of its parent among the recorded spans.
#[derive(Debug, Clone)]
struct SpanSeen {
    name: &'static str,
    fields: BTreeMap<String, String>,
    parent: Option<usize>,
}

/// Records every span, in order of creation. Span ids are reused once a span closes, so
/// each span carries its index in its extensions.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanSeen>>>);

struct Index(usize);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let span = ctx.span(id).expect("a new span is registered");
        let parent = span
            .parent()
            .and_then(|p| p.extensions().get::<Index>().map(|i| i.0));
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut spans = self.0.lock().unwrap();
        spans.push(SpanSeen {
            name: attrs.metadata().name(),
            fields,
            parent,
        });
        span.extensions_mut().insert(Index(spans.len() - 1));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).expect("a recorded span is registered");
        let Some(i) = span.extensions().get::<Index>().map(|i| i.0) else {
            return;
        };
        values.record(&mut Fields(&mut self.0.lock().unwrap()[i].fields));
    }
}

impl Spans {
    fn all(&self) -> Vec<SpanSeen> {
        self.0.lock().unwrap().clone()
    }

    /// The `idempotent.call` spans, in order of creation.
    fn calls(&self) -> Vec<SpanSeen> {
        self.all()
            .into_iter()
            .filter(|s| s.name == "idempotent.call")
            .collect()
    }
}

/// Runs `test` on a current-thread runtime under a subscriber that records spans.
fn with_spans<F, Fut>(test: F) -> Spans
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    let _default = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(test());
    spans
}

fn field<'a>(span: &'a SpanSeen, name: &str) -> Option<&'a str> {
    span.fields.get(name).map(String::as_str)
}

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
        assert_eq!(field(span, "scope"), Some("payments"), "{span:?}");
        assert_eq!(field(span, "key_digest"), Some(digest.as_str()), "{span:?}");
        assert_eq!(field(span, "store"), Some("memory"), "{span:?}");
        assert_eq!(field(span, "outcome"), Some(outcome), "{span:?}");
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
    assert_eq!(field(&all[parent], "outcome"), Some("executed"));
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
    assert_eq!(field(&all[call], "scope"), Some("spans.attributed"));
    assert_eq!(field(&all[call], "outcome"), Some("executed"));
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
    assert_eq!(field(&calls[0], "outcome"), Some("store_error"));
    assert_eq!(field(&calls[0], "store"), Some("memory"));
}
