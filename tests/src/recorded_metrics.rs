//! The engine's metrics (feature `metrics`), read back from `metrics-util`'s debugging
//! recorder.
//!
//! [`with_recorder`] installs a recorder for the test's own thread
//! (`metrics::with_local_recorder`) and runs the test on a current-thread runtime inside
//! it, so tests of one binary that run at once never see each other's metrics, and every
//! task a test spawns records into its recorder. A snapshot ([`Metrics::take`]) takes
//! the counters' values and resets them, so each step of a test checks what it moved,
//! and that nothing else moved.

use std::future::Future;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// Runs `test` on a current-thread runtime with a recorder of its own, and hands it the
/// recorder's snapshotter.
pub fn with_recorder<F, Fut>(test: F)
where
    F: FnOnce(Metrics) -> Fut,
    Fut: Future<Output = ()>,
{
    let recorder = DebuggingRecorder::new();
    let metrics = Metrics(recorder.snapshotter());
    metrics::with_local_recorder(&recorder, || crate::block_on(test(metrics)));
}

/// One metric's value in a snapshot: its name, its labels sorted, and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric's name.
    pub name: String,
    /// Its labels, sorted.
    pub labels: Vec<(String, String)>,
    /// What it recorded since the last snapshot.
    pub value: Value,
}

/// What a metric recorded since the last snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A counter, moved by this much.
    Counter(u64),
    /// A histogram's values, in the order recorded.
    Histogram(Vec<f64>),
}

/// A counter moved: its name, its labels sorted, and by how much.
pub type Moved = (String, Vec<(String, String)>, u64);

/// The snapshots of one test's recorder.
pub struct Metrics(Snapshotter);

impl Metrics {
    /// What was recorded since the last call; counters read as moved since then.
    pub fn take(&self) -> Vec<Sample> {
        let mut samples: Vec<Sample> = self
            .0
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| {
                let key = key.key();
                let mut labels: Vec<(String, String)> = key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                labels.sort();
                let value = match value {
                    // A counter not moved since the last snapshot still shows, as 0.
                    DebugValue::Counter(0) => return None,
                    DebugValue::Counter(n) => Value::Counter(n),
                    DebugValue::Histogram(xs) if xs.is_empty() => return None,
                    DebugValue::Histogram(xs) => {
                        Value::Histogram(xs.into_iter().map(|x| x.into_inner()).collect())
                    }
                    DebugValue::Gauge(_) => return None,
                };
                Some(Sample {
                    name: key.name().to_owned(),
                    labels,
                    value,
                })
            })
            .collect();
        samples.sort_by(|a, b| (&a.name, &a.labels).cmp(&(&b.name, &b.labels)));
        samples
    }

    /// The counters moved since the last snapshot, as (name, labels, by how much); the
    /// histograms recorded meanwhile are dropped.
    pub fn counters(&self) -> Vec<Moved> {
        self.take()
            .into_iter()
            .filter_map(|s| match s.value {
                Value::Counter(n) => Some((s.name, s.labels, n)),
                Value::Histogram(_) => None,
            })
            .collect()
    }
}

/// `pairs` as a sample's labels: owned, and sorted.
pub fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    v.sort();
    v
}

/// A counter of `scope` on the memory store, moved by `n`.
pub fn moved(name: &str, scope: &str, n: u64) -> Moved {
    (
        name.to_owned(),
        labels(&[("scope", scope), ("store", "memory")]),
        n,
    )
}

/// The values `samples` hold of the histogram `name` with exactly `labels`, in order.
pub fn recorded(samples: &[Sample], name: &str, labels: &[(String, String)]) -> Vec<f64> {
    samples
        .iter()
        .filter(|s| s.name == name && s.labels == labels)
        .flat_map(|s| match &s.value {
            Value::Histogram(xs) => xs.clone(),
            Value::Counter(_) => Vec::new(),
        })
        .collect()
}

/// How much `samples` moved the counter `name` with exactly `labels`.
pub fn counted(samples: &[Sample], name: &str, labels: &[(String, String)]) -> u64 {
    samples
        .iter()
        .filter(|s| s.name == name && s.labels == labels)
        .map(|s| match s.value {
            Value::Counter(n) => n,
            Value::Histogram(_) => 0,
        })
        .sum()
}
