//! Functions built as a service's are: without `cfg(test)` (this library is compiled
//! without it when integration tests use it), so that their default engine is the
//! process's, shared by every runtime.

use std::sync::atomic::{AtomicU32, Ordering};

use idempotent_runtime::{idempotent, Error};

/// How many times [`shared_price`] has run.
pub static SHARED_PRICE_RUNS: AtomicU32 = AtomicU32::new(0);

/// Answers the value it is given, through the default engine of a service build.
#[idempotent(key = id, scope = "service_build.shared_price")]
pub async fn shared_price(id: u32, value: u32) -> Result<u32, Error> {
    SHARED_PRICE_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(value)
}
