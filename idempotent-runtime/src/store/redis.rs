//! The Redis store: one record per key, shared by every process that uses the same Redis.
//!
//! A claim is one plain `SET key record NX PX lease GET`: it either creates the claim or
//! answers with the record already there, atomically and in one round trip, so a hit
//! costs one cheap command. Renewal, completion and release compare the holder's token
//! first, in Lua scripts (one round trip each; a large result's completion sends its
//! record with a plain `SET` in the same round trip, which its script renames over the
//! claim): a first execution is two round trips.
//! Records expire with their key (`PX`): a claim after its lease, a result after its TTL,
//! so Redis itself frees the key of a crashed holder.
//!
//! The same commands run on one server, on a Redis Cluster (every key in a hash tag of
//! its own, so a completion's two keys share a slot) and on the primary Sentinel names
//! (`redis_connection.rs` routes them); `redis_acks.rs` makes writes wait for replicas.
//!
//! A record is one binary string: a state byte (`p` in progress, `c` completed, `e` a
//! stored error), the token and the end of its lease or TTL (big-endian `u64`s), a
//! fingerprint flag and 32 bytes, then the result's bytes.
//!
//! Fencing tokens are minted by the engine ([`FencingToken::mint`]), unique without any
//! clock. Completion, renewal and release only act for the token in the record, so a
//! holder whose lease ran out can never overwrite or delete the record of the caller that
//! took the key over.

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::ops::compute::Op;
use moka::sync::Cache;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Script, Value};

use super::redis_acks::ReplicaAcks;
use super::redis_connection::{Following, RedisConnection};
use super::{Claim, Fence, Inspected, Store, ValueCopy};
use crate::clock::{Clock, SystemClock, Timestamp};
use crate::error::{Error, StoreError};
use crate::fingerprint::Fingerprint;
use crate::hasher::KeyHasher;
use crate::key::StoreKey;
use crate::record::{FencingToken, Record, RecordState, StoredResult};

/// The key prefix unless set otherwise.
pub const DEFAULT_PREFIX: &str = "idempotent:";

/// Where each part of an encoded record starts.
const TOKEN_AT: usize = 1;
const ENDS_AT: usize = 9;
const FP_FLAG_AT: usize = 17;
const FP_AT: usize = 18;
const RESULT_AT: usize = 50;

// ARGV[1]: the holder's token (8 bytes). Lua's strings are 1-based: the token is 2..9.
const RENEW: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 1) ~= 'p' or string.sub(v, 2, 9) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], 'p' .. ARGV[1] .. ARGV[2] .. string.sub(v, 18), 'PX', ARGV[3])
return 1
"#;

// A small result's completion: the finished record is built in the script.
// ARGV[1]: the holder's token (8 bytes); ARGV[2]: the state (`c`, `e`); ARGV[3]: the end
// of the TTL (8 bytes); ARGV[4]: the result; ARGV[5]: the TTL in milliseconds.
// Completed already by this token (an earlier completion whose answer was lost): 1.
const COMPLETE: &str = r#"
local v = redis.call('GETRANGE', KEYS[1], 0, 49)
if #v < 50 or string.sub(v, 2, 9) ~= ARGV[1] then
  return 0
end
if string.sub(v, 1, 1) ~= 'p' then
  return 1
end
redis.call('SET', KEYS[1], ARGV[2] .. ARGV[1] .. ARGV[3] .. string.sub(v, 18, 50) .. ARGV[4], 'PX', ARGV[5])
return 1
"#;

// A large result's completion. KEYS[1]: the record; KEYS[2]: the finished record, written
// by a plain `SET` sent just before in the same round trip (see `RedisStore::complete`).
// ARGV[1]: the holder's token (8 bytes); ARGV[2]: the TTL in milliseconds.
//
// The result never passes through Lua: Redis makes a Lua string of every argument and of
// every string a script builds, at a cost that grows with its size (a 64 KB result took
// about 200 us of server time in the script above, during which Redis serves no one
// else). Here the script reads 50 bytes of the claim, copies its fingerprint into the
// finished record in place, and renames it over the claim: the same work for a result of
// any size, but more than the script above does for a small one.
//
// Completed already by this token: 1. The finished record missing (it expired before the
// script ran) or not this token's: -1, an error, and the completion is tried again.
const COMPLETE_FINISHED: &str = r#"
local v = redis.call('GETRANGE', KEYS[1], 0, 49)
if #v < 50 or string.sub(v, 2, 9) ~= ARGV[1] then
  redis.call('DEL', KEYS[2])
  return 0
end
if string.sub(v, 1, 1) ~= 'p' then
  redis.call('DEL', KEYS[2])
  return 1
end
local f = redis.call('GETRANGE', KEYS[2], 0, 8)
if #f < 9 or string.sub(f, 2, 9) ~= ARGV[1] then
  return -1
