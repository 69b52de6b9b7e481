//! The engine of `#[idempotent]` functions that name no `store`.
//!
//! - In a block run by [`Idempotency::as_default`], the block's engine.
//! - In the crate's own tests (the function's crate built with `cfg(test)`, as
//!   `cargo test` builds its unit tests and examples), one per tokio runtime: every
//!   `#[tokio::test]` has a runtime of its own, so two tests of one binary that call a
//!   function with equal keys each run it, rather than the second replaying the first's
//!   result.
//! - Otherwise, one per process, shared by every runtime: a service's (actix-web runs one
//!   runtime per worker thread, and duplicates on two workers must meet).
//!
//! The choice is made where the function is compiled: the attribute passes `cfg!(test)`
//! of the function's crate. Integration tests (`tests/`) build that crate without
//! `cfg(test)`; they share the process's engine unless they use `as_default` or a `store`.

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

/// The default engine of each runtime that has used one, in test builds.
fn by_runtime() -> &'static DashMap<Id, Idempotency> {
    static ENGINES: OnceLock<DashMap<Id, Idempotency>> = OnceLock::new();
    ENGINES.get_or_init(DashMap::new)
}

/// The process's default engine.
fn process() -> Idempotency {
    static ENGINE: OnceLock<Idempotency> = OnceLock::new();
    ENGINE.get_or_init(Idempotency::memory).clone()
}

/// The default engine where the caller is: the block's; else, in a test build
/// (`per_runtime`), its runtime's; else the process's.
pub(crate) fn current(per_runtime: bool) -> Idempotency {
    if let Ok(engine) = OVERRIDE.try_with(Idempotency::clone) {
        return engine;
    }
    if !per_runtime {
        return process();
    }
    let Ok(handle) = Handle::try_current() else {
        return process();
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
    // ends, and the guard in it removes the entry (test runtimes come and go by the
    // hundred). The task counts among the runtime's alive tasks. A runtime already
    // shutting down refuses it: its calls from then on (a blocking task still running)
    // get a new engine each.
    let guard = Forget(id);
    handle.spawn(async move {
        let _guard = guard;
        std::future::pending::<()>().await;
    });
    engine
}

/// `fut`, run with the caller's block's default engine, if it has one: for a task the
/// library spawns on the caller's behalf (`on_cancel = "finish"`).
pub(crate) fn carry<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    let engine = OVERRIDE.try_with(Idempotency::clone).ok();
    async move {
        match engine {
            Some(engine) => OVERRIDE.scope(engine, fut).await,
            None => fut.await,
        }
    }
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
    /// calls that name no `store`: for a test that wants to look at the records and
    /// counters of the calls it makes, or keep them apart from other tests' (integration
    /// tests share the process's default engine).
    ///
    /// The default is the block's own and goes with the bodies the library runs on tasks
    /// of their own (`on_cancel = "finish"`); tasks the block spawns itself have the usual
    /// default.
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

    /// The engine that `#[idempotent]` functions that name no `store`, compiled without
    /// `cfg(test)`, use here: the one a surrounding [`as_default`](Self::as_default)
    /// block gives, or the process's.
    pub fn current_default() -> Idempotency {
        current(false)
    }
}
