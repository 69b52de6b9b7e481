//! What [`RedisStore::with_replica_acks`] costs: first executions and hits through a store
//! that waits for one replica, against the same calls through a store that does not, on
//! the same primary (found through Sentinel), interleaved: each round times a batch of
//! each back to back, and the ratio is taken within the round. Prints the median ratio
//! and its quartiles.
//!
//! Needs a primary with a replica behind Sentinel: `IDEMPOTENT_BENCH_REDIS_SENTINEL`
//! (`url,url,url#master`), or the set `bash .ci/services` starts. With
//! `IDEMPOTENT_BENCH_REDIS_PRIMARY` (a URL) both stores connect to that primary directly
//! (`RedisStore::connect`), to tell what following it through Sentinel costs.
//!
//! ```text
//! bash .ci/services
//! cargo bench -p idempotent-runtime --features redis --bench redis_replica_acks
//! ```

#[path = "common/interleaved.rs"]
mod interleaved;

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idempotent_runtime::store::RedisStore;
use idempotent_runtime::{Error, Idempotency};
use interleaved::report;

const ROUNDS: usize = 60;
const CALLS: usize = 100;

fn sentinel() -> (Vec<String>, String) {
    let spec = std::env::var("IDEMPOTENT_BENCH_REDIS_SENTINEL").unwrap_or_else(|_| {
        let file =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/topology.env"))
                .expect("IDEMPOTENT_BENCH_REDIS_SENTINEL, or run bash .ci/services");
        file.lines()
            .find_map(|l| l.strip_prefix("IDEMPOTENT_TEST_REDIS_SENTINEL="))
            .expect("a Sentinel set in .ci/topology.env")
            .to_owned()
    });
    let (urls, name) = spec.split_once('#').expect("url,url#master");
    (
        urls.split(',').map(str::to_owned).collect(),
        name.to_owned(),
    )
}

async fn per_call(idem: &Idempotency, keys: impl Iterator<Item = String>) -> f64 {
    let start = Instant::now();
    for key in keys {
        let v: u64 = idem
            .call(key)
            .scope("bench")
            .run(|| async { Ok::<_, Error>(black_box(7)) })
            .await
            .expect("call");
        black_box(v);
    }
    start.elapsed().as_nanos() as f64 / CALLS as f64
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (urls, name) = sentinel();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let direct = std::env::var("IDEMPOTENT_BENCH_REDIS_PRIMARY").ok();
        let store = || async {
            match &direct {
                Some(url) => RedisStore::connect(url).await,
                None => RedisStore::connect_sentinel(&urls, &name).await,
            }
            .expect("the primary")
            .with_prefix(format!("idembench-acks:{nanos}:"))
        };
        let plain = Idempotency::new(store().await);
        let acked = Idempotency::new(store().await.with_replica_acks(1, Duration::from_secs(1)));
        let (mut first_p, mut first_a, mut hit_p, mut hit_a) = (vec![], vec![], vec![], vec![]);
        for round in 0..ROUNDS {
            let fresh = |side: &'static str| (0..CALLS).map(move |i| format!("{side}-{round}-{i}"));
            let hits = || (0..CALLS).map(|_| "hit".to_owned());
            if round == 0 {
                per_call(&plain, hits()).await;
            }
            if round % 2 == 0 {
                first_p.push(per_call(&plain, fresh("p")).await);
                first_a.push(per_call(&acked, fresh("a")).await);
                hit_p.push(per_call(&plain, hits()).await);
                hit_a.push(per_call(&acked, hits()).await);
            } else {
                first_a.push(per_call(&acked, fresh("a")).await);
                first_p.push(per_call(&plain, fresh("p")).await);
                hit_a.push(per_call(&acked, hits()).await);
                hit_p.push(per_call(&plain, hits()).await);
            }
        }
        report(
            "first execution",
            ("without acks", first_p),
            ("with acks", first_a),
        );
        report("hit", ("without acks", hit_p), ("with acks", hit_a));
    });
}
