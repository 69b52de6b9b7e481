//! `run_in_transaction` under attack, from the outside review of #13, against the real
//! PostgreSQL: cancellation at every step, a `BEGIN` or `COMMIT` whose answer is slow or
//! lost, a peer gone silent, a full pool, a takeover racing the commit, bodies that end
//! their own transaction. Each test asserts what the documented guarantee promises.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotent_runtime::store::PostgresStore;
use idempotent_runtime::{Concurrency, Error, Outcome, StoreError, StoreErrorKind};
use idempotent_tests::transactions::{
    apply, begin_delaying_proxy, effects, engine, insert, other_process, server_addr,
    store_with_effects, url_through,
};
use idempotent_tests::FaultyStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const SCOPE: &str = "review.apply";

/// What the trap does to the first `COMMIT` it sees once armed.
#[derive(Clone, Copy, PartialEq)]
enum OnCommit {
    /// The `COMMIT` never reaches the server and the connection stays open, silent: a
    /// peer that vanished without a reset (a partition, a dead host) right after the
    /// completion's `UPDATE` was answered. Released when the trap drops.
    Swallow,
    /// The `COMMIT` reaches the server, its answer is held back, and the connection is
    /// closed after the given delay.
    AnswerLostAfter(Duration),
}

/// A proxy in front of PostgreSQL that acts on a `COMMIT` once armed.
struct Trap {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    sprung: Arc<Notify>,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Trap {
    async fn start(target: SocketAddr, mode: OnCommit) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let armed = Arc::new(AtomicBool::new(false));
        let sprung = Arc::new(Notify::new());
        let stop = Arc::new(Notify::new());
        let (a, s, st) = (armed.clone(), sprung.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                conns.push(tokio::spawn(Self::pump(
                    client,
                    server,
                    mode,
                    a.clone(),
                    s.clone(),
                    st.clone(),
                )));
            }
        });
        Self {
            addr,
            armed,
            sprung,
            stop,
            task,
        }
    }

    async fn pump(
        client: TcpStream,
        server: TcpStream,
        mode: OnCommit,
        armed: Arc<AtomicBool>,
        sprung: Arc<Notify>,
        stop: Arc<Notify>,
    ) {
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let cut = Arc::new(AtomicBool::new(false));
        let up = {
            let cut = cut.clone();
            let sprung = sprung.clone();
            async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let commit = buf[..n].windows(6).any(|w| w == b"COMMIT");
                    if commit && armed.swap(false, Ordering::SeqCst) {
                        cut.store(true, Ordering::SeqCst);
                        sprung.notify_one();
                        match mode {
                            OnCommit::Swallow => {
                                // Nothing more goes through; the sockets stay open.
                                std::future::pending::<()>().await;
                            }
                            OnCommit::AnswerLostAfter(d) => {
                                let _ = sw.write_all(&buf[..n]).await;
                                tokio::time::sleep(d).await;
                                return;
                            }
                        }
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        };
        let down = {
            let cut = cut.clone();
            async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if cut.load(Ordering::SeqCst) {
                        // Answers after the trap sprang go nowhere.
                        std::future::pending::<()>().await;
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        };
        tokio::select! {
            () = up => {}
            () = down => {}
            () = stop.notified() => {}
        }
    }

    fn url(&self) -> String {
        url_through(self.addr)
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.stop.notify_waiters();
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Finding: a commit swallowed by a silent peer leaves the completion's row lock held by an
// idle-in-transaction backend; the key is then locked (every retry fails with a store
// error) until the server notices the dead client, which by default takes hours.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_peer_at_commit_does_not_lock_the_key_for_longer_than_a_few_leases() {
    let direct = store_with_effects().await;
    let t = direct.table().to_owned();
    let trap = Trap::start(server_addr().await, OnCommit::Swallow).await;
    let via_trap = PostgresStore::connect(&trap.url())
        .await
        .expect("connect through the trap")
        .with_table(&t)
        .expect("table");
    let lease = Duration::from_secs(1);
    let holder = engine(via_trap, lease);

    trap.armed.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let first = holder
        .call("msg-zombie")
        .scope(SCOPE)
        .run_in_transaction(|tx| {
            Box::pin(async {
                insert(&t, "first", tx).await?;
                Ok::<_, Error>(1_u32)
            })
        })
        .await;
    eprintln!("first call after {:?}: {first:?}", started.elapsed());
    assert!(!trap.armed.load(Ordering::SeqCst), "the trap sprang");

    // Another process retries for 10 leases. The first transaction never committed
    // (its COMMIT never arrived), so a retry should run or wait, and end with a value.
    let retrier = engine(other_process(&t).await, lease);
    let began = Instant::now();
    let mut errors = Vec::new();
    let outcome = loop {
        let again = apply(&retrier, SCOPE, &t, "msg-zombie", "retry", 2_u32).await;
        match again {
            Ok(answer) => break Some(answer),
            Err(e) if began.elapsed() < lease * 10 => errors.push(format!("{e:?}")),
            Err(e) => {
                errors.push(format!("{e:?}"));
                break None;
            }
        }
    };
    let locks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' AND query LIKE 'UPDATE%'",
    )
    .fetch_one(direct.pool())
    .await
    .expect("pg_stat_activity");
    drop(trap); // the zombie's socket closes, the server rolls it back
    assert!(
        outcome.is_some(),
        "the key stayed locked for {:?} after the first call ended ({} retries failed, \
         idle-in-transaction backends holding the completion: {locks}); first errors: {:?}",
        began.elapsed(),
        errors.len(),
        &errors[..errors.len().min(2)]
    );
}

// ---------------------------------------------------------------------------------------
// Finding: the settle reads the row, not the transaction's fate. With a TTL shorter than
// the time from commit to settle, a committed transaction whose row expired and was
// purged (or taken over) is reported as rolled back: Error::Store, "did not run", while
// its writes are in the database.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_whose_answer_is_lost_is_never_reported_as_not_run_when_it_committed() {
    let direct = store_with_effects().await;
    let t = direct.table().to_owned();
    let trap = Trap::start(
        server_addr().await,
        OnCommit::AnswerLostAfter(Duration::from_millis(600)),
    )
    .await;
    let via_trap = PostgresStore::connect(&trap.url())
        .await
        .expect("connect through the trap")
        .with_table(&t)
        .expect("table");
    let holder = engine(via_trap, Duration::from_secs(2));

    trap.armed.store(true, Ordering::SeqCst);
    let sprung = trap.sprung.clone();
    let purger = {
        let direct = direct.clone();
        tokio::spawn(async move {
            sprung.notified().await;
            // The TTL (100 ms) runs out while the commit's answer is lost; a purger runs.
            tokio::time::sleep(Duration::from_millis(300)).await;
            direct.purge_expired().await.expect("purge")
        })
    };
    let answer = holder
        .call("msg-ttl")
        .scope(SCOPE)
        .ttl(Duration::from_millis(100))
        .run_in_transaction_with_outcome(|tx| {
            Box::pin(async {
                insert(&t, "committed", tx).await?;
                Ok::<_, Error>(7_u32)
            })
        })
        .await;
    let purged = purger.await.expect("purger");
    let written = effects(&direct).await;
    eprintln!("answer {answer:?}, purged {purged}, rows {written:?}");
    assert_eq!(written, ["committed"], "the transaction committed");
    match answer {
        Ok(_) => {}
        Err(Error::Store(e)) if e.kind() == StoreErrorKind::CommitUnknown => {}
        other => panic!(
            "the transaction committed, but the caller was told {other:?} \
             (Error::Store: 'the operation did not run')"
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Finding: renewals share the pool with the transactions. With as many transactional
// bodies in flight as the pool has connections, no renewal gets a connection, live
// holders' leases lapse, another process takes their keys over, and every live holder
// ends with LeaseLost after doing all its work.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_pool_does_not_cost_live_holders_their_leases() {
    let store = store_with_effects().await; // PostgresStore::connect: 16 connections
    let t = store.table().to_owned();
    let lease = Duration::from_millis(600);
    let busy = engine(store.clone(), lease);
    let other = engine(other_process(&t).await, lease);

    let mut holders = Vec::new();
    for i in 0..16 {
        let (busy, t) = (busy.clone(), t.clone());
        holders.push(tokio::spawn(async move {
            busy.call(format!("msg-{i}"))
                .scope(SCOPE)
                .run_in_transaction(|tx| {
                    Box::pin(async move {
                        insert(&t, &format!("holder-{i}"), tx).await?;
                        // A body of three leases, alive and well the whole time.
                        tokio::time::sleep(lease * 3).await;
                        Ok::<_, Error>(format!("holder-{i}"))
                    })
                })
                .await
        }));
    }
    // Another process's duplicate of key 0 arrives while the holder is still running.
    tokio::time::sleep(lease * 3 / 2).await;
    let dup = other
        .call("msg-0")
        .scope(SCOPE)
        .run_in_transaction_with_outcome(|tx| {
            let t = t.clone();
            Box::pin(async move {
                insert(&t, "duplicate", tx).await?;
                Ok::<_, Error>("duplicate".to_owned())
            })
        })
        .await;
    let mut lost = 0;
    let mut answers = Vec::new();
    for h in holders {
        let a = h.await.expect("task");
        if matches!(a, Err(Error::LeaseLost)) {
            lost += 1;
        }
        answers.push(a);
    }
    eprintln!(
        "duplicate: {dup:?}; holder 0: {:?}; lease_lost {lost}; store_errors {}",
        answers[0],
        busy.stats().store_errors
    );
    assert_eq!(
        dup.expect("the duplicate").1,
        Outcome::Replayed,
        "the live holder's result should be replayed, not run again"
    );
    assert_eq!(lost, 0, "live holders lost their leases");
}

// ---------------------------------------------------------------------------------------
// Cancelling the caller at every point of the transactional path: for every key, exactly
// one write survives once a retry has run (never two, never zero), and the key frees.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_cancelled_anywhere_leaves_exactly_one_write_after_a_retry() {
    let store = store_with_effects().await;
    let t = store.table().to_owned();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("idempotent_runtime=warn")
        .with_test_writer()
        .try_init();
    let idem = engine(store.clone(), Duration::from_secs(30));
    // First measure how long a whole call takes, to spread the cancellations over it.
    let t0 = Instant::now();
    idem.call("warmup")
        .scope(SCOPE)
        .run_in_transaction(|tx| {
            Box::pin(async {
                insert(&t, "warmup", tx).await?;
                Ok::<_, Error>(0_u32)
            })
        })
        .await
        .expect("warmup");
    let whole = t0.elapsed().as_micros() as u64;
    let n = 120_u64;
    let mut firsts_seen = Vec::new();
    for i in 0..n {
        let key = format!("k-{i}");
        let cut = Duration::from_micros(whole * 3 / 2 * i / n);
        let tt = t.clone();
        let first = tokio::time::timeout(
            cut,
            idem.call(key.clone())
                .scope(SCOPE)
                .run_in_transaction(|tx| {
                    Box::pin(async move {
                        insert(&tt, "first", tx).await?;
                        Ok::<_, Error>(1_u32)
                    })
                }),
        )
        .await;
        firsts_seen.push(format!("{first:?}"));
    }
    // Retry each key (rejecting while a background release is pending).
    for i in 0..n {
        let key = format!("k-{i}");
        let began = Instant::now();
        loop {
            let tt = t.clone();
            let again = idem
                .call(key.clone())
                .scope(SCOPE)
                .concurrency(Concurrency::Reject)
                .run_in_transaction(|tx| {
                    Box::pin(async move {
                        insert(&tt, "retry", tx).await?;
                        Ok::<_, Error>(1_u32)
                    })
                })
                .await;
            match again {
                Ok(1) => break,
                Err(Error::InProgress) if began.elapsed() < Duration::from_secs(5) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => {
                    let row: Option<(String, i64, String)> = sqlx::query_as(&format!(
                        "SELECT state, token, (expires_at - now())::text FROM {t} WHERE key LIKE '%' || $1"
                    ))
                    .bind(&key)
                    .fetch_optional(store.pool())
                    .await
                    .expect("row");
                    panic!(
                        "{key} (cut at {:?} of a {whole} us call, first call answered {}): retry answered {other:?} after {:?}; row {row:?}",
                        Duration::from_micros(whole * 3 / 2 * i / n),
                        firsts_seen[i as usize],
                        began.elapsed()
                    )
                }
            }
        }
    }
    let written = effects(&store).await;
    let firsts = written.iter().filter(|w| *w == "first").count();
    let retries = written.iter().filter(|w| *w == "retry").count();
    eprintln!("whole call {whole} us; first writes kept {firsts}, retries ran {retries}");
    assert_eq!(firsts + retries, n as usize, "one write per key");
}

// ---------------------------------------------------------------------------------------
// The body ends the transaction itself with raw SQL: misuse, refused loudly. The key is
// marked, so neither an apply twice nor a value whose writes were undone can follow.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_commits_by_hand_and_fails_is_not_run_twice() {
    let store = store_with_effects().await;
    let t = store.table().to_owned();
    let idem = engine(store.clone(), Duration::from_secs(5));
    let attempt = AtomicU32::new(0);
    for _ in 0..2 {
        let answer = idem
            .call("msg-raw-commit")
            .scope(SCOPE)
            .run_in_transaction(|tx| {
                Box::pin(async {
                    insert(&t, "written", tx).await?;
                    sqlx::query("COMMIT")
                        .execute(&mut **tx)
                        .await
                        .map_err(|e| Error::Store(StoreError::new("commit", e)))?;
                    attempt.fetch_add(1, Ordering::SeqCst);
                    Err::<u32, _>(Error::Store(StoreError::msg("a later step failed")))
                })
            })
            .await;
        assert!(matches!(answer, Err(Error::TransactionEnded)), "{answer:?}");
    }
    assert_eq!(attempt.load(Ordering::SeqCst), 1, "the retry was refused");
    assert_eq!(
        effects(&store).await,
        ["written"],
        "the body's write was applied once per attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_rolls_back_by_hand_has_no_result_stored_for_undone_writes() {
    let store = store_with_effects().await;
    let t = store.table().to_owned();
    let idem = engine(store.clone(), Duration::from_secs(5));
    let answer = idem
        .call("msg-raw-rollback")
        .scope(SCOPE)
        .run_in_transaction_with_outcome(|tx| {
            Box::pin(async {
                insert(&t, "undone", tx).await?;
                sqlx::query("ROLLBACK")
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| Error::Store(StoreError::new("rollback", e)))?;
                Ok::<_, Error>(9_u32)
            })
        })
        .await;
    let replay = idem
        .call("msg-raw-rollback")
        .scope(SCOPE)
        .run_in_transaction_with_outcome(|_tx| Box::pin(async { Ok::<_, Error>(0_u32) }))
        .await;
    assert!(matches!(answer, Err(Error::TransactionEnded)), "{answer:?}");
    assert!(matches!(replay, Err(Error::TransactionEnded)), "{replay:?}");
    assert!(effects(&store).await.is_empty());
}

