//! Coalescing 1,000 concurrent callers on one key, measured interleaved: each round runs
//! the baseline (the body, then waking 1,000 tasks) and the engine back to back, in
//! alternating order, and the ratio is taken within the round. On a shared machine whose
//! speed drifts, this keeps the drift out of the ratio, where criterion's separate timing
//! of each variant does not. Prints the median and quartiles over the rounds.
//!
//! ```text
//! cargo bench -p idempotent-runtime --bench coalesce_ratio
//! ```
//!
//! For a profiler, `ONLY=baseline` or `ONLY=engine` runs one side alone, and `ROUNDS=n`
//! sets the number of rounds (default 100).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotent_runtime::{Error, Idempotency};

const CALLERS: usize = 1_000;
const BODY: Duration = Duration::from_millis(20);

/// The body's own duration plus waking 1,000 waiting tasks, spawning included.
async fn baseline() -> Duration {
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

/// 1,000 callers of `Idempotency::run` on a new key, spawning included.
async fn engine(idem: &Idempotency, key: u64) -> Duration {
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

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let idem = Idempotency::memory();
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let only = std::env::var("ONLY").unwrap_or_default();
    if !only.is_empty() {
        rt.block_on(async {
            for round in 0..rounds {
                match only.as_str() {
                    "baseline" => black_box(baseline().await),
                    _ => black_box(engine(&idem, round as u64).await),
                };
            }
        });
        return;
    }
    let mut ratios = Vec::with_capacity(rounds);
    let (mut base_ms, mut engine_ms) = (Vec::new(), Vec::new());
    rt.block_on(async {
        // Warm-up: the runtime's threads, the allocator, the store's first entries.
        for key in 0..5 {
            baseline().await;
            engine(&idem, u64::MAX - key).await;
        }
        for round in 0..rounds {
            let key = round as u64;
            let (b, e) = if round % 2 == 0 {
                let b = baseline().await;
                (b, engine(&idem, key).await)
            } else {
                let e = engine(&idem, key).await;
                (baseline().await, e)
            };
            base_ms.push(b.as_secs_f64() * 1e3);
            engine_ms.push(e.as_secs_f64() * 1e3);
            ratios.push(e.as_secs_f64() / b.as_secs_f64());
        }
    });
    for v in [&mut ratios, &mut base_ms, &mut engine_ms] {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    println!("{rounds} rounds, {CALLERS} callers, {BODY:?} body, 2 worker threads");
    println!(
        "baseline (body + wake {} tasks): median {:.2} ms",
        CALLERS - 1,
        quantile(&base_ms, 0.5)
    );
    println!(
        "Idempotency::run, {CALLERS} callers: median {:.2} ms",
        quantile(&engine_ms, 0.5)
    );
    println!(
        "ratio within each round: median {:.3}x, quartiles {:.3}x .. {:.3}x",
        quantile(&ratios, 0.5),
        quantile(&ratios, 0.25),
        quantile(&ratios, 0.75)
    );
}
