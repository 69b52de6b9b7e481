use idempotent_runtime::{idempotent, Error};

#[idempotent(key = request_key)]
async fn f(request_key: Option<String>) -> Result<u64, Error> {
    Ok(1)
}

fn main() {}
