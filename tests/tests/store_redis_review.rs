//! The completion of large results on Redis (a `SET` of the finished record, then a
//! script that renames it over the claim), under the attacks of its outside review, each
//! against a private Redis of the test's own: user keys named like finished records, a
//! connection cut between the `SET` and the script, a server restarted there, lost
//! answers, stale holders, the 2 KiB threshold to the byte, TTLs short and long, a storm
//! of lapsing claims, the local tier.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idempotent_runtime::store::{Claim, Fence, RedisStore, Store};
use idempotent_runtime::{FencingToken, Fingerprint, RecordState, StoreKey, StoredResult};
use idempotent_tests::redis_server::CommandLog;
use idempotent_tests::RedisServer;
use redis::AsyncCommands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn raw(url: &str) -> redis::aio::ConnectionManager {
    redis::aio::ConnectionManager::new(redis::Client::open(url).unwrap())
        .await
        .unwrap()
}

fn key(scope: &str, k: &str) -> StoreKey {
    StoreKey::new(scope, k, 255).unwrap()
}

fn big(n: usize, b: u8) -> StoredResult {
    StoredResult::Ok(Bytes::from(vec![b; n]))
}

const LEASE: Duration = Duration::from_secs(5);
const TTL: Duration = Duration::from_secs(3600);

fn result_of(c: &Claim) -> Option<(FencingToken, StoredResult, Option<Fingerprint>)> {
    match c {
        Claim::Completed(rec) => match &rec.state {
            RecordState::Completed { token, result, .. } => {
                Some((*token, result.clone(), rec.fingerprint))
            }
            _ => None,
        },
        _ => None,
    }
}

/// Claims `key` with `token` and completes it with a small result.
async fn stored_small(store: &RedisStore, key: &StoreKey, token: FencingToken) {
    let claim = store.claim(key, token, None, LEASE).await.unwrap();
    assert_eq!(claim, Claim::Acquired);
    let fence = store
        .complete(key, token, big(10, b'v'), TTL)
        .await
        .unwrap();
    assert_eq!(fence, Fence::Held);
}

/// A user key `K:done:<hex of K's holder token>` in the same scope was, in the first
/// version, the very Redis key a large completion of `K` wrote its finished record under:
/// the completion overwrote it and renamed it away, and that key ran again. It must keep
/// its own result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_done_key_collision_erases_another_keys_completed_record() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let a = FencingToken::new(0x1234);
    let k = key("s", "order-7");
    let victim = key("s", &format!("order-7:done:{:016x}", a.get()));

    // The victim key runs and completes first (small result).
    let c = FencingToken::new(0x9999);
    stored_small(&store, &victim, c).await;
    // K runs and completes with a large result.
    assert_eq!(
        store.claim(&k, a, None, LEASE).await.unwrap(),
        Claim::Acquired
    );
    assert_eq!(
        store.complete(&k, a, big(4096, b'k'), TTL).await.unwrap(),
        Fence::Held
    );
    // The victim key must still replay its own result.
    let d = FencingToken::new(0x7777);
    let again = store.claim(&victim, d, None, LEASE).await.unwrap();
    assert!(
        matches!(result_of(&again), Some((t, r, _)) if t == c && r == big(10, b'v')),
        "victim key no longer replays its result: {again:?}"
    );
}

/// The same key, and K's completion lost (a stale holder): the script deletes the finished
/// record, which in the first version was the victim's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_done_key_collision_stale_completion_deletes_victim() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let a = FencingToken::new(0xabcdef);
    let k = key("s", "order-8");
    let victim = key("s", &format!("order-8:done:{:016x}", a.get()));
    let c = FencingToken::new(0x42);
    stored_small(&store, &victim, c).await;
    // `a` never held K (or lost it): its completion is refused...
    assert_eq!(
        store.complete(&k, a, big(4096, b'k'), TTL).await.unwrap(),
        Fence::Lost
    );
    // ...and the victim's record stays.
    let again = store
        .claim(&victim, FencingToken::new(0x43), None, LEASE)
        .await
        .unwrap();
    assert!(
        matches!(result_of(&again), Some((t, _, _)) if t == c),
        "victim key no longer replays its result: {again:?}"
    );
}

