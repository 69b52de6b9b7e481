//! `run_in_transaction` against a real PostgreSQL: the operation's writes and its stored
//! result commit together, and whatever stops the operation before that commit (an error,
//! a panic, a cancelled caller, a killed process, a claim taken over, a commit whose
//! answer is lost) leaves none of its writes behind, so a retry never applies them twice.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotent_runtime::store::PostgresStore;
use idempotent_runtime::{Concurrency, ConfigError, Error, Idempotency, Outcome, StoreErrorKind};
use idempotent_tests::crash::KilledOnDrop;
use idempotent_tests::postgres::postgres_url;
use idempotent_tests::transactions::{
    apply, effects, engine, insert, other_process, server_addr, store_with_effects, url_through,
};
use idempotent_tests::{eventually, FaultyStore};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

const SCOPE: &str = "ledger.apply";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_writes_and_the_result_commit_together_and_replay_runs_nothing() {
    let store = store_with_effects().await;
    let idem = engine(store.clone(), Duration::from_secs(5));
    let t = store.table().to_owned();
    let runs = AtomicU32::new(0);
    for round in 0..3 {
        let (value, outcome) = idem
            .call("msg-1")
            .scope(SCOPE)
            .fingerprint(&("acct-1", 500))
            .run_in_transaction_with_outcome(|tx| {
                Box::pin(async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    insert(&t, "first", tx).await?;
                    Ok::<_, Error>(format!("posted-{round}"))
                })
            })
            .await
            .expect("the call");
        assert_eq!(value, "posted-0", "round {round}");
        let expected = if round == 0 {
            Outcome::Executed
        } else {
            Outcome::Replayed
        };
        assert_eq!(outcome, expected);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(effects(&store).await, ["first"]);

    // The record was written by the same commit: a different payload under the key is
    // refused, and nothing runs.
    let refused = idem
        .call("msg-1")
        .scope(SCOPE)
        .fingerprint(&("acct-1", 900))
        .run_in_transaction(|tx| {
            Box::pin(async {
                insert(&t, "mismatch", tx).await?;
                Ok::<_, Error>(String::new())
            })
        })
        .await;
    assert!(matches!(refused, Err(Error::Mismatch)), "{refused:?}");
    assert_eq!(effects(&store).await, ["first"]);
    assert_eq!(idem.stats().executed, 1);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
enum Refused {
    #[error("insufficient funds")]
    InsufficientFunds,
    #[error("idempotency: {0}")]
    Idempotency(String),
}

impl From<Error> for Refused {
    fn from(e: Error) -> Self {
        Refused::Idempotency(e.to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_error_rolls_the_writes_back_and_frees_the_key_or_is_stored() {
    let store = store_with_effects().await;
    let idem = engine(store.clone(), Duration::from_secs(5));
    let t = store.table().to_owned();

    // Not stored: rolled back, and the key is free at once (a rejecting duplicate runs).
    let failed = idem
        .call("msg-err")
        .scope(SCOPE)
        .run_in_transaction(|tx| {
            Box::pin(async {
                insert(&t, "failed", tx).await.map_err(Refused::from)?;
                Err::<u32, _>(Refused::InsufficientFunds)
            })
        })
        .await;
    assert_eq!(failed, Err(Refused::InsufficientFunds));
    assert!(
        effects(&store).await.is_empty(),
        "the failed call's write was rolled back"
    );
    let retried = idem
        .call("msg-err")
        .scope(SCOPE)
        .concurrency(Concurrency::Reject)
        .run_in_transaction_with_outcome(|tx| {
            Box::pin(async {
                insert(&t, "retried", tx).await?;
                Ok::<_, Error>(7_u32)
            })
        })
        .await
        .expect("the key was released");
    assert_eq!(retried, (7, Outcome::Executed));
    assert_eq!(effects(&store).await, ["retried"]);

    // Stored: the writes are still rolled back, and a retry gets the same error without
    // running.
    let runs = AtomicU32::new(0);
    for _ in 0..2 {
        let declined = idem
            .call("msg-declined")
            .scope(SCOPE)
            .store_errors()
            .run_in_transaction(|tx| {
                Box::pin(async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    insert(&t, "declined", tx).await.map_err(Refused::from)?;
                    Err::<u32, _>(Refused::InsufficientFunds)
                })
            })
            .await;
        assert_eq!(declined, Err(Refused::InsufficientFunds));
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the stored error was replayed"
    );
    assert_eq!(effects(&store).await, ["retried"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panic_or_a_cancelled_caller_rolls_back_and_frees_the_key() {
    let store = store_with_effects().await;
    let idem = engine(store.clone(), Duration::from_secs(30));
    let t = store.table().to_owned();

    let panicking = {
        let (idem, t) = (idem.clone(), t.clone());
        tokio::spawn(async move {
            idem.call("msg-panic")
                .scope(SCOPE)
                .run_in_transaction(|tx| {
                    Box::pin(async move {
                        insert(&t, "panicked", tx).await?;
                        panic!("the operation panics after its write");
                        #[allow(unreachable_code)]
                        Ok::<u32, Error>(0)
                    })
                })
                .await
        })
    };
    let joined = panicking.await;
    assert!(
        joined.is_err_and(|e| e.is_panic()),
        "the panic reaches the caller"
    );

    let inserted = Arc::new(Notify::new());
    let cancelled = {
        let (idem, t, inserted) = (idem.clone(), t.clone(), inserted.clone());
        tokio::spawn(async move {
            idem.call("msg-cancel")
                .scope(SCOPE)
                .run_in_transaction(|tx| {
                    Box::pin(async move {
                        insert(&t, "cancelled", tx).await?;
                        inserted.notify_one();
                        std::future::pending::<()>().await;
                        Ok::<u32, Error>(0)
                    })
                })
                .await
        })
    };
    inserted.notified().await;
    cancelled.abort();
    assert!(cancelled.await.is_err_and(|e| e.is_cancelled()));

    // Both keys free themselves long before their 30 s leases: a rejecting call runs.
    for key in ["msg-panic", "msg-cancel"] {
        let started = Instant::now();
        loop {
            let again = idem
                .call(key)
                .scope(SCOPE)
                .concurrency(Concurrency::Reject)
                .run_in_transaction_with_outcome(|tx| {
                    Box::pin(async {
                        insert(&t, "retried", tx).await?;
                        Ok::<_, Error>(1_u32)
                    })
                })
                .await;
            match again {
                Ok(answer) => {
                    assert_eq!(answer, (1, Outcome::Executed));
                    break;
                }
                // The release runs in the background after a cancellation.
                Err(Error::InProgress) if started.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{key}: {e:?}"),
            }
        }
    }
    assert_eq!(effects(&store).await, ["retried", "retried"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_taken_over_rolls_back_and_reports_lease_lost() {
    let base = store_with_effects().await;
    let t = base.table().to_owned();
    let lease = Duration::from_millis(400);
    // The first holder's renewals go through a store that a test can take down.
    let faulty = FaultyStore::new(base.clone());
    let stale = engine(faulty.clone(), lease);
    let fresh = engine(other_process(&t).await, lease);

    let inserted = Arc::new(Notify::new());
    let go_on = Arc::new(Semaphore::new(0));
    let first = {
        let (stale, t, inserted, go_on) =
            (stale.clone(), t.clone(), inserted.clone(), go_on.clone());
        tokio::spawn(async move {
            stale
                .call("msg-lost")
                .scope(SCOPE)
                .run_in_transaction(|tx| {
                    Box::pin(async move {
                        insert(&t, "stale", tx).await?;
                        inserted.notify_one();
                        let _permit = go_on.acquire().await;
                        Ok::<_, Error>("stale".to_owned())
                    })
                })
                .await
        })
    };
    inserted.notified().await;
    // Its renewals fail now, so its claim lapses, and another process takes the key over.
    faulty.set_down(true);
    let (value, outcome) = fresh
        .call("msg-lost")
        .scope(SCOPE)
        .run_in_transaction_with_outcome(|tx| {
            Box::pin(async {
                insert(&t, "fresh", tx).await?;
                Ok::<_, Error>("fresh".to_owned())
            })
        })
        .await
        .expect("the takeover");
    assert_eq!((value.as_str(), outcome), ("fresh", Outcome::Executed));

    faulty.set_down(false);
    go_on.add_permits(1);
    let stale_answer = first.await.expect("the stale holder's task");
    assert!(
        matches!(stale_answer, Err(Error::LeaseLost)),
        "{stale_answer:?}"
    );
    assert_eq!(stale.stats().lease_lost, 1);
    assert_eq!(
        effects(&base).await,
        ["fresh"],
        "the stale holder's write never landed"
    );
    let replay = stale
        .call("msg-lost")
        .scope(SCOPE)
        .run_in_transaction_with_outcome(|_tx| Box::pin(async { Ok::<_, Error>(String::new()) }))
        .await
        .expect("the replay");
    assert_eq!(replay, ("fresh".to_owned(), Outcome::Replayed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_in_this_process_and_others_run_the_operation_once() {
    let store = store_with_effects().await;
    let t = store.table().to_owned();
    let lease = Duration::from_secs(2);
    // Two engines with pools of their own are two processes to each other: they meet only
    // in the database.
    let mut engines = vec![engine(store.clone(), lease)];
    engines.push(engine(other_process(&t).await, lease));
    let runs = Arc::new(AtomicU32::new(0));
    let started = Arc::new(Notify::new());
    let finish = Arc::new(Semaphore::new(0));
    let mut calls = Vec::new();
    for i in 0..16 {
        let idem = engines[i % 2].clone();
        let (t, runs, started, finish) = (t.clone(), runs.clone(), started.clone(), finish.clone());
        calls.push(tokio::spawn(async move {
            idem.call("msg-dup")
                .scope(SCOPE)
                .run_in_transaction_with_outcome(|tx| {
                    Box::pin(async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        insert(&t, "dup", tx).await?;
                        started.notify_one();
                        let _permit = finish.acquire().await;
                        Ok::<_, Error>(42_u32)
                    })
                })
                .await
        }));
    }
    started.notified().await;
    // Every other caller is waiting, in this engine or the other: let the one body end.
    eventually(
        Duration::from_secs(10),
        "the duplicates are waiting",
        || engines.iter().map(Idempotency::in_flight).sum::<usize>() == 2,
    )
    .await;
    finish.add_permits(16);
    let mut outcomes = Vec::new();
    for c in calls {
        let (value, outcome) = c.await.expect("task").expect("call");
        assert_eq!(value, 42);
        outcomes.push(outcome);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        outcomes.iter().filter(|o| **o == Outcome::Executed).count(),
        1
    );
    assert_eq!(effects(&store).await, ["dup"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_ttl_the_key_is_new() {
    let store = store_with_effects().await;
    let idem = engine(store.clone(), Duration::from_secs(5));
    let t = store.table().to_owned();
    let call = |who: &'static str| {
        let t = t.clone();
        idem.call("msg-ttl")
            .scope(SCOPE)
            .ttl(Duration::from_millis(200))
            .run_in_transaction_with_outcome(move |tx| {
                Box::pin(async move {
                    insert(&t, who, tx).await?;
                    Ok::<_, Error>(who.to_owned())
                })
            })
    };
    let got = |answer: Result<(String, Outcome), Error>| {
        let (value, outcome) = answer.expect("the call");
        (value, outcome)
    };
    assert_eq!(got(call("one").await), ("one".into(), Outcome::Executed));
    assert_eq!(got(call("two").await), ("one".into(), Outcome::Replayed));
    // The database's clock decides expiry; wait it out, with a margin.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        got(call("three").await),
        ("three".into(), Outcome::Executed)
    );
    assert_eq!(effects(&store).await, ["one", "three"]);
}

#[tokio::test]
async fn an_engine_over_another_store_refuses_without_running() {
    let ran = AtomicBool::new(false);
    for idem in [Idempotency::memory(), Idempotency::memory()] {
        // Even a key the store holds a result for is refused: the call is a mistake.
        let _ = idem
            .call("k")
            .scope(SCOPE)
            .run(|| async { Ok::<_, Error>(1_u32) })
            .await;
        let refused = idem
            .call("k")
            .scope(SCOPE)
            .run_in_transaction(|_tx| {
                Box::pin(async {
                    ran.store(true, Ordering::SeqCst);
                    Ok::<_, Error>(2_u32)
                })
            })
            .await;
        assert!(
            matches!(refused, Err(Error::Config(ConfigError::NotTransactional))),
            "{refused:?}"
        );
    }
    assert!(!ran.load(Ordering::SeqCst));
}

/// Starts `holder postgres-tx` on `table` and waits until it has inserted its row (in its
/// transaction, not yet committed).
fn start_holder(table: &str, lease: Duration) -> KilledOnDrop {
    let mut child = KilledOnDrop(
        Command::new(env!("CARGO_BIN_EXE_holder"))
            .args([
                "postgres-tx",
                &postgres_url(),
                table,
                &lease.as_millis().to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the holder binary"),
    );
    let stdout = child.stdout.take().expect("piped stdout");
    let inserted = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("INSERTED"));
    assert!(inserted, "the holder never inserted its row");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_killed_mid_transaction_leaves_nothing_and_its_key_is_taken_over() {
    let store = store_with_effects().await;
    let t = store.table().to_owned();
    let lease = Duration::from_millis(800);
    let idem = engine(store.clone(), lease);
    let mut holder = tokio::task::spawn_blocking({
        let t = t.clone();
        move || start_holder(&t, lease)
    })
    .await
    .expect("start the holder");

    let refused = idem
        .call("crash")
        .scope("holder")
        .concurrency(Concurrency::Reject)
        .run_in_transaction(|_tx| Box::pin(async { Ok::<u32, Error>(1) }))
        .await;
    assert!(matches!(refused, Err(Error::InProgress)), "{refused:?}");

    holder.kill().expect("kill the holder");
    let _ = holder.wait();
    let killed = Instant::now();
    let (value, outcome) = idem
        .call("crash")
        .scope("holder")
        .run_in_transaction_with_outcome(|tx| {
            Box::pin(async {
                insert(&t, "survivor", tx).await?;
                Ok::<u32, Error>(2)
            })
        })
        .await
        .expect("the takeover");
    assert_eq!((value, outcome), (2, Outcome::Executed));
    assert!(
        killed.elapsed() < lease + Duration::from_secs(2),
        "took {:?} for a {lease:?} lease",
        killed.elapsed()
    );
    assert_eq!(
        effects(&store).await,
        ["survivor"],
        "the killed holder's row vanished"
    );
}

/// A proxy in front of PostgreSQL that, once armed, lets a `COMMIT` through to the
/// server and then drops the connection it came on before the server's answer gets back:
/// the commit happens, and the client cannot know. Set to, it then refuses new
/// connections too (an outage that starts with the commit), until told otherwise.
struct CommitTrap {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    then_refuse: Arc<AtomicBool>,
    refusing: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CommitTrap {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let armed = Arc::new(AtomicBool::new(false));
        let then_refuse = Arc::new(AtomicBool::new(false));
        let refusing = Arc::new(AtomicBool::new(false));
        let (a, t, r) = (armed.clone(), then_refuse.clone(), refusing.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if r.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let refuse = (t.clone(), r.clone());
                tokio::spawn(Self::pump(client, server, a.clone(), refuse));
            }
        });
        Self {
            addr,
            armed,
            then_refuse,
            refusing,
            task,
        }
    }

    async fn pump(
        client: TcpStream,
        server: TcpStream,
        armed: Arc<AtomicBool>,
        (then_refuse, refusing): (Arc<AtomicBool>, Arc<AtomicBool>),
    ) {
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let cut = Arc::new(AtomicBool::new(false));
        let up = {
            let (cut, armed) = (cut.clone(), armed.clone());
            async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let commit = buf[..n].windows(6).any(|w| w == b"COMMIT");
                    if commit && armed.load(Ordering::SeqCst) {
                        // From here on the server's answers go nowhere.
                        cut.store(true, Ordering::SeqCst);
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    if cut.load(Ordering::SeqCst) {
                        // The client says nothing more that matters; wait for `down`.
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        let down = async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if cut.load(Ordering::SeqCst) {
                    // The server has answered the commit, so it committed: now the
                    // connection drops, and the client never hears of it.
                    if then_refuse.load(Ordering::SeqCst) {
                        refusing.store(true, Ordering::SeqCst);
                    }
                    armed.store(false, Ordering::SeqCst);
                    return;
                }
                if cw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        // Either side ending ends both: the client sees its connection close.
        tokio::select! {
            () = up => {}
            () = down => {}
        }
    }

    fn url(&self) -> String {
        url_through(self.addr)
    }
}

impl Drop for CommitTrap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_whose_answer_is_lost_is_found_to_have_committed() {
    let direct = store_with_effects().await;
    let t = direct.table().to_owned();
    let trap = CommitTrap::start(server_addr().await).await;
    let store = PostgresStore::connect(&trap.url())
        .await
        .expect("connect through the trap")
        .with_table(&t)
        .expect("table");
    let idem = engine(store, Duration::from_secs(5));

    trap.armed.store(true, Ordering::SeqCst);
    let answer = apply(&idem, SCOPE, &t, "msg-commit", "committed", 5_u32).await;
    assert!(
        !trap.armed.load(Ordering::SeqCst),
        "the trap caught the commit"
    );
    // The database says it committed: the caller gets the value, as the retry would.
    assert_eq!(answer.expect("the call"), (5, Outcome::Executed));
    assert_eq!(effects(&direct).await, ["committed"]);
    let replay = idem
        .call("msg-commit")
        .scope(SCOPE)
        .run_in_transaction_with_outcome(|_tx| Box::pin(async { Ok::<_, Error>(0_u32) }))
        .await
        .expect("the replay");
    assert_eq!(replay, (5, Outcome::Replayed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_that_cannot_be_settled_is_reported_unknown_and_a_retry_learns() {
    let direct = store_with_effects().await;
    let t = direct.table().to_owned();
    let trap = CommitTrap::start(server_addr().await).await;
    // One connection: the transaction's, so the outcome can only be asked on a new one.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&trap.url())
        .await
        .expect("connect through the trap");
    let store = PostgresStore::from_pool(pool)
        .with_table(&t)
        .expect("table");
    let idem = engine(store, Duration::from_secs(5));

    // Once the commit is on its way, the database becomes unreachable for new
    // connections, so the outcome cannot be asked.
    trap.then_refuse.store(true, Ordering::SeqCst);
    trap.armed.store(true, Ordering::SeqCst);
    let answer = apply(&idem, SCOPE, &t, "msg-unknown", "committed", 6_u32).await;
    assert!(
        !trap.armed.load(Ordering::SeqCst),
        "the trap caught the commit"
    );
    // The pool's one connection carried the transaction, and no new one can be made.
    match answer {
        Err(Error::Store(e)) => assert_eq!(e.kind(), StoreErrorKind::CommitUnknown, "{e:?}"),
        other => panic!("{other:?}"),
    }
    trap.refusing.store(false, Ordering::SeqCst);
    let retry = idem
        .call("msg-unknown")
        .scope(SCOPE)
        .run_in_transaction_with_outcome(|_tx| Box::pin(async { Ok::<_, Error>(0_u32) }))
        .await
        .expect("the retry");
    assert_eq!(retry, (6, Outcome::Replayed), "the commit had landed");
    assert_eq!(effects(&direct).await, ["committed"]);
}

#[derive(Debug, thiserror::Error)]
enum LedgerError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Idempotency(#[from] Error),
}

/// A service whose method runs in a transaction through the attribute.
struct Ledger {
    idem: Idempotency,
    table: String,
    runs: AtomicU32,
}

impl Ledger {
    #[idempotent_runtime::idempotent(key = id, store = &self.idem, scope = "ledger.post", transaction = tx)]
    async fn post(&self, id: &str, cents: i64) -> Result<i64, LedgerError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        sqlx::query(&format!("INSERT INTO {}_fx (who) VALUES ($1)", self.table))
            .bind(id)
            .execute(&mut **tx)
            .await?;
        if cents < 0 {
            // Written, then refused: the write must not stay.
            return Err(LedgerError::Idempotency(Error::Mismatch));
        }
        Ok(cents)
    }
}

/// The same through `#[async_trait]`, which rewrites the method before the attribute.
#[async_trait::async_trait]
trait Post {
    async fn post_boxed(&self, id: String, cents: i64) -> Result<i64, LedgerError>;
}

#[async_trait::async_trait]
impl Post for Ledger {
    #[idempotent_runtime::idempotent(key = id, store = &self.idem, scope = "ledger.boxed", transaction = tx)]
    async fn post_boxed(&self, id: String, cents: i64) -> Result<i64, LedgerError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        sqlx::query(&format!("INSERT INTO {}_fx (who) VALUES ($1)", self.table))
            .bind(&id)
            .execute(&mut **tx)
            .await?;
        Ok(cents)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_attribute_runs_the_body_in_a_transaction() {
    let store = store_with_effects().await;
    let ledger = Arc::new(Ledger {
        idem: engine(store.clone(), Duration::from_secs(5)),
        table: store.table().to_owned(),
        runs: AtomicU32::new(0),
    });
    // Concurrent duplicates, spawned: one runs, the rest get its result.
    let mut calls = Vec::new();
    for _ in 0..8 {
        let ledger = ledger.clone();
        calls.push(tokio::spawn(async move { ledger.post("p-1", 250).await }));
    }
    for c in calls {
        assert_eq!(c.await.expect("task").expect("post"), 250);
    }
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 1);
    assert_eq!(effects(&store).await, ["p-1"]);

    let refused = ledger.post("p-2", -5).await;
    assert!(matches!(
        refused,
        Err(LedgerError::Idempotency(Error::Mismatch))
    ));
    assert_eq!(
        effects(&store).await,
        ["p-1"],
        "the refused post's write rolled back"
    );

    for _ in 0..2 {
        assert_eq!(
            ledger.post_boxed("p-3".into(), 75).await.expect("boxed"),
            75
        );
    }
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 3);
    assert_eq!(effects(&store).await, ["p-1", "p-3"]);
}

/// Spawns calls of the keys `k0`..`k7` on `idem`, each inserting `who` and holding its
/// transaction open for `hold`, and answering `who`.
fn spawn_eight(
    idem: &Idempotency,
    t: &str,
    who: &'static str,
    hold: Duration,
) -> Vec<tokio::task::JoinHandle<Result<String, Error>>> {
    (0..8)
        .map(|i| {
            let (idem, t) = (idem.clone(), t.to_owned());
            tokio::spawn(async move {
                idem.call(format!("k{i}"))
                    .scope(SCOPE)
                    .run_in_transaction(|tx| {
                        Box::pin(async move {
                            insert(&t, who, tx).await?;
                            tokio::time::sleep(hold).await;
                            Ok::<_, Error>(who.to_owned())
                        })
                    })
                    .await
            })
        })
        .collect()
}

/// Eight transactional calls on a pool of four connections, each running for two leases,
/// while another process waits on the same keys, ready to take over any claim that
/// lapses: no live holder may lose its claim for want of a connection to renew it with.
///
/// (With `with_transaction_limit(8)` on the store, which lets the transactions take every
/// connection, this fails: renewals time out waiting for a connection, four holders get
/// `Error::LeaseLost` and four a store error, and the other process runs all eight.)
async fn more_transactions_than_connections() -> (Vec<String>, u64) {
    let base = store_with_effects().await;
    let t = base.table().to_owned();
    let lease = Duration::from_millis(600);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&postgres_url())
        .await
        .expect("connect");
    let store = PostgresStore::from_pool(pool)
        .with_table(&t)
        .expect("table");
    let holder = engine(store, lease);
    let other = engine(other_process(&t).await, lease);
    let calls = spawn_eight(&holder, &t, "holder", 2 * lease);
    // Every key claimed in the database before the other process asks for it.
    let claimed = format!("SELECT count(*) FROM {t} WHERE state = 'p'");
    let started = Instant::now();
    while sqlx::query_scalar::<_, i64>(&claimed)
        .fetch_one(base.pool())
        .await
        .expect("count the claims")
        < 8
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not all eight claimed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let waiting = spawn_eight(&other, &t, "other", Duration::ZERO);
    let mut answers = Vec::new();
    for c in calls.into_iter().chain(waiting) {
        answers.push(match c.await.expect("task") {
            Ok(v) => v,
            Err(e) => format!("{e:?}"),
        });
    }
    (answers, holder.stats().lease_lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_transactions_than_connections_keep_their_claims() {
    let (answers, lease_lost) = more_transactions_than_connections().await;
    assert_eq!(
        answers,
        vec!["holder".to_owned(); 16],
        "every caller got the holder's value"
    );
    assert_eq!(lease_lost, 0);
}