end
redis.call('SETRANGE', KEYS[2], 17, string.sub(v, 18, 50))
redis.call('RENAME', KEYS[2], KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Results of this many bytes or more are completed by [`COMPLETE_FINISHED`]; smaller
/// ones by [`COMPLETE`], which costs less for them (measured: `redis_completion` bench).
const LARGE_RESULT: usize = 2 * 1024;

/// How long a finished record waits under its own key for the completion script that
/// renames it (they are sent together): past it, one whose script never ran (its
/// connection dropped in between) is gone.
const FINISHED_WAITS: Duration = Duration::from_secs(60);

const RELEASE: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 1) ~= 'p' or string.sub(v, 2, 9) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
"#;

/// A [`Store`] on Redis, through the `redis` crate's connection manager, which reconnects
/// by itself after the server comes back.
///
/// ```no_run
/// # async fn demo() -> Result<(), idempotent_runtime::Error> {
/// use idempotent_runtime::{store::RedisStore, Idempotency};
///
/// let store = RedisStore::connect("redis://127.0.0.1:6379")
///     .await?
///     .with_prefix("billing:idem:")
///     .with_local_cache(10_000);
/// let idem = Idempotency::new(store);
/// # let _ = idem; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConnection,
    prefix: Arc<str>,
    // On a cluster, unless the prefix carries a hash tag of its own: each key is wrapped
    // in a hash tag of its own (see `RedisStore::write_key`).
    tagged: bool,
    // Whether a large result's finished record can share its claim's slot; not under a
    // prefix whose first braces are empty (`{}`), which makes a cluster hash whole keys.
    split_completion: bool,
    acks: Option<ReplicaAcks>,
    scripts: Arc<Scripts>,
    local: Option<Cache<String, Local, KeyHasher>>,
    // Bumped by every `forget` of this store (and its clones): a claim that read a result
    // from Redis before a forget deleted it must not put that result into the local tier
    // after the forget cleared it there, where it would be replayed until its TTL ends.
    // A claim puts a result there only if no forget began since it sent its request.
    forgets: Arc<AtomicU64>,
}

struct Scripts {
    renew: Lua,
    complete: Lua,
    complete_finished: Lua,
    release: Lua,
}

/// A script: its hash, sent while the server has it cached, and its code, sent when it
/// does not (a restarted server, a promoted replica, a node new to a cluster).
struct Lua {
    hash: String,
    code: &'static str,
}

impl Lua {
    fn new(code: &'static str) -> Self {
        Self {
            hash: Script::new(code).get_hash().to_owned(),
            code,
        }
    }

    /// Adds `EVALSHA` (or `EVAL`, with `code`) of this script on `keys` to `pipe`; its
    /// arguments follow (`Pipeline::arg` adds to the last command).
    fn push<'p>(
        &self,
        pipe: &'p mut redis::Pipeline,
        code: bool,
        keys: &[&str],
    ) -> &'p mut redis::Pipeline {
        let cmd = if code {
            pipe.cmd("EVAL").arg(self.code)
        } else {
            pipe.cmd("EVALSHA").arg(&self.hash)
        };
        cmd.arg(keys.len()).arg(keys)
    }
}

