use idempotent_runtime::{idempotent, Error};

#[idempotent(key = id, ttl = "100years 1s")]
async fn f(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
