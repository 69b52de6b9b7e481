//! In-process single-flight: concurrent callers of one key in this process share one
//! leader, which alone talks to the store; the rest wait for what it lands.
//!
//! The map holds one [`Flight`] per key in flight. Its lock (a dashmap shard) is held only
//! to look up, insert or remove an entry, never across an `.await`.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::watch;

use crate::fingerprint::Fingerprint;
use crate::hasher::KeyHasher;
use crate::key::StoreKey;
use crate::record::StoredResult;

/// What a leader hands its followers when it is done.
#[derive(Debug, Clone)]
pub(crate) enum Landing {
    /// The key's result (fresh or replayed), with the fingerprint stored beside it.
    Result {
        result: StoredResult,
        fingerprint: Option<Fingerprint>,
    },
    /// Nothing to share (an unstored error, a panic, a cancellation, a lost claim):
    /// followers start over, and one of them leads.
    Retry,
}

/// One key in flight.
#[derive(Debug)]
pub(crate) struct Flight {
    fingerprint: Option<Fingerprint>,
    // What the leader landed; the first landing stands (a flight replaced by a new
    // leader lands `Retry` at once, and its old leader's later landing is moot).
    landed: OnceLock<Landing>,
    // Wakes the followers: on the landing, and on the hand-over of the leader's timing
    // (a second waiter each, a `Notify` for the hand-over, put all of them on one more
    // lock, taken again as each dropped its wait, which cost a thousand coalesced callers
    // more than the rest of their wake-up). Made by the first follower: most flights have
    // none, and making, waking and dropping a channel cost a leader alone about a tenth
    // of a first execution.
    wake: OnceLock<watch::Sender<()>>,
    // Bumped by the leader while its future is being polled; a follower that sees it still
    // after a whole lease knows the leader is stalled and goes to the store itself.
    beats: AtomicU64,
    // Whether a follower is timing the leader; one suffices.
    watched: AtomicBool,
}

/// What a follower's wait ended with.
pub(crate) enum Waited {
    /// The leader landed.
    Landed(Landing),
    /// The follower timing the leader left; another may take the role.
    WatcherLeft,
}

impl Flight {
    fn new(fingerprint: Option<Fingerprint>) -> Arc<Self> {
        Arc::new(Self {
            fingerprint,
            landed: OnceLock::new(),
            wake: OnceLock::new(),
            beats: AtomicU64::new(0),
            watched: AtomicBool::new(false),
        })
    }

    /// The fingerprint the leader runs with.
    pub(crate) fn fingerprint(&self) -> Option<Fingerprint> {
        self.fingerprint
    }

    /// Records that the leader is alive.
    pub(crate) fn beat(&self) {
        self.beats.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times the leader has beaten so far.
    pub(crate) fn beats(&self) -> u64 {
        self.beats.load(Ordering::Relaxed)
    }

    /// Makes the caller the follower that times the leader, unless another one already
    /// does. The role ends when the guard drops, and passes to a waiting follower.
    pub(crate) fn watch_leader(self: &Arc<Self>) -> Option<WatchGuard> {
        self.watched
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| WatchGuard(self.clone()))
    }

    /// A follower's view of the flight, to wait on.
    pub(crate) fn follow(self: &Arc<Self>) -> Following {
        let rx = self.wake.get_or_init(|| watch::Sender::new(())).subscribe();
        // Pairs with the fence in `land`: either the leader sees this follower's channel
        // and wakes it, or this follower's first look sees the landing.
        fence(Ordering::SeqCst);
        Following {
            rx,
            flight: self.clone(),
        }
    }

    fn land(&self, landing: Landing) {
        let _ = self.landed.set(landing);
        fence(Ordering::SeqCst);
        self.wake_followers();
    }

    /// Wakes the followers, if any: each looks again at what it waits for.
    fn wake_followers(&self) {
        if let Some(wake) = self.wake.get() {
            // `send_modify` notifies even when nothing changed.
            wake.send_modify(|_| {});
        }
    }
}

