//! The checks, one function each. Every one fails if the store breaks the clause of the
//! [`Store`] contract it is named for.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::store::{Claim, Fence, Store};
use idempotent_runtime::{
    Concurrency, Error, FencingToken, Fingerprint, Idempotency, Outcome, RecordState, StoreKey,
    StoredResult,
};

use crate::Harness;

const TTL: Duration = Duration::from_secs(3600);

fn key(scope: &str, name: &str) -> StoreKey {
    StoreKey::new(scope, name, 255).expect("valid test key")
}

fn fp(v: u32) -> Fingerprint {
    Fingerprint::of(&v).expect("fingerprint of an integer")
}

/// A test payload as a store holds it.
fn bytes(s: &str) -> StoredResult {
    StoredResult::Ok(s.as_bytes().to_vec().into())
}

async fn acquire<S: Store>(
    store: &S,
    k: &StoreKey,
    f: Option<Fingerprint>,
    lease: Duration,
) -> FencingToken {
    let t = FencingToken::mint();
    match store.claim(k, t, f, lease).await.expect("claim") {
        Claim::Acquired => t,
        other => panic!("expected to acquire {k:?}, got {other:?}"),
    }
}

/// Asserts that `token` still holds `k`: another claim finds it in progress, and the
/// holder then completes it.
async fn still_held_by<S: Store>(store: &S, k: &StoreKey, token: FencingToken, lease: Duration) {
    assert!(matches!(
        store
            .claim(k, FencingToken::mint(), None, lease)
            .await
            .expect("claim"),
        Claim::InProgress(_)
    ));
    assert_eq!(
        store
            .complete(k, token, bytes("1"), TTL)
            .await
            .expect("complete"),
        Fence::Held
    );
}

/// A free key is acquired, and the answer carries a token.
pub async fn claim_on_a_free_key_acquires<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "free");
    acquire(&store, &k, None, h.lease()).await;
}

/// A claim within its lease is reported, with the fingerprint it was made with.
pub async fn a_second_claim_sees_the_claim_in_progress<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "second");
    let token = acquire(&store, &k, Some(fp(1)), h.lease()).await;
    match store
        .claim(&k, FencingToken::mint(), Some(fp(2)), h.lease())
        .await
        .expect("claim")
    {
        Claim::InProgress(rec) => {
            assert_eq!(rec.fingerprint, Some(fp(1)));
            assert_eq!(rec.holder(), Some(token));
        }
        other => panic!("expected in progress, got {other:?}"),
    }
}

/// Completing by the holder stores the result, and claims then answer with it.
pub async fn complete_by_the_holder_stores_the_result<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "complete");
    let token = acquire(&store, &k, None, h.lease()).await;
    assert_eq!(
        store
            .complete(&k, token, bytes("\"r1\""), TTL)
            .await
            .expect("complete"),
        Fence::Held
    );
    match store
        .claim(&k, FencingToken::mint(), None, h.lease())
        .await
        .expect("claim")
    {
        Claim::Completed(rec) => match rec.state {
            RecordState::Completed { result, .. } => assert_eq!(result, bytes("\"r1\"")),
            other => panic!("completed claim with state {other:?}"),
        },
        other => panic!("expected completed, got {other:?}"),
    }
    // Completing again by the same token (the retry of a completion whose answer was
    // lost) is answered as held and changes nothing; by another token it is refused.
    assert_eq!(
        store
            .complete(&k, token, bytes("\"r2\""), TTL)
            .await
            .expect("complete"),
        Fence::Held
    );
    let other = FencingToken::new(token.get().wrapping_add(1000));
    assert_eq!(
        store
            .complete(&k, other, bytes("\"r3\""), TTL)
            .await
            .expect("complete"),
        Fence::Lost
    );
    match store
        .claim(&k, FencingToken::mint(), None, h.lease())
        .await
        .expect("claim")
    {
        Claim::Completed(rec) => {
            assert_eq!(rec.token(), token);
            assert!(
                matches!(rec.state, RecordState::Completed { result, .. } if result == bytes("\"r1\""))
            );
        }
        other => panic!("expected completed, got {other:?}"),
    }
}