/// A completed record in the local tier, with how long it may stay there, and the copy
/// of its value a hit kept (see [`Store::keep_copy`]).
#[derive(Clone)]
struct Local {
    record: Record,
    keep_for: Duration,
    copy: Option<ValueCopy>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("connection", &self.conn)
            .field("prefix", &self.prefix)
            .field("replica_acks", &self.acks)
            .field(
                "local_cache",
                &self.local.as_ref().map(|c| c.policy().max_capacity()),
            )
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://host:port/db`). Operations time out after
    /// two seconds, so an unreachable server fails a call rather than hanging it.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(|e| StoreError::new("redis: bad url", e))?;
        let conn = ConnectionManager::new_with_config(client.clone(), manager_config())
            .await
            .map_err(|e| StoreError::new("redis: connect", e))?;
        Ok(Self::on(RedisConnection::single(conn, Some(client))))
    }

    /// Connects to a Redis Cluster through any of its nodes (`nodes`: seed URLs, e.g.
    /// `redis://10.0.0.1:6379`; one that answers is enough, the rest of the cluster is
    /// discovered). Each key lives on the node that serves its slot; the connection
    /// follows slot moves and failovers. Operations time out after two seconds.
    ///
    /// Every Redis key of the store is wrapped in a hash tag of its own (`{...}`), built
    /// from the whole idempotency key, so keys spread over the cluster as untagged keys do
    /// and no key can choose its slot with braces of its own. A prefix with a hash tag
    /// ([`RedisStore::with_prefix`], e.g. `"{billing}:idem:"`) instead puts all the
    /// store's keys in that one slot, as Redis does for any key with a tag.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), idempotent_runtime::Error> {
    /// use idempotent_runtime::{store::RedisStore, Idempotency};
    ///
    /// let store = RedisStore::connect_cluster([
    ///     "redis://10.0.0.1:6379",
    ///     "redis://10.0.0.2:6379",
    ///     "redis://10.0.0.3:6379",
    /// ])
    /// .await?;
    /// let idem = Idempotency::new(store);
    /// # let _ = idem; Ok(()) }
    /// ```
    pub async fn connect_cluster<I>(nodes: I) -> Result<Self, Error>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        if nodes.is_empty() {
            return Err(StoreError::msg("redis: connect_cluster needs at least one node").into());
        }
        let client = ClusterClientBuilder::new(nodes)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .build()
            .map_err(|e| StoreError::new("redis: bad cluster url", e))?;
        let conn = client
            .get_async_connection()
            .await
            .map_err(|e| StoreError::new("redis: connect to the cluster", e))?;
        Ok(Self::on(RedisConnection::cluster(conn, Some(client))))
    }

    /// Connects to the primary that the sentinels at `sentinels` (their URLs, e.g.
    /// `redis://10.0.0.1:26379`) name for `master_name`, and follows it: when the primary
    /// moves (`+switch-master` from a sentinel, a write refused with `READONLY` by a
    /// demoted server, or a lost connection), the store asks the sentinels again and
    /// connects to the new primary once it confirms its role. A write refused by a
    /// demoted server is sent again to the new primary, so no claim lands on a replica.
    ///
    /// Replication is asynchronous: a write the old primary acknowledged just before a
    /// failover may never reach the new one, which then lacks that claim or result, and a
    /// retry runs the operation again. [`RedisStore::with_replica_acks`] closes that
    /// window for servers with replicas; the README's "Running Redis for it" says more.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), idempotent_runtime::Error> {
    /// use std::time::Duration;
    /// use idempotent_runtime::{store::RedisStore, Idempotency};
    ///
    /// let store = RedisStore::connect_sentinel(
    ///     ["redis://10.0.0.1:26379", "redis://10.0.0.2:26379", "redis://10.0.0.3:26379"],
    ///     "payments",
    /// )
    /// .await?
    /// .with_replica_acks(1, Duration::from_millis(500));
    /// let idem = Idempotency::new(store);
    /// # let _ = idem; Ok(()) }
    /// ```
    pub async fn connect_sentinel<I>(sentinels: I, master_name: &str) -> Result<Self, Error>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let urls: Vec<String> = sentinels
            .into_iter()
            .map(|n| n.as_ref().to_owned())
            .collect();
        if urls.is_empty() {
            return Err(
                StoreError::msg("redis: connect_sentinel needs at least one sentinel").into(),
            );
        }
        let following = Following::connect(urls, master_name, manager_config())
            .await
            .map_err(|e| StoreError::new("redis: connect through sentinel", e))?;
        Ok(Self::on(RedisConnection::sentinel(following)))
    }

    /// A store on an existing connection manager (one server).
    pub fn from_manager(conn: ConnectionManager) -> Self {
        Self::on(RedisConnection::single(conn, None))
    }

    /// A store on an existing cluster connection, with the key layout that
    /// [`RedisStore::connect_cluster`] describes.
    pub fn from_cluster(conn: ClusterConnection) -> Self {
        Self::on(RedisConnection::cluster(conn, None))
    }

    fn on(conn: RedisConnection) -> Self {
        let mut store = Self {
            conn,
            prefix: Arc::from(DEFAULT_PREFIX),
            tagged: false,
            split_completion: true,
            acks: None,
            scripts: Arc::new(Scripts {
                renew: Lua::new(RENEW),
                complete: Lua::new(COMPLETE),
                complete_finished: Lua::new(COMPLETE_FINISHED),
                release: Lua::new(RELEASE),
            }),
            local: None,
            forgets: Arc::new(AtomicU64::new(0)),
        };
        store.lay_out_keys();
        store
    }

    fn lay_out_keys(&mut self) {
        let cluster = self.conn.is_cluster();
        self.tagged = cluster && !has_hash_tag(&self.prefix);
        self.split_completion = !cluster || !empty_first_tag(&self.prefix);
    }

    /// Puts every Redis key of this store under `prefix` (default [`DEFAULT_PREFIX`]).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self.lay_out_keys();
        self
    }

    /// Counts a claim that wrote, and a completion, only once `replicas` replicas have
    /// it, waiting up to `timeout` for them (`WAIT`: in the completion's round trip; after
    /// a claim, in a second one, only when the claim wrote, so hits and duplicates never
    /// wait). One fewer replicas acknowledged in time fails as the store being down does:
    /// a claim fails its call (no operation runs; the engine releases the claim, or it
    /// lapses with its lease), a completion is retried. Renewals and releases are not
    /// waited for.
    ///
    /// With it, a failover to a replica that acknowledged the write keeps the claim or
    /// result: with one replica, `replicas = 1` makes every claim and result that counted
    /// survive a failover to it. It costs a first execution a round trip and the
    /// replication (BENCHMARKS.md has the figures), and it cannot help a server without
    /// replicas, where every new key then fails.
    ///
    /// Each acknowledged write goes out on a connection of its own (`WAIT` holds every
    /// other command on its connection until it answers), at most 256 at once. A store
    /// made from a connection of the application's ([`RedisStore::from_manager`],
    /// [`RedisStore::from_cluster`]) cannot open more, and sends them on that one.
    pub fn with_replica_acks(mut self, replicas: u32, timeout: Duration) -> Self {
        self.acks = Some(ReplicaAcks::new(replicas, timeout));
        self
    }

    /// Keeps up to `capacity` completed results in this process as well, so a hit on one
    /// of them costs no round trip. A result enters the local tier the first time a claim
    /// finds it in Redis, and stays no longer than its TTL left there (read with the
    /// claim, in the same round trip). Claims in progress are never kept locally.
    ///
    /// Clones share the tier; it is keyed by the full Redis key, prefix included, so
    /// clones given another prefix ([`RedisStore::with_prefix`]) never see each other's
    /// results.
    pub fn with_local_cache(mut self, capacity: u64) -> Self {
        self.local = Some(
            Cache::builder()
                .max_capacity(capacity)
                .expire_after(LocalExpiry)
                .build_with_hasher(KeyHasher::default()),
        );
        self
    }

    /// A connection to the same Redis, for commands of the application's own.
    pub fn connection(&self) -> RedisConnection {
        self.conn.clone()
    }

    /// The Redis key of `key`: the prefix, then the key, which on a cluster goes inside a
    /// hash tag of its own unless the prefix has one. Inside the tag, `%` and `}` are
    /// escaped (`%25`, `%7D`): the first `}` must be the tag's own, and distinct keys must
    /// stay distinct.
    /// Runs `f` on the full Redis key of `key`, built in a buffer of this thread's (the
    /// local tier's lookups make no allocation); `None` while the thread exits.
    fn with_local_key<R>(&self, key: &StoreKey, f: impl FnOnce(&str) -> R) -> Option<R> {
        LOCAL_KEY
            .try_with(|buf| {
                let mut buf = buf.borrow_mut();
                buf.clear();
                self.write_key(&mut buf, key);
                f(buf.as_str())
            })
            .ok()
    }

    fn write_key(&self, buf: &mut String, key: &StoreKey) {
        buf.push_str(&self.prefix);
        if !self.tagged {
            buf.push_str(key.as_str());
            return;
        }
        buf.push('{');
        for c in key.as_str().chars() {
            match c {
                '%' => buf.push_str("%25"),
                '}' => buf.push_str("%7D"),
                c => buf.push(c),
            }
        }
        buf.push('}');
    }

    fn redis_key(&self, key: &StoreKey) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.as_str().len() + 2);
        self.write_key(&mut k, key);
        k
    }

    /// Where a large result's finished record waits for its completion script: in the
    /// claim's slot, under a name no claim has and no other completion uses (its token).
    /// Without a tag of our own, a claim's name has a `|` after the prefix (between scope
    /// and key) and this one does not; with one, a claim's name ends at its tag.
    fn finished_key(&self, rkey: &str, token: FencingToken) -> String {
        if self.tagged {
            format!("{rkey}done:{:016x}", token.get())
        } else {
            format!("{}done:{:016x}", self.prefix, token.get())
        }
    }

    /// Sends the pipeline `build` makes (one round trip). With `wait` and replica acks
    /// required, it goes out on a connection of its own with a `WAIT` after it, and
    /// fails unless enough replicas acknowledged. `build` is told whether to send its
    /// scripts' code: it is, once, when the server answers that it does not have one.
    /// With `apart`, a pipeline a cluster redirected is sent again one command at a time
    /// (see [`one_by_one`]).
    async fn round_trip(
        &self,
        op: &'static str,
        wait: bool,
        apart: bool,
        build: impl Fn(bool) -> redis::Pipeline,
    ) -> Result<Vec<Value>, StoreError> {
        if let Some(acks) = self.acks.as_ref().filter(|_| wait) {
            let (values, acked) = acks.round_trip(op, &self.conn, apart, build).await?;
            acks.check(op, acked)?;
            return Ok(values);
        }
        let mut conn = self.conn.clone();
        let cluster = conn.is_cluster();
        send(&mut conn, cluster && apart, build)
            .await
            .map_err(|e| StoreError::new(op, e))
    }

    /// Runs a fencing script (renew, complete, release) on `key`.
    async fn fenced(
        &self,
        op: &'static str,
        wait: bool,
        script: &Lua,
        rkey: &str,
        args: &[&[u8]],
    ) -> Result<Fence, StoreError> {
        let values = self
            .round_trip(op, wait, true, |code| {
                let mut pipe = redis::pipe();
                let cmd = script.push(&mut pipe, code, &[rkey]);
                for a in args {
                    cmd.arg(*a);
                }
                pipe
            })
            .await?;
        match values.as_slice() {
            [Value::Int(1)] => Ok(Fence::Held),
            [Value::Int(_)] => Ok(Fence::Lost),
            _ => Err(StoreError::msg("redis: a script answered out of shape")),
        }
    }

    /// Completes with a small result: see [`COMPLETE`].
    async fn complete_small(
        &self,
        key: &StoreKey,
        token: FencingToken,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<Fence, StoreError> {
        let state: &[u8] = if result.is_err() { b"e" } else { b"c" };
        let ends = SystemClock.now().after(ttl).as_millis().to_be_bytes();
        let ttl = millis(ttl).to_string();
        self.fenced(
            "redis: complete",
            true,
            &self.scripts.complete,
            &self.redis_key(key),
            &[
                &token.get().to_be_bytes(),
                state,
                &ends,
                result.bytes().as_ref(),
                ttl.as_bytes(),
            ],
        )
        .await
    }

    /// Completes with a large result: see [`COMPLETE_FINISHED`].
    async fn complete_large(
        &self,
        key: &StoreKey,
        token: FencingToken,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<Fence, StoreError> {
        let rkey = self.redis_key(key);
        let finished = self.finished_key(&rkey, token);
        let record = completed(result, token, ttl);
        let token_bytes = token.get().to_be_bytes();
        let answer = self
            .round_trip("redis: complete", true, false, |code| {
                let mut pipe = redis::pipe();
                pipe.cmd("SET")
                    .arg(&finished)
                    .arg(&record[..])
                    .arg("PX")
                    .arg(millis(FINISHED_WAITS))
                    .ignore();
                self.scripts
                    .complete_finished
                    .push(&mut pipe, code, &[&rkey, &finished])
                    .arg(&token_bytes[..])
                    .arg(millis(ttl));
                pipe
            })
            .await;
        let values = match answer {
            // A slot being migrated answers a pipeline with a redirection the cluster
            // connection does not follow, and a script on two keys with TRYAGAIN while
            // they are on two nodes: the single-key completion goes through, for as
            // long as the migration lasts (or stays stuck).
            Err(e) if self.conn.is_cluster() && redirected_store_error(&e) => {
                return self.complete_small(key, token, result, ttl).await;
            }
            r => r?,
        };
        match values.as_slice() {
            [Value::Int(1)] => Ok(Fence::Held),
            [Value::Int(0)] => Ok(Fence::Lost),
            [Value::Int(_)] => Err(StoreError::msg(
                "redis: complete: the finished record expired before its script ran",
            )),
            _ => Err(StoreError::msg("redis: a script answered out of shape")),
        }
    }
}

/// Operations time out after these, so an unreachable server fails a call rather than
/// hanging it.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The timeouts above, for a plain connection.
pub(crate) fn connection_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2)
}

