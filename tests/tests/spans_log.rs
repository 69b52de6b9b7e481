//! A process that logs through the `log` crate alone, with no `tracing` subscriber: no
//! `idempotent.call` span reaches its logger. `tracing`'s `log` feature is on in this
//! build (a dependency, actix-router, turns it on), and with it `tracing` writes a span
//! made while no subscriber was ever set to `log`, a line per call; the engine makes no
//! span at all while no subscriber takes INFO.
//!
//! One test in a binary of its own: setting a `tracing` subscriber anywhere in the
//! process, even for a thread, would stop `tracing` writing to `log` at all.

use std::sync::Mutex;

use idempotent_runtime::{Error, Idempotency, Outcome};

/// Every record the logger was given, as `target: message`.
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Lines;

impl log::Log for Lines {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        LINES
            .lock()
            .unwrap()
            .push(format!("{}: {}", record.target(), record.args()));
    }

    fn flush(&self) {}
}

static LOGGER: Lines = Lines;

#[test]
fn no_call_span_reaches_a_log_logger_without_a_tracing_subscriber() {
    log::set_logger(&LOGGER).expect("the only logger");
    log::set_max_level(log::LevelFilter::Trace);
    idempotent_tests::block_on(async {
        let idem = Idempotency::memory();
        for expected in [Outcome::Executed, Outcome::Replayed] {
            let (_, how) = idem
                .call("k")
                .scope("logged")
                .run_with_outcome(|| async { Ok::<_, Error>(1u32) })
                .await
                .unwrap();
            assert_eq!(how, expected);
        }
        // The bridge works here: a span of the test's own reaches the logger.
        drop(tracing::info_span!("control").entered());
    });
    let lines = LINES.lock().unwrap().clone();
    assert!(
        lines.iter().any(|l| l.contains("control")),
        "tracing writes spans to log in this build: {lines:?}"
    );
    let calls: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("idempotent.call"))
        .collect();
    assert!(calls.is_empty(), "{calls:?}");
}
