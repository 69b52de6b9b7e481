//! What the PostgreSQL benches compare on: an engine over `PostgresStore` with one stored
//! result, and a raw table holding the same bytes, on one pool.

use idempotent_runtime::store::PostgresStore;
use idempotent_runtime::{Error, Idempotency};
use sqlx::PgPool;

use super::common::{receipt, Receipt};

/// The engine, its pool, and the raw statements.
pub(crate) struct PostgresFixture {
    pub(crate) idem: Idempotency,
    pub(crate) pool: PgPool,
    /// `SELECT v FROM <raw> WHERE k = $1`; `order-1001` is there.
    pub(crate) select: String,
    /// `INSERT INTO <raw> VALUES ($1, $2)`.
    pub(crate) insert: String,
    table: String,
    raw: String,
}

/// Connects to `IDEMPOTENT_TEST_POSTGRES` (default the local test database), makes the
/// store's table and a raw one, both named after `name` and the process, and stores
/// `order-1001` in scope `bench` in each.
pub(crate) async fn postgres_fixture(name: &str) -> PostgresFixture {
    let url = std::env::var("IDEMPOTENT_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let table = format!("{name}_{}", std::process::id());
    let store = PostgresStore::connect(&url)
        .await
        .expect("a PostgreSQL to benchmark against")
        .with_table(&table)
        .expect("table name");
    store.migrate().await.expect("migrate");
    let pool = store.pool().clone();
    let raw = format!("{table}_raw");
    sqlx::query(&format!(
        "CREATE TABLE {raw} (k text PRIMARY KEY, v bytea NOT NULL)"
    ))
    .execute(&pool)
    .await
    .expect("raw table");
    let bytes = serde_json::to_vec(&receipt()).expect("encode");
    sqlx::query(&format!("INSERT INTO {raw} VALUES ('order-1001', $1)"))
        .bind(bytes)
        .execute(&pool)
        .await
        .expect("raw row");
    let idem = Idempotency::new(store);
    let _: Receipt = idem
        .call("order-1001")
        .scope("bench")
        .run(|| async { Ok::<_, Error>(receipt()) })
        .await
        .expect("first");
    PostgresFixture {
        idem,
        pool,
        select: format!("SELECT v FROM {raw} WHERE k = $1"),
        insert: format!("INSERT INTO {raw} VALUES ($1, $2)"),
        table,
        raw,
    }
}

impl PostgresFixture {
    /// Drops what [`postgres_fixture`] made.
    pub(crate) async fn drop_tables(&self) {
        for ddl in [
            format!("DROP TABLE {}", self.raw),
            format!("DROP TABLE {}", self.table),
            format!("DROP SEQUENCE {}_token", self.table),
        ] {
            let _ = sqlx::query(&ddl).execute(&self.pool).await;
        }
    }
}
