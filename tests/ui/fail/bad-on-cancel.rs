use idempotent_runtime::{idempotent, Error};

#[idempotent(key = id, on_cancel = "abort")]
async fn f(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
