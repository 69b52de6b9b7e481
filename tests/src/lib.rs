//! The store conformance suite: the contract of [`Store`], checked the same way for every
//! store, plus the engine guarantees that depend on the store (leases and their renewal,
//! takeover, single execution across engines).
//!
//! A store's test file implements [`Harness`] and invokes [`store_conformance!`] once:
//!
//! ```text
//! idempotent_tests::store_conformance!(idempotent_tests::MemoryHarness::new());
//! ```

pub mod captured_spans;
pub mod conformance;
pub mod crash;
mod faulty;
pub mod local_hit_fns;
pub mod observed;
pub mod postgres;
pub mod recorded_metrics;
pub mod redis_server;
pub mod redis_topology;
mod runs;
pub mod service_build;
pub mod transactions;

pub use faulty::{FaultyStore, Held, Stop};
pub use postgres::{PostgresHarness, TcpProxy};
pub use redis_server::{RedisHarness, RedisServer};
pub use redis_topology::{cluster_seeds, sentinel_spec, PrivateCluster, PrivateSentinelSet};
pub use runs::Runs;

use std::time::Duration;

use idempotent_runtime::clock::ManualClock;
use idempotent_runtime::store::{MemoryStore, Store};

/// What the suite needs from a store under test.
pub trait Harness: Send + Sync + 'static {
    /// The store type.
    type Store: Store + Clone;

    /// A store that holds nothing the suite wrote before (a fresh instance or prefix).
    /// Its expiry follows [`Harness::advance`].
    fn store(&self) -> impl std::future::Future<Output = Self::Store> + Send;

    /// A store whose expiry follows real time, for tests of renewal while time passes.
    fn real_time_store(&self) -> impl std::future::Future<Output = Self::Store> + Send;

    /// Moves the clock of [`Harness::store`] forward by `d`: instantly for a store with a
    /// manual clock, by waiting for a server.
    fn advance(&self, d: Duration) -> impl std::future::Future<Output = ()> + Send;

    /// A lease the suite may wait out: long for a manual clock, short for a server.
    fn lease(&self) -> Duration;

    /// A lease for a check that runs in real time while the store is written to: longer
    /// than the longest stall of the store seen on a loaded CI machine.
    fn real_time_lease(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// The in-memory store, on a manual clock.
#[derive(Debug, Clone)]
pub struct MemoryHarness {
    clock: ManualClock,
}

impl MemoryHarness {
    /// A harness with its own clock.
    pub fn new() -> Self {
        Self {
            clock: ManualClock::new(),
        }
    }
}

impl Default for MemoryHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness for MemoryHarness {
    type Store = MemoryStore;

    async fn store(&self) -> MemoryStore {
        MemoryStore::builder().clock(self.clock.clone()).build()
    }

    async fn real_time_store(&self) -> MemoryStore {
        MemoryStore::new()
    }

    async fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(10)
    }
}

/// Generates one `#[tokio::test]` per check of [`conformance`], each with a harness built
/// by `$harness`.
#[macro_export]
macro_rules! store_conformance {
    ($harness:expr) => {
        $crate::store_conformance!(@tests $harness;
            claim_on_a_free_key_acquires,
            a_second_claim_sees_the_claim_in_progress,
            complete_by_the_holder_stores_the_result,
            complete_keeps_the_fingerprint_of_the_claim,
            stored_errors_come_back_as_errors,
            a_stale_token_cannot_complete,
            release_by_the_holder_frees_the_key,
            release_with_another_token_changes_nothing,
            renew_keeps_a_live_claim_past_its_first_lease,
            a_renewal_sets_the_whole_lease_it_is_given,
            an_expired_lease_is_taken_over_and_the_old_holder_is_fenced,
            a_lapsed_claim_cannot_be_renewed,
            results_expire_after_their_ttl,
            a_claim_keeps_the_token_it_was_made_with,
            scopes_keep_equal_keys_apart,
            peek_never_shows_a_claim_in_progress,
            concurrent_claims_acquire_once,
            two_engines_execute_once_under_concurrent_callers,
            a_body_three_times_its_lease_runs_once_while_duplicates_arrive,
            a_holder_that_stops_renewing_frees_its_key_within_one_lease,
            an_absent_key_is_neither_inspected_nor_forgotten,
            inspect_shows_a_claim_in_progress_and_its_lease,
            inspect_shows_a_result_and_its_ttl_left,
            a_forgotten_result_is_claimed_afresh,
            a_forgotten_claim_fences_its_holder,
            expired_records_are_neither_inspected_nor_forgotten,
            an_engine_runs_a_forgotten_key_again,
        );
    };
    (@tests $harness:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let harness = $harness;
                $crate::conformance::$check(&harness).await;
            }
        )*
    };
}

/// One store of each kind, fresh (a memory store, a new prefix on the test Redis, a new
/// table in the test PostgreSQL), named, for tests that must hold on every store.
pub async fn each_store() -> Vec<(&'static str, std::sync::Arc<dyn Store>)> {
    vec![
        ("memory", std::sync::Arc::new(MemoryStore::new())),
        (
            "redis",
            std::sync::Arc::new(RedisHarness::new().fresh_store().await),
        ),
        (
            "postgres",
            std::sync::Arc::new(postgres::fresh_store(&postgres::postgres_url()).await),
        ),
    ]
}

/// Runs `f` to its end on a current-thread runtime of its own, timers and IO on: every
/// task it spawns runs on this thread, under what this thread has set (a `tracing`
/// subscriber, a `metrics` recorder).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// [`block_on`] on a multi-threaded runtime of `workers` threads: for tests of callers
/// that really run at once.
pub fn block_on_threads<F: std::future::Future>(workers: usize, f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Waits until `check` is true, looking every 10 ms, and fails the test if it is still
/// false after `within`: for effects that land in the background, such as a release or a
/// completion finished by a task of its own.
pub async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Calls `op` until it succeeds or `within` has passed, and returns its value: for the
/// tests of a store that comes back after an outage.
pub async fn until_ok<T, E: std::fmt::Debug, F, Fut>(within: Duration, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() >= deadline => panic!("never recovered: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
