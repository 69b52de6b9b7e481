// A `{name}` placeholder in a string that is not a format string interpolates nothing:
// this key is the same text, "order-{order_id}", for every call. The check counts the
// placeholder as reading `order_id` and lets it through; it should be refused as
// `key = "order_id"` is.
use idempotent_runtime::{idempotent, Error};

#[idempotent(key = "order-{order_id}".to_owned())]
async fn ship(order_id: u64) -> Result<u64, Error> {
    Ok(order_id)
}

#[idempotent(key = String::from("{order_id}"))]
async fn ship2(order_id: u64) -> Result<u64, Error> {
    Ok(order_id)
}

fn main() {}
