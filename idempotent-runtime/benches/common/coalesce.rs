//! One coalescing round, both sides: 1,000 concurrent callers on one key, against the
//! body's own duration plus waking the same number of waiting tasks.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotent_runtime::{Error, Idempotency};

/// Concurrent callers per round.
pub(crate) const CALLERS: usize = 1_000;
/// How long the body takes.
pub(crate) const BODY: Duration = Duration::from_millis(20);

/// The body's own duration, then waking 999 tasks waiting on a `watch` channel; spawning
/// included.
pub(crate) async fn baseline() -> Duration {
    let (tx, rx) = tokio::sync::watch::channel(None::<u64>);
    let start = Instant::now();
    let waiters: Vec<_> = (0..CALLERS - 1)
        .map(|_| {
            let mut rx = rx.clone();
            tokio::spawn(async move { *rx.wait_for(Option::is_some).await.expect("sent") })
        })
        .collect();
    tokio::time::sleep(BODY).await;
    tx.send_replace(Some(7));
    for w in waiters {
        black_box(w.await.expect("task"));
    }
    start.elapsed()
}

/// 1,000 callers of `Idempotency::run` on `key`, which must be new; spawning included.
/// Asserts that the body ran once.
pub(crate) async fn engine(idem: &Idempotency, key: u64) -> Duration {
    let runs = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (idem, runs) = (idem.clone(), runs.clone());
            tokio::spawn(async move {
                idem.call(key)
                    .scope("coalesce")
                    .run(|| async move {
                        runs.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(BODY).await;
                        Ok::<_, Error>(7u64)
                    })
                    .await
            })
        })
        .collect();
    for c in callers {
        black_box(c.await.expect("task").expect("call"));
    }
    let elapsed = start.elapsed();
    assert_eq!(runs.load(Ordering::Relaxed), 1, "one execution");
    elapsed
}
