//! Hits from several threads at once, each on keys of its own: how the memory store's
//! hits scale with the cores that make them, against raw moka gets on the same threads
//! and the `cached` crate's hits.
//!
//! ```text
//! cargo bench -p idempotent-runtime --bench hit_threads
//! THREADS=1,2,4 ROUNDS=20 N=200000 cargo bench -p idempotent-runtime --bench hit_threads
//! ```
//!
//! Every thread runs its own current-thread runtime, as a worker of a service does, and
//! makes `N` hits (default 500,000) over 64 keys of its own. Each round runs every
//! variant at every thread count, in turn; what is printed is the median over the rounds
//! (default 5) of the hits a second of all threads together. `THREADS` defaults to 1 and
//! 2, and to 1, 2, 4, ... up to the machine's cores where it has more than two.

mod common;
#[path = "common/hit_fns.rs"]
mod hit_fns;
#[path = "common/interleaved.rs"]
mod interleaved;

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use common::{receipt, Receipt};
use idempotent_runtime::Idempotency;

/// Keys per thread: more than one, so that the threads' reads are not all on one entry.
const KEYS: usize = 64;

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Raw,
    Decoded,
    Clone,
    Cached,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::Raw,
        Variant::Decoded,
        Variant::Clone,
        Variant::Cached,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Raw => "raw moka sync get + serde_json decode",
            Variant::Decoded => "#[idempotent] fn, not Clone",
            Variant::Clone => "#[idempotent] fn, Clone value",
            Variant::Cached => "cached crate #[cached] hit",
        }
    }
}

/// What every thread reads: the engine, a raw moka cache of the same bytes, and each
/// thread's keys in the form each variant takes them.
struct Shared {
    engine: Idempotency,
    raw: moka::sync::Cache<String, bytes::Bytes>,
    keys: Vec<Vec<&'static str>>,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn thread_counts() -> Vec<usize> {
    if let Ok(list) = std::env::var("THREADS") {
        return list
            .split(',')
            .filter_map(|t| t.trim().parse().ok())
            .collect();
    }
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let mut counts = vec![1];
    while counts[counts.len() - 1] * 2 <= cores.max(2) {
        counts.push(counts[counts.len() - 1] * 2);
    }
    counts
}

/// Hits a second of `threads` threads making `n` hits each of `variant`.
fn run(shared: &Arc<Shared>, variant: Variant, threads: usize, n: usize) -> f64 {
    let ready = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (shared, ready) = (Arc::clone(shared), Arc::clone(&ready));
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let keys = &shared.keys[t];
                let raw_keys: Vec<String> = keys.iter().map(|k| format!("bench|{k}")).collect();
                ready.wait();
                rt.block_on(async {
                    for i in 0..n {
                        let key = keys[i % KEYS];
                        match variant {
                            Variant::Raw => {
                                let b =
                                    shared.raw.get(raw_keys[i % KEYS].as_str()).expect("stored");
                                black_box(serde_json::from_slice::<Receipt>(&b).expect("decode"));
                            }
                            Variant::Decoded => {
                                let hit = hit_fns::place_decoded(&shared.engine, key).await;
                                black_box(hit.expect("hit"));
                            }
                            Variant::Clone => {
                                let hit = hit_fns::place(&shared.engine, key).await;
                                black_box(hit.expect("hit"));
                            }
                            Variant::Cached => {
                                black_box(hit_fns::cached_place(key).await.expect("hit"));
                            }
                        }
                    }
                });
            })
        })
        .collect();
    ready.wait();
    let start = Instant::now();
    for handle in handles {
        handle.join().expect("bench thread");
    }
    (threads * n) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let n = env_usize("N", 500_000);
    let rounds = env_usize("ROUNDS", 5).max(1);
    let counts = thread_counts();
    let most = counts.iter().copied().max().unwrap_or(1);
    // Leaked once: the `cached` crate's function takes `&'static str` keys.
    let keys: Vec<Vec<&'static str>> = (0..most)
        .map(|t| {
            (0..KEYS)
                .map(|i| &*Box::leak(format!("order-{t}-{i}").into_boxed_str()))
                .collect()
        })
        .collect();
    let shared = Arc::new(Shared {
        engine: Idempotency::memory(),
        raw: moka::sync::Cache::new(100_000),
        keys,
    });
    let bytes = bytes::Bytes::from(serde_json::to_vec(&receipt()).expect("encode"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for key in shared.keys.iter().flatten().copied() {
            // Two calls each, so the `Clone` function's first hit has kept its copy.
            for _ in 0..2 {
                hit_fns::place(&shared.engine, key).await.expect("place");
                hit_fns::cached_place(key).await.expect("cached");
            }
            shared.raw.insert(format!("bench|{key}"), bytes.clone());
        }
    });
    // `place_decoded` shares `place`'s scope, so its keys are stored apart.
    let decoded = Arc::new(Shared {
        engine: Idempotency::memory(),
        raw: shared.raw.clone(),
        keys: shared.keys.clone(),
    });
    rt.block_on(async {
        for key in decoded.keys.iter().flatten().copied() {
            hit_fns::place_decoded(&decoded.engine, key)
                .await
                .expect("place");
        }
    });

    let mut rates = vec![vec![Vec::new(); counts.len()]; Variant::ALL.len()];
    for _ in 0..rounds {
        for (v, variant) in Variant::ALL.into_iter().enumerate() {
            let on = if variant == Variant::Decoded {
                &decoded
            } else {
                &shared
            };
            for (c, &threads) in counts.iter().enumerate() {
                rates[v][c].push(run(on, variant, threads, n));
            }
        }
    }

    println!(
        "{rounds} rounds of {n} hits a thread; medians over rounds, in millions of hits a second (all threads)"
    );
    print!("{:<42}", "variant");
    for threads in &counts {
        print!("{:>12}", format!("{threads} thr"));
    }
    println!("{:>16}", "scaling");
    let medians: Vec<Vec<f64>> = rates
        .into_iter()
        .map(|per| per.into_iter().map(interleaved::median).collect())
        .collect();
    for (v, variant) in Variant::ALL.into_iter().enumerate() {
        print!("{:<42}", variant.name());
        for rate in &medians[v] {
            print!("{:>12.2}", rate / 1e6);
        }
        let last = medians[v][counts.len() - 1] / medians[v][0];
        println!("{:>16}", format!("{last:.2}x at {most}"));
    }
    // Time ratios: the baseline's rate over the variant's.
    for (label, variant, baseline) in [
        ("#[idempotent] not Clone vs raw", 1, 0),
        ("#[idempotent] Clone vs cached", 2, 3),
    ] {
        print!("{label:<42}");
        for (v, b) in medians[variant].iter().zip(&medians[baseline]) {
            print!("{:>12}", format!("{:.2}x", b / v));
        }
        println!();
    }
}