/// The completed record keeps the fingerprint the key was claimed with.
pub async fn complete_keeps_the_fingerprint_of_the_claim<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "fp");
    let token = acquire(&store, &k, Some(fp(7)), h.lease()).await;
    let _ = store
        .complete(&k, token, bytes("1"), TTL)
        .await
        .expect("complete");
    match store
        .claim(&k, FencingToken::mint(), Some(fp(8)), h.lease())
        .await
        .expect("claim")
    {
        Claim::Completed(rec) => assert_eq!(rec.fingerprint, Some(fp(7))),
        other => panic!("expected completed, got {other:?}"),
    }
}

/// A stored error is kept apart from a stored value.
pub async fn stored_errors_come_back_as_errors<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "err");
    let token = acquire(&store, &k, None, h.lease()).await;
    let err = StoredResult::Err(b"\"declined\"".to_vec().into());
    let _ = store
        .complete(&k, token, err.clone(), TTL)
        .await
        .expect("complete");
    match store
        .claim(&k, FencingToken::mint(), None, h.lease())
        .await
        .expect("claim")
    {
        Claim::Completed(rec) => {
            assert!(matches!(rec.state, RecordState::Completed { result, .. } if result == err))
        }
        other => panic!("expected completed, got {other:?}"),
    }
}

/// Only the current token completes.
pub async fn a_stale_token_cannot_complete<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "stale");
    let token = acquire(&store, &k, None, h.lease()).await;
    let forged = FencingToken::new(token.get().wrapping_add(1000));
    assert_eq!(
        store
            .complete(&k, forged, bytes("1"), TTL)
            .await
            .expect("complete"),
        Fence::Lost
    );
    assert!(matches!(
        store
            .claim(&k, FencingToken::mint(), None, h.lease())
            .await
            .expect("claim"),
        Claim::InProgress(_)
    ));
}

/// Release by the holder frees the key at once.
pub async fn release_by_the_holder_frees_the_key<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "release");
    let first = acquire(&store, &k, None, h.lease()).await;
    assert_eq!(
        store.release(&k, first).await.expect("release"),
        Fence::Held
    );
    let second = acquire(&store, &k, None, h.lease()).await;
    assert_ne!(first, second);
}

/// Release with another token leaves the holder's claim alone.
pub async fn release_with_another_token_changes_nothing<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "release-other");
    let token = acquire(&store, &k, None, h.lease()).await;
    let other = FencingToken::new(token.get().wrapping_add(1000));
    assert_eq!(
        store.release(&k, other).await.expect("release"),
        Fence::Lost
    );
    still_held_by(&store, &k, token, h.lease()).await;
}

/// A renewed claim outlives its first lease.
pub async fn renew_keeps_a_live_claim_past_its_first_lease<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "renew");
    let lease = h.lease();
    let token = acquire(&store, &k, None, lease).await;
    // Renew every half lease: a late timer on a loaded machine still lands in time.
    for _ in 0..4 {
        h.advance(lease / 2).await;
        assert_eq!(
            store.renew(&k, token, lease).await.expect("renew"),
            Fence::Held
        );
    }
    // Two full leases have passed since the claim; it still holds.
    still_held_by(&store, &k, token, lease).await;
}

/// A renewal sets the whole lease it is given, from when it is made, whatever lease the
/// claim was made with: a store that kept less (a part of it, or the claim's first lease)
/// would let a live holder's key lapse under it, and a duplicate run beside it.
pub async fn a_renewal_sets_the_whole_lease_it_is_given<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "renew-length");
    let lease = h.lease();
    let token = acquire(&store, &k, None, lease).await;
    let longer = lease * 4;
    assert_eq!(
        store.renew(&k, token, longer).await.expect("renew"),
        Fence::Held
    );
    let found = store
        .inspect(&k)
        .await
        .expect("inspect")
        .expect("a claim in progress is a live record");
    // A whole lease of slack for the time between the renewal and the look.
    assert!(
        found.time_left > lease * 3 && found.time_left <= longer,
        "renewed for {longer:?}, {:?} left",
        found.time_left
    );
    // Past the claim's first lease, the renewed one holds.
    h.advance(lease + lease / 2).await;
    still_held_by(&store, &k, token, lease).await;
}

