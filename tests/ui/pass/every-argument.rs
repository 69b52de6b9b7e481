use idempotent_runtime::{idempotent, Error, Idempotency};

#[derive(serde::Serialize)]
struct Order {
    id: String,
    total: u64,
}

#[idempotent(
    key = order.id,
    ttl = "24h",
    lease = "30s",
    store = idem,
    scope = "orders.place",
    fingerprint = (&order.id, order.total),
    cache_errors = false,
    concurrent = "wait",
    replay = "clone",
    crate = "idempotent_runtime",
)]
async fn place(idem: &Idempotency, order: Order) -> Result<u64, Error> {
    Ok(order.total)
}

fn main() {}
