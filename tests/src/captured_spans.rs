//! The spans a test's code made, as a `tracing` subscriber saw them: for the tests of
//! the `idempotent.call` span.
//!
//! [`with_spans`] sets a subscriber for the test's own thread (`set_default`) and runs
//! the test on a current-thread runtime, so tests of one binary that run at once never
//! see each other's spans. [`Spans`] is the layer that records them, for a test that
//! builds its subscriber itself (behind a filter, say).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;

/// The name of the span of each call.
pub const CALL_SPAN: &str = "idempotent.call";

/// A span as the recorder saw it: its name, its fields (all of them, as recorded last),
/// and the index of its parent among the recorded spans.
#[derive(Debug, Clone)]
pub struct SpanSeen {
    /// The span's name.
    pub name: &'static str,
    /// Its fields, as recorded last.
    pub fields: BTreeMap<String, String>,
    /// Its parent's index among the recorded spans.
    pub parent: Option<usize>,
    /// The values recorded after the span was made, field by field, in order: a field
    /// recorded twice shows twice here (and once, as recorded last, in `fields`).
    pub recorded: Vec<(String, String)>,
}

impl SpanSeen {
    /// The value of the field `name`, if it was recorded.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    /// Every value the field `name` was given after the span was made, in order.
    pub fn recorded(&self, name: &str) -> Vec<&str> {
        self.recorded
            .iter()
            .filter(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
            .collect()
    }
}

/// Records every span, in order of creation. Span ids are reused once a span closes, so
/// each span carries its index in its extensions.
#[derive(Clone, Default)]
pub struct Spans(Arc<Mutex<Vec<SpanSeen>>>);

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
            recorded: Vec::new(),
        });
        span.extensions_mut().insert(Index(spans.len() - 1));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).expect("a recorded span is registered");
        let Some(i) = span.extensions().get::<Index>().map(|i| i.0) else {
            return;
        };
        let mut spans = self.0.lock().unwrap();
        let mut now = BTreeMap::new();
        values.record(&mut Fields(&mut now));
        let seen = &mut spans[i];
        for (field, value) in now {
            seen.fields.insert(field.clone(), value.clone());
            seen.recorded.push((field, value));
        }
    }
}

impl Spans {
    /// Every span recorded, in order of creation.
    pub fn all(&self) -> Vec<SpanSeen> {
        self.0.lock().unwrap().clone()
    }

    /// The `idempotent.call` spans, in order of creation.
    pub fn calls(&self) -> Vec<SpanSeen> {
        self.all()
            .into_iter()
            .filter(|s| s.name == CALL_SPAN)
            .collect()
    }
}

/// Runs `test` on a current-thread runtime under a subscriber that records spans.
pub fn with_spans<F, Fut>(test: F) -> Spans
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    let _default = tracing::subscriber::set_default(subscriber);
    crate::block_on(test());
    spans
}

/// `script` run three times: with no subscriber, under a filter for another crate only,
/// and under `idempotent_runtime=debug`. The three must give the same result, and the
/// filtered run must record no call span: a subscriber may change the spans and nothing
/// else. The result, and the spans of the last run.
pub fn alike_under_subscribers<T, F>(script: F) -> (T, Spans)
where
    T: PartialEq + fmt::Debug,
    F: Fn() -> T,
{
    let quiet = script();

    let other = Spans::default();
    let sub = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("other_crate=info"))
        .with(other.clone());
    let filtered = tracing::subscriber::with_default(sub, &script);
    assert_eq!(quiet, filtered, "under another crate's filter");
    assert!(other.calls().is_empty(), "{:?}", other.calls());

    let ours = Spans::default();
    let sub = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(
            "idempotent_runtime=debug",
        ))
        .with(ours.clone());
    let debug = tracing::subscriber::with_default(sub, &script);
    assert_eq!(quiet, debug, "under idempotent_runtime=debug");
    (quiet, ours)
}
