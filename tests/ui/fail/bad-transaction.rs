use idempotent_runtime::{idempotent, Error};

// The name of the transaction, not a string.
#[idempotent(key = id, transaction = "tx")]
async fn quoted(id: u64) -> Result<u64, Error> {
    Ok(id)
}

// A name an argument already has: the body could not reach both.
#[idempotent(key = id, transaction = tx)]
async fn shadowing(id: u64, tx: u64) -> Result<u64, Error> {
    Ok(id + tx)
}

// A cancelled transaction rolls back; there is nothing to finish.
#[idempotent(key = id, transaction = tx, on_cancel = "finish")]
async fn finishing(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
