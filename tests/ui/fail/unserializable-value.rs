use idempotent_runtime::{idempotent, Error};

struct Receipt;

#[idempotent(key = id)]
async fn f(id: u64) -> Result<Receipt, Error> {
    let _ = id;
    Ok(Receipt)
}

fn main() {}