/// A follower's subscription to its flight.
pub(crate) struct Following {
    rx: watch::Receiver<()>,
    flight: Arc<Flight>,
}

impl Following {
    /// Waits for the landing; with `or_watcher_left`, also returns when nobody times the
    /// leader. Cancel-safe: a follower may be dropped at any point.
    pub(crate) async fn wait(&mut self, or_watcher_left: bool) -> Waited {
        let flight = &self.flight;
        let done = |_: &()| {
            flight.landed.get().is_some()
                || (or_watcher_left && !flight.watched.load(Ordering::Acquire))
        };
        match self.rx.wait_for(done).await {
            Ok(_) => match flight.landed.get() {
                Some(landing) => Waited::Landed(landing.clone()),
                None => Waited::WatcherLeft,
            },
            // The sender lives as long as the flight, which we hold, so the channel
            // cannot close; if it somehow did, starting over is the safe answer.
            Err(_) => Waited::Landed(Landing::Retry),
        }
    }
}

/// The role of timing a flight's leader; dropping it hands the role on.
pub(crate) struct WatchGuard(Arc<Flight>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.watched.store(false, Ordering::Release);
        // Wakes the waiting followers; the first to claim the role takes it, the others
        // see it taken and wait again. A follower that subscribes later reads the flag.
        // The guard's holder is a follower, so the channel exists.
        self.0.wake_followers();
    }
}

/// Whether the caller leads its key or follows another caller.
pub(crate) enum Joined {
    Leader(FlightGuard),
    Follower(Arc<Flight>),
}

/// The keys in flight in this process.
#[derive(Debug, Default, Clone)]
pub(crate) struct Flights {
    // Keyed by shared strings: the map and the leader's guard hold one copy between them.
    map: Arc<DashMap<Arc<str>, Arc<Flight>, KeyHasher>>,
}

impl Flights {
    /// Joins the flight for `key`, or starts one and leads it.
    pub(crate) fn join(&self, key: &StoreKey, fingerprint: Option<Fingerprint>) -> Joined {
        // Most joins of a busy key find a leader: a read needs no owned copy of the key.
        if let Some(flight) = self.map.get(key.as_str()) {
            return Joined::Follower(flight.clone());
        }
        let shared: Arc<str> = Arc::from(key.as_str());
        match self.map.entry(shared.clone()) {
            Entry::Occupied(e) => Joined::Follower(e.get().clone()),
            Entry::Vacant(e) => {
                let flight = Flight::new(fingerprint);
                e.insert(flight.clone());
                Joined::Leader(self.guard(shared, flight))
            }
        }
    }

    /// Makes the caller the leader of `key` in place of whatever flight is there, because
    /// it now holds the key's claim in the store (the old leader stalled). The replaced
    /// flight's followers are told to start over, so they follow the new leader.
    pub(crate) fn take_over(
        &self,
        key: &StoreKey,
        fingerprint: Option<Fingerprint>,
    ) -> FlightGuard {
        let flight = Flight::new(fingerprint);
        let shared: Arc<str> = Arc::from(key.as_str());
        if let Some(old) = self.map.insert(shared.clone(), flight.clone()) {
            old.land(Landing::Retry);
        }
        self.guard(shared, flight)
    }

    /// Takes `key`'s flight out of the map, if there is one, and tells its followers to
    /// start over, because the key was forgotten in the store: its leader's claim is gone,
    /// so what it lands would be refused by the store (or would answer for a key that was
    /// deleted), and followers left waiting on a stuck leader would stay stuck. Starting
    /// over, one of them leads and claims the key afresh. The leader itself runs on; its
    /// later landing is moot, and its guard leaves alone whatever flight replaced it.
    /// Says whether there was a flight.
    pub(crate) fn detach(&self, key: &StoreKey) -> bool {
        match self.map.remove(key.as_str()) {
            Some((_, flight)) => {
                flight.land(Landing::Retry);
                true
            }
            None => false,
        }
    }

