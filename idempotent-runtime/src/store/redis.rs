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
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::sync::Cache;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{Claim, Fence, Store};
use crate::clock::{Clock, SystemClock, Timestamp};
use crate::error::{Error, StoreError};
use crate::fingerprint::Fingerprint;
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
    conn: ConnectionManager,
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
    local: Option<Cache<String, Local>>,
}

struct Scripts {
    renew: Script,
    complete: Script,
    complete_finished: Script,
    release: Script,
}

/// A completed record in the local tier, with how long it may stay there.
#[derive(Clone)]
struct Local {
    record: Record,
    keep_for: Duration,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
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
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| StoreError::new("redis: connect", e))?;
        Ok(Self::from_manager(conn))
    }

    /// A store on an existing connection manager.
    pub fn from_manager(conn: ConnectionManager) -> Self {
        Self {
            conn,
            prefix: Arc::from(DEFAULT_PREFIX),
            scripts: Arc::new(Scripts {
                renew: Script::new(RENEW),
                complete: Script::new(COMPLETE),
                complete_finished: Script::new(COMPLETE_FINISHED),
                release: Script::new(RELEASE),
            }),
            local: None,
        }
    }

    /// Puts every Redis key of this store under `prefix` (default [`DEFAULT_PREFIX`]).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
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
                .build(),
        );
        self
    }

    /// The connection manager, for commands of the application's own.
    pub fn manager(&self) -> &ConnectionManager {
        &self.conn
    }

    fn redis_key(&self, key: &StoreKey) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.as_str().len());
        k.push_str(&self.prefix);
        k.push_str(key.as_str());
        k
    }

    async fn fenced(
        &self,
        op: &'static str,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<Fence, StoreError> {
        let mut conn = self.conn.clone();
        let held: i64 = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| StoreError::new(op, e))?;
        Ok(if held == 1 { Fence::Held } else { Fence::Lost })
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
        // Under the prefix, under a name no claim can have (a claim's name always has a
        // `|` after the prefix, between scope and key) and no other completion uses (its
        // token). (On a cluster it must share the claim's slot: a hash tag in both names.)
        let finished = format!("{}done:{:016x}", self.prefix, token.get());
        let record = completed(result, token, ttl);
        let complete = &self.scripts.complete_finished;
        let mut conn = self.conn.clone();
        // The script is loaded once per server; a server that lost it (restarted) says so,
        // and the pair is sent again after loading it.
        for _ in 0..2 {
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(&finished)
                .arg(&record[..])
                .arg("PX")
                .arg(millis(FINISHED_WAITS))
                .ignore()
                .cmd("EVALSHA")
                .arg(complete.get_hash())
                .arg(2)
                .arg(&rkey)
                .arg(&finished)
                .arg(&token.get().to_be_bytes()[..])
                .arg(millis(ttl));
            match pipe.query_async::<(i64,)>(&mut conn).await {
                Ok((1,)) => return Ok(Fence::Held),
                Ok((0,)) => return Ok(Fence::Lost),
                Ok(_) => {
                    return Err(StoreError::msg(
                        "redis: complete: the finished record expired before its script ran",
                    ))
                }
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    complete
                        .prepare_invoke()
                        .load_async(&mut conn)
                        .await
                        .map_err(|e| StoreError::new("redis: complete", e))?;
                }
                Err(e) => return Err(StoreError::new("redis: complete", e)),
            }
        }
        Err(StoreError::msg(
            "redis: complete: the script did not stay loaded",
        ))
    }
}

thread_local! {
    // A hit on the local tier looks up the full Redis key; building it here, in a buffer
    // kept per thread, spares the hit an allocation.
    static LOCAL_KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

fn millis(d: Duration) -> u64 {
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
        let mut conn = self.conn.clone();
        let sent = Instant::now();
        let (existing, ttl_ms): (Option<Vec<u8>>, Option<i64>) = if self.local.is_some() {
            // With a local tier, ask for the TTL left in the same round trip.
            let mut pipe = redis::pipe();
            pipe.add_command(set).cmd("PTTL").arg(&rkey);
            pipe.query_async(&mut conn)
                .await
                .map_err(|e| StoreError::new("redis: claim", e))?
        } else {
            let v: Option<Vec<u8>> = set
                .query_async(&mut conn)
                .await
                .map_err(|e| StoreError::new("redis: claim", e))?;
            (v, None)
        };
        let Some(bytes) = existing else {
            return Ok(Claim::Acquired);
        };
        let record = decode(&bytes).ok_or(StoreError::msg(
            "redis: a record under this key is not ours",
        ))?;
        Ok(match record.state {
            RecordState::InProgress { .. } => Claim::InProgress(record),
            RecordState::Completed { .. } => {
                if let (Some(local), Some(ttl)) = (&self.local, ttl_ms) {
                    let left = Duration::from_millis(u64::try_from(ttl).unwrap_or(0));
                    let keep_for = left.saturating_sub(sent.elapsed());
                    if !keep_for.is_zero() {
                        local.insert(
                            rkey,
                            Local {
                                record: record.clone(),
                                keep_for,
                            },
                        );
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
        let mut inv = self.scripts.renew.key(self.redis_key(key));
        inv.arg(&token.get().to_be_bytes()[..])
            .arg(&SystemClock.now().after(lease).as_millis().to_be_bytes()[..])
            .arg(millis(lease));
        self.fenced("redis: renew", &inv).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        result: StoredResult,
        ttl: Duration,
    ) -> Result<Fence, StoreError> {
        if result.bytes().len() >= LARGE_RESULT {
            return self.complete_large(key, token, &result, ttl).await;
        }
        let (state, bytes) = (if result.is_err() { "e" } else { "c" }, result.bytes());
        let mut inv = self.scripts.complete.key(self.redis_key(key));
        inv.arg(&token.get().to_be_bytes()[..])
            .arg(state)
            .arg(&SystemClock.now().after(ttl).as_millis().to_be_bytes()[..])
            .arg(bytes.as_ref())
            .arg(millis(ttl));
        self.fenced("redis: complete", &inv).await
    }

    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<Fence, StoreError> {
        let mut inv = self.scripts.release.key(self.redis_key(key));
        inv.arg(&token.get().to_be_bytes()[..]);
        self.fenced("redis: release", &inv).await
    }

    fn peek_completed(&self, key: &StoreKey) -> Option<Record> {
        let local = self.local.as_ref()?;
        LOCAL_KEY
            .try_with(|buf| {
                let mut buf = buf.borrow_mut();
                buf.clear();
                buf.push_str(&self.prefix);
                buf.push_str(key.as_str());
                local.get(buf.as_str()).map(|l| l.record)
            })
            .ok()
            .flatten()
    }
}

struct LocalExpiry;

impl moka::Expiry<String, Local> for LocalExpiry {
    fn expire_after_create(&self, _: &String, v: &Local, _: Instant) -> Option<Duration> {
        Some(v.keep_for)
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
