//! PostgreSQL for tests: the server named by `IDEMPOTENT_TEST_POSTGRES`, a table per store
//! so parallel tests and runs never collide, and a proxy a test can cut to simulate an
//! outage.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idempotent_runtime::store::PostgresStore;
use sqlx::PgPool;
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

/// A store on a fresh, migrated table of the test database. The first store of a process
/// drops the tables of earlier runs more than an hour old first (see
/// [`drop_stale_tables`]), and every other store of the process waits until it has, so
/// that no test runs its timing against those drops.
pub async fn fresh_store(url: &str) -> PostgresStore {
    static STALE_DROPPED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let store = PostgresStore::connect(url)
        .await
        .unwrap_or_else(|e| panic!("no PostgreSQL at {url} (set IDEMPOTENT_TEST_POSTGRES): {e}"))
        .with_table(&unique_table())
        .expect("a valid table name");
    STALE_DROPPED
        .get_or_init(|| async {
            // Housekeeping: a failure is reported, and fails no test.
            if let Err(e) = drop_stale_tables(store.pool()).await {
                eprintln!("could not drop the stale test tables: {e}");
            }
        })
        .await;
    store.migrate().await.expect("migrate");
    store
}

/// How many relations one `DROP` names: each takes a few locks, and a transaction may
/// hold a few thousand of them.
const DROP_BATCH: usize = 64;

/// Drops the test tables of runs more than an hour old, and the sequences (`{table}_token`)
/// earlier versions of the store made beside them, a batch of them per statement. Tables
/// of runs still going (younger) are left alone. A table something still holds a lock on
/// (a holder process a failed test left behind) fails the drop after a second rather than
/// hold up the tests.
pub async fn drop_stale_tables(pool: &PgPool) -> Result<(), sqlx::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stale = |name: &str| {
        name.strip_prefix(TEST_TABLE_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|born| born + 3600 < now)
    };
    let relations: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, c.relkind = 'r'
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'S')
           AND c.relname LIKE 'idemtest\\_%'",
    )
    .fetch_all(pool)
    .await?;
    let (tables, sequences): (Vec<_>, Vec<_>) = relations
        .into_iter()
        .filter(|(name, _)| stale(name))
        .partition(|(_, table)| *table);
    for (kind, names) in [("TABLE", tables), ("SEQUENCE", sequences)] {
        for batch in names.chunks(DROP_BATCH) {
            let list = batch
                .iter()
                .map(|(name, _)| name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let mut tx = pool.begin().await?;
            // Past the statement timeout the store's connections carry, for a drop that
            // waits for the disk; never for long on a lock.
            sqlx::query("SET LOCAL statement_timeout = '60s'")
                .execute(&mut *tx)
                .await?;
            sqlx::query("SET LOCAL lock_timeout = '1s'")
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!("DROP {kind} IF EXISTS {list}"))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
    }
    Ok(())
}

/// The lease of the tests that renew a claim in real time. On the 2-core CI machine a
/// commit has waited about a second for the disk while a build wrote its output, and once
/// long enough (over 1.5 s) for renewals on a one-second lease to miss the whole lease.
/// A renewal every second keeps a three-second lease about two seconds ahead of the
/// clock: `renewals_held_by_a_stalled_database_keep_the_claim` passes with the key's row
/// held 1.4 s (and 1.9 s), and fails with it held 1.4 s on a one-second lease.
pub const LEASE: Duration = Duration::from_secs(3);

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
        LEASE
    }

    fn real_time_lease(&self) -> Duration {
        LEASE
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
