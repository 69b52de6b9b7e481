//! How the Redis store reaches Redis: one server, a Redis Cluster, or whichever server
//! Sentinel currently names as the primary.
//!
//! The store sends the same commands and scripts in all three cases; only routing differs.
//! A cluster connection routes each command (and each pipeline) by the slot of its first
//! key, and follows `MOVED`/`ASK` and failovers itself. A Sentinel-followed connection is
//! ours ([`Following`]): the `redis` crate resolves a primary once but does not follow it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::Sentinel;
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};
use tokio::sync::{oneshot, Mutex};

/// A connection to the Redis a [`RedisStore`](super::RedisStore) uses, cheap to clone, for
/// commands of the application's own: it routes them as the store's own are routed (to a
/// key's node on a cluster, to the current primary under Sentinel).
///
/// ```no_run
/// # async fn demo(store: idempotent_runtime::store::RedisStore) -> redis::RedisResult<()> {
/// let mut conn = store.connection();
/// let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
/// # let _ = pong; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisConnection(Kind);

#[derive(Clone)]
enum Kind {
    // The client, where the store made the connection, opens dedicated connections.
    Single(ConnectionManager, Option<redis::Client>),
    Cluster(ClusterConnection, Option<Arc<ClusterClient>>),
    Sentinel(Arc<Following>),
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Kind::Single(..) => "RedisConnection::Single",
            Kind::Cluster(..) => "RedisConnection::Cluster",
            Kind::Sentinel(_) => "RedisConnection::Sentinel",
        })
    }
}

impl RedisConnection {
    pub(crate) fn single(conn: ConnectionManager, client: Option<redis::Client>) -> Self {
        Self(Kind::Single(conn, client))
    }

    pub(crate) fn cluster(conn: ClusterConnection, client: Option<ClusterClient>) -> Self {
        Self(Kind::Cluster(conn, client.map(Arc::new)))
    }

    pub(crate) fn sentinel(following: Arc<Following>) -> Self {
        Self(Kind::Sentinel(following))
    }

    /// The `host:port` this connection sends to now, when it follows a primary through
    /// Sentinel ([`RedisStore::connect_sentinel`](super::RedisStore::connect_sentinel));
    /// `None` otherwise.
    pub fn primary_address(&self) -> Option<String> {
        match &self.0 {
            Kind::Sentinel(f) => {
                let p = f.primary.read().unwrap_or_else(|e| e.into_inner());
                Some(p.address.clone())
            }
            _ => None,
        }
    }

    /// Whether keys are spread over the slots of a cluster, so that keys used together
    /// need a hash tag in common.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.0, Kind::Cluster(..))
    }

    /// Which connection [`RedisConnection::dedicated`] would open now: a new one after
    /// Sentinel's primary moved, so pooled ones to the old primary are not reused.
    pub(crate) fn generation(&self) -> u64 {
        match &self.0 {
            Kind::Sentinel(f) => f.current().0,
            _ => 0,
        }
    }

    /// A connection of its own to the same Redis (the same node for a key, on a cluster),
    /// for a write followed by `WAIT`: Redis answers nothing else on a connection while
    /// a `WAIT` on it blocks, so a shared connection would hold every other caller's
    /// command behind it. A store made from someone else's connection
    /// ([`RedisStore::from_manager`](super::RedisStore::from_manager)) has no way to open
    /// another, and shares it.
    pub(crate) async fn dedicated(&self) -> RedisResult<Dedicated> {
        let config = super::redis::connection_config();
        Ok(match &self.0 {
            Kind::Single(_, Some(client)) => Dedicated::Plain(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            ),
            Kind::Cluster(_, Some(client)) => {
                Dedicated::Cluster(Box::new(client.get_async_connection().await?))
            }
            Kind::Sentinel(f) => {
                let (generation, client) = {
                    let p = f.primary.read().unwrap_or_else(|e| e.into_inner());
                    (p.generation, p.client.clone())
                };
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Dedicated::Following {
                    conn,
                    generation,
                    following: f.clone(),
                }
            }
            _ => Dedicated::Shared(self.clone()),
        })
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Kind::Single(c, _) => c.req_packed_command(cmd),
            Kind::Cluster(c, _) => c.req_packed_command(cmd),
            Kind::Sentinel(f) => {
                let f = f.clone();
                async move { f.command(cmd).await }.boxed()
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Kind::Single(c, _) => c.req_packed_commands(pipeline, offset, count),
            Kind::Cluster(c, _) => c.req_packed_commands(pipeline, offset, count),
            Kind::Sentinel(f) => {
                let f = f.clone();
                async move { f.commands(pipeline, offset, count).await }.boxed()
            }
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Kind::Single(c, _) => c.get_db(),
            Kind::Cluster(c, _) => c.get_db(),
            Kind::Sentinel(f) => f.current().1.get_db(),
        }
    }
}

