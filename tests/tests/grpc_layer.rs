//! The gRPC layer against a real tonic server and client over a loopback port: one test
//! for each rule of the layer's table (`idempotent_runtime::grpc`).

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use idempotent_runtime::grpc::GrpcIdempotencyLayer;
use idempotent_runtime::store::{MemoryStore, RedisStore};
use idempotent_runtime::Idempotency;
use idempotent_tests::redis_server::{redis_url, unique_prefix};
use idempotent_tests::FaultyStore;
use tokio::sync::{Notify, Semaphore};
use tokio_stream_shim::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};

mod pb {
    tonic::include_proto!("payments");
}

use pb::payments_client::PaymentsClient;
use pb::payments_server::{Payments, PaymentsServer};
use pb::{ChargeReply, ChargeRequest, RefundReply, RefundRequest, WatchRequest};

const CHARGE: &str = "/payments.Payments/Charge";
const REFUND: &str = "/payments.Payments/Refund";

/// A slow charge: it says it has started, then waits until the test lets it finish.
struct Gate {
    started: Notify,
    release: Semaphore,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            started: Notify::new(),
            release: Semaphore::new(0),
        }
    }
}

/// The service under the layer. What a charge does depends on its account:
/// `fail:<code>` answers that status (with `x-reason` metadata), `big` pads its reply to
/// 4 KiB, `slow` waits at the gate; any other account is charged.
#[derive(Clone, Default)]
struct Bank {
    runs: Arc<AtomicU32>,
    gate: Arc<Gate>,
}

impl Bank {
    fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl Payments for Bank {
    async fn charge(&self, req: Request<ChargeRequest>) -> Result<Response<ChargeReply>, Status> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let req = req.into_inner();
        if let Some(code) = req.account.strip_prefix("fail:") {
            let code = Code::from_i32(code.parse().expect("a code"));
            let mut meta = MetadataMap::new();
            meta.insert("x-reason", format!("run-{n}").parse().expect("ascii"));
            return Err(Status::with_metadata(
                code,
                format!("refused, run {n}"),
                meta,
            ));
        }
        if req.account == "slow" {
            self.gate.started.notify_one();
            let _permit = self.gate.release.acquire().await.expect("open");
        }
        let padding = if req.account == "big" {
            vec![7; 4096]
        } else {
            Vec::new()
        };
        let mut resp = Response::new(ChargeReply {
            charge_id: format!("ch_{n}"),
            amount_cents: req.amount_cents,
            padding,
        });
        resp.metadata_mut()
            .insert("x-charge-id", format!("ch_{n}").parse().expect("ascii"));
        Ok(resp)
    }

    async fn refund(&self, req: Request<RefundRequest>) -> Result<Response<RefundReply>, Status> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(RefundReply {
            refund_id: format!("re_{}", req.into_inner().charge_id),
        }))
    }

    type WatchStream = ReceiverStream<Result<ChargeReply, Status>>;

    async fn watch(
        &self,
        _req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        for i in 0..3 {
            let reply = ChargeReply {
                charge_id: format!("ch_{n}_{i}"),
                ..Default::default()
            };
            tx.send(Ok(reply)).await.expect("room for three");
        }
        Ok(Response::new(ReceiverStream(rx)))
    }
}

/// A `Stream` over an mpsc receiver, for the streaming method (tokio-stream's, in a few
/// lines, rather than one more dependency).
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub(crate) struct ReceiverStream<T>(pub(crate) tokio::sync::mpsc::Receiver<T>);

    impl<T> futures_util::Stream for ReceiverStream<T> {
        type Item = T;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

/// Adds a trailing metadata entry, `x-ledger-seq`, to every response that has trailers,
/// as servers that send trailing metadata do (tonic's own unary handlers cannot).
#[derive(Clone)]
struct Trailing<S>(S);

struct WithTrailer<B>(Pin<Box<B>>);

impl<B: Body<Data = Bytes>> Body for WithTrailer<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.0.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                let mut t = frame.into_trailers().unwrap_or_default();
                t.insert("x-ledger-seq", http::HeaderValue::from_static("42"));
                Poll::Ready(Some(Ok(Frame::trailers(t))))
            }
            other => other,
        }
    }
}

impl<S, R, B> tower::Service<R> for Trailing<S>
where
    S: tower::Service<R, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
{
    type Response = http::Response<WithTrailer<B>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(async move { Ok(fut.await?.map(|b| WithTrailer(Box::pin(b)))) })
    }
}

