//! Counters, and tracing events that name the scope and a hash of the key, never the key
//! or a payload. One test in this binary, since it installs the global subscriber.

use std::io::Write;
use std::sync::{Arc, Mutex};

use idempotent_runtime::{Concurrency, Error, Idempotency, StoreKey};
use tokio::sync::oneshot;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_every_outcome_and_events_never_show_keys_or_payloads() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let idem = Idempotency::memory();
    let secret_key = "customer-jane.doe@example.com";
    let secret_payload = "card-4242424242424242";
    let ok = |v: &'static str| move || async move { Ok::<_, Error>(v.to_owned()) };

    // executed, then replayed, then mismatched
    idem.call(secret_key)
        .scope("payments")
        .fingerprint(secret_payload)
        .run(ok(secret_payload))
        .await
        .unwrap();
    idem.call(secret_key)
        .scope("payments")
        .fingerprint(secret_payload)
        .run(ok("x"))
        .await
        .unwrap();
    assert!(idem
        .call(secret_key)
        .scope("payments")
        .fingerprint("other")
        .run(ok("y"))
        .await
        .is_err());

    // rejected, and coalesced
    let (open, gate) = oneshot::channel::<()>();
    let leader = {
        let idem = idem.clone();
        tokio::spawn(async move {
            idem.call("slow")
                .scope("payments")
                .run(|| async move {
                    let _ = gate.await;
                    Ok::<_, Error>(1u32)
                })
                .await
        })
    };
    while idem.in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    let rejected = idem
        .call("slow")
        .scope("payments")
        .concurrency(Concurrency::Reject)
        .run(|| async { Ok::<_, Error>(2u32) })
        .await;
    assert!(matches!(rejected, Err(Error::InProgress)));
    let follower = {
        let idem = idem.clone();
        tokio::spawn(async move {
            idem.call("slow")
                .scope("payments")
                .run(|| async { Ok::<_, Error>(3u32) })
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    open.send(()).unwrap();
    assert_eq!(leader.await.unwrap().unwrap(), 1);
    assert_eq!(follower.await.unwrap().unwrap(), 1);

    let s = idem.stats();
    assert_eq!(
        (
            s.executed,
            s.replayed,
            s.mismatched,
            s.rejected,
            s.coalesced,
            s.store_errors
        ),
        (2, 1, 1, 1, 1, 0)
    );

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let digest = StoreKey::new("payments", secret_key, 255)
        .unwrap()
        .digest()
        .to_string();
    assert!(
        log.contains("scope=\"payments\"") || log.contains("scope=payments"),
        "{log}"
    );
    assert!(log.contains(&digest), "events name the key's hash: {log}");
    // One word per outcome, the same in events and in the `idempotent.call` span.
    for outcome in ["executed", "replayed", "mismatch", "rejected", "coalesced"] {
        assert!(
            log.contains(&format!("outcome=\"{outcome}\"")),
            "no {outcome} event in {log}"
        );
    }
    assert!(
        !log.contains("Replayed") && !log.contains("Coalesced") && !log.contains("executed_err"),
        "an outcome written another way: {log}"
    );
    assert!(
        !log.contains("jane.doe"),
        "a key leaked into the log: {log}"
    );
    assert!(
        !log.contains("4242"),
        "a payload leaked into the log: {log}"
    );
}