/// Whether a cluster refused `e`'s pipeline for a slot that is moving or has moved
/// (`ASK`, `TRYAGAIN`, `MOVED`): the cluster connection follows these for a single
/// command, not inside a pipeline.
fn redirected(e: &redis::RedisError) -> bool {
    use redis::ServerErrorKind::{Ask, Moved, TryAgain};
    matches!(e.kind(), redis::ErrorKind::Server(Ask | Moved | TryAgain))
}

/// Sends the pipeline `build` makes on `conn`. `build` is told whether to send its
/// scripts' code: it is, once, when the server answers that it does not have one (a
/// restarted server, a promoted replica); `EVAL` caches the script as it runs it, and a
/// failed `EVALSHA` changed nothing, so sending again is safe. With `apart` (a cluster,
/// and a pipeline whose commands may go one at a time), a pipeline the cluster redirected
/// is sent again through [`one_by_one`].
pub(crate) async fn send(
    conn: &mut impl redis::aio::ConnectionLike,
    apart: bool,
    build: impl Fn(bool) -> redis::Pipeline,
) -> redis::RedisResult<Vec<Value>> {
    match build(false).query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            build(true).query_async(conn).await
        }
        Err(e) if apart && redirected(&e) => one_by_one(conn, &build(true)).await,
        r => r,
    }
}

