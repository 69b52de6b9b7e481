//! The hit-path ratios, measured interleaved: each round times 10,000 calls of every
//! variant back to back (starting at the next variant each round), and the ratio is taken
//! within the round. On a shared machine
//! whose speed drifts from second to second, this keeps the drift out of the ratios,
//! where timing each variant for seconds on its own (as criterion does) does not.
//! Prints the median over the rounds.
//!
//! The last five variants are floors, not rivals: what a moka store of this crate's
//! records must do at least for a hit (the value kept instead of bytes; bytes and a copy
//! side by side, as the memory store keeps them; a key joined per call; the record with its
//! token, expiry and fingerprint), without the engine around it.
//!
//! ```text
//! cargo bench -p idempotent-runtime --bench hit_ratio
//! ```

mod common;
#[path = "common/hit_fns.rs"]
mod hit_fns;
#[path = "common/interleaved.rs"]
mod interleaved;

use std::hint::black_box;
use std::time::Instant;

use common::{receipt, Receipt};
use hit_fns::{cached_place, place, place_decoded};
use idempotent_runtime::{Codec, Error, Idempotency};
use interleaved::{median, median_ratio};

const ROUNDS: usize = 200;
const CALLS: usize = 10_000;

/// Every entry lives 24 hours from its write, decided per entry as the memory store does.
struct FixedExpiry(std::time::Duration);

impl<V> moka::Expiry<String, V> for FixedExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        _value: &V,
        _at: std::time::Instant,
    ) -> Option<std::time::Duration> {
        Some(self.0)
    }
}

/// What the memory store keeps for a result (its encoded bytes, the source of truth, and
/// what a call checks against them) with a typed copy of the value beside them.
#[derive(Clone)]
struct KeptLike {
    result: bytes::Bytes,
    token: u64,
    expires_at: u64,
    fingerprint: Option<[u8; 32]>,
    is_err: bool,
    copy: Option<std::sync::Arc<Box<dyn std::any::Any + Send + Sync>>>,
}

/// Times `CALLS` runs of `body`, in nanoseconds per call.
macro_rules! per_call {
    ($body:block) => {{
        let start = Instant::now();
        for _ in 0..CALLS $body
        start.elapsed().as_nanos() as f64 / CALLS as f64
    }};
}

