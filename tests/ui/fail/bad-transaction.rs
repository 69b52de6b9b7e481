use idempotent_runtime::{idempotent, Error, Idempotency};

static ENGINE: std::sync::LazyLock<Idempotency> = std::sync::LazyLock::new(Idempotency::memory);

// The name of the transaction, not a string.
#[idempotent(key = id, store = &*ENGINE, transaction = "tx")]
async fn quoted(id: u64) -> Result<u64, Error> {
    Ok(id)
}

// A name an argument already has: the body could not reach both.
#[idempotent(key = id, store = &*ENGINE, transaction = tx)]
async fn shadowing(id: u64, tx: u64) -> Result<u64, Error> {
    Ok(id + tx)
}

// A cancelled transaction rolls back; there is nothing to finish.
#[idempotent(key = id, store = &*ENGINE, transaction = tx, on_cancel = "finish")]
async fn finishing(id: u64) -> Result<u64, Error> {
    Ok(id)
}

// The default engine keeps its records in memory: no transaction to run in.
#[idempotent(key = id, transaction = tx)]
async fn in_memory(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
