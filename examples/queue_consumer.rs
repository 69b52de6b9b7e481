//! A queue consumer that applies every message exactly once although the queue delivers
//! each two or three times, in concurrent bursts and out of order: at-least-once
//! delivery made effectively-once, keyed by the message id.
//!
//! ```text
//! cargo run --example queue_consumer
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use idempotent_runtime::{idempotent, Error, Idempotency};
use serde::{Deserialize, Serialize};

/// A ledger posting, as the producer published it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Message {
    id: String,
    account: String,
    cents: i64,
}

/// What the consumer acknowledges back for a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Applied {
    message_id: String,
    balance_after: i64,
}

#[derive(Default)]
struct Ledger {
    balances: Mutex<HashMap<String, i64>>,
    postings: AtomicU32,
}

struct Consumer {
    idem: Idempotency,
    ledger: Ledger,
}

impl Consumer {
    /// Applies a posting. A redelivery of the same message id gets the first result back
    /// (and is acknowledged again); a redelivery that arrives while the first delivery is
    /// still being applied waits for it.
    #[idempotent(
        key = msg.id,
        store = &self.idem,
        scope = "ledger.apply",
        fingerprint = (&msg.account, msg.cents),
    )]
    async fn apply(&self, msg: Message) -> Result<Applied, Error> {
        // Simulate the write taking a moment, so duplicates really overlap.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        self.ledger.postings.fetch_add(1, Ordering::SeqCst);
        let mut balances = self
            .ledger
            .balances
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let balance = balances.entry(msg.account.clone()).or_insert(0);
        *balance += msg.cents;
        Ok(Applied {
            message_id: msg.id,
            balance_after: *balance,
        })
    }
}

/// A small deterministic generator, so every run delivers the same way.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// The queue's view: every message two or three times, shuffled.
fn deliveries(messages: &[Message], seed: u64) -> Vec<Message> {
    let mut rng = Lcg(seed);
    let mut out: Vec<Message> = messages
        .iter()
        .flat_map(|m| std::iter::repeat_n(m.clone(), 2 + rng.next(2) as usize))
        .collect();
    for i in (1..out.len()).rev() {
        out.swap(i, rng.next(i as u64 + 1) as usize);
    }
    out
}

fn messages(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message {
            id: format!("msg-{i:04}"),
            account: format!("acct-{}", i % 5),
            cents: (i as i64 % 7 + 1) * 100,
        })
        .collect()
}

/// Delivers in bursts: each burst's messages are handled concurrently, as a consumer
/// with several workers would.
async fn consume(
    consumer: Arc<Consumer>,
    queue: Vec<Message>,
    burst: usize,
) -> Result<usize, Error> {
    let mut acked = 0;
    for chunk in queue.chunks(burst) {
        let tasks: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|m| {
                let c = consumer.clone();
                tokio::spawn(async move { c.apply(m).await })
            })
            .collect();
        for t in tasks {
            match t.await {
                Ok(result) => {
                    result?;
                    acked += 1;
                }
                Err(join) => eprintln!("a worker failed: {join}"),
            }
        }
    }
    Ok(acked)
}

fn expected_balances(messages: &[Message]) -> HashMap<String, i64> {
    let mut expected = HashMap::new();
    for m in messages {
        *expected.entry(m.account.clone()).or_insert(0) += m.cents;
    }
    expected
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let published = messages(200);
    let queue = deliveries(&published, 7);
    let consumer = Arc::new(Consumer {
        idem: Idempotency::memory(),
        ledger: Ledger::default(),
    });
    let acked = consume(consumer.clone(), queue.clone(), 16).await?;
    let balances = consumer
        .ledger
        .balances
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    println!("messages published:  {}", published.len());
    println!(
        "deliveries received: {} (acknowledged {acked})",
        queue.len()
    );
    println!(
        "postings applied:    {}",
        consumer.ledger.postings.load(Ordering::SeqCst)
    );
    println!(
        "balances correct:    {}",
        balances == expected_balances(&published)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_message_is_applied_exactly_once() {
        for seed in [1, 2, 3] {
            let published = messages(120);
            let queue = deliveries(&published, seed);
            assert!(queue.len() >= 2 * published.len());
            let consumer = Arc::new(Consumer {
                idem: Idempotency::memory(),
                ledger: Ledger::default(),
            });
            let acked = consume(consumer.clone(), queue.clone(), 24).await.unwrap();
            assert_eq!(acked, queue.len(), "every delivery is acknowledged");
            assert_eq!(
                consumer.ledger.postings.load(Ordering::SeqCst) as usize,
                published.len()
            );
            let balances = consumer.ledger.balances.lock().unwrap().clone();
            assert_eq!(balances, expected_balances(&published));
        }
    }

    #[tokio::test]
    async fn a_redelivery_is_acknowledged_with_the_first_result() {
        let consumer = Consumer {
            idem: Idempotency::memory(),
            ledger: Ledger::default(),
        };
        let m = messages(1).remove(0);
        let first = consumer.apply(m.clone()).await.unwrap();
        let again = consumer.apply(m).await.unwrap();
        assert_eq!(first, again);
    }
}
