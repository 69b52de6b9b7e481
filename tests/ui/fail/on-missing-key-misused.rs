use idempotent_runtime::{idempotent, Error};

// The key is not an `Option`.
#[idempotent(key = id, on_missing_key = "run")]
async fn f(id: u64) -> Result<u64, Error> {
    Ok(id)
}

#[idempotent(key = id, on_missing_key = "skip")]
async fn g(id: Option<u64>) -> Result<u64, Error> {
    Ok(id.unwrap_or(0))
}

#[idempotent(key = const id, ttl = const "1h")]
async fn h(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
