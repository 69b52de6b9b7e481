use idempotent_runtime::idempotent;

#[idempotent(key = id)]
async fn f(id: u64) -> u64 {
    id
}

fn main() {}