/// A connection of one caller's own at a time: see [`RedisConnection::dedicated`].
pub(crate) enum Dedicated {
    Plain(MultiplexedConnection),
    Cluster(Box<ClusterConnection>),
    // To the primary of `generation`. A write it finds demoted, or a connection it loses,
    // has the sentinels asked again (the caller fails, and its retry gets a connection to
    // whatever they name).
    Following {
        conn: MultiplexedConnection,
        generation: u64,
        following: Arc<Following>,
    },
    Shared(RedisConnection),
}

impl Dedicated {
    /// The generation of the primary it reaches (see [`RedisConnection::generation`]).
    pub(crate) fn generation(&self) -> u64 {
        match self {
            Dedicated::Following { generation, .. } => *generation,
            _ => 0,
        }
    }

    /// Has the sentinels asked again, in the background, when `e` says the primary this
    /// connection reaches was demoted or is gone.
    pub(crate) fn noticed(&self, e: &RedisError) {
        if let Dedicated::Following {
            generation,
            following,
            ..
        } = self
        {
            if !matches!(demoted_or_gone(Err(e)), After::Fine) {
                following.follow_in_background(*generation);
            }
        }
    }
}

impl ConnectionLike for Dedicated {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Dedicated::Plain(c) | Dedicated::Following { conn: c, .. } => c.req_packed_command(cmd),
            Dedicated::Cluster(c) => c.req_packed_command(cmd),
            Dedicated::Shared(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Dedicated::Plain(c) | Dedicated::Following { conn: c, .. } => {
                c.req_packed_commands(pipeline, offset, count)
            }
            Dedicated::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Dedicated::Shared(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Dedicated::Plain(c) | Dedicated::Following { conn: c, .. } => c.get_db(),
            Dedicated::Cluster(c) => c.get_db(),
            Dedicated::Shared(c) => c.get_db(),
        }
    }
}

/// The longest a caller (or a background task) spends asking the sentinels.
const FOLLOW_WITHIN: Duration = Duration::from_secs(2);

/// A connection to the primary that Sentinel names, which moves with it.
///
/// It asks the sentinels again (and connects to the answer, once that server confirms
/// with `ROLE` that it is a primary) when:
/// - a write is refused with `READONLY`: the server was demoted to a replica. Nothing was
///   written, so the command is sent again, once, to the new primary;
/// - the connection fails: whether the command ran is unknown, so it fails as it would
///   on one server, and the next command goes to whatever the sentinels name then;
/// - a sentinel announces `+switch-master` for this primary, so a demoted server that
///   still accepts writes (it learns of its demotion some seconds later) stops getting
///   them as soon as the sentinels have decided.
pub(crate) struct Following {
    sentinel: Mutex<Sentinel>,
    name: String,
    config: ConnectionManagerConfig,
    primary: RwLock<Primary>,
    // Dropped with this value, which ends the task that listens for `+switch-master`.
    _stop: oneshot::Sender<()>,
    // Whether a task of `follow_in_background` is running.
    following: AtomicBool,
}

#[derive(Clone)]
struct Primary {
    // Counts re-resolutions, so that many callers failing on the same old primary ask
    // the sentinels once, not once each.
    generation: u64,
    address: String,
    client: redis::Client,
    conn: ConnectionManager,
}