/// Serves `bank` behind `layer` on a loopback port; a client of it.
async fn serve(layer: GrpcIdempotencyLayer, bank: Bank) -> PaymentsClient<Channel> {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = incoming.local_addr().expect("addr");
    tokio::spawn(
        Server::builder()
            .layer(layer)
            .layer(tower::layer::layer_fn(Trailing))
            .add_service(PaymentsServer::new(bank))
            .serve_with_incoming(incoming),
    );
    PaymentsClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

fn layer(idem: Idempotency) -> GrpcIdempotencyLayer {
    GrpcIdempotencyLayer::new(idem).methods([CHARGE, REFUND])
}

fn charge(key: Option<&str>, account: &str, amount_cents: i64) -> Request<ChargeRequest> {
    let mut req = Request::new(ChargeRequest {
        account: account.to_owned(),
        amount_cents,
    });
    if let Some(key) = key {
        req.metadata_mut()
            .insert("idempotency-key", key.parse().expect("ascii"));
    }
    req
}

fn replayed(meta: &MetadataMap) -> bool {
    meta.get("idempotent-replayed").is_some_and(|v| v == "true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_replays_the_message_its_metadata_and_its_trailers() {
    let bank = Bank::default();
    let mut client = serve(layer(Idempotency::memory()), bank.clone()).await;
    let first = client
        .charge(charge(Some("k1"), "acme", 1250))
        .await
        .expect("first");
    let again = client
        .charge(charge(Some("k1"), "acme", 1250))
        .await
        .expect("again");
    assert_eq!(bank.runs(), 1);
    assert_eq!(first.get_ref(), again.get_ref());
    assert_eq!(again.get_ref().charge_id, "ch_1");
    assert!(!replayed(first.metadata()));
    assert!(replayed(again.metadata()));
    for meta in [first.metadata(), again.metadata()] {
        assert_eq!(meta.get("x-charge-id").expect("initial metadata"), "ch_1");
        // tonic's client merges the trailers into the metadata it returns.
        assert_eq!(meta.get("x-ledger-seq").expect("trailing metadata"), "42");
    }
    // Another key is another charge.
    let other = client
        .charge(charge(Some("k2"), "acme", 1250))
        .await
        .expect("other");
    assert_eq!(other.get_ref().charge_id, "ch_2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_another_request_or_method_is_failed_precondition() {
    let bank = Bank::default();
    let mut client = serve(layer(Idempotency::memory()), bank.clone()).await;
    client
        .charge(charge(Some("k"), "acme", 100))
        .await
        .expect("first");
    let other_amount = client.charge(charge(Some("k"), "acme", 200)).await;
    assert_eq!(
        other_amount.expect_err("reused").code(),
        Code::FailedPrecondition
    );
    let mut refund = Request::new(RefundRequest {
        charge_id: "ch_1".into(),
    });
    refund
        .metadata_mut()
        .insert("idempotency-key", "k".parse().expect("ascii"));
    let other_method = client.refund(refund).await;
    assert_eq!(
        other_method.expect_err("reused").code(),
        Code::FailedPrecondition
    );
    assert_eq!(bank.runs(), 1);
    // The key still replays its own request.
    let again = client
        .charge(charge(Some("k"), "acme", 100))
        .await
        .expect("again");
    assert!(replayed(again.metadata()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_invalid_argument_and_a_missing_one_only_when_required() {
    let bank = Bank::default();
    let mut client = serve(layer(Idempotency::memory()), bank.clone()).await;
    // No key: run without idempotency, each time.
    client
        .charge(charge(None, "acme", 1))
        .await
        .expect("no key");
    client
        .charge(charge(None, "acme", 1))
        .await
        .expect("no key");
    assert_eq!(bank.runs(), 2);
    let long = "k".repeat(256);
    for bad in ["a b", "", long.as_str(), "\"unterminated"] {
        let err = client
            .charge(charge(Some(bad), "acme", 1))
            .await
            .expect_err(bad);
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
        assert!(err.message().contains("idempotency-key"), "{err:?}");
    }
    let mut twice = charge(Some("k"), "acme", 1);
    twice
        .metadata_mut()
        .append("idempotency-key", "k2".parse().expect("ascii"));
    let err = client.charge(twice).await.expect_err("repeated");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(bank.runs(), 2, "no bad key ran the method");

    let required = Bank::default();
    let mut client = serve(
        layer(Idempotency::memory()).require_key(true),
        required.clone(),
    )
    .await;
    let err = client
        .charge(charge(None, "acme", 1))
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(required.runs(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_metadata_name_carries_the_key() {
    let bank = Bank::default();
    let mut client = serve(
        layer(Idempotency::memory()).key_metadata("X-Request-Id"),
        bank.clone(),
    )
    .await;
    let with_id = || {
        let mut r = charge(None, "acme", 5);
        r.metadata_mut()
            .insert("x-request-id", "req-9".parse().expect("ascii"));
        r
    };
    client.charge(with_id()).await.expect("first");
    let again = client.charge(with_id()).await.expect("again");
    assert!(replayed(again.metadata()));
    assert_eq!(bank.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_in_flight_is_aborted() {
    let bank = Bank::default();
    let l = layer(Idempotency::memory()).retry_after(Duration::from_millis(1500));
    let mut client = serve(l, bank.clone()).await;
    let first = {
        let mut client = client.clone();
        tokio::spawn(async move { client.charge(charge(Some("k"), "slow", 7)).await })
    };
    bank.gate.started.notified().await;
    let err = client
        .charge(charge(Some("k"), "slow", 7))
        .await
        .expect_err("in flight");
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(
        err.metadata()
            .get("grpc-retry-pushback-ms")
            .expect("pushback"),
        "1500"
    );
    bank.gate.release.add_permits(1);
    first.await.expect("task").expect("first");
    let retry = client
        .charge(charge(Some("k"), "slow", 7))
        .await
        .expect("retry");
    assert!(replayed(retry.metadata()));
    assert_eq!(bank.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_in_flight_on_another_replica_waits_when_configured() {
    // Two replicas, each with its own engine, on one store: the second finds the key
    // claimed in the store, and waits there.
    let store = FaultyStore::new(MemoryStore::new());
    let bank = Bank::default();
    let mut a = serve(
        layer(Idempotency::new(store.clone())).wait_for_in_flight(),
        bank.clone(),
    )
    .await;
    let mut b = serve(
        layer(Idempotency::new(store.clone())).wait_for_in_flight(),
        bank.clone(),
    )
    .await;
    let first = tokio::spawn(async move { a.charge(charge(Some("k"), "slow", 7)).await });
    bank.gate.started.notified().await;
    let second = tokio::spawn(async move { b.charge(charge(Some("k"), "slow", 7)).await });
    // The second replica has asked the store for the key, which the first holds.
    while store.claims() < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(!second.is_finished(), "the duplicate did not wait");
    bank.gate.release.add_permits(1);
    let first = first.await.expect("task").expect("first");
    let second = second.await.expect("task").expect("waited");
    assert_eq!(second.get_ref(), first.get_ref());
    assert!(replayed(second.metadata()));
    assert_eq!(bank.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_unavailable_and_the_method_does_not_run() {
    let store = FaultyStore::new(MemoryStore::new());
    store.set_down(true);
    let bank = Bank::default();
    let mut client = serve(layer(Idempotency::new(store.clone())), bank.clone()).await;
    let err = client
        .charge(charge(Some("k"), "acme", 1))
        .await
        .expect_err("down");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.metadata().get("grpc-retry-pushback-ms").is_some());
    assert_eq!(bank.runs(), 0);
    store.set_down(false);
    client
        .charge(charge(Some("k"), "acme", 1))
        .await
        .expect("back");
    assert_eq!(bank.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_codes_run_again_and_other_errors_are_replayed() {
    let bank = Bank::default();
    let mut client = serve(layer(Idempotency::memory()), bank.clone()).await;
    for code in [Code::Unavailable, Code::ResourceExhausted, Code::Internal] {
        let key = format!("k{}", code as i32);
        let account = format!("fail:{}", code as i32);
        let before = bank.runs();
        for _ in 0..2 {
            let err = client
                .charge(charge(Some(&key), &account, 1))
                .await
                .expect_err("fails");
            assert_eq!(err.code(), code);
            assert!(!replayed(err.metadata()));
        }
        assert_eq!(bank.runs(), before + 2, "{code:?} was stored");
    }
    // A definite answer is the call's result: replayed with its message and metadata.
    let before = bank.runs();
    let first = client
        .charge(charge(Some("nf"), "fail:5", 1))
        .await
        .expect_err("not found");
    let again = client
        .charge(charge(Some("nf"), "fail:5", 1))
        .await
        .expect_err("not found");
    assert_eq!(bank.runs(), before + 1);
    assert_eq!(
        (first.code(), again.code()),
        (Code::NotFound, Code::NotFound)
    );
    assert_eq!(first.message(), again.message());
    assert_eq!(
        again.metadata().get("x-reason"),
        first.metadata().get("x-reason")
    );
    assert!(replayed(again.metadata()));

    // Configurable: here every code is stored.
    let all = Bank::default();
    let mut client = serve(
        layer(Idempotency::memory()).store_codes(|_| true),
        all.clone(),
    )
    .await;
    for _ in 0..2 {
        let err = client
            .charge(charge(Some("u"), "fail:14", 1))
            .await
            .expect_err("fails");
        assert_eq!(err.code(), Code::Unavailable);
    }
    assert_eq!(all.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_too_large_to_store_reaches_its_caller_and_is_never_run_again() {
    let bank = Bank::default();
    let mut client = serve(
        layer(Idempotency::memory()).max_response(1024),
        bank.clone(),
    )
    .await;
    let reply = client
        .charge(charge(Some("k"), "big", 1))
        .await
        .expect("big");
    assert_eq!(reply.get_ref().padding.len(), 4096);
    assert_eq!(reply.get_ref().charge_id, "ch_1");
    assert!(!replayed(reply.metadata()));
    // The method ran: a retry is told its response cannot be replayed, and does not run.
    let err = client
        .charge(charge(Some("k"), "big", 1))
        .await
        .expect_err("unreplayable");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("cannot be replayed"), "{err:?}");
    assert!(replayed(err.metadata()));
    assert_eq!(bank.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_limit_is_resource_exhausted_and_does_not_run() {
    let bank = Bank::default();
    let mut client = serve(layer(Idempotency::memory()).max_request(64), bank.clone()).await;
    let err = client
        .charge(charge(Some("k"), &"a".repeat(100), 1))
        .await
        .expect_err("too large");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(bank.runs(), 0);
    client
        .charge(charge(Some("k"), "acme", 1))
        .await
        .expect("fits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_and_unlisted_methods_pass_through_untouched() {
    let bank = Bank::default();
    let mut client = serve(
        GrpcIdempotencyLayer::new(Idempotency::memory()).method(CHARGE),
        bank.clone(),
    )
    .await;
    for _ in 0..2 {
        let mut req = Request::new(WatchRequest {
            account: "acme".into(),
        });
        req.metadata_mut()
            .insert("idempotency-key", "w".parse().expect("ascii"));
        let mut stream = client.watch(req).await.expect("watch").into_inner();
        let mut got = 0;
        while let Some(reply) = stream.message().await.expect("message") {
            assert!(reply.charge_id.ends_with(&format!("_{got}")));
            got += 1;
        }
        assert_eq!(got, 3);
    }
    // Refund is not listed here: the same key runs it each time.
    for _ in 0..2 {
        let mut refund = Request::new(RefundRequest {
            charge_id: "ch_1".into(),
        });
        refund
            .metadata_mut()
            .insert("idempotency-key", "w".parse().expect("ascii"));
        let reply = client.refund(refund).await.expect("refund");
        assert!(!replayed(reply.metadata()));
    }
    assert_eq!(bank.runs(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_gives_up_neither_stops_the_method_nor_frees_its_key() {
    let bank = Bank::default();
    let mut client = serve(
        layer(Idempotency::memory()).wait_for_in_flight(),
        bank.clone(),
    )
    .await;
    let abandoned = {
        let mut client = client.clone();
        tokio::spawn(async move { client.charge(charge(Some("k"), "slow", 3)).await })
    };
    bank.gate.started.notified().await;
    abandoned.abort();
    let _ = abandoned.await;
    bank.gate.release.add_permits(1);
    let retry = client
        .charge(charge(Some("k"), "slow", 3))
        .await
        .expect("retry");
    assert_eq!(retry.get_ref().charge_id, "ch_1");
    assert!(replayed(retry.metadata()));
    assert_eq!(bank.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_duplicates_on_two_replicas_sharing_redis_run_once() {
    let prefix = unique_prefix();
    let bank = Bank::default();
    let mut clients = Vec::new();
    for _ in 0..2 {
        // Each replica has its own connection and engine, as two processes would.
        let store = RedisStore::connect(&redis_url())
            .await
            .expect("redis")
            .with_prefix(prefix.clone());
        let l = layer(Idempotency::new(store)).wait_for_in_flight();
        clients.push(serve(l, bank.clone()).await);
    }
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let mut client = clients[i % 2].clone();
            tokio::spawn(async move { client.charge(charge(Some("order-77"), "slow", 900)).await })
        })
        .collect();
    bank.gate.started.notified().await;
    // Give the duplicates time to arrive while the one charge is held (those that come
    // later replay it instead: the assertions hold either way), then let it finish.
    tokio::time::sleep(Duration::from_millis(100)).await;
    bank.gate.release.add_permits(16);
    let mut ids = Vec::new();
    for call in calls {
        ids.push(
            call.await
                .expect("task")
                .expect("charge")
                .into_inner()
                .charge_id,
        );
    }
    assert!(ids.iter().all(|id| id == "ch_1"), "{ids:?}");
    assert_eq!(bank.runs(), 1);
}
