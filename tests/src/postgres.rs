//! PostgreSQL for tests: the server named by `IDEMPOTENT_TEST_POSTGRES`, a table per store
//! so parallel tests and runs never collide, and a proxy a test can cut to simulate an
//! outage.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idempotent_runtime::store::PostgresStore;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::Harness;

/// The database the tests use: `IDEMPOTENT_TEST_POSTGRES`, or the local `test` database.
pub fn postgres_url() -> String {
    std::env::var("IDEMPOTENT_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Test tables are named `idemtest_<unix seconds>_<pid>_<n>`.
const TEST_TABLE_PREFIX: &str = "idemtest_";

/// A table name no other store in any run shares.
pub fn unique_table() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{TEST_TABLE_PREFIX}{secs}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A store on a fresh, migrated table of the test database. Tables of earlier runs more
/// than an hour old are dropped on the way, so test databases do not fill up.
pub async fn fresh_store(url: &str) -> PostgresStore {
    let store = PostgresStore::connect(url)
        .await
        .unwrap_or_else(|e| panic!("no PostgreSQL at {url} (set IDEMPOTENT_TEST_POSTGRES): {e}"))
        .with_table(&unique_table())
        .expect("a valid table name");
    drop_stale_tables(&store).await;
    store.migrate().await.expect("migrate");
    store
}

async fn drop_stale_tables(store: &PostgresStore) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let names: Vec<(String,)> =
        sqlx::query_as("SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'idemtest\\_%'")
            .fetch_all(store.pool())
            .await
            .unwrap_or_default();
    for (name,) in names {
        let born = name
            .strip_prefix(TEST_TABLE_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|s| s.parse::<u64>().ok());
        if born.is_some_and(|b| b + 3600 < now) {
            let _ = sqlx::query(&format!(
                "DROP TABLE IF EXISTS {name}; DROP SEQUENCE IF EXISTS {name}_token"
            ))
            .execute(store.pool())
            .await;
        }
    }
}

/// The conformance suite's view of PostgreSQL: real time, a short lease.
#[derive(Debug, Clone)]
pub struct PostgresHarness {
    url: String,
}

impl PostgresHarness {
    /// The test database.
    pub fn new() -> Self {
        Self {
            url: postgres_url(),
        }
    }
}

impl Default for PostgresHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness for PostgresHarness {
    type Store = PostgresStore;

    async fn store(&self) -> PostgresStore {
        fresh_store(&self.url).await
    }

    async fn real_time_store(&self) -> PostgresStore {
        fresh_store(&self.url).await
    }

    async fn advance(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    fn lease(&self) -> Duration {
        // Real time on a shared server: a margin that a loaded CI machine keeps.
        Duration::from_secs(1)
    }
}

/// A TCP proxy in front of a server, which a test can cut (every connection dropped, new
/// ones refused) and restore: an outage of a real server without stopping it.
pub struct TcpProxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free local port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free port");
        let addr = listener.local_addr().expect("local addr");
        let up = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(Notify::new());
        let (up2, cut2) = (up.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let cut = cut2.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = cut.notified() => {}
                    }
                });
            }
        });
        Self {
            addr,
            up,
            cut,
            task,
        }
    }

    /// The address to connect to instead of the server's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
