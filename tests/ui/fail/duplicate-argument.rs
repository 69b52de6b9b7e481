use idempotent_runtime::{idempotent, Error};

#[idempotent(key = id, ttl = "1h", ttl = "2h")]
async fn f(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