// ---------------------------------------------------------------------------------------
// Holds up? A body that swallows a SQL error (aborted transaction) and returns Ok.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_in_an_aborted_transaction_returning_ok_frees_the_key() {
    let store = store_with_effects().await;
    let t = store.table().to_owned();
    let idem = engine(store.clone(), Duration::from_secs(5));
    let answer = idem
        .call("msg-aborted")
        .scope(SCOPE)
        .run_in_transaction_with_outcome(|tx| {
            Box::pin(async {
                insert(&t, "before", tx).await?;
                let swallowed = sqlx::query("SELECT * FROM no_such_table_anywhere")
                    .execute(&mut **tx)
                    .await;
                assert!(swallowed.is_err());
                Ok::<_, Error>(3_u32)
            })
        })
        .await;
    eprintln!("answer {answer:?}");
    let Err(Error::Store(e)) = &answer else {
        panic!("{answer:?}")
    };
    assert_ne!(e.kind(), StoreErrorKind::CommitUnknown, "{e:?}");
    assert!(effects(&store).await.is_empty());
    let again = idem
        .call("msg-aborted")
        .scope(SCOPE)
        .concurrency(Concurrency::Reject)
        .run_in_transaction_with_outcome(|tx| {
            Box::pin(async {
                insert(&t, "again", tx).await?;
                Ok::<_, Error>(4_u32)
            })
        })
        .await
        .expect("the key is free");
    assert_eq!(again, (4, Outcome::Executed));
}

