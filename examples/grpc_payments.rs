//! A payments service over gRPC (tonic) behind the idempotency layer: the gRPC twin of
//! `axum_payments`.
//!
//! ```text
//! cargo run --example grpc_payments                      # serve, in memory, on 127.0.0.1:50051
//! cargo run --example grpc_payments -- charge k1 1250    # a client: charge 12.50 with key k1
//! cargo run --example grpc_payments -- charge k1 1250    # again: the same charge, replayed
//! cargo run --example grpc_payments -- charge k1 999     # another amount: FAILED_PRECONDITION
//! PORT=50052 PAYMENT_DELAY_MS=500 IDEMPOTENT_REDIS_URL=redis://127.0.0.1:6379 \
//!     cargo run --example grpc_payments                  # shared by every replica through Redis
//! ```
//!
//! - `payments.Payments/Charge` (`proto/payments.proto`) makes a charge and answers its
//!   id, with an `x-charge-id` metadata entry; the `idempotency-key` metadata entry is
//!   required (`INVALID_ARGUMENT` without), and a retry replays the charge. The method
//!   waits `PAYMENT_DELAY_MS` (default 100) to make races visible; a duplicate that
//!   arrives meanwhile waits for it.
//! - `Refund` refunds a charge made here, or answers `NOT_FOUND`; that answer is stored
//!   too, so a retry with the same key is told the same, even if the charge appears later.
//! - `Watch` streams the charges made so far; streaming methods pass through the layer.
//!
//! Logs go to standard error, filtered by `RUST_LOG` (default `warn`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{self, BoxStream, StreamExt};
use idempotent_runtime::grpc::GrpcIdempotencyLayer;
use idempotent_runtime::store::RedisStore;
use idempotent_runtime::Idempotency;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

mod pb {
    tonic::include_proto!("payments");
}

use pb::payments_client::PaymentsClient;
use pb::payments_server::{Payments, PaymentsServer};
use pb::{ChargeReply, ChargeRequest, RefundReply, RefundRequest, WatchRequest};

/// Every charge actually made: what the layer must keep from happening twice.
#[derive(Clone, Default)]
struct Ledger {
    charges: Arc<Mutex<Vec<ChargeReply>>>,
    delay: Duration,
}

impl Ledger {
    fn charges(&self) -> Vec<ChargeReply> {
        self.charges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn fresh_id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{prefix}_{nanos:x}{:04x}",
        N.fetch_add(1, Ordering::Relaxed) % 0x10000
    )
}

#[tonic::async_trait]
impl Payments for Ledger {
    async fn charge(&self, req: Request<ChargeRequest>) -> Result<Response<ChargeReply>, Status> {
        let req = req.into_inner();
        if req.amount_cents <= 0 {
            return Err(Status::invalid_argument("amount_cents must be positive"));
        }
        tokio::time::sleep(self.delay).await;
        let reply = ChargeReply {
            charge_id: fresh_id("ch"),
            amount_cents: req.amount_cents,
            padding: Vec::new(),
        };
        self.charges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(reply.clone());
        let mut resp = Response::new(reply.clone());
        if let Ok(id) = reply.charge_id.parse() {
            resp.metadata_mut().insert("x-charge-id", id);
        }
        Ok(resp)
    }

    async fn refund(&self, req: Request<RefundRequest>) -> Result<Response<RefundReply>, Status> {
        let id = req.into_inner().charge_id;
        if !self.charges().iter().any(|c| c.charge_id == id) {
            return Err(Status::not_found(format!("no charge {id}")));
        }
        Ok(Response::new(RefundReply {
            refund_id: fresh_id("re"),
        }))
    }

    type WatchStream = BoxStream<'static, Result<ChargeReply, Status>>;

    async fn watch(
        &self,
        _req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(
            stream::iter(self.charges().into_iter().map(Ok)).boxed(),
        ))
    }
}

/// The layer: `Charge` and `Refund` are idempotent and need a key; a duplicate in flight
/// waits for the first call.
fn layer(engine: Idempotency) -> GrpcIdempotencyLayer {
    GrpcIdempotencyLayer::new(engine)
        .methods(["/payments.Payments/Charge", "/payments.Payments/Refund"])
        .require_key(true)
        .wait_for_in_flight()
}

