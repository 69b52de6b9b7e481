//! Redis topologies for tests: the shared Redis Cluster and Sentinel set that
//! `bash .ci/services` starts (and names in `.ci/topology.env`), and private ones a test
//! starts for itself on free ports and may damage: [`PrivateCluster`] and
//! [`PrivateSentinelSet`].
//!
//! The private topologies run `redis-server` (and `redis-cli --cluster create`) from the
//! `PATH`, as children of the test process, and are killed with their files removed when
//! dropped. Every wait here polls the servers' real state, and panics with what the
//! servers said when that state does not come within 60 seconds.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The variable naming the shared cluster: its nodes' URLs, comma-separated.
pub const CLUSTER_VAR: &str = "IDEMPOTENT_TEST_REDIS_CLUSTER";

/// The variable naming the shared sentinel set: `url,url,url#master-name`.
pub const SENTINEL_VAR: &str = "IDEMPOTENT_TEST_REDIS_SENTINEL";

/// The file `.ci/services` writes the shared topology's addresses to.
const TOPOLOGY_ENV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/topology.env");

/// How long a topology gets to reach the state a helper waits for.
const WAIT: Duration = Duration::from_secs(60);

/// The pause between two looks at the servers while waiting.
const POLL: Duration = Duration::from_millis(50);

/// The number of hash slots of a Redis Cluster.
const SLOTS: usize = 16384;

/// The seed URLs of the shared Redis Cluster: `IDEMPOTENT_TEST_REDIS_CLUSTER`
/// (comma-separated `redis://` URLs) when set, else what `.ci/services` wrote to
/// `.ci/topology.env`.
///
/// # Panics
///
/// When neither names a cluster: run `bash .ci/services` first.
pub fn cluster_seeds() -> Vec<String> {
    let seeds = split_urls(&topology_var(CLUSTER_VAR));
    assert!(!seeds.is_empty(), "{CLUSTER_VAR} names no URL");
    seeds
}

/// The shared Sentinel set: the sentinels' URLs and the name of the master they watch,
/// from `IDEMPOTENT_TEST_REDIS_SENTINEL` (`url,url,url#master`) when set, else from what
/// `.ci/services` wrote to `.ci/topology.env`.
///
/// # Panics
///
/// When neither names a sentinel set, or the value has no `#master` part.
pub fn sentinel_spec() -> (Vec<String>, String) {
    let spec = topology_var(SENTINEL_VAR);
    let (urls, name) = spec
        .rsplit_once('#')
        .unwrap_or_else(|| panic!("{SENTINEL_VAR}={spec:?} lacks `#<master name>` at its end"));
    let urls = split_urls(urls);
    assert!(
        !urls.is_empty() && !name.is_empty(),
        "{SENTINEL_VAR}={spec:?} names no sentinel URL or no master"
    );
    (urls, name.to_string())
}

/// The value of `name`: from the environment, else from `.ci/topology.env`.
fn topology_var(name: &str) -> String {
    if let Ok(v) = std::env::var(name) {
        if !v.trim().is_empty() {
            return v.trim().to_string();
        }
    }
    let from_file = std::fs::read_to_string(TOPOLOGY_ENV)
        .ok()
        .and_then(|text| env_file_value(&text, name));
    from_file.unwrap_or_else(|| {
        panic!(
            "{name} is not set, and {TOPOLOGY_ENV} does not name it: run `bash .ci/services` \
             at the workspace root (it starts the Redis Cluster and Sentinel set the tests use \
             and writes that file), or set {name}"
        )
    })
}

/// The value of `name` in the `NAME=value` lines of `text` (quotes around it dropped).
fn env_file_value(text: &str, name: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix(name)?.strip_prefix('='))
        .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
        .rfind(|v| !v.is_empty())
}

/// The non-empty items of a comma-separated list.
fn split_urls(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect()
}

/// `n` distinct free ports: all bound at once, then released for the servers to take.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound port").port())
        .collect()
}

/// A new directory under the system's temporary one, for the files of one topology.
fn scratch_dir(kind: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "idemtest-{kind}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("a directory for the topology's files");
    dir
}

/// Starts `redis-server` with `args`, its output discarded (each server logs to a file).
fn spawn_server(args: &[String]) -> Child {
    Command::new("redis-server")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server on PATH (bash .ci/services installs it)")
}

