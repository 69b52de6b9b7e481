//! The engine beyond the hit: a first execution, coalescing 1,000 callers, and throughput
//! on distinct keys as worker threads are added.
//!
//! ```text
//! cargo bench -p idempotent-runtime --bench engine
//! ```

#[path = "common/coalesce.rs"]
mod coalesce;
mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{receipt, Receipt};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use idempotent_runtime::{Error, Idempotency};

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A first execution: claim, run, encode, complete; against the body plus a raw insert of
/// its encoded result into a moka cache of the same capacity.
fn first_execution(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let idem = Idempotency::memory();
    let raw: moka::sync::Cache<String, bytes::Bytes> = moka::sync::Cache::new(100_000);
    let n = AtomicU64::new(0);
    let mut group = c.benchmark_group("first");
    group.bench_function("body + serde_json encode + raw moka insert", |b| {
        b.to_async(&rt).iter(|| async {
            let key = format!("first|{}", n.fetch_add(1, Ordering::Relaxed));
            let r: Receipt = receipt();
            let bytes = bytes::Bytes::from(serde_json::to_vec(&r).expect("encode"));
            raw.insert(key, bytes);
            black_box(r)
        })
    });
    group.bench_function("Idempotency::run on a new key", |b| {
        b.to_async(&rt).iter(|| async {
            let key = n.fetch_add(1, Ordering::Relaxed);
            let r: Receipt = idem
                .call(key)
                .scope("first")
                .run(|| async { Ok::<_, Error>(receipt()) })
                .await
                .expect("run");
            black_box(r)
        })
    });
    group.finish();
}

/// 1,000 concurrent callers on one key: the wall time until all have the value, against
/// the body's own duration plus waking 1,000 waiting tasks (spawning included in both).
fn coalescing(c: &mut Criterion) {
    let rt = runtime(2);
    let idem = Idempotency::memory();
    let n = Arc::new(AtomicU64::new(0));
    let mut group = c.benchmark_group("coalesce 1000 callers, 20 ms body");
    group.sample_size(20);
    group.bench_function(
        "baseline: body, then wake 1,000 tasks on a watch channel",
        |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += coalesce::baseline().await;
                }
                total
            })
        },
    );
    group.bench_function("Idempotency::run, 1,000 callers on a new key", |b| {
        let (idem, n) = (idem.clone(), n.clone());
        b.to_async(&rt).iter_custom(move |iters| {
            let (idem, n) = (idem.clone(), n.clone());
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let key = n.fetch_add(1, Ordering::Relaxed);
                    total += coalesce::engine(&idem, key).await;
                }
                total
            }
        })
    });
    group.finish();
}

const OPS_PER_TASK: u64 = 1_000;

/// Throughput on distinct keys with 1, 2, 4 and 8 worker threads (as many tasks as
/// workers, each making its own calls): new keys (first executions) and stored keys (hits).
fn scaling(c: &mut Criterion) {
    let mut group = c.benchmark_group("distinct keys");
    group.sample_size(10);
    for workers in [1usize, 2, 4, 8] {
        let rt = runtime(workers);
        let idem = Idempotency::builder()
            .memory_capacity(2_000_000)
            .build()
            .expect("engine");
        let n = Arc::new(AtomicU64::new(0));
        let hot: u64 = 10_000;
        rt.block_on(async {
            for k in 0..hot {
                let _: u64 = idem
                    .call(k)
                    .scope("hit")
                    .run(|| async move { Ok::<_, Error>(k) })
                    .await
                    .expect("fill");
            }
        });
        group.throughput(Throughput::Elements(workers as u64 * OPS_PER_TASK));
        for (label, hits) in [("first executions", false), ("hits", true)] {
            let (idem, n) = (idem.clone(), n.clone());
            group.bench_with_input(BenchmarkId::new(label, workers), &workers, |b, &workers| {
                let (idem, n) = (idem.clone(), n.clone());
                b.to_async(&rt).iter(move || {
                    let (idem, n) = (idem.clone(), n.clone());
                    async move {
                        let tasks: Vec<_> = (0..workers)
                            .map(|w| {
                                let (idem, n) = (idem.clone(), n.clone());
                                tokio::spawn(async move {
                                    for i in 0..OPS_PER_TASK {
                                        let (scope, key) = if hits {
                                            ("hit", (w as u64 * OPS_PER_TASK + i) % hot)
                                        } else {
                                            ("new", n.fetch_add(1, Ordering::Relaxed))
                                        };
                                        let v: u64 = idem
                                            .call(key)
                                            .scope(scope)
                                            .run(|| async move { Ok::<_, Error>(key) })
                                            .await
                                            .expect("call");
                                        black_box(v);
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.expect("task");
                        }
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, first_execution, coalescing, scaling);
criterion_main!(benches);
