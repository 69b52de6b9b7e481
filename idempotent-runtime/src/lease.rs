//! A claim the engine holds while the operation runs: renewed while the holder lives, and
//! given up on every way out (error, panic, cancellation) so no key stays locked.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::engine::Inner;
use crate::flight::{FlightGuard, Landing};
use crate::key::StoreKey;
use crate::record::{FencingToken, StoredResult};
use crate::stats::bump;
use crate::store::Fence;

/// How often a lease is renewed, as a fraction of it: two renewals may fail in a row (a
/// slow or briefly unreachable store) before the lease runs out.
const RENEWALS_PER_LEASE: u32 = 3;

/// A claim in the store plus the local flight it leads.
pub(crate) struct HeldClaim {
    engine: Arc<Inner>,
    key: StoreKey,
    token: FencingToken,
    // `None` once the claim was completed or released explicitly.
    flight: Option<FlightGuard>,
}

impl HeldClaim {
    pub(crate) fn new(
        engine: Arc<Inner>,
        key: StoreKey,
        token: FencingToken,
        flight: FlightGuard,
    ) -> Self {
        Self {
            engine,
            key,
            token,
            flight: Some(flight),
        }
    }

    /// Runs `body` while renewing the claim every third of `lease`. A body shorter than a
    /// third of its lease costs no renewal at all.
    pub(crate) async fn renewing<F: Future>(&self, body: F, lease: Duration) -> F::Output {
        let heartbeat = self.heartbeat(lease);
        tokio::pin!(body, heartbeat);
        tokio::select! {
            biased;
            out = &mut body => out,
            never = &mut heartbeat => match never {},
        }
    }

    async fn heartbeat(&self, lease: Duration) -> Infallible {
        let every = lease / RENEWALS_PER_LEASE;
        loop {
            tokio::time::sleep(every).await;
            if let Some(flight) = &self.flight {
                flight.flight().beat();
            }
            match self.engine.store.renew(&self.key, self.token, lease).await {
                Ok(Fence::Held) => {}
                Ok(Fence::Lost) => {
                    // Another caller took the key over; renewing cannot win it back, and
                    // completing will be refused. The body runs on to its end.
                    warn!(scope = self.key.scope(), key = %self.key.digest(), token = self.token.get(),
                        "idempotency claim lost while running; its result will not be stored");
                    break;
                }
                Err(err) => {
                    bump(&self.engine.stats.store_errors);
                    warn!(scope = self.key.scope(), key = %self.key.digest(), error = %err,
                        "could not renew idempotency claim; retrying");
                }
            }
        }
        std::future::pending().await
    }

    /// Stores `result` for `ttl` and hands it to the local followers. A claim lost in the
    /// meantime (counted in `lease_lost`) stores nothing and sends the followers to the
    /// store; a store failure (counted in `store_errors`) leaves the claim to lapse with
    /// its lease, and the followers in this process still get the result.
    pub(crate) async fn complete(mut self, result: StoredResult, ttl: Duration) {
        let flight = self.flight.take();
        let fingerprint = flight.as_ref().and_then(|f| f.flight().fingerprint());
        let landing = match self
            .engine
            .store
            .complete(&self.key, self.token, result.clone(), ttl)
            .await
        {
            Ok(Fence::Held) => Landing::Result {
                result,
                fingerprint,
            },
            Ok(Fence::Lost) => {
                bump(&self.engine.stats.lease_lost);
                warn!(scope = self.key.scope(), key = %self.key.digest(), token = self.token.get(),
                    "idempotency claim was taken over before completion; result not stored");
                // The new holder's result is the key's; followers go and get it.
                Landing::Retry
            }
            Err(err) => {
                bump(&self.engine.stats.store_errors);
                warn!(scope = self.key.scope(), key = %self.key.digest(), error = %err,
                    "could not store idempotency result; the claim lapses with its lease");
                // This process has the result in hand; its own duplicates may share it.
                Landing::Result {
                    result,
                    fingerprint,
                }
            }
        };
        if let Some(flight) = flight {
            flight.land(landing);
        }
    }

    /// Gives the claim up now, then wakes the followers to start over.
    pub(crate) async fn release(mut self) {
        let flight = self.flight.take();
        release(&self.engine, &self.key, self.token).await;
        drop(flight);
    }
}

async fn release(engine: &Inner, key: &StoreKey, token: FencingToken) {
    match engine.store.release(key, token).await {
        Ok(_) => debug!(scope = key.scope(), key = %key.digest(), "idempotency claim released"),
        Err(err) => {
            bump(&engine.stats.store_errors);
            warn!(scope = key.scope(), key = %key.digest(), error = %err,
                "could not release idempotency claim; it lapses with its lease");
        }
    }
}

impl Drop for HeldClaim {
    /// The holder's future was dropped mid-operation (a cancelled request, a timeout).
    fn drop(&mut self) {
        let Some(flight) = self.flight.take() else {
            return;
        };
        // Release before waking the followers, or they would find the key still claimed
        // and wait out the lease. Without a runtime to release on, the lease frees the key.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let engine = self.engine.clone();
            let key = self.key.clone();
            let token = self.token;
            rt.spawn(async move {
                release(&engine, &key, token).await;
                drop(flight);
            });
        }
    }
}
