use idempotent_runtime::{idempotent, Error};

#[idempotent(kye = id)]
async fn f(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