/// One command to the server on `port`, with timeouts so a dead or wedged server is an
/// error rather than a hang.
fn ask<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut con = client.get_connection_with_timeout(Duration::from_millis(500))?;
    con.set_read_timeout(Some(Duration::from_secs(2)))?;
    con.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut con)
}

/// Like [`ask`], with the error as text, for the checks that wait.
fn ask_text<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> Result<T, String> {
    ask(port, args).map_err(|e| format!("{} on port {port}: {e}", args.join(" ")))
}

/// The value of `key` in `key:value` lines (INFO, CLUSTER INFO).
fn info_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim_end().strip_prefix(key)?.strip_prefix(':'))
}

/// What `ROLE` says of the server on `port`: `("master", None)`, or `("slave",
/// Some((master_port, link_state)))`, where a link state of `connected` is a link up.
fn role(port: u16) -> Result<(String, Option<(u16, String)>), String> {
    let reply: Vec<redis::Value> = ask_text(port, &["ROLE"])?;
    let text = |i: usize| -> Option<String> {
        reply
            .get(i)
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
    };
    let kind = text(0).ok_or_else(|| format!("ROLE on port {port}: {reply:?}"))?;
    if kind == "slave" || kind == "replica" {
        let master_port = text(2).and_then(|p| p.parse().ok()).unwrap_or(0);
        Ok((kind, Some((master_port, text(3).unwrap_or_default()))))
    } else {
        Ok((kind, None))
    }
}

/// Calls `check` every [`POLL`] until it is `Ok`; after [`WAIT`] panics with `what`, the
/// last reason `check` gave, and `diagnostics()`.
fn wait_until<T>(
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
    diagnostics: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        match check() {
            Ok(v) => return v,
            Err(why) if Instant::now() >= deadline => {
                panic!(
                    "not within {WAIT:?}: {what}\nlast: {why}\n{}",
                    diagnostics()
                )
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Kills (SIGKILL) and reaps a child, if it still runs.
fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// One server of a private topology: its port, and its process while it runs.
#[derive(Debug)]
struct Server {
    /// The port it listens on.
    port: u16,
    /// Its process, `None` once killed.
    child: Option<Child>,
}

impl Server {
    /// Whether its process runs (it was not killed).
    fn alive(&self) -> bool {
        self.child.is_some()
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug)]
struct NodeLine {
    /// The node's id.
    id: String,
    /// Its client port.
    port: u16,
    /// `myself`, `master`, `slave`, `fail?`, `fail`, ...
    flags: Vec<String>,
    /// The id of its master, for a replica.
    master_id: Option<String>,
    /// The slot ranges it serves, both ends included.
    slots: Vec<(usize, usize)>,
}

impl NodeLine {
    /// Whether the node is a master (failing or not).
    fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    /// Whether the node is flagged as failing (`fail`) or suspected to (`fail?`).
    fn failed(&self) -> bool {
        self.flags.iter().any(|f| f == "fail" || f == "fail?")
    }

    /// Whether `slot` is in one of its slot ranges.
    fn serves(&self, slot: usize) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
}

/// Parses `CLUSTER NODES`: `id ip:port@cport flags master ping pong epoch link slots...`.
fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('[')) // slots being migrated or imported
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            Some(NodeLine {
                id: f[0].to_string(),
                port,
                flags: f[2].split(',').map(String::from).collect(),
                master_id: (f[3] != "-").then(|| f[3].to_string()),
                slots,
            })
        })
        .collect()
}

/// A Redis Cluster a test starts for itself on free ports, and may damage (kill masters,
/// wait for their replicas to take over). Killed (SIGKILL) with its files removed on drop.
///
/// Its nodes use a node timeout of 1 s, so a killed master is replaced within seconds.
#[derive(Debug)]
pub struct PrivateCluster {
    /// The nodes' directories (node files, logs), one per port.
    dir: PathBuf,
    /// Every node, killed ones included.
    nodes: Vec<Server>,
    /// The number of masters asked for.
    masters_at_start: usize,
    /// The replicas each killed master had when it was killed: one of them must take over.
    replicas_at_kill: HashMap<u16, Vec<u16>>,
}