/// After its lease a claim is taken over with a new token; the old holder can then
/// neither complete, renew nor release.
pub async fn an_expired_lease_is_taken_over_and_the_old_holder_is_fenced<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "takeover");
    let lease = h.lease();
    let old = acquire(&store, &k, Some(fp(1)), lease).await;
    h.advance(lease + lease / 4).await;
    let new = acquire(&store, &k, Some(fp(1)), lease).await;
    assert_ne!(new, old);
    assert_eq!(
        store
            .complete(&k, old, bytes("\"old\""), TTL)
            .await
            .expect("complete"),
        Fence::Lost
    );
    assert_eq!(
        store.renew(&k, old, lease).await.expect("renew"),
        Fence::Lost
    );
    assert_eq!(store.release(&k, old).await.expect("release"), Fence::Lost);
    assert_eq!(
        store
            .complete(&k, new, bytes("\"new\""), TTL)
            .await
            .expect("complete"),
        Fence::Held
    );
    match store
        .claim(&k, FencingToken::mint(), None, lease)
        .await
        .expect("claim")
    {
        Claim::Completed(rec) => assert!(
            matches!(rec.state, RecordState::Completed { result, .. } if result == bytes("\"new\""))
        ),
        other => panic!("expected completed, got {other:?}"),
    }
}

/// A claim whose lease ran out cannot be renewed back to life, even if nobody took it.
pub async fn a_lapsed_claim_cannot_be_renewed<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "lapsed");
    let lease = h.lease();
    let token = acquire(&store, &k, None, lease).await;
    h.advance(lease + lease / 4).await;
    assert_eq!(
        store.renew(&k, token, lease).await.expect("renew"),
        Fence::Lost
    );
    assert_eq!(
        store
            .complete(&k, token, bytes("1"), TTL)
            .await
            .expect("complete"),
        Fence::Lost
    );
}

/// A result is forgotten after its TTL, and the key is new again.
pub async fn results_expire_after_their_ttl<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "ttl");
    let ttl = h.lease();
    let token = acquire(&store, &k, None, ttl).await;
    let _ = store
        .complete(&k, token, bytes("1"), ttl)
        .await
        .expect("complete");
    h.advance(ttl / 2).await;
    assert!(matches!(
        store
            .claim(&k, FencingToken::mint(), None, ttl)
            .await
            .expect("claim"),
        Claim::Completed(_)
    ));
    h.advance(ttl / 2 + ttl / 4).await;
    acquire(&store, &k, None, ttl).await;
}

/// A claim keeps the token it was made with, and so does the result completed by it.
pub async fn a_claim_keeps_the_token_it_was_made_with<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "token");
    let token = acquire(&store, &k, None, h.lease()).await;
    match store
        .claim(&k, FencingToken::mint(), None, h.lease())
        .await
        .expect("claim")
    {
        Claim::InProgress(rec) => assert_eq!(rec.holder(), Some(token)),
        other => panic!("expected in progress, got {other:?}"),
    }
    let _ = store
        .complete(&k, token, bytes("1"), TTL)
        .await
        .expect("complete");
    match store
        .claim(&k, FencingToken::mint(), None, h.lease())
        .await
        .expect("claim")
    {
        Claim::Completed(rec) => assert_eq!(rec.token(), token),
        other => panic!("expected completed, got {other:?}"),
    }
}

/// Equal keys in two scopes are two keys.
pub async fn scopes_keep_equal_keys_apart<H: Harness>(h: &H) {
    let store = h.store().await;
    let a = key("conf-a", "same");
    let b = key("conf-b", "same");
    let ta = acquire(&store, &a, None, h.lease()).await;
    acquire(&store, &b, None, h.lease()).await;
    let _ = store
        .complete(&a, ta, bytes("1"), TTL)
        .await
        .expect("complete");
    assert!(matches!(
        store
            .claim(&b, FencingToken::mint(), None, h.lease())
            .await
            .expect("claim"),
        Claim::InProgress(_)
    ));
}

/// `peek_completed` shows a completed result or nothing, never a claim.
pub async fn peek_never_shows_a_claim_in_progress<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "peek");
    let token = acquire(&store, &k, None, h.lease()).await;
    assert_eq!(store.peek_completed(&k), None);
    let _ = store
        .complete(&k, token, bytes("1"), TTL)
        .await
        .expect("complete");
    if let Some(rec) = store.peek_completed(&k) {
        assert!(matches!(rec.state, RecordState::Completed { .. }));
    }
}

/// Of many concurrent claims on one free key, exactly one acquires.
pub async fn concurrent_claims_acquire_once<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "race");
    let lease = h.lease();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let store = store.clone();
            let k = k.clone();
            tokio::spawn(async move {
                store
                    .claim(&k, FencingToken::mint(), None, lease)
                    .await
                    .expect("claim")
            })
        })
        .collect();
    let mut acquired = 0;
    for t in tasks {
        if matches!(t.await.expect("task"), Claim::Acquired) {
            acquired += 1;
        }
    }
    assert_eq!(acquired, 1);
}

