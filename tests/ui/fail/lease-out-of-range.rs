use idempotent_runtime::{idempotent, Error};

// Renewed every third of it, a lease of a few milliseconds cannot keep its claim.
#[idempotent(key = id, lease = "50ms")]
async fn short(id: u64) -> Result<u64, Error> {
    Ok(id)
}

#[idempotent(key = id, lease = "101years")]
async fn long(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
