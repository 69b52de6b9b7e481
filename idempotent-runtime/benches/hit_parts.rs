//! What the parts of a hit cost on this machine, each alone: reading a clock, a moka
//! `get` with and without per-entry expiry, cloning the record it hands out, and the
//! whole hits beside them. Why a ratio stands where it does, not a ratio itself: each
//! line is the best of 15 batches of 200,000 (the least the machine's noise adds), and
//! the lines run one after the other, so compare them as sizes, not to the last percent.
//!
//! ```text
//! cargo bench -p idempotent-runtime --bench hit_parts
//! ```

mod common;
#[path = "common/hit_fns.rs"]
mod hit_fns;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::{receipt, Receipt};
use idempotent_runtime::{Error, Idempotency, RecordState, StoreKey, StoredResult};

const BATCH: u32 = 200_000;
const BATCHES: usize = 15;

/// Every entry lives 24 hours from its write, decided per entry as the memory store does.
struct FixedExpiry(Duration);

impl<V> moka::Expiry<String, V> for FixedExpiry {
    fn expire_after_create(&self, _key: &String, _value: &V, _at: Instant) -> Option<Duration> {
        Some(self.0)
    }
}

/// The memory store's record, in the same shape: bytes, token, expiry, a copy, flags.
#[derive(Clone)]
#[allow(dead_code)]
struct KeptLike {
    buffer: bytes::Bytes,
    token: u64,
    expires_at: u64,
    copy: Option<std::sync::Arc<Box<dyn std::any::Any + Send + Sync>>>,
    is_err: bool,
    has_fingerprint: bool,
}

/// Prints the least time per call of `BATCHES` batches of `BATCH` runs of `body`.
macro_rules! part {
    ($name:expr, $body:block) => {{
        let mut best = f64::MAX;
        for _ in 0..BATCHES {
            let start = Instant::now();
            for _ in 0..BATCH $body
            best = best.min(start.elapsed().as_nanos() as f64 / f64::from(BATCH));
        }
        println!("{:<58} {:>7.1} ns", $name, best);
    }};
}

fn per_entry<V: Clone + Send + Sync + 'static>() -> moka::sync::Cache<String, V> {
    moka::sync::Cache::builder()
        .max_capacity(100_000)
        .expire_after(FixedExpiry(Duration::from_secs(24 * 3600)))
        .build()
}

fn main() {
    const KEY: &str = "bench|order-1001";
    let bytes = bytes::Bytes::from(serde_json::to_vec(&receipt()).expect("encode"));

    part!("Instant::now", {
        black_box(Instant::now());
    });
    part!("SystemTime::now", {
        black_box(SystemTime::now());
    });
    let counter = AtomicU64::new(0);
    part!("AtomicU64::fetch_add, relaxed", {
        black_box(&counter).fetch_add(1, Ordering::Relaxed);
    });
    part!("Bytes clone + drop", {
        drop(black_box(black_box(&bytes).clone()));
    });
    let arc = std::sync::Arc::new(0u64);
    part!("Arc clone + drop", {
        drop(black_box(black_box(&arc).clone()));
    });

    let plain: moka::sync::Cache<String, bytes::Bytes> = moka::sync::Cache::new(100_000);
    plain.insert(KEY.to_owned(), bytes.clone());
    part!("moka get of bytes", {
        black_box(plain.get(black_box(KEY)));
    });
    let ttl: moka::sync::Cache<String, bytes::Bytes> = moka::sync::Cache::builder()
        .max_capacity(100_000)
        .time_to_live(Duration::from_secs(24 * 3600))
        .build();
    ttl.insert(KEY.to_owned(), bytes.clone());
    part!("moka get of bytes, 24 h time_to_live", {
        black_box(ttl.get(black_box(KEY)));
    });
    let entry_bytes = per_entry::<bytes::Bytes>();
    entry_bytes.insert(KEY.to_owned(), bytes.clone());
    part!("moka get of bytes, per-entry expiry", {
        black_box(entry_bytes.get(black_box(KEY)));
    });
    let entry_kept = per_entry::<KeptLike>();
    entry_kept.insert(
        KEY.to_owned(),
        KeptLike {
            buffer: bytes.clone(),
            token: 1,
            expires_at: u64::MAX,
            copy: None,
            is_err: false,
            has_fingerprint: false,
        },
    );
    part!("moka get of a record, per-entry expiry", {
        black_box(entry_kept.get(black_box(KEY)));
    });
    part!(
        "moka contains_key, per-entry expiry (no value, no read kept)",
        {
            black_box(entry_bytes.contains_key(black_box(KEY)));
        }
    );
    part!("serde_json decode of the receipt", {
        black_box(serde_json::from_slice::<Receipt>(black_box(&bytes)).expect("decode"));
    });
    let value = receipt();
    part!("clone of the receipt", {
        black_box(black_box(&value).clone());
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let idem = Idempotency::memory();
    rt.block_on(async {
        let _: Receipt = idem
            .call("order-1001")
            .scope("bench")
            .run(|| async { Ok::<_, Error>(receipt()) })
            .await
            .expect("first");
        for _ in 0..2 {
            hit_fns::place(&idem, "order-1001").await.expect("hit");
            hit_fns::place_decoded(&idem, "order-1001")
                .await
                .expect("hit");
        }
        hit_fns::cached_place("order-1001").await.expect("first");
        let store = idem.store().clone();
        let key = StoreKey::new("bench", "order-1001", 1_000).expect("key");
        part!("memory store's peek_completed_copy", {
            black_box(store.peek_completed_copy(black_box(&key)));
        });
        part!("store key joined + peek + decode (no engine)", {
            let key = StoreKey::new("bench", black_box("order-1001"), 1_000).expect("key");
            let (record, _) = store.peek_completed_copy(&key).expect("stored");
            if let RecordState::Completed {
                result: StoredResult::Ok(bytes),
                ..
            } = &record.state
            {
                // Past the codec's tag byte.
                black_box(serde_json::from_slice::<Receipt>(&bytes[1..]).expect("decode"));
            }
        });
        part!("raw moka get + decode", {
            let b = plain.get(black_box(KEY)).expect("stored");
            black_box(serde_json::from_slice::<Receipt>(&b).expect("decode"));
        });
        part!("#[idempotent] hit, not Clone", {
            black_box(
                hit_fns::place_decoded(&idem, black_box("order-1001"))
                    .await
                    .expect("hit"),
            );
        });
        part!("#[idempotent] hit, Clone value", {
            black_box(
                hit_fns::place(&idem, black_box("order-1001"))
                    .await
                    .expect("hit"),
            );
        });
        part!("cached crate's #[cached] hit", {
            black_box(
                hit_fns::cached_place(black_box("order-1001"))
                    .await
                    .expect("hit"),
            );
        });
    });
}
