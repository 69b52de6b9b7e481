//! Completed keys replay their stored result; errors are stored only when asked; keys,
//! scopes and settings are checked before anything runs.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{
    CodecErrorKind, ConfigError, Error, Idempotency, KeyError, Outcome, DEFAULT_LEASE, DEFAULT_TTL,
    MAX_TTL, MIN_LEASE, MIN_TTL,
};
use idempotent_tests::FaultyStore;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    id: String,
    cents: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum PayError {
    Declined(String),
    Engine(String),
}

impl From<Error> for PayError {
    fn from(e: Error) -> Self {
        PayError::Engine(e.to_string())
    }
}

fn counter() -> Arc<AtomicU32> {
    Arc::new(AtomicU32::new(0))
}

async fn pay(
    idem: &Idempotency,
    key: &str,
    runs: &Arc<AtomicU32>,
) -> Result<(Receipt, Outcome), Error> {
    let runs = runs.clone();
    idem.call(key)
        .scope("payments")
        .run_with_outcome(|| async move {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            Ok(Receipt {
                id: format!("pay_{n}"),
                cents: 1250,
            })
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_runs_and_a_retry_replays_the_stored_value() {
    let idem = Idempotency::memory();
    let runs = counter();
    let (first, how) = pay(&idem, "order-1", &runs).await.unwrap();
    assert_eq!(how, Outcome::Executed);
    for _ in 0..3 {
        let (again, how) = pay(&idem, "order-1", &runs).await.unwrap();
        assert_eq!((again, how), (first.clone(), Outcome::Replayed));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let stats = idem.stats();
    assert_eq!((stats.executed, stats.replayed), (1, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_a_local_tier_replays_through_its_claim() {
    let idem = Idempotency::new(FaultyStore::new(MemoryStore::new()).without_peek());
    let runs = counter();
    let (first, _) = pay(&idem, "order-1", &runs).await.unwrap();
    let (again, how) = pay(&idem, "order-1", &runs).await.unwrap();
    assert_eq!((again, how), (first, Outcome::Replayed));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_not_stored_by_default_so_a_retry_runs_again() {
    let idem = Idempotency::memory();
    let runs = counter();
    for expected_runs in 1..=2 {
        let runs2 = runs.clone();
        let r: Result<u32, PayError> = idem
            .call("order-2")
            .scope("payments")
            .run(|| async move {
                runs2.fetch_add(1, Ordering::SeqCst);
                Err(PayError::Declined("insufficient funds".into()))
            })
            .await;
        assert_eq!(r, Err(PayError::Declined("insufficient funds".into())));
        assert_eq!(runs.load(Ordering::SeqCst), expected_runs);
    }
    // The key is free: a success now runs and is stored.
    let ok: Result<u32, PayError> = idem
        .call("order-2")
        .scope("payments")
        .run(|| async { Ok(5) })
        .await;
    assert_eq!(ok, Ok(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_errors_are_replayed_without_running_again() {
    let idem = Idempotency::memory();
    let runs = counter();
    for _ in 0..3 {
        let runs2 = runs.clone();
        let r: Result<u32, PayError> = idem
            .call("order-3")
            .scope("payments")
            .store_errors()
            .run(|| async move {
                runs2.fetch_add(1, Ordering::SeqCst);
                Err(PayError::Declined("card expired".into()))
            })
            .await;
        assert_eq!(r, Err(PayError::Declined("card expired".into())));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // A call that does not store errors cannot decode one, and says so; it does not run.
    let r: Result<u32, Error> = idem
        .call("order-3")
        .scope("payments")
        .run(|| async { Ok(1) })
        .await;
    match r {
        Err(Error::Codec(e)) => assert_eq!(e.kind(), CodecErrorKind::UnexpectedStoredError),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_keys_in_two_scopes_are_two_keys() {
    let idem = Idempotency::memory();
    let a: u32 = idem
        .call("42")
        .scope("charge")
        .run(|| async { Ok::<_, Error>(1) })
        .await
        .unwrap();
    let b: u32 = idem
        .call("42")
        .scope("refund")
        .run(|| async { Ok::<_, Error>(2) })
        .await
        .unwrap();
    assert_eq!((a, b), (1, 2));
    assert_eq!(idem.stats().executed, 2);
}

async fn charge(idem: &Idempotency, key: u64) -> Result<String, Error> {
    idem.run(key, || async { Ok("charged".to_owned()) }).await
}

async fn refund(idem: &Idempotency, key: u64) -> Result<String, Error> {
    idem.run(key, || async { Ok("refunded".to_owned()) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_scope_keeps_two_functions_apart() {
    let idem = Idempotency::memory();
    assert_eq!(charge(&idem, 7).await.unwrap(), "charged");
    assert_eq!(refund(&idem, 7).await.unwrap(), "refunded");
    assert_eq!(charge(&idem, 7).await.unwrap(), "charged");
    assert_eq!(idem.stats().executed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_any_display_type_work() {
    let idem = Idempotency::memory();
    let n: u32 = idem
        .call(17u64)
        .scope("s")
        .run(|| async { Ok::<_, Error>(1) })
        .await
        .unwrap();
    // The key is its text: "17" the string is the same key as 17 the integer.
    let m: u32 = idem
        .call("17")
        .scope("s")
        .run(|| async { Ok::<_, Error>(2) })
        .await
        .unwrap();
    assert_eq!((n, m), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_and_settings_are_refused_before_anything_runs() {
    let idem = Idempotency::memory();
    let runs = counter();
    let op = || {
        let runs = runs.clone();
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<u32, Error>(1)
        }
    };
    let empty = idem.call("").scope("s").run(op()).await;
    assert!(
        matches!(empty, Err(Error::InvalidKey(KeyError::Empty))),
        "{empty:?}"
    );
    let long = idem.call("k".repeat(256)).scope("s").run(op()).await;
    assert!(
        matches!(
            long,
            Err(Error::InvalidKey(KeyError::TooLong { len: 256, max: 255 }))
        ),
        "{long:?}"
    );
    let scope = idem.call("k").scope("a|b").run(op()).await;
    assert!(
        matches!(
            scope,
            Err(Error::InvalidKey(KeyError::ReservedCharInScope { .. }))
        ),
        "{scope:?}"
    );
    // TTLs and leases a store cannot hold, or too short to keep a claim, are refused
    // where they are set, before anything runs.
    use std::time::Duration;
    let refused = |got: Result<u32, Error>| match got {
        Err(Error::Config(e)) => e,
        other => panic!("expected a config error, got {other:?}"),
    };
    for (ttl, lease) in [
        (Duration::ZERO, DEFAULT_LEASE),
        (Duration::MAX, DEFAULT_LEASE),
        (MAX_TTL + Duration::from_secs(1), DEFAULT_LEASE),
        (DEFAULT_TTL, Duration::ZERO),
        (DEFAULT_TTL, Duration::from_millis(1)),
        (DEFAULT_TTL, MIN_LEASE - Duration::from_millis(1)),
        (DEFAULT_TTL, Duration::MAX),
    ] {
        let call = idem.call("k").scope("s").ttl(ttl).lease(lease);
        let e = refused(call.run(op()).await);
        let built = Idempotency::builder().ttl(ttl).lease(lease).build();
        assert!(
            matches!(&built, Err(Error::Config(b)) if *b == e),
            "{built:?}"
        );
        let expected = if ttl < MIN_TTL {
            ConfigError::TtlTooShort {
                got: ttl,
                min: MIN_TTL,
            }
        } else if ttl > MAX_TTL {
            ConfigError::TtlTooLong {
                got: ttl,
                max: MAX_TTL,
            }
        } else if lease < MIN_LEASE {
            ConfigError::LeaseTooShort {
                got: lease,
                min: MIN_LEASE,
            }
        } else {
            ConfigError::LeaseTooLong {
                got: lease,
                max: MAX_TTL,
            }
        };
        assert_eq!(e, expected);
    }
    // The limits themselves are accepted, and stored by the store.
    let (v, how) = idem
        .call("limits")
        .scope("s")
        .ttl(MAX_TTL)
        .lease(MIN_LEASE)
        .run_with_outcome(op())
        .await
        .unwrap();
    assert_eq!((v, how), (1, Outcome::Executed));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let short = Idempotency::builder().max_key_len(4).build().unwrap();
    assert!(short.call("12345").scope("s").run(op()).await.is_err());
    assert!(short.call("1234").scope("s").run(op()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_value_read_as_another_type_is_a_codec_error() {
    let idem = Idempotency::memory();
    let _: String = idem
        .call("k")
        .scope("s")
        .run(|| async { Ok::<_, Error>("text".to_owned()) })
        .await
        .unwrap();
    let r: Result<u64, Error> = idem.call("k").scope("s").run(|| async { Ok(1) }).await;
    match r {
        Err(Error::Codec(e)) => assert_eq!(e.kind(), CodecErrorKind::Decode),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_fails_closed_and_recovers_by_itself() {
    let store = FaultyStore::new(MemoryStore::new());
    let idem = Idempotency::new(store.clone());
    let runs = counter();
    store.set_down(true);
    let r = pay(&idem, "order-9", &runs).await;
    assert!(matches!(r, Err(Error::Store(_))), "{r:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "nothing runs without the guarantee"
    );
    assert_eq!(idem.stats().store_errors, 1);
    store.set_down(false);
    let (_, how) = pay(&idem, "order-9", &runs).await.unwrap();
    assert_eq!(how, Outcome::Executed);
    assert_eq!(
        pay(&idem, "order-9", &runs).await.unwrap().1,
        Outcome::Replayed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postcard_engine_replays_values_and_stored_errors() {
    let idem = Idempotency::builder()
        .codec(idempotent_runtime::Codec::Postcard)
        .build()
        .unwrap();
    let runs = counter();
    let (first, _) = pay(&idem, "order-p", &runs).await.unwrap();
    let (again, how) = pay(&idem, "order-p", &runs).await.unwrap();
    assert_eq!((again, how), (first, Outcome::Replayed));
    for _ in 0..2 {
        let r: Result<u32, PayError> = idem
            .call("order-e")
            .scope("payments")
            .store_errors()
            .run(|| async { Err(PayError::Declined("stolen card".into())) })
            .await;
        assert_eq!(r, Err(PayError::Declined("stolen card".into())));
    }
    // Records of one codec do not decode in an engine of the other: engines sharing a
    // store must agree.
    let store = MemoryStore::new();
    let json = Idempotency::new(store.clone());
    let post = Idempotency::builder()
        .store(store)
        .codec(idempotent_runtime::Codec::Postcard)
        .build()
        .unwrap();
    let _: Receipt = json
        .call("k")
        .scope("s")
        .run(|| async {
            Ok::<_, Error>(Receipt {
                id: "x".into(),
                cents: 1,
            })
        })
        .await
        .unwrap();
    let r: Result<Receipt, Error> = post
        .call("k")
        .scope("s")
        .run(|| async {
            Ok(Receipt {
                id: "y".into(),
                cents: 2,
            })
        })
        .await;
    assert!(matches!(r, Err(Error::Codec(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_another_codec_is_a_codec_error_never_a_value() {
    // Untagged, JSON's `5` is the byte 53, which Postcard reads back as the number 53.
    let store = MemoryStore::new();
    let json = Idempotency::new(store.clone());
    let post = Idempotency::builder()
        .store(store)
        .codec(idempotent_runtime::Codec::Postcard)
        .build()
        .unwrap();
    let stored: u8 = json
        .call("k")
        .scope("codec")
        .run(|| async { Ok::<_, Error>(5) })
        .await
        .unwrap();
    assert_eq!(stored, 5);
    let runs = counter();
    let replayed: Result<u8, Error> = {
        let runs = runs.clone();
        post.call("k")
            .scope("codec")
            .run(|| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(6)
            })
            .await
    };
    match replayed {
        Err(Error::Codec(e)) => {
            assert_eq!(e.kind(), CodecErrorKind::WrongCodec);
            assert_eq!(e.scope(), Some("codec"));
        }
        other => panic!("expected a codec error, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_cannot_be_stored_faithfully_runs_once_and_is_refused_on_replay() {
    let idem = Idempotency::memory();
    let runs = counter();
    let nan = |runs: Arc<AtomicU32>| {
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<f64, Error>(f64::NAN)
        }
    };
    // The caller that ran it gets its value: the side effect happened.
    let (v, how) = idem
        .call("nan")
        .scope("unstorable")
        .run_with_outcome(nan(runs.clone()))
        .await
        .unwrap();
    assert!(v.is_nan());
    assert_eq!(how, Outcome::Executed);
    // JSON would store `null`, which no f64 reads back: retries get a typed error for the
    // TTL, never another value and never a second run.
    for _ in 0..2 {
        match idem
            .call("nan")
            .scope("unstorable")
            .run(nan(runs.clone()))
            .await
        {
            Err(Error::Codec(e)) => {
                assert_eq!(e.kind(), CodecErrorKind::Unstorable);
                assert_eq!(e.scope(), Some("unstorable"));
            }
            other => panic!("expected a codec error, got {other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A value the codec cannot encode at all (a map with tuple keys) is the same.
    let tuple_keys = || async {
        let mut m = std::collections::HashMap::new();
        m.insert((1u8, 2u8), 3u8);
        Ok::<_, Error>(m)
    };
    let runs2 = counter();
    for expected_runs in [1, 1, 1] {
        let r = {
            let runs2 = runs2.clone();
            idem.call("tuple-keys")
                .scope("unstorable")
                .run(move || async move {
                    runs2.fetch_add(1, Ordering::SeqCst);
                    tuple_keys().await
                })
                .await
        };
        assert!(
            r.is_ok()
                || matches!(&r, Err(Error::Codec(e)) if e.kind() == CodecErrorKind::Unstorable),
            "{r:?}"
        );
        assert_eq!(runs2.load(Ordering::SeqCst), expected_runs);
    }
    assert_eq!(idem.stats().unstored, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_no_longer_decodes_names_its_scope() {
    // A deploy changed the type a scope stores: old records fail to decode, with the scope
    // in the error, rather than run again. (A new type wants a new scope: `...v2`.)
    let idem = Idempotency::memory();
    let _: String = idem
        .call("k")
        .scope("billing.invoice.v1")
        .run(|| async { Ok::<_, Error>("text".to_owned()) })
        .await
        .unwrap();
    let r: Result<u64, Error> = idem
        .call("k")
        .scope("billing.invoice.v1")
        .run(|| async { Ok(1) })
        .await;
    match r {
        Err(Error::Codec(e)) => {
            assert_eq!(e.kind(), CodecErrorKind::Decode);
            assert_eq!(e.scope(), Some("billing.invoice.v1"));
            assert!(e.to_string().contains("billing.invoice.v1"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
enum RiskError {
    Declined { risk: f64 },
    Engine(String),
}

impl From<Error> for RiskError {
    fn from(e: Error) -> Self {
        RiskError::Engine(e.to_string())
    }
}

/// An error to store that would not decode back as itself (JSON writes the `NaN` as
/// `null`) is not stored as it is: the operation ran, so the key keeps the marker of an
/// unstorable result, as for a value, and the retry is refused rather than run again.
/// (Before, the key was released and the retry ran the operation a second time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_error_that_does_not_decode_back_is_refused_not_run_again() {
    let idem = Idempotency::memory();
    let runs = counter();
    let call = |risk: f64| {
        let runs = runs.clone();
        idem.call("pay-9")
            .scope("edge.err")
            .store_errors()
            .run(move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Err::<u32, _>(RiskError::Declined { risk })
            })
    };
    let first = call(f64::NAN).await;
    assert!(matches!(first, Err(RiskError::Declined { .. })));
    let retry = call(0.5).await;
    // The engine's refusal (`Error::Codec`, `Unstorable`: counted below), not a run.
    assert!(
        matches!(retry, Err(RiskError::Engine(_))),
        "the retry got another answer than the refusal: {retry:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran again");
    assert_eq!(idem.stats().unstored, 1);
}

#[tokio::test]
async fn a_nan_in_an_option_is_not_replayed_as_another_value() {
    let idem = Idempotency::memory();
    let first: Option<f64> = idem
        .call("reading-1")
        .scope("edge.nan")
        .run(|| async { Ok::<_, Error>(Some(f64::NAN)) })
        .await
        .unwrap();
    assert!(first.is_some_and(f64::is_nan));
    let retry = idem
        .call("reading-1")
        .scope("edge.nan")
        .run_with_outcome(|| async { Ok::<Option<f64>, Error>(Some(1.0)) })
        .await;
    match retry {
        Err(Error::Codec(e)) if e.kind() == CodecErrorKind::Unstorable => {}
        other => panic!("expected Error::Codec(Unstorable), got another value: {other:?}"),
    }
}

#[tokio::test]
async fn some_none_is_not_replayed_as_none() {
    let idem = Idempotency::memory();
    let first: Option<Option<u32>> = idem
        .call("k")
        .scope("edge.option")
        .run(|| async { Ok::<_, Error>(Some(None)) })
        .await
        .unwrap();
    assert_eq!(first, Some(None));
    let retry = idem
        .call("k")
        .scope("edge.option")
        .run_with_outcome(|| async { Ok::<Option<Option<u32>>, Error>(Some(Some(1))) })
        .await;
    assert!(
        !matches!(retry, Ok((None, Outcome::Replayed))),
        "the caller got Some(None), its retry gets None: {retry:?}"
    );
}
