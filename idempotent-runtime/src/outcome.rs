//! The outcome of one call made through `#[idempotent]`, for whoever awaits it:
//! [`outcome_of`], the peer of the `cached` crate's `with_cached_flag`, without changing
//! the function's signature.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::engine::Outcome;

tokio::task_local! {
    /// Where the first attributed call in an [`outcome_of`] block reports.
    static SLOT: Arc<Slot>;
}

/// How many [`outcome_of`] blocks are open in the process. While none is, no call has a
/// slot to report to, and [`Report::claim`] does not look for one: the task-local's
/// lookup costs a hit more than this load.
///
/// Relaxed is enough: a call inside a block runs on the block's task, after the block's
/// increment in that task's order, so it reads a count that includes its block's.
static OPEN_BLOCKS: AtomicUsize = AtomicUsize::new(0);

/// One open [`outcome_of`] block, counted in [`OPEN_BLOCKS`] until it ends or is dropped.
struct OpenBlock;

impl OpenBlock {
    fn open() -> Self {
        OPEN_BLOCKS.fetch_add(1, Ordering::Relaxed);
        OpenBlock
    }
}

impl Drop for OpenBlock {
    fn drop(&mut self) {
        OPEN_BLOCKS.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Slot {
    /// Set by the first attributed call made in the block; the calls its body makes (and
    /// any later ones) find it set and report nothing, so the outcome is the outer call's.
    taken: AtomicBool,
    /// 0 while nothing is known, else [`code`] of the outcome.
    outcome: AtomicU8,
    /// Bumped when a call that took the slot is dropped before its answer, which frees
    /// the slot for a retry in the same block: what the dropped call's body (still running
    /// on a task of its own under `on_cancel = "finish"`) says later is then not heard.
    generation: AtomicU32,
}

fn code(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Executed => 1,
        Outcome::Replayed => 2,
        Outcome::Coalesced => 3,
    }
}

impl Slot {
    fn set(&self, outcome: Outcome) {
        self.outcome.store(code(outcome), Ordering::Release);
    }

    fn get(&self) -> Option<Outcome> {
        match self.outcome.load(Ordering::Acquire) {
            1 => Some(Outcome::Executed),
            2 => Some(Outcome::Replayed),
            3 => Some(Outcome::Coalesced),
            _ => None,
        }
    }
}

/// Awaits `call`, a call of an `#[idempotent]` function, and says how it got its value:
/// executed (its body ran), replayed (a stored result) or coalesced (it shared the
/// result of a duplicate running in this process).
///
/// The outcome is that of the first attributed call the future makes; calls made inside
/// its body (nested attributed functions) do not change it. It is `None` when no
/// attributed call answered through the engine: the call was refused before its body
/// ran (its `Err` says why: `Error::Mismatch`, `Error::InProgress`, a store error), the
/// attribute is switched off ([`DISABLED_ENV`](crate::DISABLED_ENV)), or an `Option`
/// key was `None` under `on_missing_key = "run"`. A body that ran and returned an error
/// reports [`Outcome::Executed`]. Two limits: a stored error replayed (`cache_errors`)
/// reports `None`, as the engine's answer does not say whether an `Err` was replayed; and
/// blocks do not nest: an `outcome_of` inside another takes the call for itself, and the
/// outer block reports `None`. A call of the block dropped before its answer (a timeout)
/// gives way: a retry in the same block reports.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use idempotent_runtime::{idempotent, outcome_of, Error, Outcome};
///
/// #[idempotent(key = order_id, scope = "docs.outcome")]
/// async fn ship(order_id: u64) -> Result<String, Error> {
///     Ok(format!("parcel-{order_id}"))
/// }
///
/// let (first, how) = outcome_of(ship(7)).await;
/// assert_eq!(first.unwrap(), "parcel-7");
/// assert_eq!(how, Some(Outcome::Executed));
///
/// let (again, how) = outcome_of(ship(7)).await;
/// assert_eq!(again.unwrap(), "parcel-7");
/// assert_eq!(how, Some(Outcome::Replayed));
/// # }
/// ```
pub async fn outcome_of<F: Future>(call: F) -> (F::Output, Option<Outcome>) {
    let slot = Arc::new(Slot::default());
    let open = OpenBlock::open();
    let output = SLOT.scope(Arc::clone(&slot), call).await;
    drop(open);
    (output, slot.get())
}

/// Where one attributed call reports its outcome: the [`outcome_of`] block's slot, if the
/// call is the block's first, else nowhere. A call dropped before its answer (a timeout, a
/// `select!`) gives the slot back, so a retry in the same block reports.
pub(crate) struct Report {
    slot: Option<(Arc<Slot>, u32)>,
    settled: bool,
}

/// What the call's body says when it starts: that the call executed.
pub(crate) struct Ran(Option<(Arc<Slot>, u32)>);

impl Report {
    /// Takes the current block's slot if no call took it yet. While no block is open in
    /// the process, this is one load; outside a block, one look at a task-local more: no
    /// allocation.
    #[inline]
    pub(crate) fn claim() -> Self {
        if OPEN_BLOCKS.load(Ordering::Relaxed) == 0 {
            return Self {
                slot: None,
                settled: false,
            };
        }
        let slot = SLOT
            .try_with(|slot| {
                (!slot.taken.swap(true, Ordering::AcqRel))
                    .then(|| (Arc::clone(slot), slot.generation.load(Ordering::Acquire)))
            })
            .ok()
            .flatten();
        Self {
            slot,
            settled: false,
        }
    }

    /// For the body, which reports that it started.
    pub(crate) fn started(&self) -> Ran {
        Ran(self.slot.clone())
    }

    /// The call ended without an outcome of the engine's (a body run directly): the slot
    /// stays taken and empty, so calls nested in the body do not speak for it.
    pub(crate) fn settle(mut self) {
        self.settled = true;
    }

    /// The call's answer, with its outcome reported. An `Err` reports nothing beyond what
    /// the body said: refusals have no outcome, and the engine does not say whether an
    /// error it returns was replayed.
    ///
    /// Inlined: out of line, the answer is moved once more on every call.
    #[inline(always)]
    pub(crate) fn answered<T, E>(mut self, answer: Result<(T, Outcome), E>) -> Result<T, E> {
        self.settled = true;
        answer.map(|(value, outcome)| {
            self.set(outcome);
            value
        })
    }

    /// [`Report::answered`] for a call answered from a stored result, told only whether
    /// the answer is `Ok`: the answer itself goes straight into the caller's type, and is
    /// not moved through here.
    #[inline(always)]
    pub(crate) fn replayed(&mut self, ok: bool) {
        self.settled = true;
        if ok {
            self.set(Outcome::Replayed);
        }
    }

    #[inline(always)]
    fn set(&self, outcome: Outcome) {
        if let Some((slot, generation)) = &self.slot {
            if slot.generation.load(Ordering::Acquire) == *generation {
                slot.set(outcome);
            }
        }
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Some((slot, generation)) = &self.slot {
            if slot
                .generation
                .compare_exchange(
                    *generation,
                    generation.wrapping_add(1),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
            {
                slot.outcome.store(0, Ordering::Release);
                slot.taken.store(false, Ordering::Release);
            }
        }
    }
}

impl Ran {
    /// The call's body started.
    pub(crate) fn ran(&self) {
        if let Some((slot, generation)) = &self.0 {
            if slot.generation.load(Ordering::Acquire) == *generation {
                slot.set(Outcome::Executed);
            }
        }
    }
}
