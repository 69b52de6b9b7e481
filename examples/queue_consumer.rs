//! A RabbitMQ consumer that applies ledger postings to PostgreSQL exactly once, although
//! RabbitMQ delivers at least once: the producer publishes some postings two or three
//! times, and a consumer that dies before its acknowledgement gets its messages again.
//!
//! Each delivery is applied with `run_in_transaction`, keyed by the message id: the
//! posting's rows and the idempotency record commit in one PostgreSQL transaction, and the
//! message is acknowledged only after that. A duplicate gets the first result back (and is
//! acknowledged); a consumer killed mid-apply leaves nothing behind, and the redelivery
//! applies the posting once its claim has lapsed (one lease, a second here).
//!
//! ```text
//! cargo run --example queue_consumer             # publish 300 postings, then consume them
//! cargo run --example queue_consumer -- publish  # only publish (starting from scratch)
//! cargo run --example queue_consumer -- consume  # only consume, until all 300 are applied
//! ```
//!
//! It needs RabbitMQ and PostgreSQL (`bash .ci/services` starts both on a Debian machine):
//! - `IDEMPOTENT_TEST_AMQP`: default `amqp://guest:guest@127.0.0.1:5672/%2f`;
//! - `IDEMPOTENT_TEST_POSTGRES`: default `postgres://postgres@127.0.0.1:5432/test`;
//! - `QUEUE_CONSUMER_NAME`: the queue, and the prefix of the tables `<name>_postings`,
//!   `<name>_balances` and `<name>_idempotency` (default `queue_consumer`). Publishing
//!   drops and recreates them.
//!
//! Try `consume` in one terminal, `kill -9` it half-way, and run it again: the totals come
//! out the same. `cargo test --example queue_consumer` does that five times over.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use idempotent_runtime::store::PostgresStore;
use idempotent_runtime::{Idempotency, Outcome};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::task::JoinSet;

/// How many distinct postings the producer publishes.
const POSTINGS: usize = 300;
/// Deliveries a consumer holds unacknowledged at once, all applied concurrently.
const PREFETCH: u16 = 32;
/// How long a claim holds without renewal. A consumer killed mid-apply leaves its claim
/// behind, and a redelivery of that message waits this long for it to lapse; the holder
/// renews it every third of this, however long the apply takes.
const LEASE: Duration = Duration::from_secs(1);
/// A sixth of the lease, as `PostgresStore::with_statement_timeout` asks, so that a stuck
/// renewal fails before the claim could lapse under a live holder.
const STATEMENT_TIMEOUT: Duration = Duration::from_millis(160);
/// Stands for the rest of a real handler's work (a call to another service, say). It
/// keeps each transaction open for a moment, so duplicates really overlap.
const WORK: Duration = Duration::from_millis(5);
/// RabbitMQ accepts AMQP some seconds after its port opens; connecting retries this long.
const CONNECT_FOR: Duration = Duration::from_secs(60);

/// Everything that can stop the example.
#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("PostgreSQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("idempotency: {0}")]
    Idempotency(#[from] idempotent_runtime::Error),
    #[error("could not encode a posting: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("RabbitMQ did not confirm a published message")]
    NotConfirmed,
    #[error("{0}")]
    Usage(String),
}

/// A ledger posting: the message body, plus its id in the message's `message_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Posting {
    #[serde(skip)]
    id: String,
    account: String,
    cents: i64,
}

/// What applying a posting returned; stored with the idempotency record, and handed back
/// as-is to every duplicate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Applied {
    balance_after: i64,
}

/// Where the example keeps its state, named after `QUEUE_CONSUMER_NAME`.
#[derive(Debug, Clone)]
struct Config {
    /// RabbitMQ, from `IDEMPOTENT_TEST_AMQP`.
    amqp_url: String,
    /// PostgreSQL, from `IDEMPOTENT_TEST_POSTGRES`.
    postgres_url: String,
    /// The queue's name and the tables' prefix, from `QUEUE_CONSUMER_NAME`.
    name: String,
}

