//! The Redis store against a real Redis: the conformance suite, then what only several
//! processes and a server that goes away can show.

use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::store::RedisStore;
use idempotent_runtime::{Error, Idempotency, Outcome};
use idempotent_tests::redis_server::{redis_url, unique_prefix, CommandLog};
use idempotent_tests::{RedisHarness, RedisServer};
use redis::AsyncCommands;

idempotent_tests::store_conformance!(idempotent_tests::RedisHarness::new());

async fn raw(url: &str) -> redis::aio::ConnectionManager {
    redis::aio::ConnectionManager::new(redis::Client::open(url).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engines_on_two_connections_make_one_execution_for_100_callers() {
    let prefix = unique_prefix();
    let counter = format!("{prefix}side-effect");
    let mk = || async {
        Idempotency::new(
            RedisStore::connect(&redis_url())
                .await
                .unwrap()
                .with_prefix(prefix.clone()),
        )
    };
    let engines = [mk().await, mk().await];
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let idem = engines[i % 2].clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                idem.call("pay-1")
                    .scope("redis")
                    .run(|| async move {
                        // The side effect is counted in Redis itself.
                        let mut conn = raw(&redis_url()).await;
                        let n: u64 = conn.incr(&counter, 1).await.map_err(|e| {
                            Error::Store(idempotent_runtime::StoreError::new("incr", e))
                        })?;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, Error>(n)
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 1);
    }
    let mut conn = raw(&redis_url()).await;
    let n: u64 = conn.get(&counter).await.unwrap();
    assert_eq!(n, 1, "the side effect ran once across both engines");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holder_process_frees_its_key_within_one_lease() {
    let prefix = unique_prefix();
    let lease = Duration::from_millis(500);
    let store = RedisStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let idem = Idempotency::builder()
        .store(store)
        .lease(lease)
        .build()
        .unwrap();
    idempotent_tests::crash::a_crashed_holder_process_frees_its_key(
        env!("CARGO_BIN_EXE_holder"),
        "redis",
        &redis_url(),
        &prefix,
        &idem,
        lease,
        Duration::from_secs(1),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_restarted_fails_closed_then_recovers_by_itself() {
    let mut server = RedisServer::start();
    let idem = Idempotency::new(RedisStore::connect(&server.url()).await.unwrap());
    let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let call = |key: &'static str| {
        let runs = runs.clone();
        idem.call(key).scope("redis").run(move || async move {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<u32, Error>(7)
        })
    };
    assert_eq!(call("before").await.unwrap(), 7);
    server.stop();
    let r = call("during").await;
    assert!(matches!(r, Err(Error::Store(_))), "{r:?}");
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "nothing runs while the store is down"
    );
    server.restart();
    // The same engine and store, no reconnect by the program: calls work again.
    let result = idempotent_tests::until_ok(Duration::from_secs(20), || call("after")).await;
    assert_eq!(result, 7);
    assert_eq!(
        idem.call("after")
            .scope("redis")
            .run(|| async { Ok::<u32, Error>(8) })
            .await
            .unwrap(),
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_is_one_round_trip_and_a_first_execution_two() {
    let server = RedisServer::start();
    let idem = Idempotency::new(RedisStore::connect(&server.url()).await.unwrap());
    // Load the scripts once, so the counts below are steady-state.
    let _ = idem
        .call("warm")
        .scope("rt")
        .run(|| async { Ok::<u32, Error>(0) })
        .await
        .unwrap();
    let log = CommandLog::start(server.port()).await;
    let _ = idem
        .call("k")
        .scope("rt")
        .run(|| async { Ok::<u32, Error>(1) })
        .await
        .unwrap();
    let first = log.take().await;
    let _ = idem
        .call("k")
        .scope("rt")
        .run(|| async { Ok::<u32, Error>(2) })
        .await
        .unwrap();
    let hit = log.take().await;
    assert_eq!(
        first,
        ["SET", "EVALSHA"],
        "a first execution: claim, complete"
    );
    assert_eq!(hit, ["SET"], "a hit: one claim that finds the result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_tier_serves_hits_without_a_round_trip_and_not_past_the_ttl() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url())
        .await
        .unwrap()
        .with_local_cache(100);
    let idem = Idempotency::new(store);
    let ttl = Duration::from_millis(400);
    let call = |v: u32| {
        idem.call("k")
            .scope("local")
            .ttl(ttl)
            .run_with_outcome(move || async move { Ok::<u32, Error>(v) })
    };
    assert_eq!(call(1).await.unwrap(), (1, Outcome::Executed));
    assert_eq!(call(2).await.unwrap(), (1, Outcome::Replayed)); // fetched from Redis, kept
    let log = CommandLog::start(server.port()).await;
    for _ in 0..10 {
        assert_eq!(call(3).await.unwrap(), (1, Outcome::Replayed));
    }
    assert_eq!(
        log.take().await,
        Vec::<String>::new(),
        "local hits send nothing"
    );
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert_eq!(
        call(4).await.unwrap(),
        (4, Outcome::Executed),
        "expired locally with its TTL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_with_other_prefixes_never_share_the_local_tier() {
    let base = RedisHarness::new()
        .fresh_store()
        .await
        .with_local_cache(100);
    let prefix = unique_prefix();
    let billing = Idempotency::new(base.clone().with_prefix(format!("{prefix}billing:")));
    let shipping = Idempotency::new(base.with_prefix(format!("{prefix}shipping:")));
    async fn call(idem: &Idempotency, v: &'static str) -> Result<(String, Outcome), Error> {
        idem.call("order-1")
            .scope("local")
            .run_with_outcome(move || async move { Ok::<_, Error>(v.to_owned()) })
            .await
    }
    assert_eq!(call(&billing, "billed").await.unwrap().1, Outcome::Executed);
    // A claim that finds the result puts it in the (shared) local tier.
    assert_eq!(call(&billing, "x").await.unwrap().1, Outcome::Replayed);
    assert_eq!(
        call(&shipping, "shipped").await.unwrap(),
        ("shipped".to_owned(), Outcome::Executed),
        "another prefix is another store"
    );
    assert_eq!(
        call(&shipping, "y").await.unwrap(),
        ("shipped".to_owned(), Outcome::Replayed)
    );
    assert_eq!(
        call(&billing, "z").await.unwrap(),
        ("billed".to_owned(), Outcome::Replayed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_tier_still_refuses_another_fingerprint() {
    let h = RedisHarness::new();
    let idem = Idempotency::new(h.fresh_store().await.with_local_cache(100));
    let call = |fp: u32| {
        idem.call("k")
            .scope("local")
            .fingerprint(&fp)
            .run(|| async { Ok::<u32, Error>(1) })
    };
    call(1).await.unwrap();
    call(1).await.unwrap();
    assert!(matches!(call(2).await, Err(Error::Mismatch)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_local_waiters_make_one_remote_wait_not_fifty() {
    let server = RedisServer::start();
    let holder = Idempotency::new(RedisStore::connect(&server.url()).await.unwrap());
    let waiters = Idempotency::new(RedisStore::connect(&server.url()).await.unwrap());
    let (open, gate) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let holder = holder.clone();
        tokio::spawn(async move {
            holder
                .call("slow")
                .scope("coalesce")
                .run(|| async move {
                    let _ = gate.await;
                    Ok::<u32, Error>(1)
                })
                .await
        })
    };
    while holder.in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let log = CommandLog::start(server.port()).await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let w = waiters.clone();
            tokio::spawn(async move {
                w.call("slow")
                    .scope("coalesce")
                    .run(|| async { Ok::<u32, Error>(2) })
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    open.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap(), 1);
    for t in tasks {
        assert_eq!(
            t.await.unwrap().unwrap(),
            1,
            "every waiter gets the holder's result"
        );
    }
    let claims = log.take().await.iter().filter(|c| *c == "SET").count();
    // One leader polls with backoff (2 ms doubling to 100 ms) for about 300 ms: about ten
    // claims. Fifty callers each polling would make hundreds.
    assert!(claims <= 15, "{claims} claims for 50 local waiters");
    assert_eq!(waiters.stats().coalesced, 49);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_costs_no_round_trip_for_a_body_shorter_than_a_third_of_its_lease() {
    let server = RedisServer::start();
    let lease = Duration::from_millis(900);
    let idem = Idempotency::builder()
        .store(RedisStore::connect(&server.url()).await.unwrap())
        .lease(lease)
        .build()
        .unwrap();
    let body = |d: Duration| {
        move || async move {
            tokio::time::sleep(d).await;
            Ok::<u32, Error>(1)
        }
    };
    // Load every script once (a renewal included), so the counts below are steady-state.
    idem.call("warm")
        .scope("renew")
        .run(body(lease / 3 + Duration::from_millis(50)))
        .await
        .unwrap();
    let log = CommandLog::start(server.port()).await;
    idem.call("short")
        .scope("renew")
        .run(body(lease / 3 - Duration::from_millis(100)))
        .await
        .unwrap();
    let short = log.take().await;
    idem.call("long")
        .scope("renew")
        .run(body(lease + Duration::from_millis(100)))
        .await
        .unwrap();
    let long = log.take().await;
    assert_eq!(short, ["SET", "EVALSHA"], "claim and complete only");
    // Renewals at 300, 600 and 900 ms (a late timer may push the last past the body's
    // end), then the completion.
    assert_eq!(long.first().map(String::as_str), Some("SET"));
    let scripts = long.iter().filter(|c| *c == "EVALSHA").count();
    assert!((3..=4).contains(&scripts), "{long:?}");
}

/// A large result's completion sends its finished record under a key of its own, then
/// renames it over the claim: none of those keys may outlive the completion, whether it
/// held the claim, lost it to another caller, or came again after its answer was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_completions_leave_no_finished_record_behind() {
    use idempotent_runtime::store::{Claim, Fence, Store};
    use idempotent_runtime::{FencingToken, StoreKey, StoredResult};

    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server.url()).await;
    let key = |k: &str| StoreKey::new("done", k, 255).unwrap();
    let large = StoredResult::Ok(bytes::Bytes::from(vec![b'r'; 64 * 1024]));
    let (a, b) = (FencingToken::mint(), FencingToken::mint());
    let lease = Duration::from_millis(200);
    let ttl = Duration::from_secs(60);

    // Held: completed, and asked again (an answer lost on the way).
    let k1 = key("held");
    assert_eq!(
        store.claim(&k1, a, None, lease).await.unwrap(),
        Claim::Acquired
    );
    assert_eq!(
        store.complete(&k1, a, large.clone(), ttl).await.unwrap(),
        Fence::Held
    );
    assert_eq!(
        store.complete(&k1, a, large.clone(), ttl).await.unwrap(),
        Fence::Held
    );
    // Lost: the claim lapsed and another caller took the key over.
    let k2 = key("lost");
    assert_eq!(
        store.claim(&k2, a, None, lease).await.unwrap(),
        Claim::Acquired
    );
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    assert_eq!(
        store.claim(&k2, b, None, lease).await.unwrap(),
        Claim::Acquired
    );
    assert_eq!(
        store.complete(&k2, a, large.clone(), ttl).await.unwrap(),
        Fence::Lost
    );
    // Lost: nothing there at all.
    let k3 = key("gone");
    assert_eq!(
        store.complete(&k3, a, large.clone(), ttl).await.unwrap(),
        Fence::Lost
    );

    let left: Vec<String> = conn.keys("idempotent:done:*").await.unwrap();
    assert!(left.is_empty(), "finished records left behind: {left:?}");
    // The completed record is the claim's key, with the result's TTL and every byte.
    let full = format!("idempotent:{}", k1.as_str());
    let pttl: i64 = conn.pttl(&full).await.unwrap();
    assert!(pttl > 50_000, "{pttl}");
    let stored: Vec<u8> = conn.get(&full).await.unwrap();
    assert_eq!(stored.len(), 50 + 64 * 1024);
    // The key still claimed by the other caller kept its claim.
    match store.claim(&k2, a, None, lease).await.unwrap() {
        Claim::InProgress(rec) => assert_eq!(rec.holder(), Some(b)),
        other => panic!("{other:?}"),
    }
}

/// Large and small results replay as they were stored, with the fingerprint they were
/// claimed with (a large result's record gets it from the claim, in the script).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_of_any_size_replay_with_their_fingerprint() {
    let server = RedisServer::start();
    let idem = Idempotency::new(RedisStore::connect(&server.url()).await.unwrap());
    for size in [10, 2 * 1024 - 60, 2 * 1024, 70 * 1024] {
        let value = "v".repeat(size);
        let call = |fp: &'static str, v: String| {
            idem.call(size)
                .scope("sizes")
                .fingerprint(fp)
                .run_with_outcome(move || async move { Ok::<String, Error>(v) })
        };
        assert_eq!(
            call("a", value.clone()).await.unwrap(),
            (value.clone(), Outcome::Executed)
        );
        assert_eq!(
            call("a", String::new()).await.unwrap(),
            (value, Outcome::Replayed),
            "{size}"
        );
        assert!(
            matches!(call("b", String::new()).await, Err(Error::Mismatch)),
            "{size}"
        );
    }
}

/// A server that lost its scripts (restarted, or `SCRIPT FLUSH`) gets a large result's
/// completion script again, and the completion goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_completion_loads_its_script_again_when_the_server_lost_it() {
    let server = RedisServer::start();
    let idem = Idempotency::new(RedisStore::connect(&server.url()).await.unwrap());
    let large = "x".repeat(8 * 1024);
    let call = |k: &'static str| {
        let v = large.clone();
        idem.call(k)
            .scope("flush")
            .run_with_outcome(move || async move { Ok::<String, Error>(v) })
    };
    assert_eq!(call("a").await.unwrap().1, Outcome::Executed);
    let mut conn = raw(&server.url()).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(call("b").await.unwrap().1, Outcome::Executed);
    assert_eq!(call("b").await.unwrap(), (large.clone(), Outcome::Replayed));
    assert_eq!(idem.stats().store_errors, 0);
}
