//! What the tests of `run_in_transaction` share: a store beside a table of effects that
//! the operations write to in their transactions, and ways to read it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::store::{PostgresStore, Store};
use idempotent_runtime::{Error, Idempotency, Outcome, StoreError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::{Postgres, Transaction};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

/// `idem`'s call of `key` in `scope`, run in a transaction that inserts the row `who`
/// into the effects table of the store on `table`, and returns `value`.
pub async fn apply<T>(
    idem: &Idempotency,
    scope: &str,
    table: &str,
    key: &str,
    who: &str,
    value: T,
) -> Result<(T, Outcome), Error>
where
    T: Serialize + DeserializeOwned + Send,
{
    idem.call(key)
        .scope(scope)
        .run_in_transaction_with_outcome(|tx| {
            Box::pin(async move {
                insert(table, who, tx).await?;
                Ok(value)
            })
        })
        .await
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

/// A proxy in front of PostgreSQL that holds back the answers to the next `armed`
/// `BEGIN`s for `delay`.
pub async fn begin_delaying_proxy(
    target: SocketAddr,
    delay: Duration,
) -> (SocketAddr, Arc<AtomicU32>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let armed = Arc::new(AtomicU32::new(0));
    let a = armed.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(target).await else {
                continue;
            };
            let armed = a.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let hold = Arc::new(AtomicBool::new(false));
                let h2 = hold.clone();
                let up = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if buf[..n].windows(5).any(|w| w == b"BEGIN")
                            && armed
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok()
                        {
                            h2.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let down = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if hold.swap(false, Ordering::SeqCst) {
                            tokio::time::sleep(delay).await;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! { () = up => {}, () = down => {} }
            });
        }
    });
    (addr, armed)
}
