use idempotent_runtime::idempotent;

#[derive(Debug)]
struct MyError;

#[idempotent(key = id)]
async fn f(id: u64) -> Result<u64, MyError> {
    Ok(id)
}

fn main() {}
