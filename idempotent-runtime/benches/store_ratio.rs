//! Redis and PostgreSQL against their raw commands, and a call in a PostgreSQL
//! transaction against the same body in a bare sqlx transaction, measured interleaved: each round
//! times a batch of calls of the raw command and of the engine back to back, and the
//! ratio is taken within the round. Criterion's separate timing of each variant (the
//! `redis` and `postgres` benches) moved by up to 25 % between runs on the shared machine
//! these figures come from; within a round, both sides see the same machine. Prints the
//! median ratio and its quartiles.
//!
//! Needs the servers of the test suite (`IDEMPOTENT_TEST_REDIS`,
//! `IDEMPOTENT_TEST_POSTGRES`, defaulting to the local ones).
//!
//! ```text
//! cargo bench -p idempotent-runtime --features redis,postgres --bench store_ratio
//! ```

mod common;
#[path = "common/interleaved.rs"]
mod interleaved;
#[path = "common/postgres_fixture.rs"]
mod postgres_fixture;
#[path = "common/redis_fixture.rs"]
mod redis_fixture;

use std::hint::black_box;
use std::time::Instant;

use common::{receipt, Receipt};
use idempotent_runtime::Error;
use interleaved::report;
use postgres_fixture::postgres_fixture;
use redis_fixture::{redis_fixture, RedisFixture};

/// Times `calls` runs of `body`, in nanoseconds per call.
macro_rules! per_call {
    ($calls:expr, $body:block) => {{
        let start = Instant::now();
        for _ in 0..$calls $body
        start.elapsed().as_nanos() as f64 / $calls as f64
    }};
}

/// Times the raw side and the engine's, first one then the other as `round` says, so
/// that neither always runs right after the other's writes.
macro_rules! pair {
    ($round:expr, $raw:expr, $engine:expr) => {{
        if $round % 2 == 0 {
            let r = $raw;
            (r, $engine)
        } else {
            let e = $engine;
            ($raw, e)
        }
    }};
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // `store_ratio transaction` runs the last part alone.
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if only.is_none() {
        rt.block_on(redis());
        rt.block_on(postgres());
    }
    if only.is_none() || only.as_deref() == Some("transaction") {
        rt.block_on(transaction());
    }
}

async fn redis() {
    const ROUNDS: usize = 100;
    const CALLS: usize = 100;
    let RedisFixture {
        idem,
        mut conn,
        prefix,
        raw_key,
    } = redis_fixture("idemratio").await;

    let (mut raw_hit, mut hit, mut raw_first, mut first) = (vec![], vec![], vec![], vec![]);
    let mut n = 0u64;
    for round in 0..ROUNDS {
        let (r, e) = pair!(
            round,
            per_call!(CALLS, {
                let v: Vec<u8> = redis::cmd("GET")
                    .arg(&raw_key)
                    .query_async(&mut conn)
                    .await
                    .expect("get");
                black_box(serde_json::from_slice::<Receipt>(&v).expect("decode"));
            }),
            per_call!(CALLS, {
                let r: Receipt = idem
                    .call(black_box("order-1001"))
                    .scope("bench")
                    .run(|| async { Ok::<_, Error>(receipt()) })
                    .await
                    .expect("replay");
                black_box(r);
            })
        );
        raw_hit.push(r);
        hit.push(e);
        let (r, e) = pair!(
            round,
            per_call!(CALLS, {
                n += 1;
                let encoded = serde_json::to_vec(&receipt()).expect("encode");
                let _: () = redis::cmd("SET")
                    .arg(format!("{prefix}set:{n}"))
                    .arg(encoded)
                    .arg("PX")
                    .arg(60_000)
                    .query_async(&mut conn)
                    .await
                    .expect("set");
            }),
            per_call!(CALLS, {
                n += 1;
                let r: Receipt = idem
                    .call(n)
                    .scope("bench-first")
                    .ttl(std::time::Duration::from_secs(60))
                    .run(|| async { Ok::<_, Error>(receipt()) })
                    .await
                    .expect("first");
                black_box(r);
            })
        );
        raw_first.push(r);
        first.push(e);
    }
    println!("Redis: {ROUNDS} rounds of {CALLS} calls per variant, interleaved");
    report("hit vs GET", ("raw", raw_hit), ("engine", hit));
    report("first vs SET", ("raw", raw_first), ("engine", first));
}

