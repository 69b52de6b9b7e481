// `Option<Option<String>>` under on_missing_key: `Some(None)` is a key? It is not Display.
use idempotent_runtime::{idempotent, Error};

#[idempotent(key = id, on_missing_key = "run")]
async fn nested(id: Option<Option<String>>) -> Result<u64, Error> {
    Ok(1)
}

fn main() {}
