//! Writes that count only once replicas have them (`WAIT`), for
//! [`RedisStore::with_replica_acks`](super::RedisStore::with_replica_acks).
//!
//! `WAIT` blocks the connection it is sent on: Redis answers nothing else on it until the
//! replicas acknowledge or the timeout passes. On the store's shared, multiplexed
//! connection every other caller's command would queue behind each `WAIT`, and while a
//! primary has no replica (the seconds after a failover) each one takes the whole timeout:
//! commands then wait longer than a lease, and a completion sent in time lands after its
//! claim lapsed. So each acknowledged write goes out on a connection of its own, taken
//! from a pool that grows with the writes in flight.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::{Pipeline, Value};

use super::redis_connection::{Dedicated, RedisConnection};
use crate::error::StoreError;

/// Idle dedicated connections kept for reuse; more are opened when more writes are in
/// flight, and closed after.
const IDLE_KEPT: usize = 64;

/// Acknowledged writes in flight at once, each on a connection of its own; more wait for
/// one to finish, so a burst cannot open connections without bound (Redis refuses
/// clients past `maxclients`, 10,000 by default, and each costs it memory).
const IN_FLIGHT: usize = 256;

/// Whether a pipeline's answer shows that it wrote.
type Wrote<'a> = &'a (dyn Fn(&[Value]) -> bool + Sync);

/// How many replicas must have a write before it counts, and how long to wait for them.
#[derive(Clone)]
pub(crate) struct ReplicaAcks {
    pub(crate) replicas: u32,
    pub(crate) timeout: Duration,
    idle: Arc<Mutex<Vec<Dedicated>>>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for ReplicaAcks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaAcks")
            .field("replicas", &self.replicas)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Fewer replicas acknowledged a write than
/// [`RedisStore::with_replica_acks`](super::RedisStore::with_replica_acks) requires. The
/// write was made on the primary; it may or may not survive a failover.
#[derive(Debug, thiserror::Error)]
#[error("{acked} of {wanted} replicas acknowledged the write within {timeout:?}")]
pub struct TooFewReplicas {
    /// Replicas that acknowledged it.
    pub acked: u32,
    /// Replicas required.
    pub wanted: u32,
    /// How long the store waited for them.
    pub timeout: Duration,
}

impl ReplicaAcks {
    pub(crate) fn new(replicas: u32, timeout: Duration) -> Self {
        Self {
            replicas,
            timeout,
            idle: Arc::new(Mutex::new(Vec::new())),
            in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
        }
    }

    /// Sends the pipeline `build` makes, then `WAIT`, in one round trip on a connection
    /// of its own; answers the pipeline's values and how many replicas acknowledged.
    /// `build` is told whether to send scripts' code, and `apart` whether the pipeline
    /// may be sent one command at a time (see `RedisStore::round_trip`).
    pub(crate) async fn round_trip(
        &self,
        op: &'static str,
        conn: &RedisConnection,
        apart: bool,
        build: impl Fn(bool) -> Pipeline,
    ) -> Result<(Vec<Value>, u32), StoreError> {
        let (values, acked) = self.send(op, conn, apart, build, None).await?;
        Ok((values, acked.unwrap_or(0)))
    }

    /// As [`ReplicaAcks::round_trip`], but `WAIT`s (a second round trip, on the same
    /// connection) only when `wrote` says the pipeline's answer shows it wrote: a claim
    /// that found a record wrote nothing, and a hit should not pay for replicas. `None`
    /// for acknowledgements when it did not wait.
    pub(crate) async fn round_trip_if_written(
        &self,
        op: &'static str,
        conn: &RedisConnection,
        apart: bool,
        build: impl Fn(bool) -> Pipeline,
        wrote: Wrote<'_>,
    ) -> Result<(Vec<Value>, Option<u32>), StoreError> {
        self.send(op, conn, apart, build, Some(wrote)).await
    }

    async fn send(
        &self,
        op: &'static str,
        conn: &RedisConnection,
        apart: bool,
        build: impl Fn(bool) -> Pipeline,
        wrote: Option<Wrote<'_>>,
    ) -> Result<(Vec<Value>, Option<u32>), StoreError> {
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|e| StoreError::new(op, e))?;
        let mut dedicated = match self.take(conn.generation()) {
            Some(d) => d,
            None => conn.dedicated().await.map_err(|e| StoreError::new(op, e))?,
        };
        let wait = |mut pipe: Pipeline| {
            pipe.cmd("WAIT")
                .arg(self.replicas)
                .arg(super::redis::millis(self.timeout));
            pipe
        };
        let pipelined = wrote.is_none();
        let apart = apart && conn.is_cluster();
        let answer = super::redis::send(&mut dedicated, apart, |code| {
            let pipe = build(code);
            if pipelined {
                wait(pipe)
            } else {
                pipe
            }
        })
        .await;
        // A connection that failed is not reused: it may be broken, or mid-answer.
        let mut values = answer.map_err(|e| {
            dedicated.noticed(&e);
            StoreError::new(op, e)
        })?;
        let acked = match wrote {
            None => values.pop(),
            Some(wrote) if wrote(&values) => {
                let mut answer = wait(redis::pipe())
                    .query_async::<Vec<Value>>(&mut dedicated)
                    .await
                    .map_err(|e| {
                        dedicated.noticed(&e);
                        StoreError::new(op, e)
                    })?;
                answer.pop()
            }
            Some(_) => {
                self.give_back(dedicated);
                return Ok((values, None));
            }
        };
        self.give_back(dedicated);
        let acked = acked
            .and_then(|v| redis::from_redis_value::<i64>(v).ok())
            .ok_or(StoreError::msg("redis: WAIT answered out of shape"))?;
        Ok((values, Some(u32::try_from(acked).unwrap_or(0))))
    }

    /// `Ok` when `acked` replicas are enough.
    pub(crate) fn check(&self, op: &'static str, acked: u32) -> Result<(), StoreError> {
        if acked >= self.replicas {
            return Ok(());
        }
        Err(StoreError::new(
            op,
            TooFewReplicas {
                acked,
                wanted: self.replicas,
                timeout: self.timeout,
            },
        ))
    }

    fn take(&self, generation: u64) -> Option<Dedicated> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(d) = idle.pop() {
            // Connections to a primary that has since moved are closed, not reused.
            if d.generation() == generation {
                return Some(d);
            }
        }
        None
    }

    fn give_back(&self, d: Dedicated) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_KEPT {
            idle.push(d);
        }
    }
}
