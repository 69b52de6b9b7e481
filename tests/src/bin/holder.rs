//! A process that claims a key and then hangs inside the operation, for the tests of a
//! holder that crashes: the test kills it and checks the key frees itself after a lease.
//!
//! Usage: `holder redis <url> <prefix> <lease-ms>` or `holder postgres <url> <table>
//! <lease-ms>`; prints `CLAIMED` once it holds the key `crash` in the scope `holder`.
//!
//! `holder postgres-tx <url> <table> <lease-ms>` runs the operation in a transaction
//! instead: it inserts a row `('holder')` into `<table>_fx` and prints `INSERTED`, then
//! hangs before its commit.

use std::io::Write;
use std::time::Duration;

use idempotent_runtime::store::{PostgresStore, RedisStore};
use idempotent_runtime::{Error, Idempotency, IdempotencyBuilder};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, url, space, lease] = args.as_slice() else {
        eprintln!("usage: holder <redis|postgres> <url> <prefix|table> <lease-ms>");
        std::process::exit(2);
    };
    let lease = Duration::from_millis(lease.parse().unwrap_or(500));
    let builder: IdempotencyBuilder = match kind.as_str() {
        "redis" => {
            Idempotency::builder().store(RedisStore::connect(url).await?.with_prefix(space.clone()))
        }
        "postgres" | "postgres-tx" => {
            Idempotency::builder().store(PostgresStore::connect(url).await?.with_table(space)?)
        }
        other => {
            eprintln!("unknown store {other}");
            std::process::exit(2);
        }
    };
    let idem = builder.lease(lease).build()?;
    if kind == "postgres-tx" {
        let insert = format!("INSERT INTO {space}_fx (who) VALUES ('holder')");
        idem.call("crash")
            .scope("holder")
            .run_in_transaction(|tx| {
                Box::pin(async move {
                    sqlx::query(&insert).execute(&mut **tx).await.map_err(|e| {
                        Error::Store(idempotent_runtime::StoreError::new("insert", e))
                    })?;
                    println!("INSERTED");
                    let _ = std::io::stdout().flush();
                    std::future::pending::<()>().await;
                    Ok::<u32, Error>(0)
                })
            })
            .await?;
        return Ok(());
    }
    idem.call("crash")
        .scope("holder")
        .run(|| async {
            println!("CLAIMED");
            let _ = std::io::stdout().flush();
            std::future::pending::<()>().await;
            Ok::<u32, Error>(0)
        })
        .await?;
    Ok(())
}