/// Exactly at the threshold: 2047 bytes go through the small script (one EVALSHA, no
/// SET), 2048 through SET + EVALSHA; both replay byte for byte with their fingerprint,
/// as `c` and as `e`, with the requested TTL, and leave no finished key behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_threshold_2047_and_2048_bytes() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server.url()).await;
    // Warm the scripts so MONITOR sees no SCRIPT LOAD.
    for (i, n) in [2047usize, 2048].into_iter().enumerate() {
        let k = key("warm", &i.to_string());
        let t = FencingToken::mint();
        store.claim(&k, t, None, LEASE).await.unwrap();
        let _ = store.complete(&k, t, big(n, b'w'), TTL).await.unwrap();
    }
    let log = CommandLog::start(server.port()).await;
    let fp = Fingerprint::of("payload").unwrap();
    for n in [2047usize, 2048] {
        for err in [false, true] {
            let k = key("edge", &format!("{n}-{err}"));
            let t = FencingToken::mint();
            let bytes = Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
            let result = if err {
                StoredResult::Err(bytes)
            } else {
                StoredResult::Ok(bytes)
            };
            assert_eq!(
                store.claim(&k, t, Some(fp), LEASE).await.unwrap(),
                Claim::Acquired
            );
            let _ = log.take().await;
            assert_eq!(
                store.complete(&k, t, result.clone(), TTL).await.unwrap(),
                Fence::Held
            );
            let cmds = log.take().await;
            if n >= 2048 {
                assert_eq!(cmds, vec!["SET", "EVALSHA"], "{n}");
            } else {
                assert_eq!(cmds, vec!["EVALSHA"], "{n}");
            }
            let rkey = format!("idempotent:{}", k.as_str());
            let pttl: i64 = conn.pttl(&rkey).await.unwrap();
            assert!(
                pttl > 3_500_000 && pttl <= 3_600_000,
                "{n} {err}: pttl {pttl}"
            );
            let len: usize = conn.strlen(&rkey).await.unwrap();
            assert_eq!(len, 50 + n);
            let again = store
                .claim(&k, FencingToken::mint(), None, LEASE)
                .await
                .unwrap();
            let (tok, r, f) = result_of(&again).expect("completed");
            assert_eq!(tok, t);
            assert_eq!(r, result, "{n} {err}");
            assert_eq!(f, Some(fp), "{n} {err}");
        }
    }
    let left: Vec<String> = conn.keys("*").await.unwrap();
    assert!(
        left.iter().all(|k| !k.contains(":done:")),
        "finished keys left: {left:?}"
    );
}

/// A completion whose answer was lost, sent again while the first is in flight, from two
/// connections, many times: always Held, the first result kept, no finished key left.
/// A second completion with another result by the same token must not replace the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn review_concurrent_duplicate_large_completions() {
    let server = RedisServer::start();
    let s1 = RedisStore::connect(&server.url()).await.unwrap();
    let s2 = RedisStore::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server.url()).await;
    let fp = Fingerprint::of(&42u32).unwrap();
    for i in 0..200 {
        let k = key("dup", &i.to_string());
        let t = FencingToken::mint();
        assert_eq!(
            s1.claim(&k, t, Some(fp), LEASE).await.unwrap(),
            Claim::Acquired
        );
        let r1 = big(3000, b'1');
        let r2 = big(5000 + i, b'2');
        let (x, y) = tokio::join!(
            s1.complete(&k, t, r1.clone(), TTL),
            s2.complete(&k, t, r2.clone(), TTL)
        );
        assert_eq!(x.unwrap(), Fence::Held);
        assert_eq!(y.unwrap(), Fence::Held);
        let got = s1
            .claim(&k, FencingToken::mint(), None, LEASE)
            .await
            .unwrap();
        let (tok, r, f) = result_of(&got).expect("completed");
        assert_eq!(tok, t);
        assert!(r == r1 || r == r2, "{i}: a mixed record");
        assert_eq!(f, Some(fp), "{i}");
        // A third, later completion by the same token with another result changes nothing.
        assert_eq!(
            s2.complete(&k, t, big(9000, b'3'), TTL).await.unwrap(),
            Fence::Held
        );
        let got2 = s1
            .claim(&k, FencingToken::mint(), None, LEASE)
            .await
            .unwrap();
        assert_eq!(result_of(&got2).unwrap().1, r, "{i}: result replaced");
    }
    let left: Vec<String> = conn.keys("*:done:*").await.unwrap();
    assert!(left.is_empty(), "finished keys left: {left:?}");
}

