//! The `#[idempotent]` functions the local-hit tests call: on an engine they are given,
//! counting their runs, so each test reads what ran.

use std::sync::atomic::{AtomicU32, Ordering};

use idempotent_runtime::{idempotent, Error, Idempotency, Stats};

/// The scope of [`charge`] and [`charge_as_text`] (one record for both).
pub const SCOPE: &str = "local-hits";

/// Charges `cents` for `order`, fingerprinted by the amount.
#[idempotent(key = order, store = idem, scope = "local-hits", fingerprint = cents)]
pub async fn charge(
    idem: &Idempotency,
    runs: &AtomicU32,
    order: &str,
    cents: u64,
) -> Result<u64, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(cents)
}

/// The same scope and key as [`charge`], read as another type.
#[idempotent(key = order, store = idem, scope = "local-hits")]
pub async fn charge_as_text(idem: &Idempotency, order: &str) -> Result<String, Error> {
    Ok(order.to_owned())
}

/// Not `Clone`: its hits decode the stored bytes rather than clone a kept copy.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Receipt(pub u64);

/// A receipt for `order`, whose hits decode.
#[idempotent(key = order, store = idem, scope = "local-hits-receipts")]
pub async fn receipt(idem: &Idempotency, runs: &AtomicU32, order: &str) -> Result<Receipt, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(Receipt(7))
}

/// `(executed, replayed, coalesced, mismatched, store_errors)`.
pub fn counts(s: &Stats) -> (u64, u64, u64, u64, u64) {
    (
        s.executed,
        s.replayed,
        s.coalesced,
        s.mismatched,
        s.store_errors,
    )
}

/// An error type that is stored (`cache_errors = true`), and keeps the engine's error it
/// was made from, as its `Debug` text.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Declined {
    /// The body's own error, which is stored and replayed.
    Card,
    /// A refusal of the engine's.
    Engine(String),
}

impl From<Error> for Declined {
    fn from(e: Error) -> Self {
        Declined::Engine(format!("{e:?}"))
    }
}

impl Declined {
    /// The engine's error, as text; empty for the body's own.
    pub fn engine(&self) -> &str {
        match self {
            Declined::Engine(s) => s,
            Declined::Card => "",
        }
    }
}

/// Declines with a stored error (the body's own), counting its runs; the payload is
/// `cents`, so another amount on the same key is a mismatch.
#[idempotent(key = k, store = idem, scope = "rf.err-fp", cache_errors = true, fingerprint = cents)]
pub async fn declined_fp(
    idem: &Idempotency,
    runs: &AtomicU32,
    k: &str,
    cents: u64,
) -> Result<u64, Declined> {
    runs.fetch_add(1, Ordering::SeqCst);
    Err(Declined::Card)
}
