// `transaction = tx` on shapes `tests/transactions.rs` does not run: `&mut self` with the
// engine borrowed from `self`, a generic function, a pattern argument.
use idempotent_runtime::{idempotent, Error, Idempotency};

#[allow(dead_code)]
struct Svc {
    idem: Idempotency,
    n: u64,
}

impl Svc {
    #[idempotent(key = id, store = &self.idem, transaction = tx)]
    async fn by_mut_self(&mut self, id: &str) -> Result<u64, Error> {
        self.n += 1;
        let _ = &mut **tx;
        Ok(self.n)
    }
}

#[idempotent(key = id, store = idem, transaction = tx)]
async fn generic<V: serde::Serialize + Send + Sync>(
    idem: &Idempotency,
    id: &str,
    v: V,
) -> Result<u64, Error> {
    let _ = (&mut **tx, serde_json::to_string(&v));
    Ok(1)
}

#[idempotent(key = a, store = idem, transaction = tx)]
async fn pattern(idem: &Idempotency, (a, b): (u64, u64)) -> Result<u64, Error> {
    let _ = &mut **tx;
    Ok(a + b)
}

fn main() {}
