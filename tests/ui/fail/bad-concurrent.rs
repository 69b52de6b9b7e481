use idempotent_runtime::{idempotent, Error};

#[idempotent(key = id, concurrent = "queue")]
async fn f(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
