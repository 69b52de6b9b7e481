//! A hit through `RedisStore` against a raw `GET` of the same bytes on the same
//! connection, and a first execution against a raw `SET`. Needs a Redis at
//! `IDEMPOTENT_TEST_REDIS` (default `redis://127.0.0.1:6379`).
//!
//! ```text
//! cargo bench -p idempotent-runtime --features redis --bench redis
//! ```

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

mod common;
#[path = "common/redis_fixture.rs"]
mod redis_fixture;

use common::{receipt, Receipt};
use criterion::{criterion_group, criterion_main, Criterion};
use idempotent_runtime::Error;
use redis_fixture::{redis_fixture, RedisFixture};

fn redis(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let RedisFixture {
        idem,
        conn,
        prefix,
        raw_key,
    } = rt.block_on(redis_fixture("idembench"));

    let mut group = c.benchmark_group("redis");
    group.bench_function("hit: raw GET + serde_json decode", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = conn.clone();
            let raw_key = raw_key.clone();
            async move {
                let v: Vec<u8> = redis::cmd("GET")
                    .arg(&raw_key)
                    .query_async(&mut conn)
                    .await
                    .expect("get");
                black_box(serde_json::from_slice::<Receipt>(&v).expect("decode"))
            }
        })
    });
    group.bench_function("hit: Idempotency::run over RedisStore", |b| {
        b.to_async(&rt).iter(|| async {
            let r: Receipt = idem
                .call(black_box("order-1001"))
                .scope("bench")
                .run(|| async { Ok::<_, Error>(receipt()) })
                .await
                .expect("replay");
            black_box(r)
        })
    });
    let n = AtomicU64::new(0);
    group.bench_function("first: raw SET of the encoded result", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = conn.clone();
            let key = format!("{prefix}set:{}", n.fetch_add(1, Ordering::Relaxed));
            let bytes = serde_json::to_vec(&receipt()).expect("encode");
            async move {
                let _: () = redis::cmd("SET")
                    .arg(key)
                    .arg(bytes)
                    .arg("PX")
                    .arg(60_000)
                    .query_async(&mut conn)
                    .await
                    .expect("set");
            }
        })
    });
    group.bench_function(
        "first: Idempotency::run over RedisStore (claim + complete)",
        |b| {
            b.to_async(&rt).iter(|| {
                let key = n.fetch_add(1, Ordering::Relaxed);
                let idem = &idem;
                async move {
                    let r: Receipt = idem
                        .call(key)
                        .scope("bench-first")
                        .ttl(std::time::Duration::from_secs(60))
                        .run(|| async { Ok::<_, Error>(receipt()) })
                        .await
                        .expect("first");
                    black_box(r)
                }
            })
        },
    );
    group.finish();
}

criterion_group!(benches, redis);
criterion_main!(benches);
