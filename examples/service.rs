//! `#[idempotent]` on the methods of a plain service struct: no web framework. The same
//! methods can sit behind axum, tonic, a CLI or a queue; the service does not care.
//!
//! The methods name no `store`, so they use the default engine: one per process in the
//! running service, and one per test runtime under `cargo test`, so each `#[tokio::test]`
//! below starts with no stored results even though they reuse request ids.
//!
//! ```text
//! cargo run --example service
//! cargo test --example service
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use idempotent_runtime::idempotent;
use serde::{Deserialize, Serialize};

/// A request to place an order; `request_id` is the client's idempotency key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlaceOrder {
    pub request_id: String,
    pub sku: String,
    pub qty: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Confirmation {
    pub order_id: u64,
    pub sku: String,
    pub qty: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("only {available} of {sku} left")]
    OutOfStock { sku: String, available: u32 },
    #[error("unknown order {0}")]
    UnknownOrder(u64),
    #[error(transparent)]
    Idempotency(#[from] idempotent_runtime::Error),
}

/// Order ids unique in the process, as a database sequence would give: `cancel` is keyed
/// by order id on the default engine, which every `Orders` in the process shares, so a
/// per-service counter would let one service's `cancel(1)` replay another's.
fn next_order_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The service: its own state; idempotency comes from the default engine.
pub struct Orders {
    stock: Mutex<HashMap<String, u32>>,
    placed: Mutex<Vec<Confirmation>>,
}

impl Orders {
    pub fn new(stock: &[(&str, u32)]) -> Self {
        Self {
            stock: Mutex::new(stock.iter().map(|(s, n)| (s.to_string(), *n)).collect()),
            placed: Mutex::new(Vec::new()),
        }
    }

