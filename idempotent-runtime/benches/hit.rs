//! The hit path: `run` on a key whose result is stored, against the least a cache can do
//! for the same answer: a raw moka `get` of the same bytes plus a `serde_json` decode.
//!
//! ```text
//! cargo bench -p idempotent-runtime --bench hit
//! ```

use std::hint::black_box;

mod common;
#[path = "common/hit_fns.rs"]
mod hit_fns;

use common::{receipt, Receipt};
use criterion::{criterion_group, criterion_main, Criterion};
use hit_fns::{cached_place, place};
use idempotent_runtime::{Error, Idempotency};

fn hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let idem = Idempotency::memory();
    rt.block_on(async {
        let stored: Receipt = idem
            .call("order-1001")
            .scope("bench")
            .run(|| async { Ok::<_, Error>(receipt()) })
            .await
            .expect("first run");
        assert_eq!(stored, receipt());
    });

    let compact = Idempotency::builder()
        .codec(idempotent_runtime::Codec::Postcard)
        .build()
        .expect("engine");
    rt.block_on(async {
        let _: Receipt = compact
            .call("order-1001")
            .scope("bench")
            .run(|| async { Ok::<_, Error>(receipt()) })
            .await
            .expect("first run");
    });

    let raw: moka::future::Cache<String, bytes::Bytes> = moka::future::Cache::new(100_000);
    let bytes = bytes::Bytes::from(serde_json::to_vec(&receipt()).expect("encode"));
    rt.block_on(raw.insert("bench|order-1001".to_owned(), bytes.clone()));

    // The memory store sits on moka's sync cache; compare with that too.
    let raw_sync: moka::sync::Cache<String, bytes::Bytes> = moka::sync::Cache::new(100_000);
    raw_sync.insert("bench|order-1001".to_owned(), bytes.clone());

    let mut group = c.benchmark_group("hit");
    group.bench_function("raw moka sync get + serde_json decode", |b| {
        b.to_async(&rt).iter(|| async {
            let bytes = raw_sync.get(black_box("bench|order-1001")).expect("stored");
            let r: Receipt = serde_json::from_slice(&bytes).expect("decode");
            black_box(r)
        })
    });
    group.bench_function("raw moka future get + serde_json decode", |b| {
        b.to_async(&rt).iter(|| async {
            let bytes = raw
                .get(black_box("bench|order-1001"))
                .await
                .expect("stored");
            let r: Receipt = serde_json::from_slice(&bytes).expect("decode");
            black_box(r)
        })
    });
    group.bench_function("Idempotency::run on a stored key", |b| {
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
    group.bench_function("#[idempotent] fn on a stored key", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(place(&idem, black_box("order-1001")).await.expect("replay"))
        })
    });
    group.bench_function("Idempotency::run on a stored key, Postcard codec", |b| {
        b.to_async(&rt).iter(|| async {
            let r: Receipt = compact
                .call(black_box("order-1001"))
                .scope("bench")
                .run(|| async { Ok::<_, Error>(receipt()) })
                .await
                .expect("replay");
            black_box(r)
        })
    });
    rt.block_on(async { cached_place("order-1001").await.expect("first run") });
    group.bench_function(
        "cached crate #[cached(sync_writes = \"by_key\")] on a stored key",
        |b| {
            b.to_async(&rt).iter(|| async {
                black_box(cached_place(black_box("order-1001")).await.expect("hit"))
            })
        },
    );
    group.finish();
}

criterion_group!(benches, hit);
criterion_main!(benches);
