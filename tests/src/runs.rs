//! A count of the bodies that ran, each test with its own: a test hands a clone to every
//! body, which counts itself with [`Runs::next`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Counts the bodies that ran; clones share the count.
#[derive(Debug, Clone, Default)]
pub struct Runs(Arc<AtomicU32>);

impl Runs {
    /// Counts one more run, and returns the count with it (1 for the first).
    pub fn next(&self) -> u32 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// How many ran.
    pub fn count(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}
