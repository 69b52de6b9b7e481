//! The engine of `#[idempotent]` functions that name no `store`: one per tokio runtime,
//! in memory, unless a block runs with another as its default ([`Idempotency::as_default`]).
//!
//! Per runtime, not per process, so that tests keep apart: every `#[tokio::test]` has a
//! runtime of its own, and two tests of one binary that call a function with equal keys
//! each run it, rather than the second replaying the first's result. A service runs on
//! one runtime, where this is one engine for every task and thread. Functions that must
//! share records across runtimes, or processes, name a `store`.

use std::future::Future;
use std::sync::OnceLock;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::runtime::{Handle, Id};

use crate::engine::Idempotency;

tokio::task_local! {
    /// The engine a block runs with as its default.
    static OVERRIDE: Idempotency;
}

/// The default engine of each runtime that has used one.
fn by_runtime() -> &'static DashMap<Id, Idempotency> {
    static ENGINES: OnceLock<DashMap<Id, Idempotency>> = OnceLock::new();
    ENGINES.get_or_init(DashMap::new)
}

/// The default engine where the caller is: the block's, its runtime's, or, outside any
/// tokio runtime (a future polled by another executor), the process's.
pub(crate) fn current() -> Idempotency {
    if let Ok(engine) = OVERRIDE.try_with(Idempotency::clone) {
        return engine;
    }
    let Ok(handle) = Handle::try_current() else {
        static OUTSIDE: OnceLock<Idempotency> = OnceLock::new();
        return OUTSIDE.get_or_init(Idempotency::memory).clone();
    };
    let id = handle.id();
    if let Some(engine) = by_runtime().get(&id) {
        return engine.clone();
    }
    let engine = match by_runtime().entry(id) {
        Entry::Occupied(e) => return e.get().clone(),
        Entry::Vacant(e) => e.insert(Idempotency::memory()).clone(),
    };
    // The runtime forgets its engine when it is dropped: it drops this task, which never
    // ends, and the guard in it removes the entry. (Runtimes of tests come and go by the
    // hundred; their engines must not pile up.)
    let guard = Forget(id);
    handle.spawn(async move {
        let _guard = guard;
        std::future::pending::<()>().await;
    });
    engine
}

/// Removes a runtime's default engine when dropped.
struct Forget(Id);

impl Drop for Forget {
    fn drop(&mut self) {
        by_runtime().remove(&self.0);
    }
}

/// Whether runtime `id` has a default engine now (for the tests of the cleanup).
pub(crate) fn has_one(id: Id) -> bool {
    by_runtime().contains_key(&id)
}

impl Idempotency {
    /// Runs `fut` with this engine as the default of the `#[idempotent]` functions it
    /// calls that name no `store`, instead of its runtime's: for a test that wants to
    /// look at the records and counters of the calls it makes.
    ///
    /// The default is the block's own: tasks it spawns have their runtime's, as before.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_runtime::Error> {
    /// use idempotent_runtime::{idempotent, Error, Idempotency};
    ///
    /// #[idempotent(key = id)]
    /// async fn price(id: u32) -> Result<u32, Error> {
    ///     Ok(id * 100)
    /// }
    ///
    /// let idem = Idempotency::memory();
    /// idem.as_default(async {
    ///     price(7).await?;
    ///     price(7).await
    /// })
    /// .await?;
    /// assert_eq!((idem.stats().executed, idem.stats().replayed), (1, 1));
    /// # Ok(()) }
    /// ```
    pub async fn as_default<F: Future>(&self, fut: F) -> F::Output {
        OVERRIDE.scope(self.clone(), fut).await
    }

    /// The engine `#[idempotent]` functions that name no `store` use here: the one a
    /// surrounding [`as_default`](Self::as_default) block gives, or this runtime's.
    pub fn current_default() -> Idempotency {
        current()
    }
}
