// The limits of `ttl` and `lease` are accepted (they are the runtime's `MAX_TTL` and
// `MIN_LEASE`), `on_cancel` takes both values, and arguments named like the bindings the
// attribute generates neither clash with them nor get shadowed by them.
use idempotent_runtime::{idempotent, Error, Idempotency};

#[idempotent(key = id, ttl = "100years", lease = "100ms", on_cancel = "finish")]
async fn longest(id: u64) -> Result<u64, Error> {
    Ok(id)
}

#[idempotent(key = id, ttl = "1ms", on_cancel = "release")]
async fn shortest(id: u64) -> Result<u64, Error> {
    Ok(id)
}

#[idempotent(key = __idempotent_call, store = __idempotent_engine)]
async fn named_like_the_generated_code(
    __idempotent_engine: &Idempotency,
    __idempotent_call: u64,
    __idempotent_ret: u64,
    __idempotent_body: u64,
) -> Result<u64, Error> {
    Ok(__idempotent_call + __idempotent_ret + __idempotent_body)
}

fn main() {}
