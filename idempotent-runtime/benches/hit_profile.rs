//! One hit (or first execution) variant in a loop, for a profiler: instruction counts
//! under callgrind, which do not drift with the machine's load as timings do, and samples
//! under `perf`.
//!
//! ```text
//! cargo bench -p idempotent-runtime --bench hit_profile --no-run
//! valgrind --tool=callgrind target/release/deps/hit_profile-<hash> raw|engine|macro|macro-decode
//! valgrind --tool=callgrind target/release/deps/hit_profile-<hash> first-raw|first
//! N=10000000 perf record target/release/deps/hit_profile-<hash> macro
//! target/release/deps/hit_profile-<hash> sizes
//! ```
//!
//! `first-raw` is the body, a `serde_json` encode and a raw moka insert on a new key;
//! `first` is `Idempotency::run` on a new key. Both format their key the same way.
//! `first-fp` and `engine-fp` are `first` and `engine` with a fingerprint on the key.
//!
//! `N` sets the number of calls (default 200,000); `sizes` prints the size of each
//! variant's future, which a hit moves whole.

mod common;
#[path = "common/hit_fns.rs"]
mod hit_fns;

use std::hint::black_box;

use common::{receipt, Receipt};
use hit_fns::place;
use idempotent_runtime::{Error, Idempotency};

fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let json = Idempotency::memory();
    let sync: moka::sync::Cache<String, bytes::Bytes> = moka::sync::Cache::new(100_000);
    let bytes = bytes::Bytes::from(serde_json::to_vec(&receipt()).expect("encode"));
    rt.block_on(async {
        let _: Receipt = json
            .call("order-1001")
            .scope("bench")
            .run(|| async { Ok::<_, Error>(receipt()) })
            .await
            .expect("first");
        sync.insert("bench|order-1001".to_owned(), bytes.clone());
        // The first hit of a `Clone` value keeps the copy later hits clone. The other
        // function stores the same bytes (`Unclonable` is a transparent `Receipt`) under a
        // key of its own, as a key's one function does (no copy of another type beside
        // it), and decodes them on every hit. Both in every run, `N=0` too.
        place(&json, "order-1001").await.expect("hit");
        hit_fns::place_decoded(&json, "order-1002")
            .await
            .expect("first");
        match which.as_str() {
            "raw" => {
                for _ in 0..n {
                    let b = sync.get(black_box("bench|order-1001")).expect("stored");
                    black_box(serde_json::from_slice::<Receipt>(&b).expect("decode"));
                }
            }
            "engine" => {
                for _ in 0..n {
                    let r: Receipt = json
                        .call(black_box("order-1001"))
                        .scope("bench")
                        .run(|| async { Ok::<_, Error>(receipt()) })
                        .await
                        .expect("hit");
                    black_box(r);
                }
            }
            "macro-decode" => {
                for _ in 0..n {
                    black_box(
                        hit_fns::place_decoded(&json, black_box("order-1002"))
                            .await
                            .expect("hit"),
                    );
                }
            }
            "macro" => {
                for _ in 0..n {
                    black_box(place(&json, black_box("order-1001")).await.expect("hit"));
                }
            }
            "first-raw" => {
                for i in 0..n {
                    let key = format!("bench|order-{i}");
                    let value = receipt();
                    let encoded = serde_json::to_vec(&value).expect("encode");
                    sync.insert(key, bytes::Bytes::from(encoded));
                    black_box(value);
                }
            }
            "first" => {
                let idem = Idempotency::memory();
                for i in 0..n {
                    let r: Receipt = idem
                        .call(format_args!("order-{i}"))
                        .scope("bench")
                        .run(|| async { Ok::<_, Error>(receipt()) })
                        .await
                        .expect("first");
                    black_box(r);
                }
            }
            "first-fp" => {
                // As `first`, each key claimed with a fingerprint (made once, outside the
                // loop: what it costs is the store's keeping it, not the hashing).
                let idem = Idempotency::memory();
                let fp = idempotent_runtime::Fingerprint::of(&receipt()).expect("fingerprint");
                for i in 0..n {
                    let r: Receipt = idem
                        .call(format_args!("order-{i}"))
                        .scope("bench")
                        .with_fingerprint(fp)
                        .run(|| async { Ok::<_, Error>(receipt()) })
                        .await
                        .expect("first");
                    black_box(r);
                }
            }
            "engine-fp" => {
                // As `engine`, on a key completed with a fingerprint: every hit checks it.
                let fp = idempotent_runtime::Fingerprint::of(&receipt()).expect("fingerprint");
                let call = || {
                    json.call(black_box("order-fp"))
                        .scope("bench")
                        .with_fingerprint(fp)
                        .run(|| async { Ok::<_, Error>(receipt()) })
                };
                let _: Receipt = call().await.expect("first");
                for _ in 0..n {
                    let r: Receipt = call().await.expect("hit");
                    black_box(r);
                }
            }
            "get" => {
                for _ in 0..n {
                    black_box(sync.get(black_box("bench|order-1001")).expect("stored"));
                }
            }
            "decode" => {
                for _ in 0..n {
                    black_box(
                        serde_json::from_slice::<Receipt>(black_box(&bytes)).expect("decode"),
                    );
                }
            }
            "clone" => {
                let r = receipt();
                for _ in 0..n {
                    black_box(black_box(&r).clone());
                }
            }
            "cached" => {
                hit_fns::cached_place("order-1001").await.expect("first");
                for _ in 0..n {
                    black_box(
                        hit_fns::cached_place(black_box("order-1001"))
                            .await
                            .expect("hit"),
                    );
                }
            }
            "sizes" => {
                let engine = json
                    .call("order-1001")
                    .scope("bench")
                    .run(|| async { Ok::<_, Error>(receipt()) });
                println!("Idempotency::run future: {} bytes", size_of_val(&engine));
                let attribute = place(&json, "order-1001");
                println!("#[idempotent] fn future: {} bytes", size_of_val(&attribute));
            }
            other => eprintln!(
                "unknown variant {other:?}: raw, engine, engine-fp, macro, macro-decode, \
                 first-raw, first, first-fp, get, decode, clone, cached or sizes"
            ),
        }
    });
}
