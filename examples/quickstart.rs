//! A client pays for an order over a network that loses answers, then a load balancer
//! fans one retry out into a burst of concurrent duplicates. The payment is made once.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotent_runtime::{Error, Idempotency, Outcome};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payment {
    order_id: String,
    cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    payment_id: String,
    cents: u64,
}

/// The payment provider: every call here moves money.
#[derive(Default)]
struct Provider {
    charges: AtomicU32,
}

impl Provider {
    async fn charge(&self, p: &Payment) -> Result<Receipt, Error> {
        let n = self.charges.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(Receipt {
            payment_id: format!("pay_{n:04}"),
            cents: p.cents,
        })
    }
}

/// The service's handler: idempotent on the order id, refusing a reused id with
/// another amount.
async fn pay(
    idem: &Idempotency,
    provider: &Provider,
    p: Payment,
) -> Result<(Receipt, Outcome), Error> {
    idem.call(&p.order_id)
        .scope("payments.charge")
        .fingerprint(&p)
        .run_with_outcome(|| provider.charge(&p))
        .await
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let idem = Idempotency::memory();
    let provider = Arc::new(Provider::default());
    let order = Payment {
        order_id: "order-1001".into(),
        cents: 4_999,
    };
    let mut calls = 0;

    // 1. The first attempt is charged, but its answer is lost on the way back.
    calls += 1;
    let (receipt, how) = pay(&idem, &provider, order.clone()).await?;
    println!(
        "attempt 1: {how:?}, {} (answer lost in transit)",
        receipt.payment_id
    );

    // 2. The client retries twice after timeouts.
    for attempt in 2..=3 {
        calls += 1;
        let (r, how) = pay(&idem, &provider, order.clone()).await?;
        println!("attempt {attempt}: {how:?}, {}", r.payment_id);
    }

    // 3. A new order, sent as a burst of 50 concurrent duplicates.
    let burst = Payment {
        order_id: "order-1002".into(),
        cents: 1_250,
    };
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (idem, provider, burst) = (idem.clone(), provider.clone(), burst.clone());
            tokio::spawn(async move { pay(&idem, &provider, burst).await })
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        calls += 1;
        match t.await {
            Ok(result) => {
                ids.insert(result?.0.payment_id);
            }
            Err(join) => eprintln!("a duplicate's task failed: {join}"),
        }
    }
    println!("burst of 50: every caller got {ids:?}");

    // 4. The same order id with another amount is refused, and nothing is charged.
    calls += 1;
    let tampered = Payment {
        cents: 1,
        ..order.clone()
    };
    match pay(&idem, &provider, tampered).await {
        Err(Error::Mismatch) => println!("reused order id with another amount: refused (Mismatch)"),
        other => println!("reused order id with another amount: unexpected {other:?}"),
    }

    let stats = idem.stats();
    println!();
    println!("calls made:           {calls}");
    println!(
        "payments executed:    {}",
        provider.charges.load(Ordering::SeqCst)
    );
    println!(
        "replayed {}, coalesced {}, refused {}",
        stats.replayed, stats.coalesced, stats.mismatched
    );
    Ok(())
}
