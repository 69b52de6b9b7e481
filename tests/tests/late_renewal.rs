//! A claim answered later than a third of its lease is renewed before the operation runs;
//! that renewal's answer, too, counts only when it comes promptly. One that lands in the
//! store but whose answer arrives after the renewed lease ran out must not be taken as
//! "still ours" while another process holds the key.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use idempotent_runtime::store::{Claim, Fence, Inspected, MemoryStore, Store};
use idempotent_runtime::{
    Error, FencingToken, Fingerprint, Idempotency, Outcome, StoreError, StoreKey, StoredResult,
};
use tokio::sync::{oneshot, Notify};

const LEASE: Duration = Duration::from_secs(1);

/// Says a renewal reached the store, then waits to be let go.
type RenewHold = (oneshot::Sender<()>, Arc<Notify>);

/// A slow link to `inner`: the first claim's answer arrives `claim_delay` after the store
/// applied it (a slow network: injected latency), and the first renewal's answer is held
/// after the store applied it until the test opens it.
#[derive(Debug, Clone)]
struct SlowLink<S> {
    inner: S,
    claim_delay: Arc<Mutex<Option<Duration>>>,
    renew_hold: Arc<Mutex<Option<RenewHold>>>,
}

#[async_trait]
impl<S: Store + Clone> Store for SlowLink<S> {
    async fn claim(
        &self,
        key: &StoreKey,
        token: FencingToken,
        fp: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let answer = self.inner.claim(key, token, fp, lease).await;
        let delay = self.claim_delay.lock().unwrap().take();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await; // the answer is on a slow network
        }
        answer
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let answer = self.inner.renew(key, token, lease).await;
        let hold = self.renew_hold.lock().unwrap().take();
        if let Some((entered, open)) = hold {
            let _ = entered.send(());
            open.notified().await;
        }
        answer
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        result: StoredResult,
        ttl: Duration,
    ) -> Result<Fence, StoreError> {
        self.inner.complete(key, token, result, ttl).await
    }

    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<Fence, StoreError> {
        self.inner.release(key, token).await
    }

    async fn inspect(&self, key: &StoreKey) -> Result<Option<Inspected>, StoreError> {
        self.inner.inspect(key).await
    }

    async fn forget(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.inner.forget(key).await
    }
}

fn engine(store: impl Store) -> Idempotency {
    Idempotency::builder()
        .store(store)
        .lease(LEASE)
        .build()
        .expect("engine")
}

/// A's claim is answered after half a lease (later than a third: the engine renews it
/// first). The renewal lands and extends A's lease, but its answer takes longer than that
/// lease. B (another process) waits the lease out, takes the key over and runs. Then A's
/// renewal answer arrives, `Held`, and A runs too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_renewal_answered_after_its_lease_is_not_used_to_run() {
    let shared = MemoryStore::new();
    let (entered_tx, entered) = oneshot::channel();
    let open = Arc::new(Notify::new());
    let link = SlowLink {
        inner: shared.clone(),
        claim_delay: Arc::new(Mutex::new(Some(LEASE / 2))),
        renew_hold: Arc::new(Mutex::new(Some((entered_tx, open.clone())))),
    };
    let (a, b) = (engine(link), engine(shared));
    let runs = Arc::new(AtomicU32::new(0));

    let first = {
        let runs = runs.clone();
        tokio::spawn(async move {
            a.call("pay-1")
                .scope("slow.late-renewal")
                .run_with_outcome(move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(1u32)
                })
                .await
        })
    };
    // A's late claim was renewed in the store; the renewal's answer is on the way.
    entered.await.expect("A renews its late claim");

    let got_b = {
        let runs = runs.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            b.call("pay-1")
                .scope("slow.late-renewal")
                .run_with_outcome(move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(2u32)
                }),
        )
        .await
        .expect("B is not blocked forever")
    };
    // The renewal's answer ("held") finally reaches A, well after its lease.
    open.notify_one();
    let got_a = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("A finishes")
        .expect("task");
    // One of them ran (A, if a prompt renewal confirmed its claim; else B, once A's lease
    // ran out), and the other got that value.
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the operation ran twice: A ran on a renewal whose answer came after its lease \
         (A got {got_a:?}, B got {got_b:?})"
    );
    let value = |got: &Result<(u32, Outcome), Error>| got.as_ref().map(|(v, _)| *v).ok();
    assert_eq!(value(&got_a), value(&got_b), "A: {got_a:?}, B: {got_b:?}");
}