/// A stale holder's large completion racing the new holder's claim and completion:
/// the stale one never lands, the new holder's fingerprint survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn review_stale_holder_large_completion_never_lands() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let other = RedisStore::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server.url()).await;
    let fa = Fingerprint::of("a").unwrap();
    let fb = Fingerprint::of("b").unwrap();
    for i in 0..20 {
        let k = key("stale", &i.to_string());
        let (a, b) = (FencingToken::mint(), FencingToken::mint());
        let lease = Duration::from_millis(100);
        assert_eq!(
            store.claim(&k, a, Some(fa), lease).await.unwrap(),
            Claim::Acquired
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            other.claim(&k, b, Some(fb), LEASE).await.unwrap(),
            Claim::Acquired
        );
        let (x, y) = tokio::join!(
            store.complete(&k, a, big(4096, b'a'), TTL),
            other.complete(&k, b, big(4096, b'b'), TTL)
        );
        assert_eq!(x.unwrap(), Fence::Lost);
        assert_eq!(y.unwrap(), Fence::Held);
        let got = store
            .claim(&k, FencingToken::mint(), None, LEASE)
            .await
            .unwrap();
        let (tok, r, f) = result_of(&got).unwrap();
        assert_eq!((tok, r, f), (b, big(4096, b'b'), Some(fb)));
    }
    let left: Vec<String> = conn.keys("*:done:*").await.unwrap();
    assert!(left.is_empty(), "finished keys left: {left:?}");
}

/// A proxy in front of Redis that, once armed, forwards a client's bytes up to the first
/// `EVALSHA` and then cuts the connection: the finished record's SET reaches the server,
/// its script never does. Afterwards everything passes through.
async fn cutting_proxy(upstream: u16, armed: Arc<AtomicBool>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let armed = armed.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = &buf[..n];
                    if armed.load(Ordering::SeqCst) {
                        if let Some(at) = find(chunk, b"EVALSHA") {
                            // Back up to the `*N` that starts the command.
                            let start = chunk[..at].iter().rposition(|&b| b == b'*').unwrap();
                            armed.store(false, Ordering::SeqCst);
                            let _ = sw.write_all(&chunk[..start]).await;
                            let _ = sw.flush().await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            down.abort();
                            return;
                        }
                    }
                    if sw.write_all(chunk).await.is_err() {
                        break;
                    }
                }
                down.abort();
            });
        }
    });
    port
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// The finished record's SET lands, its script does not (connection cut): the finished
/// record stays for a while. A claim of the user key `K:done:<hex>` must not read it as a
/// completed result (in the first version it replayed K's result, with no fingerprint,
/// and kept it in the local tier).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn review_cut_between_set_and_evalsha() {
    let server = RedisServer::start();
    let armed = Arc::new(AtomicBool::new(false));
    let pport = cutting_proxy(server.port(), armed.clone()).await;
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{pport}"))
        .await
        .unwrap();
    let direct = RedisStore::connect(&server.url())
        .await
        .unwrap()
        .with_local_cache(100);
    let mut conn = raw(&server.url()).await;
    let fp = Fingerprint::of("mine").unwrap();
    let k = key("cut", "K");
    let a = FencingToken::mint();
    assert_eq!(
        store.claim(&k, a, Some(fp), LEASE).await.unwrap(),
        Claim::Acquired
    );
    armed.store(true, Ordering::SeqCst);
    let first = store.complete(&k, a, big(4096, b'k'), TTL).await;
    eprintln!("first completion: {first:?}");
    let left: Vec<String> = conn.keys("*:done:*").await.unwrap();
    eprintln!("after the cut: {left:?}");
    let pttl: i64 = if let Some(f) = left.first() {
        conn.pttl(f).await.unwrap()
    } else {
        -2
    };
    eprintln!("finished key pttl: {pttl}");

    // The colliding user key, claimed now by another caller with its own fingerprint.
    let victim = key("cut", &format!("K:done:{:016x}", a.get()));
    let other_fp = Fingerprint::of("theirs").unwrap();
    let seen = direct
        .claim(&victim, FencingToken::mint(), Some(other_fp), LEASE)
        .await
        .unwrap();
    eprintln!(
        "victim claim: {:?}",
        result_of(&seen).map(|(t, r, f)| (t, r.bytes().len(), f))
    );
    eprintln!(
        "victim local tier: {:?}",
        direct.peek_completed(&victim).is_some()
    );
    assert!(
        matches!(seen, Claim::Acquired),
        "a key nobody completed replays another key's result: {:?}",
        result_of(&seen).map(|(t, r, f)| (t, r.bytes().len(), f))
    );
}

