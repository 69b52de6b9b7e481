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
    // The runtime this thread last found without timers: its calls are refused without a
    // timer made again, so tokio's panic message is printed once per such runtime and
    // thread, not on every call. Only a "no" is kept: a runtime that has timers is asked
    // again on every call, so that no answer outlives its runtime (tokio may give a later
    // runtime the id of one that is gone).
    static WITHOUT_TIMERS: Cell<Option<Id>> = const { Cell::new(None) };
}

/// Whether a tokio timer can be made here: inside a runtime whose timers are enabled.
fn enabled() -> bool {
    // Outside any runtime there are no timers, and no panic need be made to learn it.
    let Ok(handle) = Handle::try_current() else {
        return false;
    };
    let id = handle.id();
    if WITHOUT_TIMERS.try_with(Cell::get) == Ok(Some(id)) {
        return false;
    }
    // Tokio has no question for this; making a timer is the test, and without timers it
    // panics (through the panic hook; under `panic = "abort"` the process ends here, before
    // anything is claimed). The timer is dropped unpolled: nothing is scheduled.
    let timed = std::panic::catch_unwind(|| drop(tokio::time::sleep(Duration::ZERO))).is_ok();
    if !timed {
        let _ = WITHOUT_TIMERS.try_with(|without| without.set(Some(id)));
    }
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
