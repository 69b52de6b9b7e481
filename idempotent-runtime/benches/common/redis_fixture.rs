//! What the Redis benches compare on: an engine over `RedisStore` with one stored result,
//! and the same bytes under a raw key, on one connection.

use idempotent_runtime::store::RedisConnection;
use idempotent_runtime::store::RedisStore;
use idempotent_runtime::{Error, Idempotency};

use super::common::{receipt, Receipt};

/// The engine, its connection, and where the raw bytes are.
pub(crate) struct RedisFixture {
    pub(crate) idem: Idempotency,
    pub(crate) conn: RedisConnection,
    /// Prefix of every key the bench writes, unique to the process.
    pub(crate) prefix: String,
    /// The raw copy of the stored result.
    pub(crate) raw_key: String,
}

/// Connects to `IDEMPOTENT_TEST_REDIS` (default the local Redis), stores `order-1001` in
/// scope `bench` through the engine and its bytes under [`RedisFixture::raw_key`].
pub(crate) async fn redis_fixture(name: &str) -> RedisFixture {
    let url =
        std::env::var("IDEMPOTENT_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("{name}:{}:", std::process::id());
    let store = RedisStore::connect(&url)
        .await
        .expect("a Redis to benchmark against")
        .with_prefix(prefix.clone());
    let mut conn = store.connection();
    let idem = Idempotency::new(store);
    let _: Receipt = idem
        .call("order-1001")
        .scope("bench")
        .run(|| async { Ok::<_, Error>(receipt()) })
        .await
        .expect("first run");
    let raw_key = format!("{prefix}raw");
    let bytes = serde_json::to_vec(&receipt()).expect("encode");
    let _: () = redis::cmd("SET")
        .arg(&raw_key)
        .arg(&bytes)
        .query_async(&mut conn)
        .await
        .expect("set");
    RedisFixture {
        idem,
        conn,
        prefix,
        raw_key,
    }
}