async fn postgres() {
    const ROUNDS: usize = 60;
    const HITS: usize = 100;
    const FIRSTS: usize = 20;
    let fixture = postgres_fixture("idemratio").await;
    let (idem, pool) = (&fixture.idem, &fixture.pool);
    let (select, insert) = (&fixture.select, &fixture.insert);
    let (mut raw_hit, mut hit, mut raw_first, mut first) = (vec![], vec![], vec![], vec![]);
    let mut n = 0u64;
    for round in 0..ROUNDS {
        let (r, e) = pair!(
            round,
            per_call!(HITS, {
                let (v,): (Vec<u8>,) = sqlx::query_as(select)
                    .bind("order-1001")
                    .fetch_one(pool)
                    .await
                    .expect("select");
                black_box(serde_json::from_slice::<Receipt>(&v).expect("decode"));
            }),
            per_call!(HITS, {
                let r: Receipt = idem
                    .call(black_box("order-1001"))
                    .scope("bench")
                    .run(|| async { Ok::<_, Error>(receipt()) })
                    .await
                    .expect("replay");
                black_box(r);
            })
        );
        raw_hit.push(r);
        hit.push(e);
        let (r, e) = pair!(
            round,
            per_call!(FIRSTS, {
                n += 1;
                let encoded = serde_json::to_vec(&receipt()).expect("encode");
                sqlx::query(insert)
                    .bind(format!("k{n}"))
                    .bind(encoded)
                    .execute(pool)
                    .await
                    .expect("insert");
            }),
            per_call!(FIRSTS, {
                n += 1;
                let r: Receipt = idem
                    .call(n)
                    .scope("bench-first")
                    .run(|| async { Ok::<_, Error>(receipt()) })
                    .await
                    .expect("first");
                black_box(r);
            })
        );
        raw_first.push(r);
        first.push(e);
    }
    println!("PostgreSQL: {ROUNDS} rounds of {HITS} hits / {FIRSTS} first executions per variant, interleaved");
    report("hit vs SELECT", ("raw", raw_hit), ("engine", hit));
    report("first vs INSERT", ("raw", raw_first), ("engine", first));
    fixture.drop_tables().await;
}

/// `run_in_transaction` against the same body (one `INSERT`) in a bare sqlx transaction,
/// both on the store's pool: the difference is the claim, and the completion inside the
/// transaction.
async fn transaction() {
    const ROUNDS: usize = 60;
    const CALLS: usize = 20;
    let fixture = postgres_fixture("idemtx").await;
    let (idem, pool) = (&fixture.idem, &fixture.pool);
    let insert = &fixture.insert;
    let (mut raw, mut engine) = (vec![], vec![]);
    let mut n = 0u64;
    for round in 0..ROUNDS {
        let (r, e) = pair!(
            round,
            per_call!(CALLS, {
                n += 1;
                let encoded = serde_json::to_vec(&receipt()).expect("encode");
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query(insert)
                    .bind(format!("k{n}"))
                    .bind(encoded)
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                tx.commit().await.expect("commit");
                black_box(receipt());
            }),
            per_call!(CALLS, {
                n += 1;
                let k = format!("k{n}");
                let r: Receipt = idem
                    .call(&k)
                    .scope("bench-tx")
                    .run_in_transaction(|tx| {
                        Box::pin(async {
                            let encoded = serde_json::to_vec(&receipt()).expect("encode");
                            sqlx::query(insert)
                                .bind(&k)
                                .bind(encoded)
                                .execute(&mut **tx)
                                .await
                                .expect("insert");
                            Ok::<_, Error>(receipt())
                        })
                    })
                    .await
                    .expect("first");
                black_box(r);
            })
        );
        raw.push(r);
        engine.push(e);
    }
    println!("PostgreSQL transactions: {ROUNDS} rounds of {CALLS} calls per variant, interleaved");
    report("tx vs bare tx", ("raw", raw), ("engine", engine));
    fixture.drop_tables().await;
}