    /// Takes stock and records the order, once per request id. A retry with the same
    /// request id and payload gets the same confirmation; with another payload, it is
    /// refused. Running out of stock is not stored: a retry after a restock succeeds.
    #[idempotent(
        key = req.request_id,
        scope = "orders.place",
        fingerprint = (&req.sku, req.qty),
    )]
    pub async fn place(&self, req: PlaceOrder) -> Result<Confirmation, OrderError> {
        let mut stock = self.stock.lock().unwrap_or_else(|e| e.into_inner());
        let available = stock.get(&req.sku).copied().unwrap_or(0);
        if available < req.qty {
            return Err(OrderError::OutOfStock {
                sku: req.sku,
                available,
            });
        }
        stock.insert(req.sku.clone(), available - req.qty);
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        let confirmation = Confirmation {
            order_id: next_order_id(),
            sku: req.sku,
            qty: req.qty,
        };
        placed.push(confirmation.clone());
        Ok(confirmation)
    }

    /// Cancels an order and returns its stock, once per order.
    #[idempotent(key = order_id, scope = "orders.cancel")]
    pub async fn cancel(&self, order_id: u64) -> Result<u32, OrderError> {
        let placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        let order = placed
            .iter()
            .find(|c| c.order_id == order_id)
            .ok_or(OrderError::UnknownOrder(order_id))?;
        let mut stock = self.stock.lock().unwrap_or_else(|e| e.into_inner());
        let left = stock.entry(order.sku.clone()).or_insert(0);
        *left += order.qty;
        Ok(*left)
    }

    pub fn restock(&self, sku: &str, qty: u32) {
        *self
            .stock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(sku.to_owned())
            .or_insert(0) += qty;
    }

    pub fn stock(&self, sku: &str) -> u32 {
        self.stock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sku)
            .copied()
            .unwrap_or(0)
    }

    pub fn orders_placed(&self) -> usize {
        self.placed.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[tokio::main]
async fn main() -> Result<(), OrderError> {
    let orders = Orders::new(&[("book", 3)]);
    let req = PlaceOrder {
        request_id: "req-1".into(),
        sku: "book".into(),
        qty: 2,
    };
    let first = orders.place(req.clone()).await?;
    let retry = orders.place(req).await?;
    println!("placed {first:?}, retry got {retry:?}");
    println!(
        "cancel: stock back to {}",
        orders.cancel(first.order_id).await?
    );
    println!(
        "cancel again: stock still {}",
        orders.cancel(first.order_id).await?
    );
    println!(
        "orders placed: {}, stock of book: {}",
        orders.orders_placed(),
        orders.stock("book")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use idempotent_runtime::{outcome_of, Idempotency, Outcome};
    use std::sync::Arc;

    fn req(id: &str, qty: u32) -> PlaceOrder {
        PlaceOrder {
            request_id: id.into(),
            sku: "book".into(),
            qty,
        }
    }

    // No engine to pass around: every test runs on a tokio runtime of its own, and in
    // test builds each runtime has its own default engine, so the request id "r1" of one
    // test never replays another test's confirmation.
    fn service(stock: u32) -> Orders {
        Orders::new(&[("book", stock)])
    }

    #[tokio::test]
    async fn a_retried_order_takes_stock_once() {
        let orders = service(5);
        let (a, how) = outcome_of(orders.place(req("r1", 2))).await;
        assert_eq!(how, Some(Outcome::Executed));
        let (b, how) = outcome_of(orders.place(req("r1", 2))).await;
        assert_eq!(how, Some(Outcome::Replayed));
        assert_eq!(a.unwrap(), b.unwrap());
        assert_eq!(orders.stock("book"), 3);
        assert_eq!(orders.orders_placed(), 1);
    }

    #[tokio::test]
    async fn a_reused_request_id_with_another_quantity_is_refused() {
        let orders = service(5);
        orders.place(req("r1", 2)).await.unwrap();
        let err = orders.place(req("r1", 3)).await.unwrap_err();
        assert!(matches!(
            err,
            OrderError::Idempotency(idempotent_runtime::Error::Mismatch)
        ));
        assert_eq!(orders.stock("book"), 3);
    }

    #[tokio::test]
    async fn out_of_stock_is_not_remembered() {
        let orders = service(1);
        assert!(matches!(
            orders.place(req("r1", 2)).await,
            Err(OrderError::OutOfStock { .. })
        ));
        orders.restock("book", 5);
        // Had another test's "r1" leaked in here, this would be its confirmation (or a
        // mismatch) rather than a fresh order.
        let (placed, how) = outcome_of(orders.place(req("r1", 2))).await;
        assert_eq!(how, Some(Outcome::Executed));
        assert_eq!(placed.unwrap().qty, 2);
    }

    #[tokio::test]
    async fn cancelling_twice_returns_stock_once() {
        let orders = service(5);
        let c = orders.place(req("r1", 2)).await.unwrap();
        assert_eq!(orders.cancel(c.order_id).await.unwrap(), 5);
        assert_eq!(orders.cancel(c.order_id).await.unwrap(), 5);
        assert_eq!(orders.stock("book"), 5);
    }

    // A test that wants to look at the engine runs the calls with one of its own.
    #[tokio::test]
    async fn an_engine_of_the_tests_own() {
        let idem = Idempotency::memory();
        let orders = service(5);
        idem.as_default(async {
            orders.place(req("r1", 1)).await.unwrap();
            orders.place(req("r1", 1)).await.unwrap();
        })
        .await;
        let stats = idem.stats();
        assert_eq!((stats.executed, stats.replayed), (1, 1));
    }

    // Two services in one test share its default engine: their order ids must not meet.
    #[tokio::test]
    async fn two_services_cancel_their_own_orders() {
        let (a, b) = (service(5), service(5));
        let ca = a.place(req("a-1", 2)).await.unwrap();
        let cb = b.place(req("b-1", 1)).await.unwrap();
        assert_ne!(ca.order_id, cb.order_id);
        assert_eq!(a.cancel(ca.order_id).await.unwrap(), 5);
        let (left, how) = outcome_of(b.cancel(cb.order_id)).await;
        assert_eq!(how, Some(Outcome::Executed), "b's cancel replayed a's");
        assert_eq!(left.unwrap(), 5);
        assert_eq!(b.stock("book"), 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_duplicates_place_one_order() {
        let orders = Arc::new(service(100));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let orders = orders.clone();
                tokio::spawn(async move { orders.place(req("r1", 1)).await })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap().unwrap().order_id);
        }
        ids.dedup();
        assert_eq!(ids.len(), 1, "one order, one id: {ids:?}");
        assert_eq!(orders.orders_placed(), 1);
        assert_eq!(orders.stock("book"), 99);
    }
}
