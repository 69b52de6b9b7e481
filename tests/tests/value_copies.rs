//! Hits of a `Clone` value through the attribute clone a typed copy kept beside the
//! record instead of decoding it. Each test counts decodes and clones with a type of its
//! own, so a copy that was never kept, kept for the wrong record, or outlived its record
//! shows in the counts or the values.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idempotent_runtime::clock::ManualClock;
use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{idempotent, CodecErrorKind, Error, Idempotency};
use idempotent_tests::RedisHarness;
use serde::{Deserialize, Serialize};

/// A value type that counts its decodes and clones, in statics of its own.
macro_rules! counted {
    ($name:ident) => {
        #[derive(Debug, PartialEq, Serialize)]
        struct $name {
            id: u32,
            note: String,
        }

        impl $name {
            fn decodes() -> u32 {
                counts::$name.0.load(Ordering::SeqCst)
            }
            #[allow(dead_code)]
            fn clones() -> u32 {
                counts::$name.1.load(Ordering::SeqCst)
            }
        }

        impl Clone for $name {
            fn clone(&self) -> Self {
                counts::$name.1.fetch_add(1, Ordering::SeqCst);
                $name {
                    id: self.id,
                    note: self.note.clone(),
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                struct Raw {
                    id: u32,
                    note: String,
                }
                let raw = Raw::deserialize(d)?;
                counts::$name.0.fetch_add(1, Ordering::SeqCst);
                Ok($name {
                    id: raw.id,
                    note: raw.note,
                })
            }
        }
    };
}

#[allow(non_upper_case_globals)]
mod counts {
    use std::sync::atomic::AtomicU32;
    type Pair = (AtomicU32, AtomicU32);
    macro_rules! pairs {
        ($($name:ident),*) => {$(
            pub static $name: Pair = (AtomicU32::new(0), AtomicU32::new(0));
        )*};
    }
    pairs!(
        Plain,
        Finish,
        Expiring,
        Shared,
        Fingerprinted,
        Threads,
        RedisLocal,
        RedisOnly
    );
}

counted!(Plain);
counted!(Finish);
counted!(Expiring);
counted!(Shared);
counted!(Fingerprinted);
counted!(Threads);
counted!(RedisLocal);
counted!(RedisOnly);

static RUNS: AtomicU32 = AtomicU32::new(0);

fn next() -> u32 {
    RUNS.fetch_add(1, Ordering::SeqCst)
}

#[idempotent(key = k, store = idem, scope = "plain")]
async fn plain(idem: &Idempotency, k: u32) -> Result<Plain, Error> {
    Ok(Plain {
        id: next(),
        note: "n".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_hit_decodes_and_later_hits_clone_its_copy() {
    let idem = Idempotency::memory();
    let first = plain(&idem, 1).await.unwrap();
    // The completion's fidelity check decodes once.
    assert_eq!(Plain::decodes(), 1);
    let clones = Plain::clones();
    assert_eq!(plain(&idem, 1).await.unwrap(), first);
    assert_eq!(Plain::decodes(), 2, "the first hit decodes");
    assert_eq!(
        Plain::clones(),
        clones + 1,
        "and keeps a copy of what it decoded"
    );
    for _ in 0..10 {
        assert_eq!(plain(&idem, 1).await.unwrap(), first);
    }
    assert_eq!(Plain::decodes(), 2, "later hits decode nothing");
    assert_eq!(Plain::clones(), clones + 11, "each later hit is a clone");
    assert_eq!(idem.stats().replayed, 11);
    assert_eq!(idem.stats().executed, 1);
}

#[idempotent(key = k, store = idem, scope = "finish", on_cancel = "finish")]
async fn finish(idem: &Idempotency, k: u32) -> Result<Finish, Error> {
    Ok(Finish {
        id: next(),
        note: "n".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_to_completion_hits_clone_too() {
    let idem = Idempotency::memory();
    let first = finish(&idem, 1).await.unwrap();
    for _ in 0..5 {
        assert_eq!(finish(&idem, 1).await.unwrap(), first);
    }
    assert_eq!(Finish::decodes(), 2, "the fidelity check and the first hit");
}

#[idempotent(key = k, store = idem, scope = "expiring", ttl = "1h")]
async fn expiring(idem: &Idempotency, k: u32) -> Result<Expiring, Error> {
    Ok(Expiring {
        id: next(),
        note: "n".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_leaves_with_its_record() {
    let clock = ManualClock::new();
    let idem = Idempotency::new(MemoryStore::builder().clock(clock.clone()).build());
    let first = expiring(&idem, 1).await.unwrap();
    assert_eq!(expiring(&idem, 1).await.unwrap(), first);
    assert_eq!(expiring(&idem, 1).await.unwrap(), first);
    clock.advance(Duration::from_secs(61 * 60));
    let second = expiring(&idem, 1).await.unwrap();
    assert_ne!(second, first, "after the TTL the key runs again");
    assert_eq!(idem.stats().executed, 2);
    let decodes = Expiring::decodes();
    assert_eq!(expiring(&idem, 1).await.unwrap(), second);
    assert_eq!(
        expiring(&idem, 1).await.unwrap(),
        second,
        "not the old copy"
    );
    assert_eq!(
        Expiring::decodes(),
        decodes + 1,
        "the new record's first hit"
    );
}

#[idempotent(key = k, store = idem, scope = "shared")]
async fn shared_clone(idem: &Idempotency, k: u32) -> Result<Shared, Error> {
    Ok(Shared {
        id: next(),
        note: "n".into(),
    })
}

/// The same scope, another value type: not `Clone`, and not the copy's.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct SameShape {
    id: u32,
    note: String,
}

#[idempotent(key = k, store = idem, scope = "shared")]
async fn shared_same_shape(idem: &Idempotency, k: u32) -> Result<SameShape, Error> {
    Ok(SameShape {
        id: next(),
        note: "other".into(),
    })
}

#[idempotent(key = k, store = idem, scope = "shared")]
async fn shared_number(idem: &Idempotency, k: u32) -> Result<u64, Error> {
    Ok(u64::from(next()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_of_another_type_decodes_as_without_a_copy() {
    let idem = Idempotency::memory();
    let first = shared_clone(&idem, 1).await.unwrap();
    shared_clone(&idem, 1).await.unwrap();
    // The copy is kept; a caller of another type still reads the record.
    let same = shared_same_shape(&idem, 1).await.unwrap();
    assert_eq!((same.id, same.note.as_str()), (first.id, "n"));
    match shared_number(&idem, 1).await {
        Err(Error::Codec(e)) => assert_eq!(e.kind(), CodecErrorKind::Decode),
        other => panic!("another type must fail to decode, got {other:?}"),
    }
    // And the copy is still this type's.
    let decodes = Shared::decodes();
    assert_eq!(shared_clone(&idem, 1).await.unwrap(), first);
    assert_eq!(Shared::decodes(), decodes);
    // A `u64` is `Clone` too: its failed decode kept no copy, and it fails again.
    assert!(shared_number(&idem, 1).await.is_err());
    assert_eq!(idem.stats().executed, 1);
}

#[idempotent(key = k, store = idem, scope = "fingerprinted", fingerprint = cents)]
async fn fingerprinted(idem: &Idempotency, k: u32, cents: u64) -> Result<Fingerprinted, Error> {
    Ok(Fingerprinted {
        id: next(),
        note: cents.to_string(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_is_refused_to_another_payload() {
    let idem = Idempotency::memory();
    let first = fingerprinted(&idem, 1, 500).await.unwrap();
    assert_eq!(fingerprinted(&idem, 1, 500).await.unwrap(), first);
    assert_eq!(fingerprinted(&idem, 1, 500).await.unwrap(), first);
    let decodes = Fingerprinted::decodes();
    assert!(matches!(
        fingerprinted(&idem, 1, 900).await,
        Err(Error::Mismatch)
    ));
    assert_eq!(Fingerprinted::decodes(), decodes);
    assert_eq!(idem.stats().mismatched, 1);
}

#[idempotent(key = k, store = idem, scope = "threads")]
async fn threads(idem: &Idempotency, k: u32) -> Result<Threads, Error> {
    Ok(Threads {
        id: next(),
        note: "n".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_hits_decode_at_most_once_each_before_a_copy_lands() {
    let idem = Idempotency::memory();
    let first = threads(&idem, 1).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let idem = idem.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..100 {
                    seen.push(threads(&idem, 1).await.unwrap());
                }
                seen
            })
        })
        .collect();
    for task in tasks {
        for value in task.await.unwrap() {
            assert_eq!(value, first);
        }
    }
    // One decode in the fidelity check, then at most one per task: a task's hit after
    // its own first one finds a copy (its own, or another's kept first).
    let decodes = Threads::decodes();
    assert!((2..=9).contains(&decodes), "{decodes} decodes");
    assert_eq!(idem.stats().executed, 1);
    assert_eq!(idem.stats().replayed, 800);
}

#[idempotent(key = k, store = idem, scope = "redis-local")]
async fn redis_local(idem: &Idempotency, k: u32) -> Result<RedisLocal, Error> {
    Ok(RedisLocal {
        id: next(),
        note: "n".into(),
    })
}

#[idempotent(key = k, store = idem, scope = "redis-only")]
async fn redis_only(idem: &Idempotency, k: u32) -> Result<RedisOnly, Error> {
    Ok(RedisOnly {
        id: next(),
        note: "n".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_local_tier_keeps_copies_and_redis_alone_does_not() {
    let harness = RedisHarness::new();
    let idem = Idempotency::new(harness.fresh_store().await.with_local_cache(100));
    let first = redis_local(&idem, 1).await.unwrap();
    // The fidelity check; the hit that fetched the record from Redis (and put it in
    // the local tier); the first hit on the local tier, which keeps a copy.
    for _ in 0..10 {
        assert_eq!(redis_local(&idem, 1).await.unwrap(), first);
    }
    assert_eq!(RedisLocal::decodes(), 3);

    let idem = Idempotency::new(harness.fresh_store().await);
    let first = redis_only(&idem, 1).await.unwrap();
    for _ in 0..10 {
        assert_eq!(redis_only(&idem, 1).await.unwrap(), first);
    }
    assert_eq!(
        RedisOnly::decodes(),
        11,
        "without a local tier every hit decodes"
    );
}