/// [`redirected`], for the Redis error under a store error.
fn redirected_store_error(e: &StoreError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<redis::RedisError>())
        .is_some_and(redirected)
}

/// Sends `pipe`'s commands one at a time, each answered before the next is sent: each
/// then follows the cluster's redirections. Every command the store pipelines may be
/// sent again (a claim with its own token answers as acquired, a completion or a renewal
/// by the same token changes nothing the second time). Its `WAIT`, alone, goes to every
/// primary and answers the fewest acknowledgements any of them got: a stricter check.
async fn one_by_one(
    conn: &mut impl redis::aio::ConnectionLike,
    pipe: &redis::Pipeline,
) -> redis::RedisResult<Vec<Value>> {
    let mut values = Vec::with_capacity(pipe.len());
    for cmd in pipe.cmd_iter() {
        match cmd.query_async::<Value>(conn).await? {
            Value::ServerError(e) => return Err(e.into()),
            v => values.push(v),
        }
    }
    Ok(values)
}

/// Whether `s` has a hash tag as Redis reads one: a `{`, then a `}` after it with at
/// least one byte between. A key that starts with such a prefix has the prefix's tag.
fn has_hash_tag(s: &str) -> bool {
    first_tag_len(s).is_some_and(|len| len > 0)
}

/// Whether `s` starts Redis's reading of a hash tag with empty braces, after which no
/// later braces count and the whole key is hashed.
fn empty_first_tag(s: &str) -> bool {
    first_tag_len(s) == Some(0)
}

