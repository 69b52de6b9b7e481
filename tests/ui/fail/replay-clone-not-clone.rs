use idempotent_runtime::{idempotent, Error};

#[derive(serde::Serialize, serde::Deserialize)]
struct Receipt {
    id: u64,
}

#[idempotent(key = id, replay = "clone")]
async fn f(id: u64) -> Result<Receipt, Error> {
    Ok(Receipt { id })
}

fn main() {}