/// Serves `ledger` behind the layer on `incoming` until `shutdown` completes.
async fn serve(
    engine: Idempotency,
    ledger: Ledger,
    incoming: TcpIncoming,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .layer(layer(engine))
        .add_service(PaymentsServer::new(ledger))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

async fn engine_from_env() -> Result<Idempotency, idempotent_runtime::Error> {
    Ok(match std::env::var("IDEMPOTENT_REDIS_URL") {
        Ok(url) => {
            eprintln!("idempotency store: Redis at {url}");
            Idempotency::new(
                RedisStore::connect(&url)
                    .await?
                    .with_prefix("grpc_payments:"),
            )
        }
        Err(_) => {
            eprintln!("idempotency store: in memory");
            Idempotency::memory()
        }
    })
}

/// A charge with an idempotency key, as a client sends it.
fn charge_request(key: &str, amount_cents: i64) -> Result<Request<ChargeRequest>, Status> {
    let mut req = Request::new(ChargeRequest {
        account: "acme".into(),
        amount_cents,
    });
    let key = key
        .parse()
        .map_err(|_| Status::invalid_argument("the key must be visible ASCII"))?;
    req.metadata_mut().insert("idempotency-key", key);
    Ok(req)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(50051);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [cmd, key, amount] = args.as_slice() {
        if cmd == "charge" {
            let mut client = PaymentsClient::connect(format!("http://127.0.0.1:{port}")).await?;
            let amount: i64 = amount.parse()?;
            match client.charge(charge_request(key, amount)?).await {
                Ok(resp) => {
                    let replayed = resp.metadata().get("idempotent-replayed").is_some();
                    let reply = resp.into_inner();
                    println!(
                        "{} for {} cents{}",
                        reply.charge_id,
                        reply.amount_cents,
                        if replayed { " (replayed)" } else { "" }
                    );
                }
                Err(status) => println!("{:?}: {}", status.code(), status.message()),
            }
            return Ok(());
        }
    }
    let delay_ms: u64 = std::env::var("PAYMENT_DELAY_MS")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(100);
    let ledger = Ledger {
        charges: Arc::default(),
        delay: Duration::from_millis(delay_ms),
    };
    let incoming = TcpIncoming::bind(([127, 0, 0, 1], port).into())?;
    eprintln!("listening on http://{}", incoming.local_addr()?);
    serve(engine_from_env().await?, ledger, incoming, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! End to end: the service on a real socket, a real tonic client.
    use super::*;
    use tonic::transport::Channel;
    use tonic::Code;

    async fn start(engine: Idempotency, delay_ms: u64) -> (PaymentsClient<Channel>, Ledger) {
        let ledger = Ledger {
            charges: Arc::default(),
            delay: Duration::from_millis(delay_ms),
        };
        let incoming = TcpIncoming::bind(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = incoming.local_addr().unwrap();
        tokio::spawn(serve(
            engine,
            ledger.clone(),
            incoming,
            std::future::pending(),
        ));
        let client = PaymentsClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        (client, ledger)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sixteen_concurrent_duplicates_make_exactly_one_charge() {
        let (client, ledger) = start(Idempotency::memory(), 200).await;
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(
                    async move { client.charge(charge_request("dup-16", 1250).unwrap()).await },
                )
            })
            .collect();
        let mut ids = Vec::new();
        for call in calls {
            ids.push(call.await.unwrap().unwrap().into_inner().charge_id);
        }
        let made = ledger.charges();
        assert_eq!(made.len(), 1, "exactly one charge");
        assert!(ids.iter().all(|id| *id == made[0].charge_id), "{ids:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_replays_the_charge_and_its_metadata() {
        let (mut client, ledger) = start(Idempotency::memory(), 0).await;
        let first = client
            .charge(charge_request("k-1", 999).unwrap())
            .await
            .unwrap();
        let retry = client
            .charge(charge_request("k-1", 999).unwrap())
            .await
            .unwrap();
        assert!(first.metadata().get("idempotent-replayed").is_none());
        assert_eq!(retry.metadata().get("idempotent-replayed").unwrap(), "true");
        assert_eq!(
            retry.metadata().get("x-charge-id").unwrap(),
            first.metadata().get("x-charge-id").unwrap()
        );
        assert_eq!(retry.get_ref(), first.get_ref());
        assert_eq!(ledger.charges(), vec![first.into_inner()]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_key_is_invalid_and_a_reused_key_with_another_amount_refused() {
        let (mut client, ledger) = start(Idempotency::memory(), 0).await;
        let missing = client
            .charge(ChargeRequest {
                account: "acme".into(),
                amount_cents: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::InvalidArgument);
        client
            .charge(charge_request("k-2", 1).unwrap())
            .await
            .unwrap();
        let reused = client
            .charge(charge_request("k-2", 2).unwrap())
            .await
            .unwrap_err();
        assert_eq!(reused.code(), Code::FailedPrecondition);
        assert_eq!(ledger.charges().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refund_refused_is_refused_again_on_retry() {
        let (mut client, _ledger) = start(Idempotency::memory(), 0).await;
        let refund = |id: &str| {
            let mut r = Request::new(RefundRequest {
                charge_id: id.into(),
            });
            r.metadata_mut()
                .insert("idempotency-key", "r-1".parse().unwrap());
            r
        };
        let first = client.refund(refund("ch_missing")).await.unwrap_err();
        let retry = client.refund(refund("ch_missing")).await.unwrap_err();
        assert_eq!(
            (first.code(), retry.code()),
            (Code::NotFound, Code::NotFound)
        );
        assert_eq!(retry.metadata().get("idempotent-replayed").unwrap(), "true");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_replicas_on_one_redis_make_one_charge_for_a_retry_on_the_other() {
        let url = std::env::var("IDEMPOTENT_TEST_REDIS")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!(
            "grpc_payments_test:{}:{}:",
            std::process::id(),
            fresh_id("t")
        );
        let replica = || async {
            let store = RedisStore::connect(&url)
                .await
                .unwrap()
                .with_prefix(prefix.clone());
            start(Idempotency::new(store), 0).await
        };
        let ((mut a, ledger_a), (mut b, ledger_b)) = (replica().await, replica().await);
        let first = a
            .charge(charge_request("cross", 42).unwrap())
            .await
            .unwrap();
        let retry = b
            .charge(charge_request("cross", 42).unwrap())
            .await
            .unwrap();
        assert_eq!(retry.metadata().get("idempotent-replayed").unwrap(), "true");
        assert_eq!(retry.get_ref(), first.get_ref());
        assert_eq!(ledger_a.charges().len() + ledger_b.charges().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watching_streams_the_charges_made() {
        let (mut client, _ledger) = start(Idempotency::memory(), 0).await;
        client
            .charge(charge_request("w-1", 5).unwrap())
            .await
            .unwrap();
        client
            .charge(charge_request("w-1", 5).unwrap())
            .await
            .unwrap();
        let mut stream = client
            .watch(WatchRequest {
                account: "acme".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut seen = 0;
        while stream.message().await.unwrap().is_some() {
            seen += 1;
        }
        assert_eq!(seen, 1);
    }
}