impl Following {
    /// Resolves `name` through the sentinels at `urls` and connects to its primary.
    pub(crate) async fn connect(
        urls: Vec<String>,
        name: &str,
        config: ConnectionManagerConfig,
    ) -> RedisResult<Arc<Self>> {
        let mut sentinel = Sentinel::build(urls.clone())?;
        let (address, client, conn) = resolve(&mut sentinel, name, &config).await?;
        let (stop, stopped) = oneshot::channel();
        let following = Arc::new(Self {
            sentinel: Mutex::new(sentinel),
            name: name.to_owned(),
            config,
            primary: RwLock::new(Primary {
                generation: 0,
                address,
                client,
                conn,
            }),
            _stop: stop,
            following: AtomicBool::new(false),
        });
        tokio::spawn(listen(Arc::downgrade(&following), urls, stopped));
        Ok(following)
    }

    fn current(&self) -> (u64, ConnectionManager) {
        let p = self.primary.read().unwrap_or_else(|e| e.into_inner());
        (p.generation, p.conn.clone())
    }

    /// Asks the sentinels for the primary, unless someone did since `seen`; connects to
    /// it when it moved.
    async fn follow(&self, seen: u64) -> RedisResult<()> {
        self.follow_to(seen, None).await
    }

    /// As [`Following::follow`], trying first the primary a `+switch-master` announced
    /// (`host:port`): the sentinel asked first may not have heard of the switch yet, and
    /// would name the old primary, which accepts writes until it is demoted.
    async fn follow_to(&self, seen: u64, announced: Option<String>) -> RedisResult<()> {
        let mut sentinel = self.sentinel.lock().await;
        if self.current().0 != seen {
            return Ok(());
        }
        let confirmed = match announced {
            Some(address) => primary_at(&address).await.ok(),
            None => None,
        };
        let client = match confirmed {
            Some(client) => client,
            None => sentinel.async_master_for(&self.name, None).await?,
        };
        let address = client.get_connection_info().addr().to_string();
        let unchanged = {
            let p = self.primary.read().unwrap_or_else(|e| e.into_inner());
            p.address == address
        };
        if unchanged {
            // The same server (restarted, or not yet replaced): its connection manager
            // reconnects by itself.
            return Ok(());
        }
        let conn = ConnectionManager::new_with_config(client.clone(), self.config.clone()).await?;
        tracing::warn!(primary = %address, master = %self.name,
            "Redis primary moved; following it");
        let mut p = self.primary.write().unwrap_or_else(|e| e.into_inner());
        *p = Primary {
            generation: p.generation + 1,
            address,
            client,
            conn,
        };
        Ok(())
    }

    /// Asks the sentinels again on a task of its own, unless such a task is running: a
    /// caller whose connection failed fails at once, rather than queue behind sentinels
    /// that may not answer either (a dead primary often comes with an unreachable host).
    pub(crate) fn follow_in_background(self: &Arc<Self>, seen: u64) {
        if self.following.swap(true, Ordering::AcqRel) {
            return;
        }
        let f = self.clone();
        tokio::spawn(async move {
            if let Ok(Err(e)) = tokio::time::timeout(FOLLOW_WITHIN, f.follow(seen)).await {
                tracing::debug!(error = %e, master = %f.name, "could not ask the sentinels yet");
            }
            f.following.store(false, Ordering::Release);
        });
    }

    /// Re-resolves after a `READONLY` (the sentinels answer: the server that refused was
    /// demoted by them), within a bound, so a caller never waits on sentinels for long.
    async fn follow_demoted(&self, seen: u64) -> RedisResult<()> {
        match tokio::time::timeout(FOLLOW_WITHIN, self.follow(seen)).await {
            Ok(r) => r,
            Err(_) => Err(RedisError::from((
                ErrorKind::Io,
                "the sentinels did not name a new primary in time",
            ))),
        }
    }

