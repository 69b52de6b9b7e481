//! A test's metrics and spans at once: a recorder and a span capture of its own thread,
//! for the tests of how each call ends (its span's outcome, and what it counted).

use std::future::Future;

use tracing_subscriber::layer::SubscriberExt as _;

use crate::captured_spans::Spans;
use crate::recorded_metrics::{with_recorder, Metrics};

/// Runs `test` with a metrics recorder and a span recorder of its own thread, on a
/// current-thread runtime, and hands back the spans.
pub fn observed<F, Fut>(test: F) -> Spans
where
    F: FnOnce(Metrics) -> Fut,
    Fut: Future<Output = ()>,
{
    let spans = Spans::default();
    let layer = spans.clone();
    with_recorder(move |metrics| async move {
        let _spans = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        test(metrics).await;
    });
    spans
}
