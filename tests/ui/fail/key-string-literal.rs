use idempotent_runtime::{idempotent, Error};

// Every call would share one key: `f(1)` and `f(2)` would both return 1.
#[idempotent(key = "order_id")]
async fn f(order_id: u64) -> Result<u64, Error> {
    Ok(order_id)
}

fn main() {}
