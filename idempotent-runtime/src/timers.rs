//! Whether the calling task's tokio runtime has timers, asked before a call claims its key.
//!
//! Every claim is kept by timers: its lease is renewed on a timer while the operation runs,
//! and each store round trip after it (renewals, the completion) is bounded by one. Tokio
//! panics where a timer is made on a runtime built without them (`enable_time`), and those
//! timers are first made while the operation runs or after it ended; the panic then gave
//! the claim back with the operation's work done, and a retry ran it again. A call is
//! therefore refused before it claims anything.

use std::cell::Cell;
use std::time::Duration;

use tokio::runtime::{Handle, Id};

thread_local! {
    // The runtime last found without timers on this thread: its calls are refused without
    // making a timer again, so tokio's panic message is printed once, not on every call.
    static WITHOUT_TIMERS: Cell<Option<Id>> = const { Cell::new(None) };
}

/// Whether a tokio timer can be made here: inside a runtime whose timers are enabled.
pub(crate) fn enabled() -> bool {
    if let Some(id) = WITHOUT_TIMERS.with(Cell::get) {
        if Handle::try_current().is_ok_and(|h| h.id() == id) {
            return false;
        }
    }
    // Tokio has no question for this; making a timer is the test, and without timers (or
    // outside any runtime) it panics. The timer is dropped unpolled: nothing is scheduled.
    let made = std::panic::catch_unwind(|| drop(tokio::time::sleep(Duration::ZERO)));
    if made.is_err() {
        if let Ok(handle) = Handle::try_current() {
            WITHOUT_TIMERS.with(|w| w.set(Some(handle.id())));
        }
    }
    made.is_ok()
}