/// Same cut, no collision: the retried completion lands with the fingerprint and TTL,
/// and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn review_cut_then_retry_completes() {
    let server = RedisServer::start();
    let armed = Arc::new(AtomicBool::new(false));
    let pport = cutting_proxy(server.port(), armed.clone()).await;
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{pport}"))
        .await
        .unwrap();
    let mut conn = raw(&server.url()).await;
    let fp = Fingerprint::of("mine").unwrap();
    let k = key("cut", "K2");
    let a = FencingToken::mint();
    assert_eq!(
        store.claim(&k, a, Some(fp), LEASE).await.unwrap(),
        Claim::Acquired
    );
    armed.store(true, Ordering::SeqCst);
    let first = store.complete(&k, a, big(4096, b'k'), TTL).await;
    assert!(first.is_err(), "{first:?}");
    let again = idempotent_tests::until_ok(Duration::from_secs(10), || async {
        store.complete(&k, a, big(4096, b'k'), TTL).await
    })
    .await;
    assert_eq!(again, Fence::Held);
    let got = store
        .claim(&k, FencingToken::mint(), None, LEASE)
        .await
        .unwrap();
    let (t, r, f) = result_of(&got).unwrap();
    assert_eq!((t, r, f), (a, big(4096, b'k'), Some(fp)));
    let pttl: i64 = conn
        .pttl(format!("idempotent:{}", k.as_str()))
        .await
        .unwrap();
    assert!(pttl > 3_500_000, "{pttl}");
    let left: Vec<String> = conn.keys("*:done:*").await.unwrap();
    assert!(left.is_empty(), "finished keys left: {left:?}");
}

/// A persistent server restarted between the SET and the EVALSHA: the SET survives,
/// the scripts do not; the completion tried again loads the script and lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn review_restart_between_set_and_evalsha() {
    let mut server = RedisServer::start_persistent();
    let armed = Arc::new(AtomicBool::new(false));
    let pport = cutting_proxy(server.port(), armed.clone()).await;
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{pport}"))
        .await
        .unwrap();
    let fp = Fingerprint::of("mine").unwrap();
    let k = key("restart", "K");
    let a = FencingToken::mint();
    assert_eq!(
        store
            .claim(&k, a, Some(fp), Duration::from_secs(30))
            .await
            .unwrap(),
        Claim::Acquired
    );
    // Load the script first so the cut pipeline is the EVALSHA one.
    let w = key("restart", "warm");
    let tw = FencingToken::mint();
    store.claim(&w, tw, None, LEASE).await.unwrap();
    let _ = store.complete(&w, tw, big(4096, b'w'), TTL).await.unwrap();
    armed.store(true, Ordering::SeqCst);
    let first = store.complete(&k, a, big(4096, b'k'), TTL).await;
    assert!(first.is_err(), "{first:?}");
    server.restart();
    let mut conn = raw(&server.url()).await;
    let left: Vec<String> = conn.keys("*:done:*").await.unwrap();
    eprintln!("after restart: {left:?}");
    let again = idempotent_tests::until_ok(Duration::from_secs(20), || async {
        store.complete(&k, a, big(4096, b'k'), TTL).await
    })
    .await;
    assert_eq!(again, Fence::Held);
    let got = store
        .claim(&k, FencingToken::mint(), None, LEASE)
        .await
        .unwrap();
    let (t, r, f) = result_of(&got).unwrap();
    assert_eq!((t, r, f), (a, big(4096, b'k'), Some(fp)));
    let left: Vec<String> = conn.keys("*:done:*").await.unwrap();
    assert!(left.is_empty(), "finished keys left: {left:?}");
}