// ---------------------------------------------------------------------------------------
// Holds up? A body of several leases (renewed meanwhile), and a lapsed lease nobody took
// over: both complete, and a duplicate from another process replays.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_bodies_and_lapsed_leases_nobody_took_complete() {
    let base = store_with_effects().await;
    let t = base.table().to_owned();
    let lease = Duration::from_millis(400);
    let faulty = FaultyStore::new(base.clone());
    let idem = engine(faulty.clone(), lease);
    let other = engine(other_process(&t).await, lease);

    // Renewed for five leases.
    let long = {
        let (idem, t) = (idem.clone(), t.clone());
        tokio::spawn(async move {
            idem.call("msg-long")
                .scope(SCOPE)
                .run_in_transaction(|tx| {
                    Box::pin(async move {
                        insert(&t, "long", tx).await?;
                        tokio::time::sleep(lease * 5).await;
                        Ok::<_, Error>(1_u32)
                    })
                })
                .await
        })
    };
    tokio::time::sleep(lease * 2).await;
    let dup = apply(&other, SCOPE, &t, "msg-long", "dup", 2_u32)
        .await
        .expect("dup");
    assert_eq!(long.await.expect("task").expect("long"), 1);
    assert_eq!(dup, (1, Outcome::Replayed));

    // Lapsed (renewals fail), nobody takes over: the completion still lands.
    faulty.set_down(true);
    let lapsed = idem
        .call("msg-lapsed")
        .scope(SCOPE)
        .run_in_transaction(|tx| {
            Box::pin(async {
                insert(&t, "lapsed", tx).await?;
                tokio::time::sleep(lease * 3).await;
                Ok::<_, Error>(5_u32)
            })
        })
        .await;
    faulty.set_down(false);
    assert_eq!(lapsed.expect("lapsed but not taken"), 5);
    assert_eq!(effects(&base).await, ["long", "lapsed"]);
}

