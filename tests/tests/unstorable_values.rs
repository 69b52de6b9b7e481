//! Values a codec would replay as another value: JSON's `null` for `Some` of a null-like
//! value, a `Deserialize` that does not mirror its `Serialize` (an untagged enum, a
//! flattened `Option`, a field skipped when `None` whose default is not `None`), a field
//! skipped under Postcard. Each is stored faithfully or refused as `Unstorable`, never
//! replayed as something else; and values that codecs keep are stored and replayed.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use idempotent_runtime::{Codec, CodecErrorKind, Error, Idempotency, Outcome};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Runs `value` once under a key, then retries the key, and says what the retry got.
async fn replayed<T>(codec: Codec, value: T) -> (T, Result<(T, Outcome), Error>)
where
    T: Serialize + DeserializeOwned + Clone + Send + 'static,
{
    let idem = Idempotency::builder().codec(codec).build().expect("engine");
    let runs = Arc::new(AtomicU32::new(0));
    let first = {
        let (v, runs) = (value.clone(), runs.clone());
        idem.call("k")
            .scope("unstorable")
            .run(move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(v)
            })
            .await
            .expect("first call")
    };
    let again = {
        let (v, runs) = (value, runs.clone());
        idem.call("k")
            .scope("unstorable")
            .run_with_outcome(move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(v)
            })
            .await
    };
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    (first, again)
}

fn assert_same<T: Debug + PartialEq>(first: T, again: Result<(T, Outcome), Error>) {
    match again {
        // Refused as unstorable: what the README promises for such values.
        Err(Error::Codec(e)) => assert_eq!(e.kind(), CodecErrorKind::Unstorable, "{e}"),
        Ok((v, _)) => assert_eq!(
            v, first,
            "the retry was handed another value than the one the operation returned"
        ),
        Err(e) => panic!("{e:?}"),
    }
}

/// An untagged enum whose earlier variant accepts a later one's JSON: `Int(5)` is written
/// `5`, which `Float` reads first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum Amount {
    Float(f64),
    Int(i64),
}

#[tokio::test]
async fn an_untagged_enum_replays_as_its_variant() {
    let (first, again) = replayed(Codec::Json, Amount::Int(5)).await;
    assert_same(first, again);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Extra {
    note: Option<String>,
}

/// A flattened `Option` of a struct whose fields are all optional: `None` is written as
/// no fields at all, which reads back as `Some(Extra { note: None })`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Charge {
    id: u32,
    #[serde(flatten)]
    extra: Option<Extra>,
}

#[tokio::test]
async fn a_flattened_none_replays_as_none() {
    let (first, again) = replayed(Codec::Json, Charge { id: 1, extra: None }).await;
    assert_same(first, again);
}

fn usd() -> Option<String> {
    Some("USD".into())
}

/// A field left out when `None`, with a default that is not `None` (a common API shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Quote {
    cents: u64,
    #[serde(skip_serializing_if = "Option::is_none", default = "usd")]
    currency: Option<String>,
}

#[tokio::test]
async fn a_skipped_field_replays_as_itself() {
    let (first, again) = replayed(
        Codec::Json,
        Quote {
            cents: 100,
            currency: None,
        },
    )
    .await;
    assert_same(first, again);
}

/// `Some` of a raw JSON value `null`: written `null`, read back as `None`.
#[tokio::test]
async fn some_raw_null_replays_as_some() {
    let raw = serde_json::value::RawValue::from_string("null".into()).unwrap();
    let (first, again) = replayed(Codec::Json, Some(raw)).await;
    match again {
        Err(Error::Codec(e)) => assert_eq!(e.kind(), CodecErrorKind::Unstorable, "{e}"),
        Ok((v, _)) => assert_eq!(
            v.as_ref().map(|r| r.get().to_owned()),
            first.as_ref().map(|r| r.get().to_owned()),
            "the retry was handed another value than the one the operation returned"
        ),
        Err(e) => panic!("{e:?}"),
    }
}

/// Postcard "needs no walk", but a field skipped when `None` shifts every byte after it:
/// `{a: None, b: 1, c: [7, 0]}` is written `[1, 2, 7, 0]`, which reads back, without
/// error, as `{a: Some(2), b: 7, c: []}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Packed {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    a: Option<u8>,
    b: u8,
    c: Vec<u8>,
}

#[tokio::test]
async fn postcard_replays_a_skipped_field_as_itself() {
    let (first, again) = replayed(
        Codec::Postcard,
        Packed {
            a: None,
            b: 1,
            c: vec![7, 0],
        },
    )
    .await;
    assert_same(first, again);
}

/// What held: values the walk must not refuse, and do replay as themselves.
#[tokio::test]
async fn values_json_keeps_are_stored_and_replayed() {
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Skips {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        a: Option<u8>,
        b: Option<Vec<u8>>,
        m: std::collections::BTreeMap<String, f64>,
        big: u128,
        c: char,
        v: Option<serde_json::Value>,
    }
    let value = Skips {
        a: None,
        b: Some(Vec::new()),
        m: [("x".to_owned(), -0.0), ("y".to_owned(), 1e300)].into(),
        big: u128::MAX,
        c: '\u{1F600}',
        v: Some(serde_json::json!({"k": null})),
    };
    let (first, again) = replayed(Codec::Json, value).await;
    let (v, outcome) = again.expect("stored and replayed");
    assert_eq!((v, outcome), (first, Outcome::Replayed));
    // Some(Value::Null) is refused (it reads back as None): right.
    let (_, again) = replayed(Codec::Json, Some(serde_json::Value::Null)).await;
    assert!(matches!(again, Err(Error::Codec(_))), "{again:?}");
}