    async fn command(self: Arc<Self>, cmd: &Cmd) -> RedisResult<Value> {
        let (seen, mut conn) = self.current();
        let answer = conn.req_packed_command(cmd).await;
        match demoted_or_gone(answer.as_ref().map(std::slice::from_ref)) {
            After::Demoted => {
                self.follow_demoted(seen).await?;
                let (_, mut conn) = self.current();
                conn.req_packed_command(cmd).await
            }
            After::Gone => {
                self.follow_in_background(seen);
                answer
            }
            After::Fine => answer,
        }
    }

    async fn commands(
        self: Arc<Self>,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let (seen, mut conn) = self.current();
        let answer = conn.req_packed_commands(pipeline, offset, count).await;
        match demoted_or_gone(answer.as_deref()) {
            After::Demoted => {
                // A demoted server refuses every write of the pipeline: sending all of it
                // again writes nothing twice (and every write the store pipelines may be
                // repeated anyway).
                self.follow_demoted(seen).await?;
                let (_, mut conn) = self.current();
                conn.req_packed_commands(pipeline, offset, count).await
            }
            After::Gone => {
                self.follow_in_background(seen);
                answer
            }
            After::Fine => answer,
        }
    }
}

enum After {
    Fine,
    Demoted,
    Gone,
}

fn demoted_or_gone(answer: Result<&[Value], &RedisError>) -> After {
    match answer {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) => After::Demoted,
        Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() => {
            After::Gone
        }
        Err(_) => After::Fine,
        Ok(values) => {
            let read_only = values.iter().any(|v| {
                matches!(v, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::ReadOnly))
            });
            if read_only {
                After::Demoted
            } else {
                After::Fine
            }
        }
    }
}

/// A client for the server at `address` (`host:port`), once it says it is a primary.
async fn primary_at(address: &str) -> RedisResult<redis::Client> {
    let client = redis::Client::open(format!("redis://{address}"))?;
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&super::redis::connection_config())
        .await?;
    let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
    match role.first() {
        Some(Value::BulkString(r)) if r == b"master" => Ok(client),
        _ => Err(RedisError::from((
            ErrorKind::Io,
            "the announced primary does not say it is one",
        ))),
    }
}

/// The primary's address and a connection to it.
async fn resolve(
    sentinel: &mut Sentinel,
    name: &str,
    config: &ConnectionManagerConfig,
) -> RedisResult<(String, redis::Client, ConnectionManager)> {
    let client = sentinel.async_master_for(name, None).await?;
    let address = client.get_connection_info().addr().to_string();
    let conn = ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
    Ok((address, client, conn))
}

/// Listens for `+switch-master` on the first sentinel that answers, and on the next one
/// when that connection ends, until the store is dropped.
async fn listen(following: Weak<Following>, urls: Vec<String>, mut stopped: oneshot::Receiver<()>) {
    const PAUSE: Duration = Duration::from_millis(500);
    let mut next = 0;
    loop {
        let url = &urls[next % urls.len()];
        next += 1;
        let subscribed = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            RedisResult::Ok(pubsub)
        };
        let pubsub = tokio::select! {
            _ = &mut stopped => return,
            p = subscribed => p,
        };
        if let Ok(pubsub) = pubsub {
            let mut messages = pubsub.into_on_message();
            loop {
                let msg = tokio::select! {
                    _ = &mut stopped => return,
                    m = messages.next() => m,
                };
                let Some(msg) = msg else { break };
                // `<name> <old ip> <old port> <new ip> <new port>`
                let payload: String = msg.get_payload().unwrap_or_default();
                let Some(f) = following.upgrade() else { return };
                let parts: Vec<&str> = payload.split(' ').collect();
                if let [name, _, _, ip, port] = parts[..] {
                    if name != f.name {
                        continue;
                    }
                    let seen = f.current().0;
                    if let Err(e) = f.follow_to(seen, Some(format!("{ip}:{port}"))).await {
                        tracing::warn!(error = %e, master = %f.name,
                            "Redis primary moved, and its successor did not answer yet");
                    }
                }
            }
        }
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(PAUSE) => {}
        }
    }
}
