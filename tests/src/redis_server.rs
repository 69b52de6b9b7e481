//! Redis for tests: the shared server named by `IDEMPOTENT_TEST_REDIS`, with a key prefix
//! per store so parallel runs never collide, and private servers a test may stop.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idempotent_runtime::store::RedisStore;

use crate::Harness;

/// The Redis the tests use: `IDEMPOTENT_TEST_REDIS`, or `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("IDEMPOTENT_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A prefix no other store in any run shares.
pub fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "idemtest:{}:{nanos}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The conformance suite's view of Redis: real time, a lease short enough to wait out.
#[derive(Debug, Clone)]
pub struct RedisHarness {
    target: Target,
}

/// Which Redis deployment a harness's stores connect to.
#[derive(Debug, Clone)]
enum Target {
    Single(String),
    Cluster(Vec<String>),
    Sentinel(Vec<String>, String),
}

impl RedisHarness {
    /// The shared test server.
    pub fn new() -> Self {
        Self {
            target: Target::Single(redis_url()),
        }
    }

    /// The test cluster ([`crate::redis_topology::cluster_seeds`]), through
    /// [`RedisStore::connect_cluster`].
    pub fn cluster() -> Self {
        Self {
            target: Target::Cluster(crate::redis_topology::cluster_seeds()),
        }
    }

    /// The test Sentinel set ([`crate::redis_topology::sentinel_spec`]), through
    /// [`RedisStore::connect_sentinel`].
    pub fn sentinel() -> Self {
        let (urls, name) = crate::redis_topology::sentinel_spec();
        Self {
            target: Target::Sentinel(urls, name),
        }
    }

    /// A fresh store (new prefix) on the harness's Redis.
    pub async fn fresh_store(&self) -> RedisStore {
        let store = match &self.target {
            Target::Single(url) => RedisStore::connect(url).await,
            Target::Cluster(seeds) => RedisStore::connect_cluster(seeds).await,
            Target::Sentinel(urls, name) => RedisStore::connect_sentinel(urls, name).await,
        };
        store
            .unwrap_or_else(|e| {
                panic!("no Redis at {:?} (run bash .ci/services): {e}", self.target)
            })
            .with_prefix(unique_prefix())
    }
}

impl Default for RedisHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness for RedisHarness {
    type Store = RedisStore;

    async fn store(&self) -> RedisStore {
        self.fresh_store().await
    }

    async fn real_time_store(&self) -> RedisStore {
        self.fresh_store().await
    }

    async fn advance(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    fn lease(&self) -> Duration {
        // Real time on a shared server: a margin that a loaded CI machine keeps.
        Duration::from_secs(1)
    }
}

/// A `redis-server` of the test's own on a free port, which it may stop and start again.
/// Killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    // Its working directory, removed on drop: where a replica of it, or it as one, puts
    // the snapshot a full sync sends (a test's own directory otherwise), and with
    // persistence its append-only file, kept across restarts.
    dir: std::path::PathBuf,
    persistent: bool,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub fn start() -> Self {
        Self::start_in(false)
    }

    /// Starts one that writes every command to an append-only file before it answers
    /// (`appendfsync always`), so a restart loses nothing it acknowledged, as a production
    /// Redis configured for durability.
    pub fn start_persistent() -> Self {
        Self::start_in(true)
    }

    fn start_in(persistent: bool) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "idemtest-redis-{}-{port}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the server");
        let mut s = Self {
            port,
            child: None,
            dir,
            persistent,
        };
        s.restart();
        s
    }

    /// The URL to reach it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGKILL): clients see the connection drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port: empty, or with what its append-only file holds.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port.to_string();
        let dir = self.dir.display().to_string();
        let mut args = vec![
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            &dir,
        ];
        if self.persistent {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            args.extend(["--appendonly", "no"]);
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (bash .ci/test installs it)");
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start on port {}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The commands clients send to a Redis, as its `MONITOR` reports them. Commands that a
/// Lua script runs inside the server are reported as coming from `lua` and left out, so
/// what remains is one entry per round trip (per command of a pipeline).
pub struct CommandLog {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CommandLog {
    /// Starts monitoring the Redis on `port`.
    pub async fn start(port: u16) -> Self {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect for MONITOR");
        stream
            .write_all(b"MONITOR\r\n")
            .await
            .expect("send MONITOR");
        let mut reader = BufReader::new(stream);
        let mut ok = String::new();
        reader.read_line(&mut ok).await.expect("MONITOR answer");
        assert!(ok.starts_with("+OK"), "MONITOR refused: {ok}");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let task = tokio::spawn(async move {
            let mut line = String::new();
            while reader
                .read_line(&mut line)
                .await
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                if !line.contains(" lua]") {
                    // `+1700000000.123456 [0 127.0.0.1:5000] "SET" "k" ...`: keep the command.
                    if let Some(cmd) = line.split('"').nth(1) {
                        sink.lock().expect("log").push(cmd.to_uppercase());
                    }
                }
                line.clear();
            }
        });
        Self { lines, task }
    }

    /// The client commands seen since the last call, after a moment for MONITOR to catch up.
    pub async fn take(&self) -> Vec<String> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::mem::take(&mut *self.lines.lock().expect("log"))
    }
}

impl Drop for CommandLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RedisServer {
    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}