impl Config {
    /// The URLs and name from the environment, or their defaults.
    fn from_env() -> Result<Self, AppError> {
        let name = std::env::var("QUEUE_CONSUMER_NAME").unwrap_or_else(|_| "queue_consumer".into());
        // The name goes into SQL text (table names cannot be bound), and a table name
        // must leave room for the longest suffix within PostgresStore's 48 characters.
        let plain = name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !plain || name.len() > 36 {
            return Err(AppError::Usage(format!(
                "QUEUE_CONSUMER_NAME={name:?}: use up to 36 of a-z, 0-9 and _, starting with a letter"
            )));
        }
        Ok(Self {
            amqp_url: std::env::var("IDEMPOTENT_TEST_AMQP")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            postgres_url: std::env::var("IDEMPOTENT_TEST_POSTGRES")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
            name,
        })
    }

    /// The queue the postings go through.
    fn queue(&self) -> &str {
        &self.name
    }

    /// One row per applied posting.
    fn postings_table(&self) -> String {
        format!("{}_postings", self.name)
    }

    /// One row per account, with the sum of its postings.
    fn balances_table(&self) -> String {
        format!("{}_balances", self.name)
    }

    /// The idempotency records, one per message id.
    fn idempotency_table(&self) -> String {
        format!("{}_idempotency", self.name)
    }
}

/// The postings the producer publishes: the same every run, so the totals can be checked.
fn postings(n: usize) -> Vec<Posting> {
    (1..=n)
        .map(|i| Posting {
            id: format!("posting-{i:04}"),
            account: format!("acct-{}", i % 5),
            cents: (i as i64 % 7 - 2) * 100,
        })
        .collect()
}

/// The balance each account must end with.
fn expected_balances(postings: &[Posting]) -> BTreeMap<String, i64> {
    let mut balances = BTreeMap::new();
    for p in postings {
        *balances.entry(p.account.clone()).or_insert(0) += p.cents;
    }
    balances
}

/// A small deterministic generator, so every run publishes the same way.
struct Lcg(u64);

