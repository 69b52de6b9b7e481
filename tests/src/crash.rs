//! A holder in another process that dies mid-operation: the check is the same for every
//! store shared between processes.

use std::io::{BufRead, BufReader};
use std::ops::{Deref, DerefMut};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idempotent_runtime::{Concurrency, Error, Idempotency, Outcome, StoreError};

/// A child process killed (and reaped) when dropped: a test that fails half-way must not
/// leave a holder behind with its claim, or its transaction and row locks, open.
#[derive(Debug)]
pub struct KilledOnDrop(pub Child);

impl Deref for KilledOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KilledOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether the store gave up on an operation for want of time (its own timeout, or
/// PostgreSQL's `statement_timeout`, SQLSTATE 57014): what a stalled server causes.
fn timed_out(e: &StoreError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<tokio::time::error::Elapsed>() {
            return true;
        }
        if let Some(sqlx::Error::Database(db)) = err.downcast_ref::<sqlx::Error>() {
            if db.code().as_deref() == Some("57014") {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// Starts the `holder` binary (at `holder`: an integration test passes
/// `env!("CARGO_BIN_EXE_holder")`) on the store `kind` (`redis` or `postgres`) at `url`, in
/// `space` (a key prefix or a table), waits until it holds the key, checks that `idem`
/// (on the same store) is refused while it lives, kills it, and checks that a waiting call
/// on `idem` takes the key over and runs within one lease and `slack` of the kill. A call
/// the store timed out (a stall longer than the store's own timeout) is made again within
/// that time: a stall is the store's, and only a key still held after it is the holder's.
/// Any other error fails the check.
pub async fn a_crashed_holder_process_frees_its_key(
    holder: &str,
    kind: &str,
    url: &str,
    space: &str,
    idem: &Idempotency,
    lease: Duration,
    slack: Duration,
) {
    let mut child = KilledOnDrop(
        Command::new(holder)
            .args([kind, url, space, &lease.as_millis().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the holder binary"),
    );
    let stdout = child.stdout.take().expect("piped stdout");
    let claimed = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("CLAIMED"))
    });
    let claimed = tokio::time::timeout(Duration::from_secs(30), claimed).await;
    assert!(
        matches!(claimed, Ok(Ok(true))),
        "the holder never claimed the key"
    );

    let reject = idem
        .call("crash")
        .scope("holder")
        .concurrency(Concurrency::Reject)
        .run(|| async { Ok::<u32, Error>(1) })
        .await;
    assert!(
        matches!(reject, Err(Error::InProgress)),
        "the live holder keeps the key: {reject:?}"
    );

    child.kill().expect("kill the holder");
    let _ = child.wait();
    let killed = Instant::now();
    // A waiting caller takes over once the dead holder's lease runs out.
    let got = loop {
        let got = idem
            .call("crash")
            .scope("holder")
            .run_with_outcome(|| async { Ok::<u32, Error>(2) })
            .await;
        match got {
            Err(Error::Store(e)) if timed_out(&e) && killed.elapsed() < lease + slack => {
                eprintln!("the store timed out a call, which is made again: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            got => break got,
        }
    };
    assert!(matches!(got, Ok((2, Outcome::Executed))), "{got:?}");
    let waited = killed.elapsed();
    assert!(
        waited < lease + slack,
        "took {waited:?} for a {lease:?} lease"
    );
}
