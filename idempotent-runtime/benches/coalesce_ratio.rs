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

#[path = "common/coalesce.rs"]
mod coalesce;

use std::hint::black_box;

use coalesce::{baseline, engine, BODY, CALLERS};
use idempotent_runtime::Idempotency;

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
