use idempotent_runtime::{idempotent, Error};

#[idempotent(ttl = "soon", concurrent = "never", lease = "1x", scoop = "s")]
fn f(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
