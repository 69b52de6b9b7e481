//! The functions whose hits the hit benchmarks compare.

use idempotent_runtime::{idempotent, Error, Idempotency};

use super::common::{receipt, Receipt};

/// `#[idempotent]` on a function of the engine it is given.
#[idempotent(key = order_id, store = idem, scope = "bench")]
pub(crate) async fn place(idem: &Idempotency, order_id: &str) -> Result<Receipt, Error> {
    Ok(receipt())
}

/// The `cached` crate's memoization with per-key write synchronization, the nearest thing
/// in that crate to single-flight: it stores clones, not bytes, so its hit decodes nothing.
#[cached::macros::cached(sync_writes = "by_key")]
pub(crate) async fn cached_place(order_id: &'static str) -> Result<Receipt, Error> {
    let _ = order_id;
    Ok(receipt())
}
