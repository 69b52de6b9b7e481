//! A store that answers late, or not at all: a claim whose answer arrives after its lease,
//! a completion that hangs, a PostgreSQL connection whose peer stops answering without a
//! reset (a half-open connection after a failover, a partition that drops packets). None
//! of them may let the operation run twice, hang the caller, or stop the heartbeat.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempotent_runtime::store::{MemoryStore, PostgresStore};
use idempotent_runtime::{Error, Idempotency, Outcome};
use idempotent_tests::postgres::{fresh_store, postgres_url};
use idempotent_tests::{FaultyStore, Stop};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};

const LEASE: Duration = Duration::from_millis(300);

fn counted(
    runs: &Arc<AtomicU32>,
    value: u32,
) -> impl FnOnce() -> futures_util::future::BoxFuture<'static, Result<u32, Error>> + Send + 'static
{
    let runs = runs.clone();
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(value)
        })
    }
}

fn engine(store: impl idempotent_runtime::store::Store) -> Idempotency {
    Idempotency::builder()
        .store(store)
        .lease(LEASE)
        .build()
        .expect("engine")
}

/// Process A's claim lands in the store but its answer reaches A only after A's lease has
/// run out (a slow network, a paused process). Meanwhile process B waits the lease out,
/// takes the key over and runs. When A's answer finally arrives, "Acquired", A must not
/// run: a claim answered later than a renewal interval is renewed before it is used, and
/// this one is found lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_answered_after_its_lease_is_not_used_to_run() {
    let shared = MemoryStore::new();
    let slow_link = FaultyStore::new(shared.clone()).without_peek();
    let (a, b) = (engine(slow_link.clone()), engine(shared.clone()));
    let runs = Arc::new(AtomicU32::new(0));

    let mut answer = slow_link.hold(Stop::ClaimAnswer);
    let first = {
        let op = counted(&runs, 1);
        tokio::spawn(async move {
            a.call("pay-1")
                .scope("slow.late")
                .run_with_outcome(op)
                .await
        })
    };
    answer.entered().await; // A's claim is in the store, its answer on the way

    // B (another process) finds the key in progress, waits out A's lease and runs.
    let got_b = tokio::time::timeout(
        Duration::from_secs(10),
        b.call("pay-1")
            .scope("slow.late")
            .run_with_outcome(counted(&runs, 2)),
    )
    .await
    .expect("B is not blocked forever");
    assert!(matches!(got_b, Ok((2, Outcome::Executed))), "{got_b:?}");

    // A's answer arrives, a whole lease late.
    answer.open();
    let got_a = first.await.expect("task");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the operation ran twice: A used a claim whose lease had lapsed before its answer \
         arrived (A got {got_a:?}, B got {got_b:?})"
    );
}

/// The leader's operation returned, and the store is slow to answer its completion (a
/// completion stuck for longer than a lease, but the store otherwise up). The follower
/// that times the leader must not decide that the leader stalled and run the operation
/// again: the completion's wait is bounded, and the followers then get its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_completion_is_not_taken_over_by_a_local_follower() {
    let store = FaultyStore::new(MemoryStore::new()).without_peek();
    let idem = engine(store.clone());
    let runs = Arc::new(AtomicU32::new(0));

    let mut completing = store.hold(Stop::Completion);
    let first = {
        let (idem, op) = (idem.clone(), counted(&runs, 1));
        tokio::spawn(async move {
            idem.call("pay-2")
                .scope("slow.slow")
                .run_with_outcome(op)
                .await
        })
    };
    completing.entered().await; // the operation ran; its result is on the way to the store

    let mut duplicate = {
        let (idem, op) = (idem.clone(), counted(&runs, 2));
        tokio::spawn(async move {
            idem.call("pay-2")
                .scope("slow.slow")
                .run_with_outcome(op)
                .await
        })
    };
    // Bounded: a correct engine keeps the duplicate waiting for the leader's landing.
    let early = tokio::time::timeout(LEASE * 6, &mut duplicate).await;
    completing.open();
    let got_first = first.await.expect("task");
    let got_dup = match early {
        Ok(r) => r.expect("task"),
        Err(_) => duplicate.await.expect("task"),
    };
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "ran twice in one process: first got {got_first:?}, duplicate got {got_dup:?}, \
         stats {:?}",
        idem.stats()
    );
}

/// The lease of the PostgreSQL tests: long enough for a loaded machine's round trips.
const PG_LEASE: Duration = Duration::from_millis(600);

/// A proxy that, once armed with a pattern, silently stops forwarding (in both
/// directions) the connection on which the client sends those bytes: the connection stays
/// open and nothing comes back, as with a peer that vanished without a reset.
struct StallingProxy {
    addr: SocketAddr,
    armed: Arc<Mutex<Option<&'static [u8]>>>,
    stalled: Arc<Notify>,
}