impl PrivateCluster {
    /// Starts `masters` masters with `replicas_per_master` replicas each, forms the cluster
    /// with `redis-cli --cluster create`, and blocks until every node says
    /// `cluster_state:ok`, knows every other node, and every replica's link is up.
    ///
    /// # Panics
    ///
    /// With fewer than 3 masters (`redis-cli --cluster create` refuses them), when a server
    /// does not start, or when the cluster is not whole within 60 s.
    pub fn start(masters: usize, replicas_per_master: usize) -> Self {
        assert!(
            masters >= 3,
            "a Redis Cluster needs at least 3 masters, not {masters}"
        );
        let n = masters * (1 + replicas_per_master);
        // A client port and a cluster bus port for each node, all distinct: the default bus
        // port (client port + 10000) may be taken, or past 65535.
        let ports = free_ports(2 * n);
        let dir = scratch_dir("cluster");
        let mut cluster = Self {
            dir,
            nodes: Vec::new(),
            masters_at_start: masters,
            replicas_at_kill: HashMap::new(),
        };
        for (&port, &bus) in ports[..n].iter().zip(&ports[n..]) {
            let node_dir = cluster.dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("a directory for a cluster node");
            let mut args = data_node_args(port, &node_dir);
            args.extend(
                [
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                ]
                .iter()
                .map(|s| s.to_string()),
            );
            cluster.nodes.push(Server {
                port,
                child: Some(spawn_server(&args)),
            });
        }
        for node in &cluster.nodes {
            let port = node.port;
            wait_until(
                &format!("cluster node on port {port} answers"),
                || ask_text::<String>(port, &["PING"]).map(drop),
                || cluster.diagnostics(),
            );
        }
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|s| format!("127.0.0.1:{}", s.port)),
            )
            .args([
                "--cluster-replicas",
                &replicas_per_master.to_string(),
                "--cluster-yes",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli on PATH (bash .ci/services installs it)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until(
            "the new cluster is whole",
            || cluster.check_whole(),
            || cluster.diagnostics(),
        );
        cluster
    }

    /// The `redis://` URLs of all its nodes, dead ones included.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect()
    }

    /// The port of the master that serves `key`'s slot now, in the view of a live node.
    ///
    /// # Panics
    ///
    /// When no live node answers, or none serves the slot (during a failover).
    pub fn master_for_key(&self, key: &str) -> u16 {
        let port = self.any_live();
        let slot: i64 = ask(port, &["CLUSTER", "KEYSLOT", key]).expect("CLUSTER KEYSLOT");
        let slot = usize::try_from(slot).expect("a slot");
        self.view(port)
            .iter()
            .find(|n| n.is_master() && !n.failed() && n.serves(slot))
            .map(|n| n.port)
            .unwrap_or_else(|| {
                panic!(
                    "no master serves slot {slot} of {key:?}\n{}",
                    self.diagnostics()
                )
            })
    }

    /// The ports of the live masters that serve slots now, in the view of a live node,
    /// in ascending order.
    pub fn masters(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .view(self.any_live())
            .iter()
            .filter(|n| n.is_master() && !n.failed() && !n.slots.is_empty())
            .map(|n| n.port)
            .filter(|&p| self.is_live(p))
            .collect();
        ports.sort_unstable();
        ports
    }

    /// Kills (SIGKILL) the node on `port`, remembering the replicas it had for
    /// [`PrivateCluster::wait_for_failover`].
    ///
    /// # Panics
    ///
    /// When no live node of this cluster has that port.
    pub fn kill(&mut self, port: u16) {
        assert!(
            self.is_live(port),
            "no live node of this cluster on port {port}"
        );
        let view = self.view(port);
        let replicas = view
            .iter()
            .find(|n| n.port == port)
            .map(|me| {
                view.iter()
                    .filter(|n| n.master_id.as_deref() == Some(&me.id))
                    .map(|n| n.port)
                    .collect()
            })
            .unwrap_or_default();
        self.replicas_at_kill.insert(port, replicas);
        let node = self
            .nodes
            .iter_mut()
            .find(|s| s.port == port)
            .expect("a live node");
        kill_child(&mut node.child);
    }

    /// Blocks until the cluster has recovered from the death of the node on `dead_port`
    /// (killed with [`PrivateCluster::kill`]): one of the replicas it had is a master now
    /// (when it had replicas), and every live node says `cluster_state:ok` and maps every
    /// slot to a live master not flagged as failing.
    ///
    /// # Panics
    ///
    /// When `dead_port` was not killed with [`PrivateCluster::kill`], or after 60 s, with
    /// every live node's `CLUSTER NODES`.
    pub fn wait_for_failover(&self, dead_port: u16) {
        let replicas = self
            .replicas_at_kill
            .get(&dead_port)
            .unwrap_or_else(|| panic!("port {dead_port} was not killed with kill()"));
        wait_until(
            &format!("the cluster recovers from the death of port {dead_port}"),
            || {
                if !replicas.is_empty() {
                    let view = self.view_text(self.any_live())?;
                    let promoted = parse_nodes(&view).into_iter().any(|n| {
                        replicas.contains(&n.port)
                            && self.is_live(n.port)
                            && n.is_master()
                            && !n.slots.is_empty()
                    });
                    if !promoted {
                        return Err(format!("none of {replicas:?} is a master yet"));
                    }
                }
                self.check_serving()
            },
            || self.diagnostics(),
        );
    }

    /// Whether the node on `port` is one of this cluster's and runs.
    fn is_live(&self, port: u16) -> bool {
        self.nodes.iter().any(|s| s.port == port && s.alive())
    }

    /// A live node's port.
    fn any_live(&self) -> u16 {
        self.nodes
            .iter()
            .find(|s| s.alive())
            .map(|s| s.port)
            .expect("a live node in the cluster")
    }

    /// `CLUSTER NODES` as the node on `port` gives it.
    fn view_text(&self, port: u16) -> Result<String, String> {
        ask_text(port, &["CLUSTER", "NODES"])
    }

    /// `CLUSTER NODES` of the node on `port`, parsed.
    ///
    /// # Panics
    ///
    /// When that node does not answer.
    fn view(&self, port: u16) -> Vec<NodeLine> {
        parse_nodes(&self.view_text(port).unwrap_or_else(|e| panic!("{e}")))
    }

    /// Every live node says `cluster_state:ok` and maps every slot to a live master that
    /// it does not flag as failing, and every live replica's link is up.
    fn check_serving(&self) -> Result<(), String> {
        for node in self.nodes.iter().filter(|s| s.alive()) {
            let port = node.port;
            let info: String = ask_text(port, &["CLUSTER", "INFO"])?;
            if info_field(&info, "cluster_state") != Some("ok") {
                return Err(format!("port {port}: cluster_state is not ok"));
            }
            let view = parse_nodes(&self.view_text(port)?);
            let mut covered = vec![false; SLOTS];
            for n in view
                .iter()
                .filter(|n| n.is_master() && !n.failed() && self.is_live(n.port))
            {
                for &(a, b) in &n.slots {
                    covered[a.min(SLOTS - 1)..=b.min(SLOTS - 1)].fill(true);
                }
            }
            if let Some(slot) = covered.iter().position(|c| !c) {
                return Err(format!("port {port} maps slot {slot} to no live master"));
            }
            let repl: String = ask_text(port, &["INFO", "replication"])?;
            if info_field(&repl, "role") == Some("slave")
                && info_field(&repl, "master_link_status") != Some("up")
            {
                return Err(format!(
                    "replica on port {port}: link to its master is down"
                ));
            }
        }
        Ok(())
    }

    /// [`Self::check_serving`], and every node knows every other node and as many masters
    /// serve slots as were asked for.
    fn check_whole(&self) -> Result<(), String> {
        for node in &self.nodes {
            let info: String = ask_text(node.port, &["CLUSTER", "INFO"])?;
            let known = info_field(&info, "cluster_known_nodes").unwrap_or("?");
            if known != self.nodes.len().to_string() {
                return Err(format!(
                    "port {} knows {known} of {} nodes",
                    node.port,
                    self.nodes.len()
                ));
            }
        }
        let masters = self.masters().len();
        if masters != self.masters_at_start {
            return Err(format!(
                "{masters} masters serve slots, not {}",
                self.masters_at_start
            ));
        }
        self.check_serving()
    }

    /// What every node says of the cluster, for a failure's message.
    fn diagnostics(&self) -> String {
        let mut out = format!("cluster files: {}\n", self.dir.display());
        for node in &self.nodes {
            if !node.alive() {
                out += &format!("--- port {}: killed\n", node.port);
                continue;
            }
            let state = ask_text::<String>(node.port, &["CLUSTER", "INFO"])
                .map(|i| info_field(&i, "cluster_state").unwrap_or("?").to_string())
                .unwrap_or_else(|e| e);
            let nodes = self.view_text(node.port).unwrap_or_else(|e| e);
            out += &format!("--- port {}: cluster_state {state}\n{nodes}\n", node.port);
        }
        out
    }
}