/// Two engines on one store (as two processes would be), 100 concurrent callers split
/// between them: one execution, one value for all.
pub async fn two_engines_execute_once_under_concurrent_callers<H: Harness>(h: &H) {
    let store = h.store().await;
    let engines = [Idempotency::new(store.clone()), Idempotency::new(store)];
    let runs = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let idem = engines[i % 2].clone();
            let runs = runs.clone();
            tokio::spawn(async move {
                idem.call("two-engines")
                    .scope("conf")
                    .run(|| async move {
                        let n = runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, Error>(format!("value-{n}"))
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task").expect("call"), "value-0");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A body that runs three times its lease keeps its key through renewal: duplicates sent
/// to a second engine all the while never run it again.
pub async fn a_body_three_times_its_lease_runs_once_while_duplicates_arrive<H: Harness>(h: &H) {
    let store = h.real_time_store().await;
    // Long enough that a loaded machine's scheduling delays and the store's stalls stay
    // well inside one lease, as they must in production: the heartbeat runs every third
    // of it.
    let lease = h.real_time_lease();
    let holder = Idempotency::builder()
        .store(store.clone())
        .lease(lease)
        .build()
        .expect("engine");
    let other = Idempotency::builder()
        .store(store)
        .lease(lease)
        .build()
        .expect("engine");
    let runs = Arc::new(AtomicU32::new(0));
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let entered_tx = Arc::new(std::sync::Mutex::new(Some(entered_tx)));
    let op = |runs: Arc<AtomicU32>| {
        let entered_tx = entered_tx.clone();
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let tx = entered_tx.lock().map(|mut g| g.take()).unwrap_or(None);
            if let Some(tx) = tx {
                let _ = tx.send(tokio::time::Instant::now());
            }
            tokio::time::sleep(lease * 3).await;
            Ok::<_, Error>(7u32)
        }
    };
    let first = {
        let holder = holder.clone();
        let op = op(runs.clone());
        tokio::spawn(async move { holder.call("long").scope("conf").run_with_outcome(op).await })
    };
    // Duplicates start once the holder is inside its body, and stop half a lease before
    // it ends, so each one meets the claim in progress, never a free or completed key.
    let started = entered.await.expect("the holder enters its body");
    let mut rejected = 0;
    let deadline = started + lease * 3 - lease / 2;
    while tokio::time::Instant::now() < deadline {
        let dup = other
            .call("long")
            .scope("conf")
            .concurrency(Concurrency::Reject)
            .run(op(runs.clone()))
            .await;
        assert!(
            matches!(dup, Err(Error::InProgress)),
            "duplicate got {dup:?}"
        );
        rejected += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(rejected > 10, "only {rejected} duplicates were sent");
    // A waiting duplicate gets the holder's value.
    let waited = other
        .call("long")
        .scope("conf")
        .run(op(runs.clone()))
        .await
        .expect("wait");
    assert_eq!(waited, 7);
    assert_eq!(
        first.await.expect("task").expect("call"),
        (7, Outcome::Executed)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(holder.stats().lease_lost, 0);
}

/// A holder that stops being polled (a crashed process, in effect) stops renewing; its
/// key is free again within one lease of its last renewal.
pub async fn a_holder_that_stops_renewing_frees_its_key_within_one_lease<H: Harness>(h: &H) {
    let store = h.store().await;
    let lease = h.lease();
    let crashed = Idempotency::builder()
        .store(store.clone())
        .lease(lease)
        .build()
        .expect("engine");
    let other = Idempotency::builder()
        .store(store)
        .lease(lease)
        .build()
        .expect("engine");
    let entered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut holder = Box::pin(crashed.call("crash").scope("conf").run(|| {
        let entered = entered.clone();
        async move {
            entered.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
            Ok::<_, Error>(0u32)
        }
    }));
    // Poll the holder until it has claimed the key and entered the body, then never again.
    let polling = tokio::time::Instant::now();
    while !entered.load(Ordering::SeqCst) {
        assert!(
            polling.elapsed() < Duration::from_secs(10),
            "the holder never entered its body"
        );
        let step = tokio::time::timeout(Duration::from_millis(5), &mut holder).await;
        assert!(step.is_err(), "the holder's body never returns");
    }
    let dup = other
        .call("crash")
        .scope("conf")
        .concurrency(Concurrency::Reject)
        .run(|| async { Ok::<_, Error>(1u32) })
        .await;
    assert!(
        matches!(dup, Err(Error::InProgress)),
        "the claim holds at first: {dup:?}"
    );
    h.advance(lease + lease / 10).await;
    let (v, how) = other
        .call("crash")
        .scope("conf")
        .concurrency(Concurrency::Reject)
        .run_with_outcome(|| async { Ok::<_, Error>(1u32) })
        .await
        .expect("the key is free again");
    assert_eq!((v, how), (1, Outcome::Executed));
    std::mem::forget(holder);
}

/// A key never used shows nothing, and forgetting it deletes nothing.
pub async fn an_absent_key_is_neither_inspected_nor_forgotten<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "absent");
    assert_eq!(store.inspect(&k).await.expect("inspect"), None);
    assert!(!store.forget(&k).await.expect("forget"));
    assert_eq!(store.inspect(&k).await.expect("inspect"), None);
}

/// A claim in progress shows as such: its holder, its fingerprint, and the lease it has
/// left (some, and no more than it was given).
pub async fn inspect_shows_a_claim_in_progress_and_its_lease<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "inspect-claim");
    let lease = h.lease();
    let token = acquire(&store, &k, Some(fp(3)), lease).await;
    let found = store
        .inspect(&k)
        .await
        .expect("inspect")
        .expect("a claim in progress is a live record");
    assert_eq!(found.record.holder(), Some(token));
    assert_eq!(found.record.fingerprint, Some(fp(3)));
    assert!(
        !found.time_left.is_zero() && found.time_left <= lease,
        "lease left {:?} of {lease:?}",
        found.time_left
    );
    // Looking changes nothing: the holder completes as before.
    assert_eq!(
        store
            .complete(&k, token, bytes("1"), TTL)
            .await
            .expect("complete"),
        Fence::Held
    );
}

/// A completed key shows its result, the token that completed it, the fingerprint it was
/// claimed with, and the TTL it has left (some, and no more than it was given).
pub async fn inspect_shows_a_result_and_its_ttl_left<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "inspect-result");
    let token = acquire(&store, &k, Some(fp(4)), h.lease()).await;
    let _ = store
        .complete(&k, token, bytes("\"shown\""), TTL)
        .await
        .expect("complete");
    let found = store
        .inspect(&k)
        .await
        .expect("inspect")
        .expect("a result within its TTL is a live record");
    assert_eq!(found.record.token(), token);
    assert_eq!(found.record.fingerprint, Some(fp(4)));
    assert!(
        matches!(&found.record.state, RecordState::Completed { result, .. } if *result == bytes("\"shown\"")),
        "{:?}",
        found.record
    );
    assert!(
        !found.time_left.is_zero() && found.time_left <= TTL,
        "TTL left {:?} of {TTL:?}",
        found.time_left
    );
    // A stored error shows as one.
    let e = key("conf", "inspect-error");
    let token = acquire(&store, &e, None, h.lease()).await;
    let err = StoredResult::Err(b"\"declined\"".to_vec().into());
    let _ = store
        .complete(&e, token, err.clone(), TTL)
        .await
        .expect("complete");
    let found = store.inspect(&e).await.expect("inspect").expect("stored");
    assert!(matches!(found.record.state, RecordState::Completed { result, .. } if result == err));
}