    fn guard(&self, key: Arc<str>, flight: Arc<Flight>) -> FlightGuard {
        FlightGuard {
            map: self.map.clone(),
            key,
            flight,
            landed: false,
        }
    }

    /// How many keys are in flight (for tests and diagnostics).
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// The leader's hold on its flight. Landing it, or dropping it, removes the flight from
/// the map and wakes every follower; a dropped guard lands [`Landing::Retry`].
#[derive(Debug)]
pub(crate) struct FlightGuard {
    map: Arc<DashMap<Arc<str>, Arc<Flight>, KeyHasher>>,
    key: Arc<str>,
    flight: Arc<Flight>,
    landed: bool,
}

impl FlightGuard {
    pub(crate) fn flight(&self) -> &Flight {
        &self.flight
    }

    pub(crate) fn land(mut self, landing: Landing) {
        self.finish(landing);
    }

    fn finish(&mut self, landing: Landing) {
        if self.landed {
            return;
        }
        self.landed = true;
        // Remove before landing, so a follower that starts over finds the key free; and
        // only our own flight, which a new leader may already have replaced.
        self.map
            .remove_if(&*self.key, |_, f| Arc::ptr_eq(f, &self.flight));
        self.flight.land(landing);
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.finish(Landing::Retry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    /// A follower that joins while its leader lands must never miss the landing: the
    /// leader may land before the follower's channel exists, while it is made, or after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_racing_the_landing_never_misses_it() {
        let flights = Flights::default();
        for i in 0..2_000 {
            let key = StoreKey::new("race", i, 255).expect("key");
            let Joined::Leader(guard) = flights.join(&key, None) else {
                panic!("the first caller leads");
            };
            let Joined::Follower(flight) = flights.join(&key, None) else {
                panic!("the second caller follows");
            };
            let follower = tokio::spawn(async move {
                let mut following = flight.follow();
                following.wait(false).await
            });
            let landing = tokio::spawn(async move {
                guard.land(Landing::Result {
                    result: StoredResult::Ok(Bytes::from_static(b"J1")),
                    fingerprint: None,
                })
            });
            landing.await.expect("lands");
            let waited = tokio::time::timeout(Duration::from_secs(10), follower)
                .await
                .expect("the follower saw the landing")
                .expect("follows");
            assert!(matches!(waited, Waited::Landed(Landing::Result { .. })));
        }
        assert_eq!(flights.len(), 0);
    }

    /// A detached flight's followers start over at once; the next caller leads a flight
    /// of its own, which the old leader's landing neither answers nor removes.
    #[tokio::test]
    async fn a_detached_flight_sends_its_followers_to_a_new_leader() {
        let flights = Flights::default();
        let key = StoreKey::new("detach", "k", 255).expect("key");
        assert!(!flights.detach(&key), "nothing to detach");
        let Joined::Leader(old) = flights.join(&key, None) else {
            panic!("the first caller leads");
        };
        let Joined::Follower(flight) = flights.join(&key, None) else {
            panic!("the second caller follows");
        };
        let mut following = flight.follow();
        assert!(flights.detach(&key));
        assert!(matches!(
            following.wait(false).await,
            Waited::Landed(Landing::Retry)
        ));
        assert_eq!(flights.len(), 0);
        let Joined::Leader(new) = flights.join(&key, None) else {
            panic!("the follower, starting over, leads");
        };
        let Joined::Follower(next) = flights.join(&key, None) else {
            panic!("a later caller follows the new leader");
        };
        old.land(Landing::Result {
            result: StoredResult::Ok(Bytes::from_static(b"J1")),
            fingerprint: None,
        });
        assert_eq!(
            flights.len(),
            1,
            "the old leader leaves the new flight alone"
        );
        assert!(next.landed.get().is_none(), "nor does it answer it");
        // The first landing stood on the detached flight.
        assert!(matches!(flight.landed.get(), Some(Landing::Retry)));
        drop(new);
        assert_eq!(flights.len(), 0);
    }
}
