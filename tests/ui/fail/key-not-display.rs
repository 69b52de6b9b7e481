use idempotent_runtime::{idempotent, Error};

struct OrderId(u64);

#[idempotent(key = id)]
async fn f(id: OrderId) -> Result<u64, Error> {
    Ok(id.0)
}

fn main() {}