// ---------------------------------------------------------------------------------------
// A holder whose lease lapses exactly as it commits, raced by another process: the write
// lands once and both callers agree on the value.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_racing_the_commit_never_applies_twice() {
    let base = store_with_effects().await;
    let t = base.table().to_owned();
    let lease = Duration::from_millis(300);
    let faulty = FaultyStore::new(base.clone());
    let holder = engine(faulty.clone(), lease);
    let other = engine(other_process(&t).await, lease);
    faulty.set_down(true); // no renewals: the lease lapses 300 ms after the claim
    let mut twice = Vec::new();
    for i in 0..30_u64 {
        let key = format!("race-{i}");
        // The body ends around the lapse; the other process polls for it.
        let body_ms = 250 + (i % 10) * 10;
        let h = {
            let (holder, t, key) = (holder.clone(), t.clone(), key.clone());
            tokio::spawn(async move {
                holder
                    .call(key)
                    .scope(SCOPE)
                    .run_in_transaction_with_outcome(|tx| {
                        Box::pin(async move {
                            insert(&t, "holder", tx).await?;
                            tokio::time::sleep(Duration::from_millis(body_ms)).await;
                            Ok::<_, Error>("holder".to_owned())
                        })
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let o = other
            .call(key.clone())
            .scope(SCOPE)
            .run_in_transaction_with_outcome(|tx| {
                let t = t.clone();
                Box::pin(async move {
                    insert(&t, "other", tx).await?;
                    Ok::<_, Error>("other".to_owned())
                })
            })
            .await;
        let h = h.await.expect("task");
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}_fx"))
            .fetch_one(base.pool())
            .await
            .expect("count");
        let consistent = match (&h, &o) {
            (Ok((hv, Outcome::Executed)), Ok((ov, Outcome::Replayed))) => hv == ov,
            (Err(Error::LeaseLost), Ok((_, Outcome::Executed))) => true,
            _ => false,
        };
        if n != i as i64 + 1 || !consistent {
            twice.push(format!("{key}: rows {n}, holder {h:?}, other {o:?}"));
        }
    }
    assert!(twice.is_empty(), "{twice:#?}");
}

// ---------------------------------------------------------------------------------------
// A statement in the body that waits on a lock longer than the statement timeout, while
// the claim's row is untouched: holds up? (Checks the pool's statement_timeout really
// reaches the body, as documented.)
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_statement_timeout_bounds_the_body_and_the_key_frees() {
    let store = store_with_effects().await;
    let t = store.table().to_owned();
    let idem = engine(store.clone(), Duration::from_secs(5));
    let began = Instant::now();
    let answer = idem
        .call("msg-slow")
        .scope(SCOPE)
        .run_in_transaction(|tx| {
            Box::pin(async {
                insert(&t, "slow", tx).await?;
                sqlx::query("SELECT pg_sleep(5)")
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| Error::Store(StoreError::new("sleep", e)))?;
                Ok::<_, Error>(1_u32)
            })
        })
        .await;
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert!(answer.is_err());
    assert!(effects(&store).await.is_empty());
    let ran = AtomicBool::new(false);
    let again = idem
        .call("msg-slow")
        .scope(SCOPE)
        .concurrency(Concurrency::Reject)
        .run_in_transaction(|_tx| {
            Box::pin(async {
                ran.store(true, Ordering::SeqCst);
                Ok::<_, Error>(2_u32)
            })
        })
        .await
        .expect("the key is free");
    assert_eq!(again, 2);
}

// ---------------------------------------------------------------------------------------
// Finding: a `BEGIN` that is dropped in flight (the engine's own begin timeout, or a caller
// cancelled while the transaction begins) goes back to the pool with the server inside an
// open transaction: sqlx 0.8.6 queues no ROLLBACK for a `BEGIN` whose answer it has not
// read. Every later statement on that connection, the protocol's included, runs in that
// transaction, uncommitted, until some body's COMMIT or ROLLBACK ends it. A plain `run`'s
// completion is then rolled back by an unrelated failing transactional call, and the plain
// operation runs twice.
// ---------------------------------------------------------------------------------------
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_begin_that_times_out_does_not_poison_the_pool() {
    let direct = store_with_effects().await;
    let t = direct.table().to_owned();
    let (addr, armed) = begin_delaying_proxy(server_addr().await, Duration::from_secs(2)).await;
    // One connection, so the test is deterministic; a larger pool gets the same
    // connection back sooner or later.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url_through(addr))
        .await
        .expect("connect through the proxy");
    let store = PostgresStore::from_pool(pool)
        .with_table(&t)
        .expect("table");
    // The engine waits for a transaction to begin for one lease at the most: half the
    // proxy's delay.
    let idem = engine(store.clone(), Duration::from_secs(1));

    // 1. The server is slow to answer one BEGIN: the engine gives up and releases the
    //    key. Nothing was run.
    armed.store(1, Ordering::SeqCst);
    let slow = idem
        .call("tx-slow")
        .scope(SCOPE)
        .run_in_transaction(|_tx| Box::pin(async { Ok::<_, Error>(0_u32) }))
        .await;
    eprintln!("slow begin: {slow:?}");
    assert!(matches!(slow, Err(Error::Store(_))), "{slow:?}");
    // The BEGIN's answer arrives (the proxy's delay is up); with the pool's one
    // connection busy until then, what follows would wait for it anyway.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // 2. A plain call runs and is told its result is stored.
    let runs = AtomicU32::new(0);
    let plain = || {
        idem.call("plain-A")
            .scope(SCOPE)
            .run_with_outcome(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(1_u32)
            })
    };
    assert_eq!(plain().await.expect("plain"), (1, Outcome::Executed));
    let visible: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {t} WHERE key LIKE '%plain-A' AND state = 'c'"
    ))
    .fetch_one(direct.pool())
    .await
    .expect("count");
    eprintln!("records visible to another connection after the plain call: {visible}");

    // 3. An unrelated transactional call fails and rolls back.
    let failed = idem
        .call("tx-B")
        .scope(SCOPE)
        .run_in_transaction(|tx| {
            Box::pin(async {
                insert(&t, "B", tx).await?;
                Err::<u32, _>(Error::Store(StoreError::msg("refused")))
            })
        })
        .await;
    assert!(failed.is_err());

    // 4. The plain call's retry must replay.
    let again = plain().await;
    eprintln!(
        "plain retry: {again:?}; runs {}",
        runs.load(Ordering::SeqCst)
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the plain operation ran twice"
    );
}
