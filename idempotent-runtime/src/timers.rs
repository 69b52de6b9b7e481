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

use crate::error::{ConfigError, Error};

thread_local! {
    // The runtime this thread last asked about, and the answer: a runtime's timers are set
    // when it is built, and its id is never given to another, so each thread makes a timer
    // to find out once per runtime (and tokio's panic message, where it has none, is
    // printed once per thread, not on every call).
    static LAST: Cell<Option<(Id, bool)>> = const { Cell::new(None) };
}

/// Whether a tokio timer can be made here: inside a runtime whose timers are enabled.
pub(crate) fn enabled() -> bool {
    // Outside any runtime there are no timers, and no panic need be made to learn it.
    let Ok(handle) = Handle::try_current() else {
        return false;
    };
    let id = handle.id();
    if let Ok(Some((last, timed))) = LAST.try_with(Cell::get) {
        if last == id {
            return timed;
        }
    }
    // Tokio has no question for this; making a timer is the test, and without timers it
    // panics (through the panic hook; under `panic = "abort"` the process ends here, before
    // anything is claimed). The timer is dropped unpolled: nothing is scheduled.
    let timed = std::panic::catch_unwind(|| drop(tokio::time::sleep(Duration::ZERO))).is_ok();
    let _ = LAST.try_with(|last| last.set(Some((id, timed))));
    timed
}

/// [`enabled`], as the error a call or a store operation is refused with.
pub(crate) fn required() -> Result<(), Error> {
    if enabled() {
        Ok(())
    } else {
        Err(Error::Config(ConfigError::TimersDisabled))
    }
}