/// One raw hit on a moka sync cache: a `get` and a decode of the bytes.
#[inline(always)]
fn raw_sync_hit(cache: &moka::sync::Cache<String, bytes::Bytes>) {
    let b = cache.get(black_box("bench|order-1001")).expect("stored");
    black_box(serde_json::from_slice::<Receipt>(&b).expect("decode"));
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let json = Idempotency::memory();
    let compact = Idempotency::builder()
        .codec(Codec::Postcard)
        .build()
        .expect("engine");
    let sync: moka::sync::Cache<String, bytes::Bytes> = moka::sync::Cache::new(100_000);
    let fut: moka::future::Cache<String, bytes::Bytes> = moka::future::Cache::new(100_000);
    // What a hand-rolled idempotency cache on moka holds at least: entries that expire.
    let ttl: moka::sync::Cache<String, bytes::Bytes> = moka::sync::Cache::builder()
        .max_capacity(100_000)
        .time_to_live(std::time::Duration::from_secs(24 * 3600))
        .build();
    let bytes = bytes::Bytes::from(serde_json::to_vec(&receipt()).expect("encode"));
    // The memory store's configuration: per-entry expiry (each record its own TTL or
    // lease), which moka evaluates on every read.
    let per_entry: moka::sync::Cache<String, bytes::Bytes> = moka::sync::Cache::builder()
        .max_capacity(100_000)
        .expire_after(FixedExpiry(std::time::Duration::from_secs(24 * 3600)))
        .build();
    // What a moka cache of values (not bytes) costs a hit of a `Clone` value: the floor
    // of a copy kept in a moka-backed store, bounded (the first) and expiring per entry
    // as the memory store's records do (the second).
    let values: moka::sync::Cache<String, Receipt> = moka::sync::Cache::new(100_000);
    let values_per_entry: moka::sync::Cache<String, Receipt> = moka::sync::Cache::builder()
        .max_capacity(100_000)
        .expire_after(FixedExpiry(std::time::Duration::from_secs(24 * 3600)))
        .build();
    let kept: moka::sync::Cache<String, KeptLike> = moka::sync::Cache::builder()
        .max_capacity(100_000)
        .expire_after(FixedExpiry(std::time::Duration::from_secs(24 * 3600)))
        .build();
    kept.insert(
        "bench|order-1001".to_owned(),
        KeptLike {
            result: bytes.clone(),
            token: 1,
            expires_at: u64::MAX,
            fingerprint: None,
            is_err: false,
            copy: Some(std::sync::Arc::new(Box::new(receipt()))),
        },
    );
    kept.insert(
        "bench|order-1002".to_owned(),
        KeptLike {
            result: bytes.clone(),
            token: 1,
            expires_at: u64::MAX,
            fingerprint: None,
            is_err: false,
            copy: None,
        },
    );
    values.insert("bench|order-1001".to_owned(), receipt());
    values_per_entry.insert("bench|order-1001".to_owned(), receipt());
    rt.block_on(async {
        for idem in [&json, &compact] {
            let _: Receipt = idem
                .call("order-1001")
                .scope("bench")
                .run(|| async { Ok::<_, Error>(receipt()) })
                .await
                .expect("first");
        }
        sync.insert("bench|order-1001".to_owned(), bytes.clone());
        ttl.insert("bench|order-1001".to_owned(), bytes.clone());
        per_entry.insert("bench|order-1001".to_owned(), bytes.clone());
        fut.insert("bench|order-1001".to_owned(), bytes.clone())
            .await;
        cached_place("order-1001").await.expect("first");
        // The first hit of a `Clone` value keeps the copy later hits clone.
        // The not-`Clone` function reads a record of its own, as a key's one function
        // does: no copy of another type beside it.
        for _ in 0..2 {
            place(&json, "order-1001").await.expect("first");
            place_decoded(&json, "order-1002").await.expect("first");
        }
    });

    let names = [
        "raw moka sync get + serde_json decode",
        "raw moka future get + serde_json decode",
        "Idempotency::run on a stored key",
        "#[idempotent] fn on a stored key, Clone value",
        "Idempotency::run, Postcard codec",
        "cached crate #[cached(sync_writes = \"by_key\")]",
        "raw moka sync get, 24 h time_to_live + decode",
        "raw moka sync get, per-entry expiry + decode",
        "#[idempotent] fn on a stored key, not Clone",
        "raw moka sync get of the value (clone)",
        "raw per-entry get of the value (clone)",
        "raw per-entry get of bytes + copy, clone the copy",
        "raw per-entry get, key joined + decode",
        "raw per-entry get of a record, key joined, decode",
    ];
    let mut per_call: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    rt.block_on(async {
        for round in 0..ROUNDS {
            let mut t = [0f64; 14];
            // Each round starts at the next variant, so none always runs first (on a cold
            // cache) or always right after the same neighbour.
            for k in 0..t.len() {
                let i = (round + k) % t.len();
                t[i] = match i {
                    0 => per_call!({ raw_sync_hit(&sync) }),
                    1 => per_call!({
                        let b = fut
                            .get(black_box("bench|order-1001"))
                            .await
                            .expect("stored");
                        black_box(serde_json::from_slice::<Receipt>(&b).expect("decode"));
                    }),
                    2 => per_call!({
                        let r: Receipt = json
                            .call(black_box("order-1001"))
                            .scope("bench")
                            .run(|| async { Ok::<_, Error>(receipt()) })
                            .await
                            .expect("hit");
                        black_box(r);
                    }),
                    3 => per_call!({
                        black_box(place(&json, black_box("order-1001")).await.expect("hit"));
                    }),
                    4 => per_call!({
                        let r: Receipt = compact
                            .call(black_box("order-1001"))
                            .scope("bench")
                            .run(|| async { Ok::<_, Error>(receipt()) })
                            .await
                            .expect("hit");
                        black_box(r);
                    }),
                    5 => per_call!({
                        black_box(cached_place(black_box("order-1001")).await.expect("hit"));
                    }),
                    6 => per_call!({ raw_sync_hit(&ttl) }),
                    7 => per_call!({ raw_sync_hit(&per_entry) }),
                    8 => per_call!({
                        black_box(
                            place_decoded(&json, black_box("order-1002"))
                                .await
                                .expect("hit"),
                        );
                    }),
                    9 => per_call!({
                        black_box(values.get(black_box("bench|order-1001")).expect("stored"));
                    }),
                    10 => per_call!({
                        black_box(
                            values_per_entry
                                .get(black_box("bench|order-1001"))
                                .expect("stored"),
                        );
                    }),
                    11 => per_call!({
                        let k = kept.get(black_box("bench|order-1001")).expect("stored");
                        let copy = k.copy.as_ref().expect("copy");
                        black_box(k.is_err || k.fingerprint.is_some() || k.expires_at == 0);
                        black_box((**copy).downcast_ref::<Receipt>().cloned().expect("typed"));
                    }),
                    12 => per_call!({
                        // A scoped key joined per call, as any store of many functions'
                        // results must (the other raw variants look up a constant).
                        let id: &str = black_box("order-1001");
                        let mut key = String::with_capacity(6 + id.len());
                        key.push_str("bench|");
                        key.push_str(id);
                        let b = per_entry.get(&key).expect("stored");
                        black_box(serde_json::from_slice::<Receipt>(&b).expect("decode"));
                    }),
                    13 => per_call!({
                        // What a store with our guarantees reads at least: the record
                        // (bytes, fencing token, expiry, fingerprint) on a joined key.
                        let id: &str = black_box("order-1002");
                        let mut key = String::with_capacity(6 + id.len());
                        key.push_str("bench|");
                        key.push_str(id);
                        let k = kept.get(&key).expect("stored");
                        assert!(!k.is_err && k.fingerprint.is_none() && k.token > 0);
                        black_box(serde_json::from_slice::<Receipt>(&k.result).expect("decode"));
                    }),
                    _ => unreachable!("fourteen variants"),
                };
            }
            for i in 0..names.len() {
                per_call[i].push(t[i]);
                ratios[i].push(t[i] / t[0]);
            }
        }
    });
    println!("{ROUNDS} rounds of {CALLS} calls each, interleaved; medians over rounds");
    println!(
        "{:<50} {:>10} {:>14} {:>16} {:>13} {:>19} {:>11}",
        "variant",
        "ns/call",
        "vs moka sync",
        "vs moka future",
        "vs moka ttl",
        "vs moka per-entry",
        "vs cached"
    );
    let against = |i: usize, base: usize| median_ratio(&per_call[i], &per_call[base]);
    for i in 0..names.len() {
        println!(
            "{:<50} {:>10.1} {:>13.2}x {:>15.2}x {:>12.2}x {:>18.2}x {:>10.2}x",
            names[i],
            median(per_call[i].clone()),
            median(ratios[i].clone()),
            against(i, 1),
            against(i, 6),
            against(i, 7),
            against(i, 5)
        );
    }
}
