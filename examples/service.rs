//! `#[idempotent]` on the methods of a plain service struct: no web framework. The same
//! methods can sit behind axum, tonic, a CLI or a queue; the service does not care.
//!
//! ```text
//! cargo run --example service
//! cargo test --example service
//! ```

use std::collections::HashMap;
use std::sync::Mutex;

use idempotent_runtime::{idempotent, Idempotency};
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

/// The service: its own engine, its own state.
pub struct Orders {
    idem: Idempotency,
    stock: Mutex<HashMap<String, u32>>,
    placed: Mutex<Vec<Confirmation>>,
}

impl Orders {
    pub fn new(idem: Idempotency, stock: &[(&str, u32)]) -> Self {
        Self {
            idem,
            stock: Mutex::new(stock.iter().map(|(s, n)| (s.to_string(), *n)).collect()),
            placed: Mutex::new(Vec::new()),
        }
    }

    /// Takes stock and records the order, once per request id. A retry with the same
    /// request id and payload gets the same confirmation; with another payload, it is
    /// refused. Running out of stock is not stored: a retry after a restock succeeds.
    #[idempotent(
        key = req.request_id,
        store = &self.idem,
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
            order_id: placed.len() as u64 + 1,
            sku: req.sku,
            qty: req.qty,
        };
        placed.push(confirmation.clone());
        Ok(confirmation)
    }

    /// Cancels an order and returns its stock, once per order.
    #[idempotent(key = order_id, store = &self.idem, scope = "orders.cancel")]
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
    let orders = Orders::new(Idempotency::memory(), &[("book", 3)]);
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
    use std::sync::Arc;

    fn req(id: &str, qty: u32) -> PlaceOrder {
        PlaceOrder {
            request_id: id.into(),
            sku: "book".into(),
            qty,
        }
    }

    // Each test gets its own engine: no state leaks between tests.
    fn service(stock: u32) -> Orders {
        Orders::new(Idempotency::memory(), &[("book", stock)])
    }

    #[tokio::test]
    async fn a_retried_order_takes_stock_once() {
        let orders = service(5);
        let a = orders.place(req("r1", 2)).await.unwrap();
        let b = orders.place(req("r1", 2)).await.unwrap();
        assert_eq!(a, b);
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
        assert_eq!(orders.place(req("r1", 2)).await.unwrap().qty, 2);
    }

    #[tokio::test]
    async fn cancelling_twice_returns_stock_once() {
        let orders = service(5);
        let c = orders.place(req("r1", 2)).await.unwrap();
        assert_eq!(orders.cancel(c.order_id).await.unwrap(), 5);
        assert_eq!(orders.cancel(c.order_id).await.unwrap(), 5);
        assert_eq!(orders.stock("book"), 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_duplicates_place_one_order() {
        let orders = Arc::new(service(100));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let orders = orders.clone();
                tokio::spawn(async move { orders.place(req("burst", 1)).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().order_id, 1);
        }
        assert_eq!(orders.orders_placed(), 1);
        assert_eq!(orders.stock("book"), 99);
    }
}
