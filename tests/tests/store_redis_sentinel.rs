//! The Redis store on a primary that Sentinel names (`IDEMPOTENT_TEST_REDIS_SENTINEL`, or
//! the set `.ci/services` starts): the conformance suite.

idempotent_tests::store_conformance!(idempotent_tests::RedisHarness::sentinel());

use std::error::Error as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::store::{RedisStore, TooFewReplicas};
use idempotent_runtime::{Error, Idempotency, Outcome};
use idempotent_tests::redis_server::{unique_prefix, RedisServer};
use idempotent_tests::redis_topology::sentinel_spec;

async fn store() -> RedisStore {
    let (urls, name) = sentinel_spec();
    RedisStore::connect_sentinel(urls, &name)
        .await
        .expect("the test Sentinel set (bash .ci/services)")
        .with_prefix(unique_prefix())
}

fn too_few_replicas(e: &Error) -> Option<&TooFewReplicas> {
    match e {
        Error::Store(s) => s.source()?.downcast_ref::<TooFewReplicas>(),
        _ => None,
    }
}

/// A call expected to fail: its error, and how many times its operation ran.
async fn failing_call(idem: &Idempotency) -> (Error, u32) {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let err = idem
        .call("k")
        .scope("acks")
        .run(move || async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(1)
        })
        .await
        .unwrap_err();
    (err, runs.load(Ordering::SeqCst))
}

/// With replica acks required, claims and completions of every size go through on a
/// primary with one replica, and replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_acknowledged_by_the_replica_go_through() {
    let idem = Idempotency::new(
        store()
            .await
            .with_replica_acks(1, Duration::from_secs(2))
            .with_local_cache(100),
    );
    for size in [8, 64 * 1024] {
        let value = "a".repeat(size);
        let call = |v: String| {
            idem.call(size)
                .scope("acks")
                .run_with_outcome(move || async move { Ok::<String, Error>(v) })
        };
        assert_eq!(
            call(value.clone()).await.unwrap(),
            (value.clone(), Outcome::Executed)
        );
        assert_eq!(
            call(String::new()).await.unwrap(),
            (value, Outcome::Replayed)
        );
    }
}

/// A claim fewer replicas acknowledged than required fails its call, typed, and the
/// operation does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_too_few_replicas_acknowledged_runs_nothing() {
    let idem = Idempotency::new(
        store()
            .await
            .with_replica_acks(2, Duration::from_millis(100)),
    );
    let (err, runs) = failing_call(&idem).await;
    let short = too_few_replicas(&err).unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!((short.acked, short.wanted), (1, 2));
    assert_eq!(runs, 0);
}

/// On a server without replicas, required acks never come: every call fails, none runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_on_a_server_without_replicas_fail_every_call() {
    let server = RedisServer::start();
    let idem = Idempotency::new(
        RedisStore::connect(&server.url())
            .await
            .unwrap()
            .with_replica_acks(1, Duration::from_millis(50)),
    );
    let (err, runs) = failing_call(&idem).await;
    assert!(too_few_replicas(&err).is_some(), "{err:?}");
    assert_eq!(runs, 0);
}

/// A hit or a duplicate wrote nothing, and does not wait for replicas: it answers even
/// while the replicas required are not there (here, two required of one), without
/// waiting out the acknowledgement timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hit_does_not_wait_for_replicas() {
    let plain = store().await;
    let strict = plain.clone().with_replica_acks(2, Duration::from_secs(5));
    let first = Idempotency::new(plain);
    let second = Idempotency::new(strict);
    async fn call(idem: &Idempotency) -> Result<(i32, Outcome), Error> {
        idem.call("k")
            .scope("acks")
            .run_with_outcome(|| async { Ok::<_, Error>(1) })
            .await
    }
    assert_eq!(call(&first).await.unwrap(), (1, Outcome::Executed));
    let started = std::time::Instant::now();
    assert_eq!(call(&second).await.unwrap(), (1, Outcome::Replayed));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the hit waited for replicas: {:?}",
        started.elapsed()
    );
}
