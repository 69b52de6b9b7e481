//! What the tests of `run_in_transaction` share: a store beside a table of effects that
//! the operations write to in their transactions, and ways to read it.

use std::net::SocketAddr;
use std::time::Duration;

use idempotent_runtime::store::{PostgresStore, Store};
use idempotent_runtime::{Error, Idempotency, StoreError};
use sqlx::{Postgres, Transaction};

use crate::postgres::{fresh_store, postgres_url};

/// A migrated store on a fresh table, and beside it the table the operations write to,
/// `<table>_fx`, with no unique constraint: a second application would show as a second
/// row.
pub async fn store_with_effects() -> PostgresStore {
    let store = fresh_store(&postgres_url()).await;
    sqlx::query(&format!(
        "CREATE TABLE {}_fx (id bigserial PRIMARY KEY, who text NOT NULL)",
        store.table()
    ))
    .execute(store.pool())
    .await
    .expect("create the effects table");
    store
}

/// The rows of `store`'s effects table, oldest first.
pub async fn effects(store: &PostgresStore) -> Vec<String> {
    sqlx::query_scalar(&format!("SELECT who FROM {}_fx ORDER BY id", store.table()))
        .fetch_all(store.pool())
        .await
        .expect("read the effects table")
}

/// The operation's write, in its transaction: a row `who` in the effects table of the
/// store on `table`.
pub async fn insert(
    table: &str,
    who: &str,
    tx: &mut Transaction<'_, Postgres>,
) -> Result<(), Error> {
    sqlx::query(&format!("INSERT INTO {table}_fx (who) VALUES ($1)"))
        .bind(who)
        .execute(&mut **tx)
        .await
        .map_err(|e| Error::Store(StoreError::new("insert", e)))?;
    Ok(())
}

/// An engine over `store` with a lease of `lease`.
pub fn engine(store: impl Store, lease: Duration) -> Idempotency {
    Idempotency::builder()
        .store(store)
        .lease(lease)
        .build()
        .expect("valid settings")
}

/// A store on `table` with a pool of its own: another process, to the store the test
/// made the table with.
pub async fn other_process(table: &str) -> PostgresStore {
    PostgresStore::connect(&postgres_url())
        .await
        .expect("connect")
        .with_table(table)
        .expect("table")
}

/// The test database's address, for a proxy in front of it.
pub async fn server_addr() -> SocketAddr {
    let url = postgres_url();
    let hostport = url
        .split_once('@')
        .map_or("127.0.0.1:5432", |(_, r)| r)
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:5432")
        .to_owned();
    tokio::net::lookup_host(hostport)
        .await
        .expect("resolve the test database")
        .next()
        .expect("an address")
}

/// The test database's URL, with `addr` (a proxy) in place of its host and port.
pub fn url_through(addr: SocketAddr) -> String {
    let url = postgres_url();
    let rest = url.split_once('@').map_or("", |(_, r)| r);
    let db = rest.split_once('/').map_or("test", |(_, d)| d);
    let user = url
        .strip_prefix("postgres://")
        .and_then(|u| u.split_once('@'))
        .map_or("postgres", |(u, _)| u);
    format!("postgres://{user}@{addr}/{db}")
}
