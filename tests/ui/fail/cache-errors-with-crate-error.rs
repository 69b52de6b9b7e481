use idempotent_runtime::{idempotent, Error};

#[idempotent(key = id, cache_errors = true)]
async fn f(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