impl Lcg {
    /// A number below `below`.
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// What the producer sends: about a third of the postings two or three times, as a
/// producer retrying after lost confirms would, each copy within 64 messages of the
/// original, so that copies are often in flight at the same time.
fn with_duplicates(postings: &[Posting]) -> Vec<Posting> {
    let mut rng = Lcg(13);
    let mut keyed: Vec<(u64, usize, &Posting)> = Vec::new();
    for (i, p) in postings.iter().enumerate() {
        let copies = if rng.next(3) == 0 { 2 + rng.next(2) } else { 1 };
        for _ in 0..copies {
            keyed.push((i as u64 + rng.next(64), keyed.len(), p));
        }
    }
    keyed.sort_unstable_by_key(|&(at, n, _)| (at, n));
    keyed.into_iter().map(|(_, _, p)| p.clone()).collect()
}

/// Connects to RabbitMQ, retrying while it is still starting.
async fn connect_amqp(url: &str) -> Result<Connection, AppError> {
    let started = Instant::now();
    loop {
        match Connection::connect(url, ConnectionProperties::default()).await {
            Ok(connection) => return Ok(connection),
            Err(e) if started.elapsed() < CONNECT_FOR => {
                eprintln!("RabbitMQ at {url} not ready ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Declares the queue (durable, so messages survive a broker restart). An unused queue
/// (no consumer, no declaration) is deleted by RabbitMQ after an hour, so the queues of
/// runs that never cleaned up do not pile up.
async fn declare_queue(channel: &Channel, queue: &str) -> Result<lapin::Queue, AppError> {
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongLongInt(3_600_000));
    Ok(channel
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments)
        .await?)
}

/// Drops and recreates the queue and the tables. The postings table has no unique
/// constraint on `message_id`: exactly-once is the consumer's doing, not the database's.
async fn reset(config: &Config, connection: &Connection) -> Result<(), AppError> {
    let channel = connection.create_channel().await?;
    channel
        .queue_delete(config.queue().into(), QueueDeleteOptions::default())
        .await?;
    declare_queue(&channel, config.queue()).await?;
    channel.close(200, "reset".into()).await?;

    let store = store(config).await?;
    let (postings, balances) = (config.postings_table(), config.balances_table());
    for ddl in [
        format!(
            "DROP TABLE IF EXISTS {postings}, {balances}, {}",
            store.table()
        ),
        format!(
            "CREATE TABLE {postings} (
               message_id text   NOT NULL,
               account    text   NOT NULL,
               cents      bigint NOT NULL
             )"
        ),
        format!("CREATE TABLE {balances} (account text PRIMARY KEY, cents bigint NOT NULL)"),
    ] {
        sqlx::query(&ddl).execute(store.pool()).await?;
    }
    store.migrate().await?;
    Ok(())
}

/// The idempotency store, on the example's database and table.
async fn store(config: &Config) -> Result<PostgresStore, AppError> {
    Ok(PostgresStore::connect(&config.postgres_url)
        .await?
        .with_table(&config.idempotency_table())?
        .with_statement_timeout(STATEMENT_TIMEOUT))
}

/// Publishes every posting, duplicates included, and waits until RabbitMQ has them all.
async fn publish(config: &Config, connection: &Connection) -> Result<usize, AppError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut confirms = Vec::new();
    let messages = with_duplicates(&postings(POSTINGS));
    for posting in &messages {
        let body = serde_json::to_vec(posting)?;
        let properties = BasicProperties::default()
            .with_message_id(posting.id.as_str().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2); // persistent
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    config.queue().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await?,
        );
    }
    for confirm in confirms {
        if !confirm.await?.is_ack() {
            return Err(AppError::NotConfirmed);
        }
    }
    channel.close(200, "published".into()).await?;
    Ok(messages.len())
}

/// Applies postings to the ledger tables, once per message id.
struct Ledger {
    idem: Idempotency,
    pool: PgPool,
    sql: Arc<LedgerSql>,
    /// For the kill test only: the posting whose apply stops, inside its transaction,
    /// until the process is killed.
    stall_on: Option<String>,
}

/// The ledger's statements, on the configured tables.
struct LedgerSql {
    insert_posting: String,
    add_to_balance: String,
}

impl Ledger {
    /// A ledger on the configured tables, with a short lease (see [`LEASE`]).
    async fn new(config: &Config) -> Result<Self, AppError> {
        let store = store(config).await?;
        let pool = store.pool().clone();
        let idem = Idempotency::builder().store(store).lease(LEASE).build()?;
        Ok(Self {
            idem,
            pool,
            sql: Arc::new(LedgerSql {
                insert_posting: format!(
                    "INSERT INTO {} (message_id, account, cents) VALUES ($1, $2, $3)",
                    config.postings_table()
                ),
                add_to_balance: format!(
                    "INSERT INTO {0} (account, cents) VALUES ($1, $2)
                     ON CONFLICT (account) DO UPDATE SET cents = {0}.cents + EXCLUDED.cents
                     RETURNING cents",
                    config.balances_table()
                ),
            }),
            stall_on: None,
        })
    }

