use idempotent_runtime::{idempotent, Error};

#[idempotent(key = id, lease = 30)]
async fn f(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