/// A forgotten result is gone: nothing to inspect, nothing to peek at, and the next claim
/// acquires the key. Forgetting it again deletes nothing.
pub async fn a_forgotten_result_is_claimed_afresh<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "forget-result");
    let first = acquire(&store, &k, None, h.lease()).await;
    let _ = store
        .complete(&k, first, bytes("1"), TTL)
        .await
        .expect("complete");
    // A claim of the completed key (which puts it in a store's local tier, if it has one).
    assert!(matches!(
        store
            .claim(&k, FencingToken::mint(), None, h.lease())
            .await
            .expect("claim"),
        Claim::Completed(_)
    ));
    assert!(store.forget(&k).await.expect("forget"));
    assert_eq!(store.inspect(&k).await.expect("inspect"), None);
    assert_eq!(store.peek_completed(&k), None);
    assert!(!store.forget(&k).await.expect("forget again"));
    let second = acquire(&store, &k, None, h.lease()).await;
    assert_ne!(second, first);
    // The first holder's completion, retried, does not bring its result back.
    assert_eq!(
        store
            .complete(&k, first, bytes("1"), TTL)
            .await
            .expect("complete"),
        Fence::Lost
    );
}

/// Forgetting a claim in progress frees the key, and fences its holder as a lapsed lease
/// does: it can no longer renew, complete (its result is not written over the forgotten
/// key, nor over the claim of the caller that took the key next) or release.
pub async fn a_forgotten_claim_fences_its_holder<H: Harness>(h: &H) {
    let store = h.store().await;
    let k = key("conf", "forget-claim");
    let lease = h.lease();
    let old = acquire(&store, &k, None, lease).await;
    assert!(store.forget(&k).await.expect("forget"));
    assert_eq!(store.inspect(&k).await.expect("inspect"), None);
    // With nobody on the key since: not resurrected.
    assert_eq!(
        store.renew(&k, old, lease).await.expect("renew"),
        Fence::Lost
    );
    assert_eq!(
        store
            .complete(&k, old, bytes("\"old\""), TTL)
            .await
            .expect("complete"),
        Fence::Lost
    );
    assert_eq!(store.inspect(&k).await.expect("inspect"), None);
    // With a new holder: its claim stands.
    let new = acquire(&store, &k, None, lease).await;
    assert_ne!(new, old);
    assert_eq!(
        store
            .complete(&k, old, bytes("\"old\""), TTL)
            .await
            .expect("complete"),
        Fence::Lost
    );
    assert_eq!(store.release(&k, old).await.expect("release"), Fence::Lost);
    let found = store.inspect(&k).await.expect("inspect").expect("claimed");
    assert_eq!(found.record.holder(), Some(new));
    assert_eq!(
        store
            .complete(&k, new, bytes("\"new\""), TTL)
            .await
            .expect("complete"),
        Fence::Held
    );
    let found = store.inspect(&k).await.expect("inspect").expect("stored");
    assert!(
        matches!(found.record.state, RecordState::Completed { result, .. } if result == bytes("\"new\""))
    );
}

