//! The Redis store on a Redis Cluster (`IDEMPOTENT_TEST_REDIS_CLUSTER`, or the one
//! `.ci/services` starts): the conformance suite, then what only a cluster can show.

idempotent_tests::store_conformance!(idempotent_tests::RedisHarness::cluster());

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use idempotent_runtime::store::RedisStore;
use idempotent_runtime::{Error, Idempotency, Outcome};
use idempotent_tests::redis_server::unique_prefix;
use idempotent_tests::redis_topology::cluster_seeds;

/// The keys under `prefix` on each master of the test cluster, by master.
async fn keys_by_master(prefix: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for url in cluster_seeds() {
        let mut conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await.unwrap();
        if !matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
            continue;
        }
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .unwrap();
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        found.push(keys);
    }
    assert_eq!(found.len(), 3, "the test cluster has three masters");
    found
}

async fn store(prefix: &str) -> RedisStore {
    RedisStore::connect_cluster(cluster_seeds())
        .await
        .expect("the test cluster (bash .ci/services)")
        .with_prefix(prefix)
}

/// Keys that share braces (a hash tag, to Redis) still spread over the cluster: a caller
/// cannot pile every key onto one node by choosing its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_with_braces_do_not_choose_their_slot() {
    let prefix = unique_prefix();
    let idem = Idempotency::new(store(&prefix).await);
    for i in 0..30 {
        let key = format!("{{same-tag}}-{i}");
        idem.call(key)
            .scope("tags")
            .run(move || async move { Ok::<_, Error>(i) })
            .await
            .unwrap();
    }
    let by_master = keys_by_master(&prefix).await;
    let total: usize = by_master.iter().map(Vec::len).sum();
    assert_eq!(total, 30, "{by_master:?}");
    let used = by_master.iter().filter(|k| !k.is_empty()).count();
    // All 30 on one of three masters by chance: 3^-29.
    assert!(used >= 2, "every key landed on one master: {by_master:?}");
}

/// A prefix with a hash tag of its own keeps its meaning: every key of the store in the
/// tag's one slot, so on one master.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefix_with_a_hash_tag_keeps_the_store_in_one_slot() {
    let prefix = format!("{{{}}}:", unique_prefix());
    let idem = Idempotency::new(store(&prefix).await);
    for i in 0..30 {
        let large = "r".repeat(if i % 2 == 0 { 8 * 1024 } else { 8 });
        idem.call(i)
            .scope("one-slot")
            .run(move || async move { Ok::<_, Error>(large) })
            .await
            .unwrap();
    }
    let by_master = keys_by_master(&prefix).await;
    let used: Vec<usize> = by_master.iter().map(Vec::len).collect();
    assert!(
        used.iter().filter(|n| **n > 0).count() == 1 && used.iter().sum::<usize>() == 30,
        "{used:?}"
    );
}

/// Keys that differ only where the cluster layout escapes characters (`}` and `%`) stay
/// apart: each runs once and replays its own result.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn escaped_characters_keep_keys_apart() {
    let idem = Idempotency::new(store(&unique_prefix()).await);
    let keys = ["a}", "a%7D", "a%257D", "a%", "a%25", "}{", "{}", "a"];
    let runs = Arc::new(AtomicU32::new(0));
    for round in 0..2 {
        for (i, key) in keys.iter().enumerate() {
            let runs = runs.clone();
            let (value, outcome) = idem
                .call(*key)
                .scope("escapes")
                .run_with_outcome(move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(i)
                })
                .await
                .unwrap();
            assert_eq!(value, i, "{key}");
            let expected = if round == 0 {
                Outcome::Executed
            } else {
                Outcome::Replayed
            };
            assert_eq!(outcome, expected, "{key}");
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), keys.len() as u32);
}

/// Large results complete through a second key, which must share the claim's slot on a
/// cluster (or the pipeline fails with CROSSSLOT): they replay with their fingerprint on
/// keys spread over every master, and leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_results_complete_on_every_master_and_leave_nothing_behind() {
    let prefix = unique_prefix();
    let idem = Idempotency::new(store(&prefix).await);
    let large = "L".repeat(64 * 1024);
    // 60 keys miss one of three masters by chance 3 x (2/3)^60 of the time: 1e-10.
    for i in 0..60 {
        let call = |fp: &'static str, v: String| {
            idem.call(i)
                .scope("large")
                .fingerprint(fp)
                .run_with_outcome(move || async move { Ok::<String, Error>(v) })
        };
        assert_eq!(
            call("a", large.clone()).await.unwrap(),
            (large.clone(), Outcome::Executed)
        );
        assert_eq!(
            call("a", String::new()).await.unwrap(),
            (large.clone(), Outcome::Replayed)
        );
        assert!(matches!(
            call("b", String::new()).await,
            Err(Error::Mismatch)
        ));
    }
    let by_master = keys_by_master(&prefix).await;
    assert!(
        by_master.iter().all(|k| !k.is_empty()),
        "60 keys did not reach every master: {by_master:?}"
    );
    let all: Vec<&String> = by_master.iter().flatten().collect();
    assert_eq!(all.len(), 60, "{all:?}");
    assert!(all.iter().all(|k| !k.contains("}done:")), "{all:?}");
}