/// The local tier after a large completion: another store with a local tier replays it
/// with its fingerprint, and a mismatching fingerprint is refused by the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_local_tier_after_large_completion() {
    use idempotent_runtime::{Error, Idempotency, Outcome};
    let server = RedisServer::start();
    let writer = Idempotency::new(RedisStore::connect(&server.url()).await.unwrap());
    let reader = Idempotency::new(
        RedisStore::connect(&server.url())
            .await
            .unwrap()
            .with_local_cache(100),
    );
    let value = "z".repeat(10_000);
    let v = value.clone();
    let (got, o) = writer
        .call("k")
        .scope("local")
        .fingerprint("fp-1")
        .run_with_outcome(move || async move { Ok::<String, Error>(v) })
        .await
        .unwrap();
    assert_eq!((got.len(), o), (10_000, Outcome::Executed));
    for _ in 0..3 {
        let (got, o) = reader
            .call("k")
            .scope("local")
            .fingerprint("fp-1")
            .run_with_outcome(|| async { Ok::<String, Error>(String::new()) })
            .await
            .unwrap();
        assert_eq!((got == value, o), (true, Outcome::Replayed));
        let r = reader
            .call("k")
            .scope("local")
            .fingerprint("fp-2")
            .run_with_outcome(|| async { Ok::<String, Error>(String::new()) })
            .await;
        assert!(matches!(r, Err(Error::Mismatch)), "{r:?}");
    }
}

/// The record's TTL after a large completion is the requested one, short (below the
/// finished key's 60 s) or as long as MAX_TTL, the same as a small completion's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_large_completion_ttl_short_and_max() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server.url()).await;
    for (name, ttl) in [
        ("short", Duration::from_millis(1500)),
        ("max", idempotent_runtime::MAX_TTL),
    ] {
        for n in [2047usize, 2048] {
            let k = key("ttl", &format!("{name}-{n}"));
            let t = FencingToken::mint();
            assert_eq!(
                store.claim(&k, t, None, LEASE).await.unwrap(),
                Claim::Acquired
            );
            let r = store.complete(&k, t, big(n, b'x'), ttl).await;
            let rkey = format!("idempotent:{}", k.as_str());
            let pttl: i64 = conn.pttl(&rkey).await.unwrap();
            eprintln!("{name} {n}: {r:?} pttl {pttl}");
            assert_eq!(r.unwrap(), Fence::Held);
            let want = i64::try_from(ttl.as_millis()).unwrap();
            assert!(
                pttl <= want && pttl > want - 1000,
                "{name} {n}: {pttl} vs {want}"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(1700)).await;
    for n in [2047usize, 2048] {
        let exists: bool = conn
            .exists(format!(
                "idempotent:{}",
                key("ttl", &format!("short-{n}")).as_str()
            ))
            .await
            .unwrap();
        assert!(!exists, "{n}: outlived its TTL");
    }
}

/// Many large completions racing claims of the same keys after their lease lapses, from
/// two stores: every key ends with exactly one completed record and no finished keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn review_large_completion_storm_leaves_nothing() {
    let server = RedisServer::start();
    let s = [
        RedisStore::connect(&server.url()).await.unwrap(),
        RedisStore::connect(&server.url()).await.unwrap(),
    ];
    let mut conn = raw(&server.url()).await;
    let mut tasks = Vec::new();
    for i in 0..400usize {
        let st = s[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let k = key("storm", &(i % 50).to_string());
            let t = FencingToken::mint();
            let fp = Fingerprint::of(&(i % 50)).unwrap();
            if let Ok(Claim::Acquired) = st.claim(&k, t, Some(fp), Duration::from_millis(100)).await
            {
                tokio::time::sleep(Duration::from_millis((i % 7) as u64 * 30)).await;
                st.complete(&k, t, big(2048 + i, b'x'), TTL)
                    .await
                    .map(|f| (f, t, i))
            } else {
                Err(idempotent_runtime::StoreError::msg("not acquired"))
            }
        }));
    }
    let mut held = std::collections::HashMap::new();
    for t in tasks {
        if let Ok((Fence::Held, tok, i)) = t.await.unwrap() {
            assert!(
                held.insert(i % 50, (tok, i)).is_none(),
                "two Held for key {}",
                i % 50
            );
        }
    }
    eprintln!("keys completed: {}", held.len());
    assert!(held.len() >= 10, "{}", held.len());
    for (k, (tok, i)) in &held {
        let got = s[0]
            .claim(
                &key("storm", &k.to_string()),
                FencingToken::mint(),
                None,
                LEASE,
            )
            .await
            .unwrap();
        let (t, r, f) = result_of(&got).expect("completed");
        assert_eq!(t, *tok);
        assert_eq!(r, big(2048 + i, b'x'));
        assert_eq!(f, Some(Fingerprint::of(k).unwrap()));
    }
    let left: Vec<String> = conn.keys("*:done:*").await.unwrap();
    assert!(left.is_empty(), "finished keys left: {left:?}");
}
