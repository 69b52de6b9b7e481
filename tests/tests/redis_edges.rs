//! The Redis store at the edges of its deployments, from an outside review of the Cluster
//! and Sentinel support: slots in migration, a dead primary with unresponsive sentinels,
//! replica acknowledgements while the replica stalls, keys and prefixes made of the
//! characters the cluster layout escapes.

use std::time::{Duration, Instant};

use idempotent_runtime::store::{Claim, Fence, RedisStore, Store};
use idempotent_runtime::{FencingToken, StoreKey, StoredResult};
use idempotent_tests::redis_server::{unique_prefix, RedisServer};
use idempotent_tests::redis_topology::PrivateSentinelSet;

fn ask<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> T {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut c = client.get_connection().unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut c).unwrap()
}

fn info_field(port: u16, section: &str, field: &str) -> String {
    let info: String = ask(port, &["INFO", section]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in INFO {section}: {info}"))
        .trim()
        .to_string()
}

fn pid_of(port: u16) -> String {
    info_field(port, "server", "process_id")
}

fn signal(pid: &str, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// The offset up to which the primary on `port` knows its (only) replica has the stream,
/// and its own offset.
fn acked_and_master_offset(port: u16) -> (u64, u64) {
    let info: String = ask(port, &["INFO", "replication"]);
    let slave0 = info
        .lines()
        .find_map(|l| l.strip_prefix("slave0:"))
        .unwrap_or_else(|| panic!("no replica: {info}"));
    let acked = slave0
        .split(',')
        .find_map(|kv| kv.strip_prefix("offset="))
        .unwrap()
        .parse()
        .unwrap();
    let master = info
        .lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (acked, master)
}

/// A completion is never reported stored (`Fence::Held`) while no replica has it, even
/// when it is retried on a pooled connection whose last write the replica already had:
/// on redis-server 7.0.15 the retry's `WAIT` blocks its whole timeout and answers 0.
///
/// The concern: `WAIT` counts replicas that have the *connection's* last write, not this operation's.
/// A completion attempt that is cut short (the engine bounds every completion attempt by
/// `lease / 3` and drops it: `lease.rs` `bounded`) loses its dedicated connection; the
/// retry takes a pooled connection whose last write (the claim) the replica already had.
/// The retry's script finds the record completed by this token, writes nothing, and its
/// `WAIT` answers 1 at once: the store says Held while the only replica is stalled and
/// does not have the result. A failover to that replica then loses the result (the claim
/// survives, so after its lease another caller runs the body again) — exactly what the
/// acks were to prevent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_completion_counts_as_acked_without_the_replica_having_it() {
    let primary = RedisServer::start();
    let replica = RedisServer::start();
    let _: String = ask(
        replica.port(),
        &["REPLICAOF", "127.0.0.1", &primary.port().to_string()],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while info_field(replica.port(), "replication", "master_link_status") != "up" {
        assert!(Instant::now() < deadline, "replica link never came up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let store = RedisStore::connect(&primary.url())
        .await
        .unwrap()
        .with_prefix(unique_prefix())
        .with_replica_acks(1, Duration::from_millis(1500));
    let key = StoreKey::new("review", "k", 100).unwrap();
    let token = FencingToken::new(0xfeed);
    let claim = store
        .claim(&key, token, None, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired));

    // The replica stalls (a GC pause, a slow disk, a network hiccup): it applies and
    // acknowledges nothing.
    let replica_pid = pid_of(replica.port());
    signal(&replica_pid, "-STOP");
    let result = StoredResult::Ok(bytes::Bytes::from_static(b"the result"));

    // First attempt: cut short as the engine's `bounded(lease / 3, ...)` would for a
    // 900 ms lease.
    let first = tokio::time::timeout(
        Duration::from_millis(300),
        store.complete(&key, token, result.clone(), Duration::from_secs(60)),
    )
    .await;
    assert!(first.is_err(), "the first attempt waits for the replica");

    // The retry.
    let t = Instant::now();
    let retry = store
        .complete(&key, token, result.clone(), Duration::from_secs(60))
        .await;
    let took = t.elapsed();
    let (acked, master) = acked_and_master_offset(primary.port());
    signal(&replica_pid, "-CONT");
    eprintln!(
        "retry answered {retry:?} after {took:?}; replica acked offset {acked}, \
         primary at {master}"
    );
    assert!(
        !matches!(retry, Ok(Fence::Held)),
        "the completion counted as acknowledged by 1 replica, but the replica (stopped) \
         acked offset {acked} < primary offset {master}"
    );
}

/// Under Sentinel, with the primary dead and the sentinels not answering (stalled), calls
/// fail within seconds, as on one server: they do not queue behind one another's attempts
/// to ask the sentinels (which once took about a second more per concurrent call).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_fail_within_seconds_when_primary_and_sentinels_are_unresponsive() {
    let mut set = PrivateSentinelSet::start();
    let store = RedisStore::connect_sentinel(set.sentinel_urls(), set.master_name())
        .await
        .unwrap()
        .with_prefix(unique_prefix());
    let key = StoreKey::new("review", "warm", 100).unwrap();
    store
        .claim(&key, FencingToken::new(1), None, Duration::from_secs(10))
        .await
        .unwrap();
    let sentinel_pids: Vec<String> = set
        .sentinel_urls()
        .iter()
        .map(|u| pid_of(u.rsplit(':').next().unwrap().parse().unwrap()))
        .collect();
    // Stall the sentinels first (so they do not fail over), then kill the primary.
    for p in &sentinel_pids {
        signal(p, "-STOP");
    }
    let primary = set.first_primary_port();
    set.kill_data_node(primary);
    let started = Instant::now();
    let calls: Vec<_> = (0..12)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = StoreKey::new("review", i, 100).unwrap();
                let t = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(60),
                    store.claim(
                        &key,
                        FencingToken::new(100 + i),
                        None,
                        Duration::from_secs(10),
                    ),
                )
                .await;
                (
                    t.elapsed(),
                    r.map(|r| r.map(|_| ()).map_err(|e| e.to_string())),
                )
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for c in calls {
        let (took, r) = c.await.unwrap();
        eprintln!("call took {took:?}: {r:?}");
        slowest = slowest.max(took);
    }
    for p in &sentinel_pids {
        signal(p, "-CONT");
    }
    eprintln!("all calls done after {:?}", started.elapsed());
    assert!(
        slowest < Duration::from_secs(10),
        "a call took {slowest:?} to fail with the primary dead and sentinels stalled"
    );
}

/// On the shared cluster, odd prefixes (`{}`, `{`, `}{x}`,
/// `a{}b{c}`) with keys made of braces, `%`, escapes and unicode: every key gets its own
/// record (no two keys collide: `}` and `%7D` and `%257D` stay distinct), small and large
/// (64 KiB, two-key) completions land without CROSSSLOT, and each replays its own value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn odd_prefixes_and_keys_on_the_cluster_never_collide() {
    let seeds = idempotent_tests::redis_topology::cluster_seeds();
    let keys = [
        "}",
        "%7D",
        "%257D",
        "%",
        "%25",
        "{",
        "{}",
        "}{",
        "{a}",
        "a}",
        "%7d",
        "ü}€",
        "}}}",
        "x|y",
        "|",
        "done:0000000000000001",
        "{x}done:0000000000000001",
    ];
    for suffix in ["", "{}", "{", "}", "}{x}", "a{}b{c}", "{{}}", "}{"] {
        let prefix = format!("{}{suffix}", unique_prefix());
        let store = RedisStore::connect_cluster(&seeds)
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        let idem = idempotent_runtime::Idempotency::new(store);
        for scope in ["s", "{", "}", "%7D", "done:"] {
            for (i, k) in keys.iter().enumerate() {
                for big in [false, true] {
                    let value = if big {
                        format!("{scope}/{k}/{}", "x".repeat(64 * 1024))
                    } else {
                        format!("{scope}/{k}")
                    };
                    let v2 = value.clone();
                    let key = format!("{k}#{big}");
                    let (got, outcome) = idem
                        .call(&key)
                        .scope(scope)
                        .run_with_outcome(
                            move || async move { Ok::<_, idempotent_runtime::Error>(v2) },
                        )
                        .await
                        .unwrap_or_else(|e| {
                            panic!("prefix {prefix:?} scope {scope} key {k}: {e:?}")
                        });
                    assert_eq!(
                        (got.len(), outcome),
                        (value.len(), idempotent_runtime::Outcome::Executed),
                        "prefix {prefix:?} scope {scope:?} key {k:?} (#{i}) replayed another key's result"
                    );
                    let (again, outcome) = idem
                        .call(&key)
                        .scope(scope)
                        .run_with_outcome(|| async {
                            Ok::<_, idempotent_runtime::Error>(String::new())
                        })
                        .await
                        .unwrap();
                    assert_eq!(outcome, idempotent_runtime::Outcome::Replayed);
                    assert!(
                        again == value,
                        "prefix {prefix:?} scope {scope:?} key {k:?}: wrong replay"
                    );
                }
            }
        }
    }
}