    /// Applies a posting, or hands back the result of the delivery that already did. The
    /// posting's rows and the idempotency record commit together or not at all.
    async fn apply(&self, posting: Posting) -> Result<(Applied, Outcome), AppError> {
        let stall = self.stall_on.as_ref() == Some(&posting.id);
        // The body borrows what it needs: its future lives no longer than the call.
        let (sql, posting) = (&self.sql, &posting);
        self.idem
            .call(&posting.id)
            .scope("ledger.apply")
            .fingerprint(&(&posting.account, posting.cents))
            .run_in_transaction_with_outcome(|tx| {
                Box::pin(async move {
                    sqlx::query(&sql.insert_posting)
                        .bind(&posting.id)
                        .bind(&posting.account)
                        .bind(posting.cents)
                        .execute(&mut **tx)
                        .await?;
                    let balance_after: i64 = sqlx::query_scalar(&sql.add_to_balance)
                        .bind(&posting.account)
                        .bind(posting.cents)
                        .fetch_one(&mut **tx)
                        .await?;
                    if stall {
                        println!("{STALLED} {}", posting.id);
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(WORK).await;
                    Ok(Applied { balance_after })
                })
            })
            .await
    }

    /// How many distinct postings are in the ledger.
    async fn applied(&self, config: &Config) -> Result<i64, AppError> {
        let sql = format!(
            "SELECT count(DISTINCT message_id) FROM {}",
            config.postings_table()
        );
        Ok(sqlx::query_scalar(&sql).fetch_one(&self.pool).await?)
    }
}

/// What the stalled apply prints, for the kill test to see.
const STALLED: &str = "stalled inside the transaction of";

/// What one consumer process saw.
#[derive(Debug, Default)]
struct Tally {
    deliveries: usize,
    executed: usize,
    duplicates: usize,
    requeued: usize,
    rejected: usize,
}

/// What became of one delivery.
enum Handled {
    Applied(Outcome),
    Requeued,
    Rejected,
}

/// Applies one delivery and then acknowledges it. A failure (the database down, say)
/// sends the message back to the queue to be tried again; a message that can never be
/// applied (no id, a body that is not a posting) is rejected rather than retried forever.
async fn handle(ledger: Arc<Ledger>, delivery: lapin::message::Delivery) -> Handled {
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned());
    let posting = serde_json::from_slice::<Posting>(&delivery.data);
    let (id, posting) = match (id, posting) {
        (Some(id), Ok(posting)) => (id.clone(), Posting { id, ..posting }),
        (id, body) => {
            eprintln!("rejecting message {id:?}: no message id, or not a posting ({body:?})");
            let _ = delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await;
            return Handled::Rejected;
        }
    };
    match ledger.apply(posting).await {
        Ok((_applied, outcome)) => {
            // Acknowledged only now: killed before this line, RabbitMQ redelivers, and
            // the redelivery gets the stored result back.
            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                eprintln!("could not acknowledge {id} (it will come back): {e}");
            }
            Handled::Applied(outcome)
        }
        Err(e) => {
            eprintln!("could not apply {id}, requeueing it: {e}");
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            if let Err(e) = delivery.acker.nack(requeue).await {
                eprintln!("could not requeue {id} (it will come back): {e}");
            }
            Handled::Requeued
        }
    }
}

