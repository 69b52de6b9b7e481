use idempotent_runtime::{idempotent, Error};

const ORDER: &str = "order";

#[idempotent(key = ORDER)]
async fn f(order_id: u64) -> Result<u64, Error> {
    Ok(order_id)
}

struct Service;

impl Service {
    // `id` is not an argument here: the key is the same for every call.
    #[idempotent(key = format!("{}", "id"))]
    async fn g(&self, order_id: u64) -> Result<u64, Error> {
        Ok(order_id)
    }
}

#[idempotent(key = const_key, on_missing_key = "fail")]
async fn h() -> Result<u64, Error> {
    Ok(1)
}

fn main() {}
