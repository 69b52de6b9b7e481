//! One Redis store, three deployments: a single server, a Redis Cluster, and a primary
//! with replicas behind Sentinel. Two "processes" (two engines on two connections) take
//! the same payments; each is charged once, and the second process replays the receipt.
//!
//! ```text
//! bash .ci/services   # starts all three on local ports, written to .ci/topology.env
//! cargo run -p examples --example redis_topologies -- single redis://127.0.0.1:6379
//! cargo run -p examples --example redis_topologies -- cluster \
//!     redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103
//! cargo run -p examples --example redis_topologies -- sentinel \
//!     'redis://127.0.0.1:27201,redis://127.0.0.1:27202,redis://127.0.0.1:27203#idemtest'
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idempotent_runtime::store::RedisStore;
use idempotent_runtime::{Error, Idempotency, Outcome};

/// Where the store connects, from the command line.
#[derive(Debug, Clone)]
enum Deployment {
    Single(String),
    Cluster(Vec<String>),
    Sentinel(Vec<String>, String),
}

impl Deployment {
    fn parse(kind: &str, spec: &str) -> Option<Self> {
        let urls = |s: &str| s.split(',').map(str::to_owned).collect::<Vec<_>>();
        match kind {
            "single" => Some(Self::Single(spec.to_owned())),
            "cluster" => Some(Self::Cluster(urls(spec))),
            "sentinel" => {
                let (list, name) = spec.split_once('#')?;
                Some(Self::Sentinel(urls(list), name.to_owned()))
            }
            _ => None,
        }
    }

    /// The store, as a service would build it for this deployment.
    async fn store(&self, prefix: &str) -> Result<RedisStore, Error> {
        let store = match self {
            Self::Single(url) => RedisStore::connect(url).await?,
            Self::Cluster(seeds) => RedisStore::connect_cluster(seeds).await?,
            // With replicas, a write counts once one of them has it: a failover to that
            // replica then keeps every claim and result that counted.
            Self::Sentinel(sentinels, name) => RedisStore::connect_sentinel(sentinels, name)
                .await?
                .with_replica_acks(1, Duration::from_millis(500)),
        };
        Ok(store.with_prefix(prefix))
    }
}

/// Runs five payments through two processes' worth of engines; answers the charges made
/// and the outcomes each process saw.
async fn run(deployment: &Deployment, prefix: &str) -> Result<(u32, Vec<Outcome>), Error> {
    let processes = [
        Idempotency::new(deployment.store(prefix).await?),
        Idempotency::new(deployment.store(prefix).await?),
    ];
    let charges = Arc::new(AtomicU32::new(0));
    let mut outcomes = Vec::new();
    for order in 0..5u32 {
        for idem in &processes {
            let charges = charges.clone();
            let (receipt, outcome) = idem
                .call(format!("order-{order}"))
                .scope("payments.charge")
                .run_with_outcome(move || async move {
                    let n = charges.fetch_add(1, Ordering::SeqCst) + 1;
                    Ok::<_, Error>(format!("receipt-{n}"))
                })
                .await?;
            println!("order-{order}: {receipt} ({outcome:?})");
            outcomes.push(outcome);
        }
    }
    Ok((charges.load(Ordering::SeqCst), outcomes))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let deployment = match args.as_slice() {
        [kind, spec] => Deployment::parse(kind, spec),
        _ => None,
    }
    .ok_or("usage: redis_topologies single|cluster|sentinel <url[,url...][#master]>")?;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let (charges, _) = run(&deployment, &format!("example:{nanos}:")).await?;
    println!("{charges} charges for 5 orders, sent twice each");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `.ci/services` wrote, or the environment's override.
    fn topology(var: &str) -> String {
        if let Ok(v) = std::env::var(var) {
            return v;
        }
        let file =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/topology.env"))
                .expect("run bash .ci/services first");
        file.lines()
            .find_map(|l| l.strip_prefix(&format!("{var}=")))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{var} missing from .ci/topology.env"))
    }

    async fn charged_once(deployment: Deployment) {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let (charges, outcomes) = run(&deployment, &format!("example-test:{nanos}:"))
            .await
            .unwrap();
        assert_eq!(charges, 5);
        let expected: Vec<Outcome> = (0..5)
            .flat_map(|_| [Outcome::Executed, Outcome::Replayed])
            .collect();
        assert_eq!(outcomes, expected);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_single_server_charges_once() {
        let url = std::env::var("IDEMPOTENT_TEST_REDIS")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        charged_once(Deployment::Single(url)).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_cluster_charges_once() {
        let spec = topology("IDEMPOTENT_TEST_REDIS_CLUSTER");
        charged_once(Deployment::parse("cluster", &spec).unwrap()).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_sentinel_set_charges_once() {
        let spec = topology("IDEMPOTENT_TEST_REDIS_SENTINEL");
        charged_once(Deployment::parse("sentinel", &spec).unwrap()).await;
    }
}