/// Consumes until every posting is in the ledger and the queue is empty, applying up to
/// `PREFETCH` deliveries concurrently.
async fn consume(
    config: &Config,
    connection: &Connection,
    ledger: Arc<Ledger>,
) -> Result<Tally, AppError> {
    let mut tally = Tally::default();
    loop {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        declare_queue(&channel, config.queue()).await?;
        let tag = format!("queue_consumer-{}", std::process::id());
        let mut deliveries = channel
            .basic_consume(
                config.queue().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut in_flight = JoinSet::new();
        let mut check = tokio::time::interval(Duration::from_millis(100));
        let mut cancelled = false;
        loop {
            tokio::select! {
                delivery = deliveries.next() => match delivery {
                    Some(delivery) => {
                        tally.deliveries += 1;
                        in_flight.spawn(handle(ledger.clone(), delivery?));
                    }
                    None => break, // cancelled
                },
                Some(done) = in_flight.join_next() => tally.count(done),
                _ = check.tick(), if !cancelled && in_flight.is_empty() => {
                    let ready = declare_queue(&channel, config.queue()).await?.message_count();
                    if ready == 0 && ledger.applied(config).await? >= POSTINGS as i64 {
                        // Deliveries already on their way still arrive before the end of
                        // the stream, and are applied and acknowledged like the others.
                        channel
                            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                            .await?;
                        cancelled = true;
                    }
                }
            }
        }
        while let Some(done) = in_flight.join_next().await {
            tally.count(done);
        }
        // Closing the channel returns anything still unacknowledged to the queue; done
        // only if nothing is there, else go round again.
        channel.close(200, "done".into()).await?;
        let channel = connection.create_channel().await?;
        let left = declare_queue(&channel, config.queue())
            .await?
            .message_count();
        channel.close(200, "done".into()).await?;
        if left == 0 {
            return Ok(tally);
        }
    }
}

impl Tally {
    /// Counts a finished apply task.
    fn count(&mut self, done: Result<Handled, tokio::task::JoinError>) {
        match done {
            Ok(Handled::Applied(Outcome::Executed)) => self.executed += 1,
            Ok(Handled::Applied(_)) => self.duplicates += 1,
            Ok(Handled::Requeued) => self.requeued += 1,
            Ok(Handled::Rejected) => self.rejected += 1,
            // The delivery was never acknowledged, so it comes back.
            Err(e) => eprintln!("an apply task failed: {e}"),
        }
    }
}

/// The ledger as the database has it: rows, distinct message ids, and balances.
async fn ledger_totals(
    config: &Config,
    pool: &PgPool,
) -> Result<(i64, i64, BTreeMap<String, i64>), AppError> {
    let (rows, ids): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT message_id) FROM {}",
        config.postings_table()
    ))
    .fetch_one(pool)
    .await?;
    let balances: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT account, cents FROM {}",
        config.balances_table()
    ))
    .fetch_all(pool)
    .await?;
    Ok((rows, ids, balances.into_iter().collect()))
}

