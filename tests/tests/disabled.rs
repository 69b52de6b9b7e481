//! `IDEMPOTENT_DISABLED=1` turns the attribute off: bodies run directly, every time, and
//! the process says so in its log. A file of its own, so that the variable, read once
//! per process, is set before any attributed call.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use idempotent_runtime::{idempotent, outcome_of, Error, Idempotency, DISABLED_ENV};

static RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = id)]
async fn charge(id: u32) -> Result<u32, Error> {
    Ok(RUNS.fetch_add(1, Ordering::SeqCst) + 1)
}

#[idempotent(key = id, on_cancel = "finish")]
async fn transfer(id: u32) -> Result<u32, Error> {
    Ok(RUNS.fetch_add(1, Ordering::SeqCst) + 1)
}

/// Collects what the log writes.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_switch_runs_every_body_and_says_so() {
    // The only test in this binary: nothing has read the variable yet.
    std::env::set_var(DISABLED_ENV, "1");
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let idem = Idempotency::memory();
    let runs = idem
        .as_default(async {
            let mut runs = Vec::new();
            let mut outcomes = Vec::new();
            for _ in 0..2 {
                let (run, outcome) = outcome_of(charge(7)).await;
                runs.push(run.unwrap());
                outcomes.push(outcome);
                let (run, outcome) = outcome_of(transfer(7)).await;
                runs.push(run.unwrap());
                outcomes.push(outcome);
            }
            assert_eq!(outcomes, [None; 4], "no call went through the engine");
            runs
        })
        .await;
    assert_eq!(runs, [1, 2, 3, 4], "every call ran its body");
    assert_eq!(
        idem.stats().executed + idem.stats().replayed,
        0,
        "the engine saw nothing"
    );
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("WARN") && text.contains(DISABLED_ENV),
        "{text}"
    );
    assert_eq!(text.matches(DISABLED_ENV).count(), 1, "said once: {text}");
}