/// The arguments every data node of these sets gets: its port, its own directory and
/// log, nothing kept on disk.
fn data_node_args(port: u16, dir: &std::path::Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        // Replicas sync at once rather than after the default 5 s, also when an old
        // primary rejoins after a failover.
        "--repl-diskless-sync-delay",
        "0",
        "--dir",
        &dir.display().to_string(),
        "--logfile",
        &dir.join("redis.log").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            kill_child(&mut node.child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis primary, one replica and three sentinels watching them, that a test starts for
/// itself on free ports and may fail over or damage. Killed (SIGKILL) with its files
/// removed on drop.
///
/// The sentinels use `down-after-milliseconds 1000` and `failover-timeout 5000`, with a
/// quorum of 2.
#[derive(Debug)]
pub struct PrivateSentinelSet {
    /// The servers' directories (sentinel configuration files, logs), one per port.
    dir: PathBuf,
    /// The two data nodes: the primary at start, then the replica.
    data: Vec<Server>,
    /// The three sentinels.
    sentinels: Vec<Server>,
    /// The name the sentinels monitor the primary by.
    name: String,
}

impl PrivateSentinelSet {
    /// Starts the primary and its replica, waits for the replica's link, then starts the
    /// sentinels and blocks until each of them names the primary, sees the replica with
    /// its link up, and sees the other two sentinels.
    ///
    /// # Panics
    ///
    /// When a server does not start, or the set is not whole within 60 s.
    pub fn start() -> Self {
        let ports = free_ports(5);
        let mut set = Self {
            dir: scratch_dir("sentinel"),
            data: Vec::new(),
            sentinels: Vec::new(),
            name: "idemtest".to_string(),
        };
        let (primary, replica) = (ports[0], ports[1]);
        for (port, replica_of) in [(primary, None), (replica, Some(primary))] {
            let node_dir = set.dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("a directory for a data node");
            let mut args = data_node_args(port, &node_dir);
            if let Some(p) = replica_of {
                args.extend(["--replicaof".into(), "127.0.0.1".into(), p.to_string()]);
            }
            set.data.push(Server {
                port,
                child: Some(spawn_server(&args)),
            });
            wait_until(
                &format!("data node on port {port} answers"),
                || ask_text::<String>(port, &["PING"]).map(drop),
                || set.diagnostics(),
            );
        }
        // The replica linked before the sentinels start: their first look at the primary
        // then lists it, rather than their next one ten seconds later.
        wait_until(
            "the replica's link to the primary is up",
            || match role(replica)? {
                (_, Some((p, state))) if p == primary && state == "connected" => Ok(()),
                other => Err(format!("replica's ROLE: {other:?}")),
            },
            || set.diagnostics(),
        );
        for &port in &ports[2..] {
            let sentinel_dir = set.dir.join(port.to_string());
            std::fs::create_dir_all(&sentinel_dir).expect("a directory for a sentinel");
            // Sentinel rewrites its configuration file (its id, what it learns), so each
            // gets a writable one of its own.
            let conf = sentinel_dir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {dir}/sentinel.log\n\
                     sentinel monitor {name} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {name} 1000\n\
                     sentinel failover-timeout {name} 5000\n",
                    dir = sentinel_dir.display(),
                    name = set.name,
                ),
            )
            .expect("write sentinel.conf");
            let args = vec![conf.display().to_string(), "--sentinel".to_string()];
            set.sentinels.push(Server {
                port,
                child: Some(spawn_server(&args)),
            });
        }
        wait_until(
            "the sentinels know the primary, the replica and each other",
            || set.check_settled(primary, set.sentinels.len()),
            || set.diagnostics(),
        );
        set
    }

    /// The `redis://` URLs of the three sentinels.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect()
    }

    /// The name the sentinels know the primary by.
    pub fn master_name(&self) -> &str {
        &self.name
    }

    /// The port of the primary, as the first sentinel that answers reports it now.
    ///
    /// # Panics
    ///
    /// When no sentinel answers.
    pub fn primary_port(&self) -> u16 {
        self.sentinels
            .iter()
            .filter(|s| s.alive())
            .find_map(|s| self.reported_primary(s.port).ok())
            .unwrap_or_else(|| panic!("no sentinel answers\n{}", self.diagnostics()))
    }

    /// Has a sentinel fail the primary over to the replica (`SENTINEL FAILOVER`), then
    /// blocks until all three sentinels report the new primary, its `ROLE` says master,
    /// the old primary's `ROLE` says it is a replica of it with its link up, and the
    /// sentinel asked sees that replica as fit (so the next failover may start at once).
    ///
    /// Takes some 10 s: a sentinel turns the old primary into a replica only once it has
    /// reported itself a master for 8 s after the switch.
    ///
    /// # Panics
    ///
    /// When a data node is dead, or after 60 s, with what every server says.
    pub fn failover(&self) {
        assert!(
            self.data.iter().all(Server::alive),
            "failover() needs both data nodes running"
        );
        let old = self.primary_port();
        let new = self.other_data_port(old);
        let sentinel = self.sentinels[0].port;
        // A sentinel refuses (INPROG, NOGOODSLAVE) while an earlier failover finishes or
        // before it has seen the replica as fit: asked again until it accepts.
        wait_until(
            "a sentinel accepts SENTINEL FAILOVER",
            || ask_text::<String>(sentinel, &["SENTINEL", "FAILOVER", &self.name]).map(drop),
            || self.diagnostics(),
        );
        wait_until(
            &format!("the failover from port {old} to port {new} completes"),
            || self.check_settled(new, 1),
            || self.diagnostics(),
        );
    }

    /// Kills (SIGKILL) the primary the sentinels report now, and returns its port. The
    /// sentinels promote the replica after `down-after-milliseconds`; see
    /// [`PrivateSentinelSet::wait_for_promotion`].
    pub fn kill_primary(&mut self) -> u16 {
        let port = self.primary_port();
        let node = self
            .data
            .iter_mut()
            .find(|s| s.port == port)
            .expect("the primary is one of the data nodes");
        kill_child(&mut node.child);
        port
    }

    /// Blocks until all three sentinels report the data node other than `dead_port` as
    /// the primary and its `ROLE` says master; returns its port.
    ///
    /// # Panics
    ///
    /// After 60 s, with what every server says.
    pub fn wait_for_promotion(&self, dead_port: u16) -> u16 {
        let new = self.other_data_port(dead_port);
        wait_until(
            &format!("the sentinels promote port {new} after port {dead_port} died"),
            || {
                self.check_sentinels_name(new)?;
                match role(new)? {
                    (kind, None) if kind == "master" => Ok(new),
                    other => Err(format!("ROLE of port {new}: {other:?}")),
                }
            },
            || self.diagnostics(),
        )
    }

    /// The port of the data node started as the primary (no sentinel asked, so it works
    /// while the sentinels are stalled).
    pub fn first_primary_port(&self) -> u16 {
        self.data[0].port
    }

    /// Kills (SIGKILL) the data node on `port` without asking a sentinel.
    pub fn kill_data_node(&mut self, port: u16) {
        let node = self
            .data
            .iter_mut()
            .find(|s| s.port == port)
            .expect("a data node");
        kill_child(&mut node.child);
    }

    /// The data node's port that is not `port`.
    fn other_data_port(&self, port: u16) -> u16 {
        self.data
            .iter()
            .map(|s| s.port)
            .find(|&p| p != port)
            .expect("two data nodes")
    }

    /// What the sentinel on `port` gives as the primary's port.
    fn reported_primary(&self, port: u16) -> Result<u16, String> {
        let addr: Option<Vec<String>> =
            ask_text(port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.name])?;
        addr.as_ref()
            .and_then(|a| a.get(1))
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("sentinel {port} gives no primary: {addr:?}"))
    }

    /// Every sentinel names `primary`.
    fn check_sentinels_name(&self, primary: u16) -> Result<(), String> {
        for s in &self.sentinels {
            let reported = self.reported_primary(s.port)?;
            if reported != primary {
                return Err(format!(
                    "sentinel {} names port {reported}, not {primary}",
                    s.port
                ));
            }
        }
        Ok(())
    }

    /// The set is whole with `primary` as its primary: every sentinel names it, sees it as
    /// a master and not down, and sees the two other sentinels; the first `replica_seen_by`
    /// sentinels see the other data node as a replica of it, not down, link ok; `ROLE` on
    /// the data nodes agrees.
    ///
    /// A sentinel refreshes what it knows of a replica every 10 s: after a failover, the
    /// old primary may look like a fit replica to one sentinel up to 10 s before the
    /// others. Only the sentinel [`Self::failover`] asks needs to see it so for the next
    /// failover to start.
    fn check_settled(&self, primary: u16, replica_seen_by: usize) -> Result<(), String> {
        let replica = self.other_data_port(primary);
        self.check_sentinels_name(primary)?;
        for (i, s) in self.sentinels.iter().enumerate() {
            let port = s.port;
            let master: HashMap<String, String> =
                ask_text(port, &["SENTINEL", "MASTER", &self.name])?;
            let field = |k: &str| master.get(k).map(String::as_str).unwrap_or("?");
            if field("flags") != "master" || field("num-other-sentinels") != "2" {
                return Err(format!(
                    "sentinel {port}: master flags {}, {} other sentinels",
                    field("flags"),
                    field("num-other-sentinels")
                ));
            }
            if i >= replica_seen_by {
                continue;
            }
            let replicas: Vec<HashMap<String, String>> =
                ask_text(port, &["SENTINEL", "REPLICAS", &self.name])?;
            let seen = replicas
                .iter()
                .find(|r| r.get("port").map(String::as_str) == Some(&replica.to_string()));
            let fit = seen.is_some_and(|r| {
                r.get("flags").map(String::as_str) == Some("slave")
                    && r.get("master-link-status").map(String::as_str) == Some("ok")
                    && r.get("master-port").map(String::as_str) == Some(&primary.to_string())
            });
            if !fit {
                return Err(format!(
                    "sentinel {port} does not yet see port {replica} as a fit replica: {seen:?}"
                ));
            }
        }
        match role(primary)? {
            (kind, None) if kind == "master" => {}
            other => return Err(format!("ROLE of port {primary}: {other:?}")),
        }
        match role(replica)? {
            (_, Some((p, state))) if p == primary && state == "connected" => Ok(()),
            other => Err(format!("ROLE of port {replica}: {other:?}")),
        }
    }

    /// What every server says, for a failure's message.
    fn diagnostics(&self) -> String {
        let mut out = format!("sentinel set files: {}\n", self.dir.display());
        for s in &self.data {
            let r = if s.alive() {
                format!("{:?}", role(s.port))
            } else {
                "killed".into()
            };
            out += &format!("--- data node {}: ROLE {r}\n", s.port);
        }
        for s in &self.sentinels {
            let master =
                ask_text::<HashMap<String, String>>(s.port, &["SENTINEL", "MASTER", &self.name])
                    .map(|m| {
                        [
                            "port",
                            "flags",
                            "num-slaves",
                            "num-other-sentinels",
                            "failover-state",
                        ]
                        .iter()
                        .map(|k| format!("{k}={}", m.get(*k).map(String::as_str).unwrap_or("-")))
                        .collect::<Vec<_>>()
                        .join(" ")
                    })
                    .unwrap_or_else(|e| e);
            out += &format!("--- sentinel {}: {master}\n", s.port);
        }
        out += &format!("(logs under {}/<port>/)\n", self.dir.display());
        out
    }
}