/// Publishes, consumes, or both (`mode` is `publish`, `consume` or `all`).
async fn run(mode: &str) -> Result<(), AppError> {
    let config = Config::from_env()?;
    let connection = connect_amqp(&config.amqp_url).await?;
    if mode == "all" || mode == "publish" {
        reset(&config, &connection).await?;
        let published = publish(&config, &connection).await?;
        println!("messages published:  {published} ({POSTINGS} distinct ids)");
    }
    if mode == "all" || mode == "consume" {
        let ledger = Arc::new(Ledger::new(&config).await?);
        let tally = consume(&config, &connection, ledger.clone()).await?;
        let (rows, ids, balances) = ledger_totals(&config, &ledger.pool).await?;
        println!(
            "deliveries received: {} ({} applied, {} duplicates answered from the first, \
             {} requeued, {} rejected)",
            tally.deliveries, tally.executed, tally.duplicates, tally.requeued, tally.rejected
        );
        println!("postings rows:       {rows} ({ids} distinct ids)");
        println!(
            "balances correct:    {}",
            balances == expected_balances(&postings(POSTINGS))
        );
    }
    connection.close(200, "bye".into()).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), AppError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mode = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    if !["all", "publish", "consume"].contains(&mode.as_str()) {
        return Err(AppError::Usage(format!(
            "unknown mode {mode:?}: use publish, consume, or nothing for both"
        )));
    }
    run(&mode).await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;

    use super::*;

    /// Set in the environment of the consumer processes the kill test starts.
    const CHILD: &str = "QUEUE_CONSUMER_CHILD";
    /// Names the posting whose apply a child stalls on, inside its transaction.
    const STALL_ON: &str = "QUEUE_CONSUMER_STALL_ON";
    /// Test queues and tables are named `qc_test_<unix seconds>_<pid>`.
    const TEST_PREFIX: &str = "qc_test_";
    /// No wait of the test takes longer than this unless something is wrong.
    const PATIENCE: Duration = Duration::from_secs(60);

    /// The consumer, as a process of its own for the kill test to kill; does nothing when
    /// run any other way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a child process of a_consumer_killed_mid_stream_applies_every_posting_once"]
    async fn consumer_process() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let config = Config::from_env().expect("the config the parent passed");
        let connection = connect_amqp(&config.amqp_url).await.expect("RabbitMQ");
        let mut ledger = Ledger::new(&config).await.expect("PostgreSQL");
        ledger.stall_on = std::env::var(STALL_ON).ok();
        let tally = consume(&config, &connection, Arc::new(ledger))
            .await
            .expect("consume");
        println!("consumer done: {tally:?}");
    }

    /// A consumer process that is killed (SIGKILL) when the test is done with it, or when
    /// the test fails.
    struct Consumer {
        child: Child,
        lines: mpsc::Receiver<String>,
    }

    impl Consumer {
        fn start(config: &Config, n: usize, stall_on: Option<&str>) -> Self {
            let mut command = Command::new(std::env::current_exe().expect("the test binary"));
            command
                .args([
                    "tests::consumer_process",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                ])
                .env(CHILD, "1")
                .env("QUEUE_CONSUMER_NAME", &config.name)
                .env("IDEMPOTENT_TEST_AMQP", &config.amqp_url)
                .env("IDEMPOTENT_TEST_POSTGRES", &config.postgres_url)
                .env_remove(STALL_ON)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if let Some(id) = stall_on {
                command.env(STALL_ON, id);
            }
            let mut child = command.spawn().expect("start a consumer process");
            let (tx, lines) = mpsc::channel();
            let stdout = child.stdout.take().expect("piped stdout");
            let stderr = child.stderr.take().expect("piped stderr");
            // The pipes are read to the end, so a chatty child never blocks on a full one;
            // the lines show in the test's output when it fails.
            std::thread::spawn(move || forward(n, stdout, Some(tx)));
            std::thread::spawn(move || forward(n, stderr, None));
            Self { child, lines }
        }

        /// Kills the process at once, as a crash or `kill -9` would.
        fn kill(mut self) {
            if !self.exited() {
                self.child.kill().expect("kill the consumer");
                self.child.wait().expect("reap the consumer");
            }
        }

        /// Whether the process has exited (and it must have exited well).
        fn exited(&mut self) -> bool {
            match self.child.try_wait().expect("the consumer's status") {
                Some(status) => {
                    assert!(status.success(), "the consumer failed: {status}");
                    true
                }
                None => false,
            }
        }

        /// Waits until the process printed a line starting with `prefix`.
        async fn wait_for_line(&mut self, prefix: &str) {
            let deadline = Instant::now() + PATIENCE;
            loop {
                match self.lines.try_recv() {
                    Ok(line) if line.starts_with(prefix) => return,
                    Ok(_) => {}
                    Err(mpsc::TryRecvError::Empty) => {
                        assert!(!self.exited(), "the consumer exited before {prefix:?}");
                        assert!(
                            Instant::now() < deadline,
                            "no {prefix:?} within {PATIENCE:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => {
                        panic!("the consumer closed its output before {prefix:?}")
                    }
                }
            }
        }

        /// Waits until the ledger holds `rows` postings, or the process finished first.
        async fn wait_for_rows(&mut self, pool: &PgPool, table: &str, rows: i64) -> i64 {
            let deadline = Instant::now() + PATIENCE;
            loop {
                let now = Self::count(pool, table).await;
                if now >= rows || self.exited() {
                    return now;
                }
                assert!(Instant::now() < deadline, "{rows} postings not reached");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        /// The postings in the ledger: only committed applies count.
        async fn count(pool: &PgPool, table: &str) -> i64 {
            sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(pool)
                .await
                .expect("count postings")
        }

        /// Waits for the process to finish on its own.
        async fn finish(mut self) {
            let deadline = Instant::now() + PATIENCE;
            while !self.exited() {
                assert!(Instant::now() < deadline, "the consumer did not finish");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    impl Drop for Consumer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn forward(n: usize, from: impl Read, to: Option<mpsc::Sender<String>>) {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            println!("  [consumer {n}] {line}");
            if let Some(to) = &to {
                let _ = to.send(line);
            }
        }
    }

    fn unix_seconds() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    /// Drops the tables of earlier runs more than an hour old (their queues expire by
    /// themselves), so that runs which failed or were interrupted do not pile up.
    async fn drop_stale_tables(pool: &PgPool) {
        let names: Vec<(String,)> = sqlx::query_as(
            "SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'qc\\_test\\_%'",
        )
        .fetch_all(pool)
        .await
        .expect("list tables");
        let now = unix_seconds();
        for (name,) in names {
            let born = name
                .strip_prefix(TEST_PREFIX)
                .and_then(|rest| rest.split('_').next())
                .and_then(|secs| secs.parse::<u64>().ok());
            if born.is_some_and(|born| born + 3600 < now) {
                let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
                    .execute(pool)
                    .await;
            }
        }
    }

    /// The issue's test: a consumer is killed (SIGKILL) five times mid-stream, once for
    /// sure inside a transaction, and restarted each time; RabbitMQ redelivers what it had
    /// not acknowledged. In the end every posting is in the ledger exactly once, the
    /// balances add up, and the queue is empty.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_consumer_killed_mid_stream_applies_every_posting_once() {
        let config = Config {
            name: format!("{TEST_PREFIX}{}_{}", unix_seconds(), std::process::id()),
            ..Config::from_env().expect("config")
        };
        let connection = connect_amqp(&config.amqp_url).await.unwrap_or_else(|e| {
            panic!(
                "no RabbitMQ at {} (set IDEMPOTENT_TEST_AMQP): {e}",
                config.amqp_url
            )
        });
        let pool = store(&config)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "no PostgreSQL at {} (set IDEMPOTENT_TEST_POSTGRES): {e}",
                    config.postgres_url
                )
            })
            .pool()
            .clone();
        drop_stale_tables(&pool).await;
        reset(&config, &connection).await.expect("reset");
        let published = publish(&config, &connection).await.expect("publish");
        assert!(
            published > POSTINGS,
            "some postings are published more than once"
        );

        // First, a kill inside a transaction: the child stops in the apply of a posting
        // of the first hundred messages, after its writes and before its commit.
        let table = config.postings_table();
        let mut consumer = Consumer::start(&config, 1, Some("posting-0020"));
        consumer.wait_for_line(STALLED).await;
        consumer.kill();
        let mut rows = Consumer::count(&pool, &table).await;
        println!("killed consumer 1 inside a transaction, at {rows} postings");
        // Then kills wherever the consumer happens to be, each after 30 more postings:
        // with 32 applies in flight, some inside their transactions, some between their
        // commit and their acknowledgement.
        for n in 2..=5 {
            let mut consumer = Consumer::start(&config, n, None);
            rows = consumer.wait_for_rows(&pool, &table, rows + 30).await;
            println!("killing consumer {n} at {rows} postings");
            consumer.kill();
        }
        Consumer::start(&config, 6, None).finish().await;

        let (rows, ids, balances) = ledger_totals(&config, &pool).await.expect("totals");
        assert_eq!(ids, POSTINGS as i64, "every posting is in the ledger");
        assert_eq!(rows, ids, "no posting is in the ledger twice");
        let sql = format!("SELECT DISTINCT message_id FROM {table}");
        let applied: BTreeSet<String> = sqlx::query_scalar(&sql)
            .fetch_all(&pool)
            .await
            .expect("ids")
            .into_iter()
            .collect();
        let expected = postings(POSTINGS);
        assert_eq!(applied, expected.iter().map(|p| p.id.clone()).collect());
        assert_eq!(balances, expected_balances(&expected));
        let channel = connection.create_channel().await.expect("channel");
        let queue = declare_queue(&channel, config.queue())
            .await
            .expect("queue");
        assert_eq!(queue.message_count(), 0, "every message is acknowledged");

        // Left in place when the test fails, for a look.
        channel
            .queue_delete(config.queue().into(), QueueDeleteOptions::default())
            .await
            .expect("delete the queue");
        let tables = [table, config.balances_table(), config.idempotency_table()];
        sqlx::query(&format!("DROP TABLE {}", tables.join(", ")))
            .execute(&pool)
            .await
            .expect("drop the tables");
        connection.close(200, "done".into()).await.expect("close");
    }
}