/// Completions of every size go through while their slot migrates: a pipeline's `ASK` is
/// not followed by the cluster connection, and a large (two-key) completion once failed
/// for as long as the slot was MIGRATING. Slot migration by hand on a private cluster (3 masters, no replicas): the claim's slot
/// is MIGRATING on its source and IMPORTING on a target, (a) with the claim still on the
/// source, (b) after `MIGRATE` moved the claim to the target. A large (two-key) and a
/// small completion in each state must never answer `Lost` for a claim this token holds,
/// and a replay after the migration finishes must give the stored value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_during_a_slot_migration() {
    use idempotent_tests::redis_topology::PrivateCluster;
    let cluster = PrivateCluster::start(3, 0);
    let prefix = unique_prefix();
    let store = RedisStore::connect_cluster(cluster.seeds())
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let mut failures = Vec::new();
    for (case, moved_first, big) in [
        ("on source, large", false, true),
        ("on source, small", false, false),
        ("moved, large", true, true),
        ("moved, small", true, false),
    ] {
        let k = format!("mig-{case}");
        let key = StoreKey::new("review", &k, 100).unwrap();
        let rkey = format!("{prefix}{{review|{k}}}");
        let src = cluster.master_for_key(&rkey);
        let dst = *cluster.masters().iter().find(|&&p| p != src).unwrap();
        let slot: i64 = ask(src, &["CLUSTER", "KEYSLOT", &rkey]);
        let slot = slot.to_string();
        let src_id: String = ask(src, &["CLUSTER", "MYID"]);
        let dst_id: String = ask(dst, &["CLUSTER", "MYID"]);
        let token = FencingToken::new(0xabc0 + u64::from(moved_first) * 2 + u64::from(big));
        let claim = store
            .claim(&key, token, None, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(matches!(claim, Claim::Acquired), "{case}: {claim:?}");
        let _: String = ask(dst, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id]);
        let _: String = ask(src, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id]);
        if moved_first {
            let _: String = ask(
                src,
                &[
                    "MIGRATE",
                    "127.0.0.1",
                    &dst.to_string(),
                    "",
                    "0",
                    "5000",
                    "KEYS",
                    &rkey,
                ],
            );
        }
        let value = if big {
            "v".repeat(8 * 1024)
        } else {
            "small".into()
        };
        let result = StoredResult::Ok(bytes::Bytes::from(value.clone()));
        let mut answers = Vec::new();
        let mut held = false;
        for _ in 0..5 {
            let a = tokio::time::timeout(
                Duration::from_secs(10),
                store.complete(&key, token, result.clone(), Duration::from_secs(60)),
            )
            .await;
            let s = format!("{a:?}");
            answers.push(s);
            match a {
                Ok(Ok(Fence::Held)) => {
                    held = true;
                    break;
                }
                Ok(Ok(Fence::Lost)) => break,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        eprintln!("{case}: completion answers during the migration: {answers:?}");
        // Finish the migration: move what is left in the slot, then assign it.
        loop {
            let left: Vec<String> = ask(src, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            if left.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1"];
            let dport = dst.to_string();
            args.push(&dport);
            args.extend(["", "0", "5000", "KEYS"]);
            args.extend(left.iter().map(String::as_str));
            let _: String = ask(src, &args);
        }
        for p in cluster.masters() {
            let _: String = ask(p, &["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id]);
        }
        let after = store
            .claim(
                &key,
                FencingToken::new(0xdead),
                None,
                Duration::from_secs(30),
            )
            .await;
        eprintln!(
            "{case}: claim after the migration: {:?}",
            after.as_ref().map(|c| match c {
                Claim::Acquired => "Acquired".to_string(),
                Claim::InProgress(_) => "InProgress".to_string(),
                Claim::Completed(r) => format!("Completed({:?})", r.state),
            })
        );
        if !held {
            failures.push(format!("{case}: the completion never landed: {answers:?}"));
            continue;
        }
        match after.unwrap() {
            Claim::Completed(r) => match r.state {
                idempotent_runtime::RecordState::Completed {
                    result: StoredResult::Ok(b),
                    ..
                } => {
                    assert!(b == value.as_bytes(), "{case}: wrong value replayed")
                }
                other => panic!("{case}: {other:?}"),
            },
            _ => panic!("{case}: not completed after the migration"),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A store with a local cache claims with a pipeline (`SET NX PX GET` + `PTTL`), whose
/// `ASK` the cluster connection does not follow: while a slot is MIGRATING, a first claim
/// of a key in it (absent on the source) is sent again one command at a time, and
/// succeeds as a store without the local tier (a single command) does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_with_a_local_cache_go_through_a_migrating_slot() {
    use idempotent_tests::redis_topology::PrivateCluster;
    let cluster = PrivateCluster::start(3, 0);
    let prefix = unique_prefix();
    let plain = RedisStore::connect_cluster(cluster.seeds())
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let cached = plain.clone().with_local_cache(100);
    let k = "fresh";
    let rkey = format!("{prefix}{{review|{k}}}");
    let src = cluster.master_for_key(&rkey);
    let dst = *cluster.masters().iter().find(|&&p| p != src).unwrap();
    let slot: i64 = ask(src, &["CLUSTER", "KEYSLOT", &rkey]);
    let slot = slot.to_string();
    let src_id: String = ask(src, &["CLUSTER", "MYID"]);
    let dst_id: String = ask(dst, &["CLUSTER", "MYID"]);
    let _: String = ask(dst, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id]);
    let _: String = ask(src, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id]);
    let key = StoreKey::new("review", k, 100).unwrap();
    let with_cache = cached
        .claim(&key, FencingToken::new(1), None, Duration::from_secs(5))
        .await;
    let key2 = StoreKey::new("review", k, 100).unwrap();
    let without = plain
        .claim(&key2, FencingToken::new(2), None, Duration::from_secs(5))
        .await;
    let show = |c: &Result<Claim, idempotent_runtime::StoreError>| match c {
        Ok(Claim::Acquired) => "Acquired".to_string(),
        Ok(Claim::InProgress(_)) => "InProgress".to_string(),
        Ok(Claim::Completed(_)) => "Completed".to_string(),
        Err(e) => format!("Err({e:?})"),
    };
    eprintln!(
        "with local cache: {}; without: {}",
        show(&with_cache),
        show(&without)
    );
    assert!(
        with_cache.is_ok(),
        "a claim with the local cache failed in a migrating slot: {}",
        show(&with_cache)
    );
}