/// The length between the first `{` of `s` and the first `}` after it.
fn first_tag_len(s: &str) -> Option<usize> {
    let open = s.find('{')?;
    s[open + 1..].find('}')
}

thread_local! {
    // A hit on the local tier looks up the full Redis key; building it here, in a buffer
    // kept per thread, spares the hit an allocation.
    static LOCAL_KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn in_progress(token: FencingToken, lease: Duration, fingerprint: Option<Fingerprint>) -> Vec<u8> {
    let mut v = Vec::with_capacity(RESULT_AT);
    v.push(b'p');
    v.extend_from_slice(&token.get().to_be_bytes());
    v.extend_from_slice(&SystemClock.now().after(lease).as_millis().to_be_bytes());
    match fingerprint {
        Some(fp) => {
            v.push(1);
            v.extend_from_slice(fp.as_bytes());
        }
        None => v.extend_from_slice(&[0; 33]),
    }
    v
}

/// A completed record, its fingerprint left blank: the completion script copies it from
/// the claim.
fn completed(result: &StoredResult, token: FencingToken, ttl: Duration) -> Vec<u8> {
    let bytes = result.bytes();
    let mut v = Vec::with_capacity(RESULT_AT + bytes.len());
    v.push(if result.is_err() { b'e' } else { b'c' });
    v.extend_from_slice(&token.get().to_be_bytes());
    v.extend_from_slice(&SystemClock.now().after(ttl).as_millis().to_be_bytes());
    v.extend_from_slice(&[0; RESULT_AT - FP_FLAG_AT]);
    v.extend_from_slice(bytes);
    v
}

/// A claim's record (if there was one) and TTL left (if asked), from its pipeline's values.
type ClaimAnswer = (Option<Vec<u8>>, Option<i64>);

fn claim_answer(values: Vec<Value>) -> Result<ClaimAnswer, StoreError> {
    let mut values = values.into_iter();
    let bad = |e| StoreError::new("redis: claim", e);
    let record = values
        .next()
        .ok_or(StoreError::msg("redis: claim answered out of shape"))?;
    let record = redis::from_redis_value(record).map_err(bad)?;
    let ttl = values
        .next()
        .map(redis::from_redis_value)
        .transpose()
        .map_err(bad)?;
    Ok((record, ttl))
}

/// A record from its encoded bytes.
fn decode(v: &[u8]) -> Option<Record> {
    let u64_at = |at: usize| Some(u64::from_be_bytes(v.get(at..at + 8)?.try_into().ok()?));
    let token = FencingToken::new(u64_at(TOKEN_AT)?);
    let ends_at = Timestamp::from_millis(u64_at(ENDS_AT)?);
    let fingerprint = match v.get(FP_FLAG_AT)? {
        1 => Some(Fingerprint::from_bytes(
            v.get(FP_AT..RESULT_AT)?.try_into().ok()?,
        )),
        _ => None,
    };
    let result = || Bytes::copy_from_slice(v.get(RESULT_AT..).unwrap_or_default());
    let state = match v.first()? {
        b'p' => RecordState::InProgress {
            token,
            lease_expires_at: ends_at,
        },
        b'c' => RecordState::Completed {
            token,
            result: StoredResult::Ok(result()),
            expires_at: ends_at,
        },
        b'e' => RecordState::Completed {
            token,
            result: StoredResult::Err(result()),
            expires_at: ends_at,
        },
        _ => return None,
    };
    Some(Record { fingerprint, state })
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(
        &self,
        key: &StoreKey,
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let rkey = self.redis_key(key);
        let mut set = redis::cmd("SET");
        set.arg(&rkey)
            .arg(in_progress(token, lease, fingerprint))
            .arg("NX")
            .arg("PX")
            .arg(millis(lease))
            .arg("GET");
        let sent = Instant::now();
        let forgets = self.forgets.load(Ordering::Acquire);
        let op = "redis: claim";
        // With replica acks required: whether enough replicas have what the claim wrote.
        let mut replicated = Ok(());
        let (existing, ttl_ms): (Option<Vec<u8>>, Option<i64>) = if let Some(acks) = &self.acks {
            // `WAIT` only after a claim that wrote (`SET ... GET` answered nil): a hit
            // or a duplicate pays no replication round trip.
            let wrote = |values: &[Value]| matches!(values.first(), Some(Value::Nil));
            let (values, acked) = acks
                .round_trip_if_written(
                    op,
                    &self.conn,
                    true,
                    |_| {
                        let mut pipe = redis::pipe();
                        pipe.add_command(set.clone());
                        if self.local.is_some() {
                            pipe.cmd("PTTL").arg(&rkey);
                        }
                        pipe
                    },
                    &wrote,
                )
                .await?;
            // A claim answered with its own token was written by an earlier sending,
            // maybe on another connection than the one `WAIT` would ask about: not
            // known to be replicated, so it fails (and the engine releases it).
            replicated = match acked {
                Some(acked) => acks.check(op, acked),
                None => Err(StoreError::msg(
                    "redis: claim: sent again, and not known to be replicated",
                )),
            };
            claim_answer(values)?
        } else if self.local.is_none() {
            // The common case: one command, no pipeline around it.
            let mut conn = self.conn.clone();
            let v: Option<Vec<u8>> = set
                .query_async(&mut conn)
                .await
                .map_err(|e| StoreError::new(op, e))?;
            (v, None)
        } else {
            // With a local tier, ask for the TTL left in the same round trip.
            let values = self
                .round_trip(op, false, true, |_| {
                    let mut pipe = redis::pipe();
                    pipe.add_command(set.clone()).cmd("PTTL").arg(&rkey);
                    pipe
                })
                .await?;
            claim_answer(values)?
        };
        let Some(bytes) = existing else {
            // Only a claim that wrote needs its replicas: one that found a record wrote
            // nothing, and answers with what it found.
            replicated?;
            return Ok(Claim::Acquired);
        };
        let record = decode(&bytes).ok_or(StoreError::msg(
            "redis: a record under this key is not ours",
        ))?;
        Ok(match record.state {
            // This very claim, sent again after its answer was lost (a cluster connection
            // resends a command whose connection dropped): it is ours. Tokens are never
            // reused, so no other claim carries this one.
            RecordState::InProgress { token: held, .. } if held == token => {
                replicated?;
                Claim::Acquired
            }
            RecordState::InProgress { .. } => Claim::InProgress(record),
            RecordState::Completed { .. } => {
                if let (Some(local), Some(ttl)) = (&self.local, ttl_ms) {
                    let left = Duration::from_millis(u64::try_from(ttl).unwrap_or(0));
                    let keep_for = left.saturating_sub(sent.elapsed());
                    if !keep_for.is_zero() {
                        // A compute, not an insert: computes on one key take turns, and
                        // `keep_copy`'s compute must not write an older record (and its
                        // copy) over this one between its read and its write.
                        let fresh = Local {
                            record: record.clone(),
                            keep_for,
                            copy: None,
                        };
                        // A forget since the claim was sent may have deleted this record:
                        // then it stays out (checked inside the compute, which takes turns
                        // with the forget's own).
                        local.entry(rkey).and_compute_with(|_| {
                            if self.forgets.load(Ordering::Acquire) == forgets {
                                Op::Put(fresh)
                            } else {
                                Op::Nop
                            }
                        });
                    }
                }
                Claim::Completed(record)
            }
        })
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let ends = SystemClock.now().after(lease).as_millis().to_be_bytes();
        let lease = millis(lease).to_string();
        self.fenced(
            "redis: renew",
            false,
            &self.scripts.renew,
            &self.redis_key(key),
            &[&token.get().to_be_bytes(), &ends, lease.as_bytes()],
        )
        .await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        result: StoredResult,
        ttl: Duration,
    ) -> Result<Fence, StoreError> {
        if result.bytes().len() >= LARGE_RESULT && self.split_completion {
            return self.complete_large(key, token, &result, ttl).await;
        }
        self.complete_small(key, token, &result, ttl).await
    }

    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<Fence, StoreError> {
        self.fenced(
            "redis: release",
            false,
            &self.scripts.release,
            &self.redis_key(key),
            &[&token.get().to_be_bytes()],
        )
        .await
    }

    async fn inspect(&self, key: &StoreKey) -> Result<Option<Inspected>, StoreError> {
        let rkey = self.redis_key(key);
        // Redis's record, never the local tier's copy; the time left by Redis's clock.
        let values = self
            .round_trip("redis: inspect", false, true, |_| {
                let mut pipe = redis::pipe();
                pipe.cmd("GET").arg(&rkey).cmd("PTTL").arg(&rkey);
                pipe
            })
            .await?;
        let bad = |e| StoreError::new("redis: inspect", e);
        let (bytes, pttl): (Option<Vec<u8>>, i64) = match values.as_slice() {
            [v, t] => (
                redis::from_redis_value_ref(v).map_err(bad)?,
                redis::from_redis_value_ref(t).map_err(bad)?,
            ),
            _ => return Err(StoreError::msg("redis: inspect answered out of shape")),
        };
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let record = decode(&bytes).ok_or(StoreError::msg(
            "redis: a record under this key is not ours",
        ))?;
        let time_left = match pttl {
            // Expired or deleted between the two commands (a pipeline is not atomic):
            // gone now.
            -2 => return Ok(None),
            // No expiry: no record of ours is written without one; answer by its own end.
            -1 => record.ends_at().saturating_since(SystemClock.now()),
            ms => Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
        };
        Ok(Some(Inspected { record, time_left }))
    }

    async fn forget(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let rkey = self.redis_key(key);
        // Before the `DEL`, so that claims in flight keep out of the local tier even if
        // this future is dropped before its answer; and again after it (below), because a
        // claim sent after this bump may still have been served before the `DEL`.
        self.forgets.fetch_add(1, Ordering::AcqRel);
        // Waits for replicas as a completion does: a forget a failover loses would bring
        // back the result (or the stuck claim) its caller was told is gone.
        let values = self
            .round_trip("redis: forget", true, true, |_| {
                let mut pipe = redis::pipe();
                pipe.cmd("DEL").arg(&rkey);
                pipe
            })
            .await;
        // Cleared whether or not Redis answered: the local tier must not go on replaying
        // a record that may be gone from Redis. A compute, to take turns with a claim's:
        // a claim served before the `DEL` puts its result in before this removal, or
        // sees the bump after it and puts nothing.
        self.forgets.fetch_add(1, Ordering::AcqRel);
        if let Some(local) = &self.local {
            local
                .entry_by_ref(rkey.as_str())
                .and_compute_with(|_| Op::<Local>::Remove);
        }
        match values?.as_slice() {
            [Value::Int(n)] => Ok(*n > 0),
            _ => Err(StoreError::msg("redis: forget answered out of shape")),
        }
    }

    fn peek_completed(&self, key: &StoreKey) -> Option<Record> {
        self.peek_completed_copy(key).map(|(record, _)| record)
    }

    fn peek_completed_copy(&self, key: &StoreKey) -> Option<(Record, Option<ValueCopy>)> {
        let local = self.local.as_ref()?;
        self.with_local_key(key, |rkey| local.get(rkey).map(|l| (l.record, l.copy)))
            .flatten()
    }

    fn keep_copy(&self, key: &StoreKey, token: FencingToken, copy: ValueCopy) {
        let Some(local) = &self.local else {
            return;
        };
        self.with_local_key(key, |rkey| {
            // Under the entry's lock, and only beside the very record the copy was
            // decoded from; the entry keeps the time it had left.
            local
                .entry_by_ref(rkey)
                .and_compute_with(|entry| match entry {
                    Some(entry)
                        if entry.value().copy.is_none()
                            && entry.value().record.token() == token =>
                    {
                        Op::Put(Local {
                            copy: Some(copy),
                            ..entry.value().clone()
                        })
                    }
                    _ => Op::Nop,
                });
        });
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

struct LocalExpiry;

impl moka::Expiry<String, Local> for LocalExpiry {
    fn expire_after_create(&self, _: &String, v: &Local, _: Instant) -> Option<Duration> {
        Some(v.keep_for)
    }

    // A copy kept beside a record does not extend its stay: moka's default for an update
    // (the time left) says so; written out, so that it stays so.
    fn expire_after_update(
        &self,
        _: &String,
        _: &Local,
        _: Instant,
        left: Option<Duration>,
    ) -> Option<Duration> {
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_their_encoding() {
        let fp = Fingerprint::of("payload").unwrap();
        let claim = decode(&in_progress(
            FencingToken::new(42),
            Duration::from_secs(5),
            Some(fp),
        ))
        .unwrap();
        assert_eq!(claim.fingerprint, Some(fp));
        assert_eq!(claim.holder(), Some(FencingToken::new(42)));
        let none = decode(&in_progress(
            FencingToken::new(7),
            Duration::from_secs(5),
            None,
        ))
        .unwrap();
        assert_eq!(none.fingerprint, None);
        assert!(decode(b"").is_none());
        assert!(decode(b"x123").is_none());
    }

    #[test]
    fn a_completed_record_decodes_once_its_fingerprint_is_copied_in() {
        let fp = Fingerprint::of("payload").unwrap();
        let claim = in_progress(FencingToken::new(9), Duration::from_secs(5), Some(fp));
        let result = StoredResult::Err(Bytes::from_static(b"refused"));
        let mut done = completed(&result, FencingToken::new(9), Duration::from_secs(60));
        assert_eq!(done.len(), RESULT_AT + 7);
        // What the completion script does: SETRANGE 17 with the claim's bytes 17..50.
        done[FP_FLAG_AT..RESULT_AT].copy_from_slice(&claim[FP_FLAG_AT..RESULT_AT]);
        let record = decode(&done).unwrap();
        assert_eq!(record.fingerprint, Some(fp));
        assert_eq!(record.token(), FencingToken::new(9));
        assert!(matches!(record.state, RecordState::Completed { result: r, .. } if r == result));
    }
}
