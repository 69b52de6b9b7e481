// Keys that name an argument without reading its value: the check is a token walk, so
// each compiles, and each is one key for every call (f(1) and f(2) share a result).
use idempotent_runtime::{idempotent, Error};

pub struct Config {
    pub id: u64,
}
pub static CONFIG: Config = Config { id: 7 };

// A block that shadows the argument.
#[idempotent(key = { let id = 1u64; id })]
async fn shadowed(id: u64) -> Result<u64, Error> {
    Ok(id)
}

// A field of a static that has the argument's name.
#[idempotent(key = CONFIG.id)]
async fn field_named_like_it(id: u64) -> Result<u64, Error> {
    Ok(id)
}

// A closure parameter of the argument's name.
#[idempotent(key = (|id: u64| id)(0))]
async fn closure_param(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
