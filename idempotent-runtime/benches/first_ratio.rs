//! First executions (a key never seen), measured interleaved as `hit_ratio` is: each round
//! times 1,000 calls of every variant back to back (starting at the next variant each
//! round), each call on a new key, and the ratios are taken within the round. Prints the
//! medians over the rounds.
//!
//! ```text
//! cargo bench -p idempotent-runtime --bench first_ratio
//! ```
//!
//! Every variant formats its key (`order-<n>`) the same way; the stores are sized so that
//! none evicts during the run.

mod common;
#[path = "common/hit_fns.rs"]
mod hit_fns;
#[path = "common/interleaved.rs"]
mod interleaved;

use std::hint::black_box;
use std::time::Instant;

use common::{receipt, Receipt};
use hit_fns::{cached_first, place};
use idempotent_runtime::{Error, Idempotency};
use interleaved::{median, median_ratio};

const ROUNDS: usize = 100;
const CALLS: usize = 1_000;

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let capacity = (ROUNDS * CALLS * 2) as u64;
    let engine = Idempotency::builder()
        .memory_capacity(capacity)
        .build()
        .expect("engine");
    let attributed = Idempotency::builder()
        .memory_capacity(capacity)
        .build()
        .expect("engine");
    let raw: moka::sync::Cache<String, bytes::Bytes> = moka::sync::Cache::new(capacity);
    let names = [
        "raw: body + serde_json encode + moka insert",
        "Idempotency::run, new key",
        "#[idempotent] fn, new key",
        "cached crate #[cached(sync_writes = \"by_key\")], new key",
    ];
    let mut next = [0usize; 4];
    let mut per_call: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    rt.block_on(async {
        for round in 0..ROUNDS {
            let mut t = [0f64; 4];
            for k in 0..t.len() {
                let i = (round + k) % t.len();
                let start = Instant::now();
                for _ in 0..CALLS {
                    let n = next[i];
                    next[i] += 1;
                    match i {
                        0 => {
                            let key = format!("bench|order-{n}");
                            let value = receipt();
                            let encoded = serde_json::to_vec(&value).expect("encode");
                            raw.insert(key, bytes::Bytes::from(encoded));
                            black_box(value);
                        }
                        1 => {
                            let r: Receipt = engine
                                .call(format_args!("order-{n}"))
                                .scope("bench")
                                .run(|| async { Ok::<_, Error>(receipt()) })
                                .await
                                .expect("first");
                            black_box(r);
                        }
                        2 => {
                            let key = format!("order-{n}");
                            black_box(place(&attributed, &key).await.expect("first"));
                        }
                        3 => {
                            black_box(cached_first(format!("order-{n}")).await.expect("first"));
                        }
                        _ => unreachable!("four variants"),
                    }
                }
                t[i] = start.elapsed().as_nanos() as f64 / CALLS as f64;
            }
            for i in 0..names.len() {
                per_call[i].push(t[i]);
            }
        }
    });
    let against = |i: usize, base: usize| median_ratio(&per_call[i], &per_call[base]);
    println!("{ROUNDS} rounds of {CALLS} calls each, interleaved; medians over rounds");
    println!(
        "{:<58} {:>10} {:>8} {:>11}",
        "variant", "ns/call", "vs raw", "vs cached"
    );
    for i in 0..names.len() {
        println!(
            "{:<58} {:>10.1} {:>7.2}x {:>10.2}x",
            names[i],
            median(per_call[i].clone()),
            against(i, 0),
            against(i, 3)
        );
    }
}
