//! An operation run to its end on a task of its own, whether or not its caller waits for
//! it (`on_cancel = "finish"`, [`Call::run_to_completion`](crate::Call::run_to_completion)),
//! and joined as if it had run in place.

use std::future::Future;
use std::panic::resume_unwind;

use tokio::task::JoinHandle;

use crate::error::{ConfigError, Error};

/// A task started by [`spawn_to_end`].
pub(crate) struct Detached<T>(JoinHandle<T>);

/// Starts `fut` on a task of the current runtime. The task keeps the caller's default
/// engine (an `as_default` block's), which a task-local would not carry by itself, so
/// the operation's own calls go where they would have gone in place.
pub(crate) fn spawn_to_end<F>(fut: F) -> Result<Detached<F::Output>, Error>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let rt =
        tokio::runtime::Handle::try_current().map_err(|_| Error::Config(ConfigError::NoRuntime))?;
    Ok(Detached(rt.spawn(crate::default_engine::carry(fut))))
}

impl<T> Detached<T> {
    /// The task's output. Its panic continues in the caller, as it would have in place;
    /// a task cancelled with its runtime's shutdown is [`Error::Cancelled`].
    pub(crate) async fn join(self) -> Result<T, Error> {
        match self.0.await {
            Ok(output) => Ok(output),
            Err(e) if e.is_panic() => resume_unwind(e.into_panic()),
            Err(_) => Err(Error::Cancelled),
        }
    }
}