/// A claim past its lease and a result past its TTL are not shown, and forgetting them
/// answers that nothing live was there.
pub async fn expired_records_are_neither_inspected_nor_forgotten<H: Harness>(h: &H) {
    let store = h.store().await;
    let lease = h.lease();
    let claimed = key("conf", "expired-claim");
    let completed = key("conf", "expired-result");
    acquire(&store, &claimed, None, lease).await;
    let token = acquire(&store, &completed, None, lease).await;
    let _ = store
        .complete(&completed, token, bytes("1"), lease)
        .await
        .expect("complete");
    h.advance(lease + lease / 4).await;
    for k in [&claimed, &completed] {
        assert_eq!(store.inspect(k).await.expect("inspect"), None, "{k:?}");
        assert!(!store.forget(k).await.expect("forget"), "{k:?}");
        acquire(&store, k, None, lease).await;
    }
}

/// Through the engine, on the store: `record` shows a call's result under the scope and key
/// the call used, and after `forget` the next call runs the operation again.
pub async fn an_engine_runs_a_forgotten_key_again<H: Harness>(h: &H) {
    let store = h.store().await;
    let idem = Idempotency::new(store);
    let runs = Arc::new(AtomicU32::new(0));
    let call = || {
        let runs = runs.clone();
        idem.call("order-9")
            .scope("conf.forget")
            .run_with_outcome(move || async move {
                Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst) + 100)
            })
    };
    assert_eq!(call().await.expect("call"), (100, Outcome::Executed));
    assert_eq!(call().await.expect("call"), (100, Outcome::Replayed));
    let rec = idem
        .record("conf.forget", "order-9")
        .await
        .expect("record")
        .expect("stored");
    assert!(rec.is_completed());
    assert_eq!(rec.value::<u32>().expect("decodes"), Some(100));
    assert!(!rec.time_left().is_zero() && rec.time_left() <= idempotent_runtime::DEFAULT_TTL);
    assert!(idem.forget("conf.forget", "order-9").await.expect("forget"));
    assert!(idem
        .record("conf.forget", "order-9")
        .await
        .expect("record")
        .is_none());
    assert_eq!(call().await.expect("call"), (101, Outcome::Executed));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
