use idempotent_runtime::idempotent;

#[idempotent(key = id)]
async fn f(id: u64) {
    let _ = id;
}

fn main() {}
