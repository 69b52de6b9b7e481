use idempotent_runtime::{idempotent, Error, Idempotency};

// One key shared by every call, said on purpose.
#[idempotent(key = const "nightly-report")]
async fn nightly() -> Result<u64, Error> {
    Ok(1)
}

fn current_message_id() -> String {
    "m-1".to_owned()
}

// A key that comes from elsewhere, said on purpose.
#[idempotent(key = const current_message_id())]
async fn consume(body: String) -> Result<usize, Error> {
    Ok(body.len())
}

// An inline const block says it as well.
#[idempotent(key = const { "fixed" })]
async fn fixed(n: u64) -> Result<u64, Error> {
    Ok(n)
}

// Inline format arguments count as reading the argument.
#[idempotent(key = format!("{user}:{day}"))]
async fn daily(user: u64, day: u32) -> Result<u64, Error> {
    Ok(user + u64::from(day))
}

// `Option` keys, by value and by reference, of strings and of other `Display` types.
#[idempotent(key = request_key, on_missing_key = "run")]
async fn charge(request_key: Option<String>) -> Result<u64, Error> {
    Ok(1)
}

#[idempotent(key = &req.key, on_missing_key = "fail")]
async fn refund(req: Request) -> Result<u64, Error> {
    Ok(req.cents)
}

#[idempotent(key = id.as_deref(), on_missing_key = "fail", store = idem)]
async fn borrowed(idem: &Idempotency, id: Option<String>) -> Result<u64, Error> {
    Ok(id.map_or(0, |s| s.len() as u64))
}

#[idempotent(key = n, on_missing_key = "run", on_cancel = "finish")]
async fn numbered(n: Option<u64>) -> Result<u64, Error> {
    Ok(n.unwrap_or(0))
}

struct Request {
    key: Option<String>,
    cents: u64,
}

fn main() {}
