//! The functions whose hits the hit benchmarks compare.

use idempotent_runtime::{idempotent, Error, Idempotency};

use super::common::{receipt, Receipt};

/// `#[idempotent]` on a function of the engine it is given. `Receipt` is `Clone`, so its
/// hits clone the copy the first hit kept.
#[idempotent(key = order_id, store = idem, scope = "bench")]
pub(crate) async fn place(idem: &Idempotency, order_id: &str) -> Result<Receipt, Error> {
    Ok(receipt())
}

/// The same receipt in a type that is not `Clone`: the attribute's hits decode it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub(crate) struct Unclonable(#[allow(dead_code)] pub(crate) Receipt);

/// `#[idempotent]` on a function whose value is not `Clone`: every hit decodes. The same
/// scope as `place`, so it reads the same record.
#[allow(dead_code)]
#[idempotent(key = order_id, store = idem, scope = "bench")]
pub(crate) async fn place_decoded(idem: &Idempotency, order_id: &str) -> Result<Unclonable, Error> {
    Ok(Unclonable(receipt()))
}

/// The `cached` crate's memoization with per-key write synchronization, the nearest thing
/// in that crate to single-flight: it stores clones, not bytes, so its hit decodes nothing.
#[cached::macros::cached(sync_writes = "by_key")]
pub(crate) async fn cached_place(order_id: &'static str) -> Result<Receipt, Error> {
    let _ = order_id;
    Ok(receipt())
}

/// The `cached` crate's memoization of a first call, on a key it has not seen.
#[allow(dead_code)]
#[cached::macros::cached(sync_writes = "by_key")]
pub(crate) async fn cached_first(order_id: String) -> Result<Receipt, Error> {
    let _ = order_id;
    Ok(receipt())
}
