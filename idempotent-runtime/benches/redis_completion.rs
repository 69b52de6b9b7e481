//! Server time of a completion against a raw `SET` of the same bytes, by result size, as
//! Redis itself counts it (`INFO commandstats`): the commands the completions sent (the
//! script's `EVALSHA`, whose time includes the commands it runs, and for a large result
//! the finished record's `SET`), per completion, against a `SET` of a record of the same size. The keys are
//! claimed before the statistics are reset, so claims are not counted. Point it at a
//! private server: any other client's commands would be counted with the bench's.
//!
//! ```text
//! redis-server --port 6390 --save "" --appendonly no --daemonize yes
//! IDEMPOTENT_BENCH_REDIS=redis://127.0.0.1:6390 \
//!   cargo bench -p idempotent-runtime --features redis --bench redis_completion
//! ```

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use idempotent_runtime::store::RedisConnection;
use idempotent_runtime::store::{Claim, Fence, RedisStore, Store};
use idempotent_runtime::{FencingToken, StoreKey, StoredResult};

/// Completions (and raw `SET`s) per size.
const CALLS: usize = 2_000;
/// Result sizes, in bytes of the stored value.
const SIZES: [usize; 6] = [64, 1024, 2047, 2048, 16 * 1024, 64 * 1024];
/// Where the store switches to the completion that sends its record apart
/// (`LARGE_RESULT` in `store/redis.rs`).
const LARGE_RESULT: usize = 2 * 1024;
const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(60);

/// Each command's total server time since the statistics were reset, in microseconds
/// (`usec` in `INFO commandstats`).
async fn usec(conn: &mut RedisConnection) -> HashMap<String, f64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let usec = fields
                .split(',')
                .find_map(|f| f.strip_prefix("usec="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), usec))
        })
        .collect()
}

async fn reset(conn: &mut RedisConnection) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await
        .expect("CONFIG RESETSTAT");
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let url = std::env::var("IDEMPOTENT_BENCH_REDIS")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("idembench-completion:{}:", std::process::id());
        let store = RedisStore::connect(&url)
            .await
            .expect("a Redis to measure on")
            .with_prefix(prefix.clone());
        let mut conn = store.connection();
        println!("server time per call, {CALLS} calls per size, on {url}");
        println!(
            "| result | `SET` of a record of its size | completion (`SET` + `EVALSHA`) | ratio |"
        );
        println!("|---:|---:|---:|---:|");
        for size in SIZES {
            let result = StoredResult::Ok(Bytes::from(vec![b'x'; size]));
            let keys: Vec<StoreKey> = (0..CALLS)
                .map(|n| StoreKey::new("bench", format!("{size}:{n}"), 255).expect("key"))
                .collect();
            let mut tokens = Vec::with_capacity(CALLS);
            for key in &keys {
                let token = FencingToken::mint();
                let claim = store.claim(key, token, None, LEASE).await.expect("claim");
                assert_eq!(claim, Claim::Acquired);
                tokens.push(token);
            }
            reset(&mut conn).await;
            for (key, token) in keys.iter().zip(&tokens) {
                let fence = store
                    .complete(key, *token, result.clone(), TTL)
                    .await
                    .expect("complete");
                assert_eq!(fence, Fence::Held);
            }
            // What the client sent: the script (whose time includes the commands it runs,
            // which Redis also counts under their own names) and, for a large result, the
            // finished record's `SET`.
            let stats = usec(&mut conn).await;
            let mut sent = stats.get("evalsha").copied().unwrap_or(0.0);
            if size >= LARGE_RESULT {
                sent += stats.get("set").copied().unwrap_or(0.0);
            }
            let engine = sent / CALLS as f64;
            let record = vec![b'c'; size + 50];
            reset(&mut conn).await;
            for n in 0..CALLS {
                let _: () = redis::cmd("SET")
                    .arg(format!("{prefix}raw:{size}:{n}"))
                    .arg(&record[..])
                    .arg("PX")
                    .arg(60_000)
                    .query_async(&mut conn)
                    .await
                    .expect("SET");
            }
            let set = usec(&mut conn).await.get("set").copied().unwrap_or(0.0) / CALLS as f64;
            println!(
                "| {size} B | {set:.2} µs | {engine:.2} µs | {:.1}x |",
                engine / set
            );
        }
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
        }
    });
}