impl Drop for PrivateSentinelSet {
    fn drop(&mut self) {
        for s in self.sentinels.iter_mut().chain(self.data.iter_mut()) {
            kill_child(&mut s.child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The parsing, without servers.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_values_are_found_and_unquoted() {
        let text = "A=1\nIDEMPOTENT_TEST_REDIS_SENTINEL=redis://h:1,redis://h:2#m\nB='x'\n";
        assert_eq!(
            env_file_value(text, SENTINEL_VAR).as_deref(),
            Some("redis://h:1,redis://h:2#m")
        );
        assert_eq!(env_file_value(text, "B").as_deref(), Some("x"));
        assert_eq!(env_file_value(text, "C"), None);
    }

    #[test]
    fn cluster_nodes_lines_are_parsed() {
        let text = "c4a2 127.0.0.1:7101@17101 myself,master - 0 0 1 connected 0-5460 [5461->-x]\n\
                    47c6 127.0.0.1:7105@17105 slave c4a2 0 1 1 connected\n\
                    3974 127.0.0.1:7102@17102 master,fail - 0 1 2 disconnected 5461 5462-10922\n";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 3);
        assert!(nodes[0].is_master() && nodes[0].serves(0) && !nodes[0].serves(5461));
        assert_eq!(nodes[1].master_id.as_deref(), Some("c4a2"));
        assert_eq!(nodes[1].port, 7105);
        assert!(nodes[2].failed() && nodes[2].serves(5461) && nodes[2].serves(10922));
    }
}
