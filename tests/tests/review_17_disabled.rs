//! Review of #17: `IDEMPOTENT_DISABLED` and `on_cancel = "finish"`. A file of its own: the
//! variable is read once per process.

use std::sync::Arc;

use idempotent_runtime::{idempotent, Error, DISABLED_ENV};
use tokio::sync::{oneshot, Notify};

#[idempotent(key = id, on_cancel = "finish", scope = "r17d.finish")]
async fn finishing(
    id: u64,
    started: Arc<Notify>,
    go: Arc<Notify>,
    done: oneshot::Sender<()>,
) -> Result<u32, Error> {
    started.notify_one();
    go.notified().await;
    let _ = done.send(());
    Ok(1)
}

/// With the switch on, `on_cancel = "finish"` bodies run inline in the caller's future
/// (`run_to_completion` returns `body()` directly): a dropped caller stops the body
/// half-way, which `on_cancel = "finish"` exists to prevent. The README says the switch
/// removes keys, replays and single-flight, not that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_body_runs_to_its_end_with_the_switch_on() {
    std::env::set_var(DISABLED_ENV, "1");
    let (started, go) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (done, finished) = oneshot::channel();
    let call = tokio::spawn(finishing(1, started.clone(), go.clone(), done));
    started.notified().await;
    call.abort();
    let _ = call.await;
    go.notify_one();
    assert!(
        finished.await.is_ok(),
        "the body stopped half-way with its dropped caller"
    );
}
