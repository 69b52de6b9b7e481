//! The slot through which a layer's operation, run by the engine (often on a task of its
//! own), hands the request that ran it a response other than the one it stores: a stream
//! or a body too large to store, passed on as it comes while the key keeps a problem.

use std::sync::{Arc, Mutex};

/// The response for the request that ran the handler, where it is not the one stored.
/// Clones share the slot.
pub(crate) struct FirstAnswer<R>(Arc<Mutex<Option<R>>>);

impl<R> Clone for FirstAnswer<R> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<R> Default for FirstAnswer<R> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<R> FirstAnswer<R> {
    pub(crate) fn set(&self, resp: R) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(resp);
    }

    pub(crate) fn take(&self) -> Option<R> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}
