// cache_errors = true with an error type that is storable but cannot carry the crate's
// Error: one message, saying what is missing?
use idempotent_runtime::{idempotent, Error};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Declined;

#[idempotent(key = id, cache_errors = true)]
async fn f(id: u64) -> Result<u64, Declined> {
    Ok(id)
}

// An Option key whose inner type is not Display, with on_missing_key given: the note
// should not tell the user to add on_missing_key.
struct OrderId(u64);

#[idempotent(key = id, on_missing_key = "fail")]
async fn g(id: Option<OrderId>) -> Result<u64, Error> {
    Ok(id.map_or(0, |i| i.0))
}

fn main() {}
