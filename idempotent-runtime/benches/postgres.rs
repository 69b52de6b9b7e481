//! A hit through `PostgresStore` against a raw `SELECT` by primary key on the same pool,
//! and a first execution against a raw `INSERT`. Needs a PostgreSQL at
//! `IDEMPOTENT_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`).
//!
//! ```text
//! cargo bench -p idempotent-runtime --features postgres --bench postgres
//! ```

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

mod common;
#[path = "common/postgres_fixture.rs"]
mod postgres_fixture;

use common::{receipt, Receipt};
use criterion::{criterion_group, criterion_main, Criterion};
use idempotent_runtime::Error;
use postgres_fixture::postgres_fixture;

fn postgres(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let fixture = rt.block_on(postgres_fixture("idembench"));
    let (idem, pool) = (&fixture.idem, &fixture.pool);
    let (select, insert) = (&fixture.select, &fixture.insert);
    let mut group = c.benchmark_group("postgres");
    group.bench_function("hit: raw SELECT by primary key + serde_json decode", |b| {
        b.to_async(&rt).iter(|| async {
            let (v,): (Vec<u8>,) = sqlx::query_as(select)
                .bind("order-1001")
                .fetch_one(pool)
                .await
                .expect("select");
            black_box(serde_json::from_slice::<Receipt>(&v).expect("decode"))
        })
    });
    group.bench_function("hit: Idempotency::run over PostgresStore", |b| {
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
    group.bench_function("first: raw INSERT of the encoded result", |b| {
        b.to_async(&rt).iter(|| async {
            let k = format!("k{}", n.fetch_add(1, Ordering::Relaxed));
            let bytes = serde_json::to_vec(&receipt()).expect("encode");
            sqlx::query(insert)
                .bind(k)
                .bind(bytes)
                .execute(pool)
                .await
                .expect("insert");
        })
    });
    group.bench_function(
        "first: Idempotency::run over PostgresStore (claim + complete)",
        |b| {
            b.to_async(&rt).iter(|| async {
                let key = n.fetch_add(1, Ordering::Relaxed);
                let r: Receipt = idem
                    .call(key)
                    .scope("bench-first")
                    .run(|| async { Ok::<_, Error>(receipt()) })
                    .await
                    .expect("first");
                black_box(r)
            })
        },
    );
    group.finish();
    rt.block_on(fixture.drop_tables());
}

criterion_group!(benches, postgres);
criterion_main!(benches);