impl StallingProxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let armed: Arc<Mutex<Option<&'static [u8]>>> = Arc::new(Mutex::new(None));
        let stalled = Arc::new(Notify::new());
        let (armed2, stalled2) = (armed.clone(), stalled.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (armed, stalled) = (armed2.clone(), stalled2.clone());
                tokio::spawn(async move {
                    let frozen = Arc::new(AtomicBool::new(false));
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let f2 = frozen.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = sr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if !f2.load(Ordering::SeqCst) && cw.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                        // Keep the client side open.
                        std::future::pending::<()>().await;
                    });
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if !frozen.load(Ordering::SeqCst) {
                            let hit = {
                                let mut a = armed.lock().unwrap();
                                let hit =
                                    a.is_some_and(|p| buf[..n].windows(p.len()).any(|w| w == p));
                                if hit {
                                    *a = None;
                                }
                                hit
                            };
                            if hit {
                                frozen.store(true, Ordering::SeqCst);
                                stalled.notify_one();
                                continue;
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                    std::future::pending::<()>().await;
                });
            }
        });
        Self {
            addr,
            armed,
            stalled,
        }
    }

    fn arm(&self, pattern: &'static [u8]) {
        *self.armed.lock().unwrap() = Some(pattern);
    }

    fn url(&self) -> String {
        let direct = postgres_url();
        let rest = direct.rsplit_once('@').expect("user@host in url").1;
        let db = rest.split_once('/').map_or("", |(_, db)| db);
        let user = direct
            .split_once("://")
            .and_then(|(_, r)| r.split_once('@'))
            .map_or("postgres", |(u, _)| u);
        format!("postgres://{user}@{}/{db}", self.addr)
    }
}

async fn pg_addr() -> SocketAddr {
    let url = postgres_url();
    let hostport = url
        .rsplit_once('@')
        .map(|(_, r)| r.split('/').next().unwrap_or(r).to_owned())
        .expect("host:port");
    tokio::net::lookup_host(hostport)
        .await
        .expect("resolve")
        .next()
        .expect("an address")
}

/// The completion statement is the only one that contains this text.
const COMPLETE_SQL: &[u8] = b"SET state = CASE";
/// The renewal statement is the only one that contains this text.
const RENEW_SQL: &[u8] = b"UPDATE idemtest";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_completion_on_a_stalled_connection_neither_hangs_nor_runs_twice() {
    let proxy = StallingProxy::start(pg_addr().await).await;
    let via_proxy = fresh_store(&proxy.url()).await;
    let table = via_proxy.table().to_owned();
    let direct = PostgresStore::connect(&postgres_url())
        .await
        .expect("direct")
        .with_table(&table)
        .expect("table");
    let (a, b) = (
        Idempotency::builder()
            .store(via_proxy)
            .lease(PG_LEASE)
            .build()
            .unwrap(),
        Idempotency::builder()
            .store(direct)
            .lease(PG_LEASE)
            .build()
            .unwrap(),
    );
    let runs = Arc::new(AtomicU32::new(0));
    proxy.arm(COMPLETE_SQL);
    let first = {
        let runs = runs.clone();
        tokio::spawn(async move {
            a.call("pay-1")
                .scope("slow.pg")
                .run_with_outcome(move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(1u32)
                })
                .await
        })
    };
    proxy.stalled.notified().await; // the completion is on a connection that went silent
                                    // Another process retries the same payment.
    let runs2 = runs.clone();
    let got_b = tokio::time::timeout(
        Duration::from_secs(10),
        b.call("pay-1")
            .scope("slow.pg")
            .run_with_outcome(move || async move {
                runs2.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(2u32)
            }),
    )
    .await
    .expect("B finishes");
    let a_done = first.is_finished();
    assert!(
        runs.load(Ordering::SeqCst) == 1 && a_done,
        "runs = {} (B got {got_b:?}); the first caller finished: {a_done} \
         (its completion waits forever on the silent connection)",
        runs.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_stalled_renewal_does_not_stop_the_heartbeat_for_good() {
    let proxy = StallingProxy::start(pg_addr().await).await;
    let via_proxy = fresh_store(&proxy.url()).await;
    let table = via_proxy.table().to_owned();
    let direct = PostgresStore::connect(&postgres_url())
        .await
        .expect("direct")
        .with_table(&table)
        .expect("table");
    let (a, b) = (
        Idempotency::builder()
            .store(via_proxy)
            .lease(PG_LEASE)
            .build()
            .unwrap(),
        Idempotency::builder()
            .store(direct)
            .lease(PG_LEASE)
            .build()
            .unwrap(),
    );
    let runs = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(Notify::new());
    let (started_tx, started) = oneshot::channel();
    let first = {
        let (runs, gate) = (runs.clone(), gate.clone());
        tokio::spawn(async move {
            a.call("pay-2")
                .scope("slow.pg")
                .run_with_outcome(move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = started_tx.send(());
                    gate.notified().await; // a long operation: the heartbeat must renew
                    Ok::<_, Error>(1u32)
                })
                .await
        })
    };
    started.await.expect("started");
    proxy.arm(RENEW_SQL);
    proxy.stalled.notified().await; // one renewal went to a connection that went silent
                                    // The store itself is fine (other connections work). Another process retries.
    let runs2 = runs.clone();
    let got_b = tokio::time::timeout(
        Duration::from_secs(3),
        b.call("pay-2")
            .scope("slow.pg")
            .run_with_outcome(move || async move {
                runs2.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(2u32)
            }),
    )
    .await;
    gate.notify_one();
    let n = runs.load(Ordering::SeqCst);
    assert!(
        n == 1 && !matches!(got_b, Ok(Ok((2, Outcome::Executed)))),
        "runs = {n}: while the first operation was still running, its claim lapsed (the \
         heartbeat waits forever on one renewal) and B ran it again: {got_b:?}"
    );
    drop(first);
}
