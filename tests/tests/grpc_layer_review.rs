//! A hostile review of the gRPC layer: attacks on its guarantees (one execution per key,
//! exact replays, no hangs, no protocol errors), against a real tonic server and client
//! over loopback, as `grpc_layer.rs` does.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use idempotent_runtime::grpc::GrpcIdempotencyLayer;
use idempotent_runtime::store::{MemoryStore, RedisStore};
use idempotent_runtime::{Codec, Idempotency};
use idempotent_tests::redis_server::{redis_url, unique_prefix};
use idempotent_tests::{FaultyStore, Stop};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};
use tonic::codec::CompressionEncoding;
use tonic::metadata::{MetadataMap, MetadataValue};
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
/// A bound on calls that must not hang: a test that hits it has found a hang.
const HANG: Duration = Duration::from_secs(30);

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

/// The service under the layer. By account: `""` answers an empty message with no
/// metadata; `panic` panics; `slowpanic` waits at the gate then panics; `fail:<code>`
/// answers that status; `slow` waits at the gate; `big` pads to 4 KiB; `slowbig` both.
/// Every charge has `x-charge-id` and binary `x-blob-bin` initial metadata.
#[derive(Clone, Default)]
struct Shop {
    runs: Arc<AtomicU32>,
    gate: Arc<Gate>,
}

impl Shop {
    fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl Payments for Shop {
    async fn charge(&self, req: Request<ChargeRequest>) -> Result<Response<ChargeReply>, Status> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let req = req.into_inner();
        let account = req.account.as_str();
        if account.is_empty() {
            return Ok(Response::new(ChargeReply::default()));
        }
        if account == "panic" {
            panic!("the charge panicked (run {n})");
        }
        if let Some(code) = account.strip_prefix("fail:") {
            let code = Code::from_i32(code.parse().expect("a code"));
            let mut meta = MetadataMap::new();
            meta.insert("x-reason", format!("run-{n}").parse().expect("ascii"));
            return Err(Status::with_metadata(
                code,
                format!("refused, run {n}"),
                meta,
            ));
        }
        if account.starts_with("slow") {
            self.gate.started.notify_one();
            let _permit = self.gate.release.acquire().await.expect("open");
        }
        if account == "slowpanic" {
            panic!("the slow charge panicked (run {n})");
        }
        let padding = if account.ends_with("big") {
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
        resp.metadata_mut().insert_bin(
            "x-blob-bin",
            MetadataValue::from_bytes(&[0, 0xff, n as u8, 0x80]),
        );
        Ok(resp)
    }

    async fn refund(&self, req: Request<RefundRequest>) -> Result<Response<RefundReply>, Status> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(RefundReply {
            refund_id: format!("re_{}", req.into_inner().charge_id),
        }))
    }

    type WatchStream = futures_util::stream::Empty<Result<ChargeReply, Status>>;

    async fn watch(
        &self,
        _req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(futures_util::stream::empty()))
    }
}

/// Between the layer and tonic's routes: changes the response's body by the request's
/// `x-mode` metadata. `trailer` adds trailing metadata (text, binary, and a non-UTF-8
/// value); `break` fails the body after its first data frame; `nostatus` drops
/// `grpc-status` from the trailers; `late` turns a success's trailers into `NOT_FOUND`
/// (a status after a message).
#[derive(Clone)]
struct Modes<S>(S);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    None,
    Trailer,
    Break,
    NoStatus,
    Late,
}

struct ModeBody {
    inner: tonic::body::Body,
    mode: Mode,
    data_seen: bool,
}

impl Body for ModeBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.mode == Mode::Break && this.data_seen {
            return Poll::Ready(Some(Err(Status::internal("the body broke"))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                this.data_seen = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                let mut t = frame.into_trailers().unwrap_or_default();
                match this.mode {
                    Mode::Trailer => {
                        t.insert("x-ledger-seq", HeaderValue::from_static("42"));
                        t.insert("x-sig-bin", HeaderValue::from_static("AAEC/w"));
                        t.insert(
                            "x-raw",
                            HeaderValue::from_bytes(b"a\xff\xfeb").expect("obs-text"),
                        );
                        t.append("x-ledger-seq", HeaderValue::from_static("43"));
                    }
                    Mode::NoStatus => {
                        t.remove("grpc-status");
                    }
                    Mode::Late => {
                        t.insert("grpc-status", HeaderValue::from_static("5"));
                        t.insert("grpc-message", HeaderValue::from_static("late"));
                    }
                    _ => {}
                }
                Poll::Ready(Some(Ok(Frame::trailers(t))))
            }
            other => other,
        }
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for Modes<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<ModeBody>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mode = match req.headers().get("x-mode").map(|v| v.as_bytes()) {
            Some(b"trailer") => Mode::Trailer,
            Some(b"break") => Mode::Break,
            Some(b"nostatus") => Mode::NoStatus,
            Some(b"late") => Mode::Late,
            _ => Mode::None,
        };
        let fut = self.0.call(req);
        Box::pin(async move {
            Ok(fut.await?.map(|b| ModeBody {
                inner: tonic::body::Body::new(b),
                mode,
                data_seen: false,
            }))
        })
    }
}

#[derive(Default, Clone, Copy)]
struct Opts {
    gzip: bool,
    timeout: Option<Duration>,
    http1: bool,
}

/// Serves `shop` behind `layer` (and `Modes`) on a loopback port: its address and a channel.
async fn serve(
    layer: GrpcIdempotencyLayer,
    shop: Shop,
    opts: Opts,
) -> (std::net::SocketAddr, Channel) {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = incoming.local_addr().expect("addr");
    let mut builder = Server::builder().accept_http1(opts.http1);
    if let Some(t) = opts.timeout {
        builder = builder.timeout(t);
    }
    let mut svc = PaymentsServer::new(shop);
    if opts.gzip {
        svc = svc
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip);
    }
    tokio::spawn(
        builder
            .layer(layer)
            .layer(tower::layer::layer_fn(Modes))
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    (addr, channel)
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

fn frame(compressed: bool, message: &[u8]) -> Vec<u8> {
    let mut f = vec![u8::from(compressed)];
    f.extend_from_slice(&(message.len() as u32).to_be_bytes());
    f.extend_from_slice(message);
    f
}

fn charge_frame(account: &str, amount_cents: i64) -> Vec<u8> {
    frame(
        false,
        &ChargeRequest {
            account: account.into(),
            amount_cents,
        }
        .encode_to_vec(),
    )
}

/// A response as it came over the wire.
#[derive(Debug)]
struct Raw {
    status: http::StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Raw {
    /// The headers as a list, less the replay marker.
    /// The headers the layer answers with, less the replay marker and `date`, which the
    /// server's connection stamps on each response as it is sent (two responses a second
    /// apart differ there, stored or not).
    fn headers_but_marker(&self) -> Vec<(String, Vec<u8>)> {
        self.headers
            .iter()
            .filter(|(n, _)| !matches!(n.as_str(), "idempotent-replayed" | "date"))
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    fn trailers_list(&self) -> Option<Vec<(String, Vec<u8>)>> {
        self.trailers.as_ref().map(|t| {
            t.iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect()
        })
    }

    fn is_replay(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    /// The grpc-status, from the trailers or (trailers-only) the headers.
    fn grpc_status(&self) -> Option<String> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .map(|v| v.to_str().expect("ascii").to_owned())
    }
}

/// Sends a raw HTTP/2 request on `channel`.
async fn raw(
    channel: &Channel,
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &[u8])],
    body: Vec<u8>,
) -> Raw {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("te", "trailers");
    let mut has_ct = false;
    for (n, v) in headers {
        has_ct |= *n == "content-type";
        req = req.header(*n, HeaderValue::from_bytes(v).expect("value"));
    }
    if !has_ct {
        req = req.header("content-type", "application/grpc");
    }
    let req = req
        .body(tonic::body::Body::new(http_body_util::Full::new(
            Bytes::from(body),
        )))
        .expect("request");
    let resp = tokio::time::timeout(HANG, tower::ServiceExt::oneshot(channel.clone(), req))
        .await
        .expect("the call hung")
        .expect("http/2 exchange");
    let (parts, body) = resp.into_parts();
    let collected = tokio::time::timeout(HANG, body.collect())
        .await
        .expect("the body hung")
        .expect("a whole body");
    let trailers = collected.trailers().cloned();
    Raw {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

fn assert_same_response(first: &Raw, again: &Raw) {
    assert_eq!(first.status, again.status);
    assert_eq!(first.headers_but_marker(), again.headers_but_marker());
    assert_eq!(first.body, again.body);
    assert_eq!(first.trailers_list(), again.trailers_list());
}

// ---------------------------------------------------------------------------------------
// Compression
// ---------------------------------------------------------------------------------------

/// A client that compresses its requests (gzip) and accepts compressed replies: its retry
/// compresses the same way, matches, and replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_requests_retried_by_the_same_client_replay() {
    let shop = Shop::default();
    let opts = Opts {
        gzip: true,
        ..Opts::default()
    };
    let (_, ch) = serve(layer(Idempotency::memory()), shop.clone(), opts).await;
    let mut client = PaymentsClient::new(ch)
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let first = client
        .charge(charge(Some("gz"), "acme", 5))
        .await
        .expect("first");
    let again = client
        .charge(charge(Some("gz"), "acme", 5))
        .await
        .expect("again");
    assert_eq!(first.get_ref(), again.get_ref());
    assert!(replayed(again.metadata()));
    assert_eq!(shop.runs(), 1);
}

/// The reply stored for a client that accepts gzip is compressed; a retry of the same
/// request (same bytes: uncompressed requests) by a client that does not accept gzip is
/// replayed that compressed reply, which it cannot read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_compressed_for_one_client_is_replayed_to_a_client_that_cannot_read_it() {
    let shop = Shop::default();
    let opts = Opts {
        gzip: true,
        ..Opts::default()
    };
    let (_, ch) = serve(layer(Idempotency::memory()), shop.clone(), opts).await;
    let mut gzip_client =
        PaymentsClient::new(ch.clone()).accept_compressed(CompressionEncoding::Gzip);
    let first = gzip_client
        .charge(charge(Some("gz2"), "acme", 5))
        .await
        .expect("first");
    let mut plain_client = PaymentsClient::new(ch);
    let again = plain_client.charge(charge(Some("gz2"), "acme", 5)).await;
    assert_eq!(shop.runs(), 1);
    let again = again.expect("the retry of a plain client could not read the replay");
    assert_eq!(first.get_ref(), again.get_ref());
}

// ---------------------------------------------------------------------------------------
// Deadlines and timeouts
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_deadline_passing_while_the_method_runs_leaves_one_run_and_a_replay() {
    let shop = Shop::default();
    let (_, ch) = serve(
        layer(Idempotency::memory()).wait_for_in_flight(),
        shop.clone(),
        Opts::default(),
    )
    .await;
    let mut client = PaymentsClient::new(ch);
    let first = {
        let mut client = client.clone();
        let mut req = charge(Some("dl"), "slow", 3);
        req.set_timeout(Duration::from_millis(200));
        tokio::spawn(async move { client.charge(req).await })
    };
    shop.gate.started.notified().await;
    // The gate is closed, so the deadline passes before the method ends.
    let err = first.await.expect("task").expect_err("deadline");
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    shop.gate.release.add_permits(1);
    let retry = tokio::time::timeout(HANG, client.charge(charge(Some("dl"), "slow", 3)))
        .await
        .expect("hang")
        .expect("retry");
    assert_eq!(retry.get_ref().charge_id, "ch_1");
    assert!(replayed(retry.metadata()));
    assert_eq!(shop.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_timeout_firing_while_the_method_runs_leaves_one_run_and_a_replay() {
    let shop = Shop::default();
    let opts = Opts {
        timeout: Some(Duration::from_millis(200)),
        ..Opts::default()
    };
    let (_, ch) = serve(
        layer(Idempotency::memory()).wait_for_in_flight(),
        shop.clone(),
        opts,
    )
    .await;
    let mut client = PaymentsClient::new(ch);
    let first = {
        let mut client = client.clone();
        tokio::spawn(async move { client.charge(charge(Some("to"), "slow", 3)).await })
    };
    shop.gate.started.notified().await;
    let err = first.await.expect("task").expect_err("server timeout");
    eprintln!(
        "server timeout answered: {:?} {:?}",
        err.code(),
        err.message()
    );
    shop.gate.release.add_permits(1);
    let retry = client
        .charge(charge(Some("to"), "slow", 3))
        .await
        .expect("retry");
    assert_eq!(retry.get_ref().charge_id, "ch_1");
    assert!(replayed(retry.metadata()));
    assert_eq!(shop.runs(), 1);
}

// ---------------------------------------------------------------------------------------
// Panics, broken bodies, statuses after the layer
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_method_neither_hangs_the_caller_nor_the_server() {
    let shop = Shop::default();
    let (_, ch) = serve(layer(Idempotency::memory()), shop.clone(), Opts::default()).await;
    let mut client = PaymentsClient::new(ch);
    let first = tokio::time::timeout(HANG, client.charge(charge(Some("p"), "panic", 1)))
        .await
        .expect("the panicking call hung");
    let err = first.expect_err("panicked");
    eprintln!("a panic answered: {:?} {:?}", err.code(), err.message());
    // The key was released: the retry runs again (and panics again).
    let again = tokio::time::timeout(HANG, client.charge(charge(Some("p"), "panic", 1)))
        .await
        .expect("the retry hung");
    assert!(again.is_err());
    assert_eq!(shop.runs(), 2);
    // The server still serves.
    client
        .charge(charge(Some("after"), "acme", 1))
        .await
        .expect("alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_waiting_on_another_replica_for_a_panicking_method_does_not_hang() {
    let store = FaultyStore::new(MemoryStore::new());
    let shop = Shop::default();
    let (_, a) = serve(
        layer(Idempotency::new(store.clone())).wait_for_in_flight(),
        shop.clone(),
        Opts::default(),
    )
    .await;
    let (_, b) = serve(
        layer(Idempotency::new(store.clone())).wait_for_in_flight(),
        shop.clone(),
        Opts::default(),
    )
    .await;
    let mut a = PaymentsClient::new(a);
    let mut b = PaymentsClient::new(b);
    let first = tokio::spawn(async move { a.charge(charge(Some("sp"), "slowpanic", 1)).await });
    shop.gate.started.notified().await;
    let second = tokio::spawn(async move { b.charge(charge(Some("sp"), "slowpanic", 1)).await });
    while store.claims() < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    shop.gate.release.add_permits(2);
    let first = tokio::time::timeout(HANG, first)
        .await
        .expect("hang")
        .expect("task");
    let second = tokio::time::timeout(HANG, second)
        .await
        .expect("hang")
        .expect("task");
    assert!(first.is_err() && second.is_err());
    // The panic released the key, so the waiting duplicate ran the method again.
    assert_eq!(shop.runs(), 2);
}

/// A body that fails after its first frame: the layer answers a gRPC status (INTERNAL),
/// not a broken stream. The method ran, so its key is kept: the retry is told its answer
/// cannot be replayed, and does not charge again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_breaks_half_way_is_an_internal_status_and_runs_once() {
    let shop = Shop::default();
    let (_, ch) = serve(layer(Idempotency::memory()), shop.clone(), Opts::default()).await;
    let mut client = PaymentsClient::new(ch);
    let broken = || {
        let mut req = charge(Some("br"), "acme", 1);
        req.metadata_mut()
            .insert("x-mode", "break".parse().expect("ascii"));
        req
    };
    let err = client.charge(broken()).await.expect_err("broken");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    let err = client.charge(broken()).await.expect_err("unreplayable");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("cannot be replayed"), "{err:?}");
    assert_eq!(shop.runs(), 1);
}

/// A status sent in the trailers after a message (NOT_FOUND): stored and replayed exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_status_after_a_message_is_stored_and_replayed_exactly() {
    let shop = Shop::default();
    let (addr, ch) = serve(layer(Idempotency::memory()), shop.clone(), Opts::default()).await;
    let headers: &[(&str, &[u8])] = &[("idempotency-key", b"late"), ("x-mode", b"late")];
    let first = raw(&ch, addr, CHARGE, headers, charge_frame("acme", 1)).await;
    let again = raw(&ch, addr, CHARGE, headers, charge_frame("acme", 1)).await;
    assert_eq!(first.grpc_status().as_deref(), Some("5"));
    assert!(again.is_replay());
    assert_same_response(&first, &again);
    let mut client = PaymentsClient::new(ch);
    let mut req = charge(Some("late"), "acme", 1);
    req.metadata_mut()
        .insert("x-mode", "late".parse().expect("ascii"));
    let err = client.charge(req).await.expect_err("late");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(shop.runs(), 1);
}

/// A response without a `grpc-status`: the method ran, so it is stored as it is and a
/// retry gets the same (documented).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_without_grpc_status_is_stored_as_it_is() {
    let shop = Shop::default();
    let (addr, ch) = serve(layer(Idempotency::memory()), shop.clone(), Opts::default()).await;
    let headers: &[(&str, &[u8])] = &[("idempotency-key", b"ns"), ("x-mode", b"nostatus")];
    let first = raw(&ch, addr, CHARGE, headers, charge_frame("acme", 1)).await;
    let again = raw(&ch, addr, CHARGE, headers, charge_frame("acme", 1)).await;
    assert_eq!(first.grpc_status(), None);
    assert!(again.is_replay());
    assert_same_response(&first, &again);
    assert_eq!(shop.runs(), 1);
}

// ---------------------------------------------------------------------------------------
// Second executions through a released key
// ---------------------------------------------------------------------------------------

/// A successful charge whose reply is over `max_response`: the caller gets the reply, and
/// a duplicate that waited for it (`wait_for_in_flight`) is told it cannot be replayed,
/// rather than charging a second time (the first version of the layer released the key).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_waiting_on_a_reply_too_large_to_store_does_not_charge_again() {
    let store = FaultyStore::new(MemoryStore::new());
    let shop = Shop::default();
    let l = || {
        layer(Idempotency::new(store.clone()))
            .wait_for_in_flight()
            .max_response(1024)
    };
    let (_, a) = serve(l(), shop.clone(), Opts::default()).await;
    let (_, b) = serve(l(), shop.clone(), Opts::default()).await;
    let mut a = PaymentsClient::new(a);
    let mut b = PaymentsClient::new(b);
    let first = tokio::spawn(async move { a.charge(charge(Some("bg"), "slowbig", 1)).await });
    shop.gate.started.notified().await;
    let second = tokio::spawn(async move { b.charge(charge(Some("bg"), "slowbig", 1)).await });
    while store.claims() < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    shop.gate.release.add_permits(2);
    let first = first.await.expect("task").expect("first");
    assert_eq!(first.get_ref().charge_id, "ch_1");
    let second = second.await.expect("task").expect_err("unreplayable");
    assert_eq!(second.code(), Code::FailedPrecondition, "{second:?}");
    assert_eq!(
        shop.runs(),
        1,
        "one key, one successful charge, yet the method ran twice"
    );
}

/// The store fails the completion after the method ran: the caller still gets its reply,
/// a retry while the store is down is UNAVAILABLE, and once it is back the retry replays
/// the one charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_down_at_completion_does_not_run_the_method_twice() {
    let store = FaultyStore::new(MemoryStore::new());
    let shop = Shop::default();
    let (_, ch) = serve(
        layer(Idempotency::new(store.clone())).wait_for_in_flight(),
        shop.clone(),
        Opts::default(),
    )
    .await;
    let mut client = PaymentsClient::new(ch);
    let mut held = store.hold(Stop::Completion);
    let first = {
        let mut client = client.clone();
        tokio::spawn(async move { client.charge(charge(Some("cd"), "acme", 1)).await })
    };
    held.entered().await;
    store.set_down(true);
    held.open();
    let first = tokio::time::timeout(HANG, first)
        .await
        .expect("hang")
        .expect("task");
    eprintln!("first with completion failing: {first:?}");
    let down = client.charge(charge(Some("cd"), "acme", 1)).await;
    assert_eq!(down.expect_err("down").code(), Code::Unavailable);
    store.set_down(false);
    let retry = tokio::time::timeout(HANG, client.charge(charge(Some("cd"), "acme", 1)))
        .await
        .expect("hang")
        .expect("retry");
    assert_eq!(retry.get_ref().charge_id, "ch_1");
    assert!(replayed(retry.metadata()));
    assert_eq!(shop.runs(), 1);
}

// ---------------------------------------------------------------------------------------
// Keys, metadata, content types, frames, protocols
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_odd_bytes_are_invalid_argument_as_grpc_statuses() {
    let shop = Shop::default();
    let (addr, ch) = serve(layer(Idempotency::memory()), shop.clone(), Opts::default()).await;
    let bad: [&[u8]; 4] = [b"k\xff", b"\"\xc3\xa9\"", b"k\tx", b"\"k\\n\""];
    for key in bad {
        let r = raw(
            &ch,
            addr,
            CHARGE,
            &[("idempotency-key", key)],
            charge_frame("acme", 1),
        )
        .await;
        assert_eq!(r.status, http::StatusCode::OK, "{key:?}");
        assert_eq!(r.headers["content-type"], "application/grpc", "{key:?}");
        assert_eq!(r.grpc_status().as_deref(), Some("3"), "{key:?}: {r:?}");
        assert!(r.body.is_empty());
    }
    assert_eq!(shop.runs(), 0);
    // A quoted key and the bare token are one key (the HTTP layer's rules).
    let a = raw(
        &ch,
        addr,
        CHARGE,
        &[("idempotency-key", b"\"q1\"")],
        charge_frame("acme", 1),
    )
    .await;
    let b = raw(
        &ch,
        addr,
        CHARGE,
        &[("idempotency-key", b"q1")],
        charge_frame("acme", 1),
    )
    .await;
    assert!(!a.is_replay() && b.is_replay());
    assert_same_response(&a, &b);
    assert_eq!(shop.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_key_metadata_entry_carries_the_key() {
    let shop = Shop::default();
    let (_, ch) = serve(
        layer(Idempotency::memory()).key_metadata("idempotency-key-bin"),
        shop.clone(),
        Opts::default(),
    )
    .await;
    let mut client = PaymentsClient::new(ch);
    let req = || {
        let mut r = charge(None, "acme", 1);
        r.metadata_mut().insert_bin(
            "idempotency-key-bin",
            MetadataValue::from_bytes(&[0, 1, 0xfe, 0xff]),
        );
        r
    };
    client.charge(req()).await.expect("first");
    let again = client.charge(req()).await.expect("again");
    assert!(replayed(again.metadata()));
    assert_eq!(shop.runs(), 1);
}

async fn exact_replays_on(idem: Idempotency) {
    let shop = Shop::default();
    let (addr, ch) = serve(layer(idem), shop.clone(), Opts::default()).await;
    // A message, binary initial metadata, trailing metadata (text, binary, repeated, and a
    // non-UTF-8 value).
    let h: &[(&str, &[u8])] = &[("idempotency-key", b"x1"), ("x-mode", b"trailer")];
    let first = raw(&ch, addr, CHARGE, h, charge_frame("acme", 9)).await;
    let again = raw(&ch, addr, CHARGE, h, charge_frame("acme", 9)).await;
    assert!(!first.is_replay() && again.is_replay());
    assert_eq!(first.grpc_status().as_deref(), Some("0"));
    assert!(first.headers.get("x-blob-bin").is_some());
    assert_eq!(
        first.trailers.as_ref().expect("trailers")["x-raw"].as_bytes(),
        b"a\xff\xfeb"
    );
    assert_same_response(&first, &again);
    // An empty message (zero-length protobuf) in an empty request.
    let h: &[(&str, &[u8])] = &[("idempotency-key", b"x2")];
    let first = raw(&ch, addr, CHARGE, h, frame(false, b"")).await;
    let again = raw(&ch, addr, CHARGE, h, frame(false, b"")).await;
    assert_eq!(first.body.as_ref(), &[0, 0, 0, 0, 0]);
    assert!(again.is_replay());
    assert_same_response(&first, &again);
    // A stored error, trailers-only.
    let h: &[(&str, &[u8])] = &[("idempotency-key", b"x3")];
    let first = raw(&ch, addr, CHARGE, h, charge_frame("fail:5", 1)).await;
    let again = raw(&ch, addr, CHARGE, h, charge_frame("fail:5", 1)).await;
    assert!(first.trailers.is_none() && again.trailers.is_none());
    assert!(again.is_replay());
    assert_same_response(&first, &again);
    assert_eq!(shop.runs(), 3);
    // And the tonic client reads the replays.
    let mut client = PaymentsClient::new(ch);
    let empty = client
        .charge(Request::new(ChargeRequest::default()))
        .await
        .expect("no key");
    assert_eq!(empty.get_ref(), &ChargeReply::default());
    let mut req = Request::new(ChargeRequest::default());
    req.metadata_mut()
        .insert("idempotency-key", "x2".parse().expect("ascii"));
    let replay = client.charge(req).await.expect("empty replay");
    assert_eq!(replay.get_ref(), &ChargeReply::default());
    assert!(replayed(replay.metadata()));
    let mut req = charge(Some("x1"), "acme", 9);
    req.metadata_mut()
        .insert("x-mode", "trailer".parse().expect("ascii"));
    let replay = client.charge(req).await.expect("replay");
    assert_eq!(
        replay
            .metadata()
            .get_bin("x-blob-bin")
            .expect("bin")
            .to_bytes()
            .expect("b64")
            .as_ref(),
        &[0, 0xff, 1, 0x80]
    );
    assert_eq!(
        replay
            .metadata()
            .get_bin("x-sig-bin")
            .expect("bin")
            .to_bytes()
            .expect("b64")
            .as_ref(),
        &[0, 1, 2, 0xff]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_exact_with_json() {
    exact_replays_on(Idempotency::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_exact_with_postcard() {
    let idem = Idempotency::builder()
        .codec(Codec::Postcard)
        .build()
        .expect("engine");
    exact_replays_on(idem).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_exact_with_postcard_on_redis() {
    let store = RedisStore::connect(&redis_url())
        .await
        .expect("redis")
        .with_prefix(unique_prefix());
    let idem = Idempotency::builder()
        .store(store)
        .codec(Codec::Postcard)
        .build()
        .expect("engine");
    exact_replays_on(idem).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_type_variants_share_a_key_and_replay() {
    let shop = Shop::default();
    let (addr, ch) = serve(layer(Idempotency::memory()), shop.clone(), Opts::default()).await;
    let first = raw(
        &ch,
        addr,
        CHARGE,
        &[
            ("idempotency-key", b"ct"),
            ("content-type", b"application/grpc+proto"),
        ],
        charge_frame("acme", 1),
    )
    .await;
    assert_eq!(first.grpc_status().as_deref(), Some("0"), "{first:?}");
    let again = raw(
        &ch,
        addr,
        CHARGE,
        &[("idempotency-key", b"ct")],
        charge_frame("acme", 1),
    )
    .await;
    assert!(again.is_replay());
    assert_same_response(&first, &again);
    assert_eq!(shop.runs(), 1);
}

/// Two frames in a unary request: the fingerprint counts both, so it is not the
/// one-frame request; and the layer's answer is a gRPC status either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_several_frames_or_none() {
    let shop = Shop::default();
    let (addr, ch) = serve(layer(Idempotency::memory()), shop.clone(), Opts::default()).await;
    let mut two = charge_frame("acme", 1);
    two.extend(charge_frame("acme", 2));
    let first = raw(
        &ch,
        addr,
        CHARGE,
        &[("idempotency-key", b"mf")],
        two.clone(),
    )
    .await;
    eprintln!(
        "two frames: {:?} {:?}",
        first.grpc_status(),
        first.headers.get("grpc-message")
    );
    assert!(first.grpc_status().is_some());
    let again = raw(&ch, addr, CHARGE, &[("idempotency-key", b"mf")], two).await;
    assert!(again.grpc_status().is_some());
    let one = raw(
        &ch,
        addr,
        CHARGE,
        &[("idempotency-key", b"mf")],
        charge_frame("acme", 1),
    )
    .await;
    if first.grpc_status().as_deref() == Some("0") {
        assert!(again.is_replay());
        assert_same_response(&first, &again);
        assert_eq!(one.grpc_status().as_deref(), Some("9"), "{one:?}");
    }
    // No frame at all: tonic answers "Missing request message" (INTERNAL), not stored.
    let none = raw(&ch, addr, CHARGE, &[("idempotency-key", b"nf")], Vec::new()).await;
    eprintln!(
        "no frame: {:?} {:?}",
        none.grpc_status(),
        none.headers.get("grpc-message")
    );
    assert!(none.grpc_status().is_some());
    // A truncated frame: INVALID_ARGUMENT from the layer.
    let mut cut = charge_frame("acme", 1);
    cut.pop();
    let cut = raw(&ch, addr, CHARGE, &[("idempotency-key", b"cut")], cut).await;
    assert_eq!(cut.grpc_status().as_deref(), Some("3"));
}

async fn http1(addr: std::net::SocketAddr, body: &[u8], content_type: &str) -> String {
    http1_keyed(addr, body, content_type, Some("h1")).await
}

async fn http1_keyed(
    addr: std::net::SocketAddr,
    body: &[u8],
    content_type: &str,
    key: Option<&str>,
) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let key = key.map_or(String::new(), |k| format!("idempotency-key: {k}\r\n"));
    let head = format!(
        "POST {CHARGE} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: {content_type}\r\n\
         {key}te: trailers\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(HANG, s.read_to_end(&mut out))
        .await
        .expect("hang")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_non_grpc_requests_to_a_listed_path() {
    let shop = Shop::default();
    let opts = Opts {
        http1: true,
        ..Opts::default()
    };
    let (addr, _) = serve(layer(Idempotency::memory()), shop.clone(), opts).await;
    // A JSON body: not gRPC frames.
    let json = http1(addr, br#"{"account":"acme"}"#, "application/json").await;
    eprintln!("json over HTTP/1.1:\n{json}");
    assert!(json.starts_with("HTTP/1.1 200"), "{json}");
    assert!(json.contains("grpc-status: 3"), "{json}");
    assert_eq!(shop.runs(), 0);
    // A gRPC frame over HTTP/1.1: runs once, then replays.
    let body = charge_frame("acme", 1);
    let one = http1(addr, &body, "application/grpc").await;
    let two = http1(addr, &body, "application/grpc").await;
    eprintln!("gRPC over HTTP/1.1:\n{one}\n---\n{two}");
    assert!(two.contains("idempotent-replayed: true"), "{two}");
    assert_eq!(shop.runs(), 1);
    // Without a key (the layer passes the call through), hyper sends no trailers over
    // HTTP/1.1 either (the response declares no `Trailer` header): the layer's answers,
    // sent with a content-length, lose nothing a passed-through call would have.
    let plain = http1_keyed(addr, &body, "application/grpc", None).await;
    eprintln!("gRPC over HTTP/1.1, no key:\n{plain}");
    assert!(!plain.contains("grpc-status"), "{plain}");
}

// ---------------------------------------------------------------------------------------
// Many duplicates, TTL, replicas
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_duplicates_in_flight_are_aborted_and_one_runs() {
    let shop = Shop::default();
    let (_, ch) = serve(layer(Idempotency::memory()), shop.clone(), Opts::default()).await;
    let client = PaymentsClient::new(ch);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..100 {
        let mut client = client.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let r = client.charge(charge(Some("many"), "slow", 1)).await;
            let _ = tx.send(r);
        });
    }
    shop.gate.started.notified().await;
    // The 99 others answer while the gate is closed: each is ABORTED.
    for _ in 0..99 {
        let r = tokio::time::timeout(HANG, rx.recv())
            .await
            .expect("hang")
            .expect("result");
        assert_eq!(r.expect_err("in flight").code(), Code::Aborted);
    }
    shop.gate.release.add_permits(1);
    let last = rx.recv().await.expect("result").expect("the one charge");
    assert_eq!(last.get_ref().charge_id, "ch_1");
    assert_eq!(shop.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_waiting_duplicates_get_the_one_reply() {
    let shop = Shop::default();
    let (_, ch) = serve(
        layer(Idempotency::memory()).wait_for_in_flight(),
        shop.clone(),
        Opts::default(),
    )
    .await;
    let client = PaymentsClient::new(ch);
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.charge(charge(Some("w100"), "slow", 1)).await })
        })
        .collect();
    shop.gate.started.notified().await;
    shop.gate.release.add_permits(100);
    for call in calls {
        let reply = tokio::time::timeout(HANG, call)
            .await
            .expect("hang")
            .expect("task")
            .expect("reply");
        assert_eq!(reply.get_ref().charge_id, "ch_1");
    }
    assert_eq!(shop.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_ttl_the_key_runs_again() {
    let shop = Shop::default();
    let (_, ch) = serve(
        layer(Idempotency::memory()).ttl(Duration::from_millis(300)),
        shop.clone(),
        Opts::default(),
    )
    .await;
    let mut client = PaymentsClient::new(ch);
    client
        .charge(charge(Some("t"), "acme", 1))
        .await
        .expect("first");
    // Expiry is a lower bound: past it, the key is surely gone.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let other = client
        .charge(charge(Some("t"), "acme", 2))
        .await
        .expect("another request after the TTL");
    assert!(!replayed(other.metadata()));
    assert_eq!(shop.runs(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_redis_abort_then_replay_exactly() {
    let prefix = unique_prefix();
    let shop = Shop::default();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::connect(&redis_url())
            .await
            .expect("redis")
            .with_prefix(prefix.clone());
        let idem = Idempotency::builder()
            .store(store)
            .codec(Codec::Postcard)
            .build()
            .expect("engine");
        servers.push(serve(layer(idem), shop.clone(), Opts::default()).await);
    }
    let (addr_a, ch_a) = servers[0].clone();
    let (addr_b, ch_b) = servers[1].clone();
    let h: &'static [(&'static str, &'static [u8])] =
        &[("idempotency-key", b"rr"), ("x-mode", b"trailer")];
    let first =
        tokio::spawn(async move { raw(&ch_a, addr_a, CHARGE, h, charge_frame("slow", 4)).await });
    shop.gate.started.notified().await;
    let busy = raw(&ch_b, addr_b, CHARGE, h, charge_frame("slow", 4)).await;
    assert_eq!(busy.grpc_status().as_deref(), Some("10"), "{busy:?}");
    assert!(busy.headers.get("grpc-retry-pushback-ms").is_some());
    shop.gate.release.add_permits(1);
    let first = first.await.expect("task");
    let again = raw(&ch_b, addr_b, CHARGE, h, charge_frame("slow", 4)).await;
    assert!(again.is_replay());
    assert_same_response(&first, &again);
    assert_eq!(shop.runs(), 1);
}

// ---------------------------------------------------------------------------------------
// gRPC-Web (tonic-web's layer outside the idempotency layer)
// ---------------------------------------------------------------------------------------

async fn serve_grpc_web(
    layer: GrpcIdempotencyLayer,
    shop: Shop,
) -> (std::net::SocketAddr, Channel) {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = incoming.local_addr().expect("addr");
    tokio::spawn(
        Server::builder()
            .accept_http1(true)
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(layer)
            .add_service(PaymentsServer::new(shop))
            .serve_with_incoming(incoming),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    (addr, channel)
}

/// A gRPC-Web call over HTTP/1.1 (as browsers make them), through tonic-web: the status
/// travels in a trailers frame at the end of the body. Without a key the layer passes
/// the call through; with one, the answer must carry that trailers frame too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_over_http1_keeps_its_trailers_frame() {
    let shop = Shop::default();
    let (addr, _) = serve_grpc_web(layer(Idempotency::memory()), shop.clone()).await;
    let body = charge_frame("acme", 1);
    let ct = "application/grpc-web+proto";
    let plain = http1_keyed(addr, &body, ct, None).await;
    eprintln!("grpc-web, no key:\n{plain:?}");
    assert!(plain.contains("grpc-status:0"), "{plain:?}");
    let first = http1_keyed(addr, &body, ct, Some("web1")).await;
    eprintln!("grpc-web, first with a key:\n{first:?}");
    let again = http1_keyed(addr, &body, ct, Some("web1")).await;
    eprintln!("grpc-web, replay:\n{again:?}");
    assert!(
        first.contains("grpc-status:0"),
        "the first answer lost its status: {first:?}"
    );
    assert!(
        again.contains("grpc-status:0"),
        "the replay lost its status: {again:?}"
    );
}

/// The same over HTTP/2 (gRPC-Web content type on an h2 connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_over_http2_keeps_its_trailers_frame() {
    let shop = Shop::default();
    let (addr, ch) = serve_grpc_web(layer(Idempotency::memory()), shop.clone()).await;
    let ct: &[u8] = b"application/grpc-web+proto";
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{CHARGE}"))
        .header("content-type", HeaderValue::from_bytes(ct).expect("ct"))
        .header("idempotency-key", "web2");
    req = req.header("te", "trailers");
    let req = req
        .body(tonic::body::Body::new(http_body_util::Full::new(
            Bytes::from(charge_frame("acme", 1)),
        )))
        .expect("request");
    let resp = tokio::time::timeout(HANG, tower::ServiceExt::oneshot(ch.clone(), req))
        .await
        .expect("hang")
        .expect("exchange");
    eprintln!("grpc-web over h2 headers: {:?}", resp.headers());
    let body = tokio::time::timeout(HANG, resp.into_body().collect())
        .await
        .expect("hang");
    let body = body
        .expect("the gRPC-Web body over HTTP/2 broke")
        .to_bytes();
    eprintln!("grpc-web over h2 body: {body:?}");
    assert!(
        body.windows(13).any(|w| w == b"grpc-status:0"),
        "no trailers frame: {body:?}"
    );
}

/// The other order: the idempotency layer outside tonic-web's. A gRPC-Web call's status
/// is in its body, where the layer cannot read it (the first version stored nothing and
/// ran every retry again): keyed gRPC-Web calls are refused with a status naming the
/// setup error, and the method never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_inside_the_layer_is_refused_and_never_runs() {
    let shop = Shop::default();
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = incoming.local_addr().expect("addr");
    tokio::spawn(
        Server::builder()
            .accept_http1(true)
            .layer(layer(Idempotency::memory()))
            .layer(tonic_web::GrpcWebLayer::new())
            .add_service(PaymentsServer::new(shop.clone()))
            .serve_with_incoming(incoming),
    );
    let body = charge_frame("acme", 1);
    let ct = "application/grpc-web+proto";
    let first = http1_keyed(addr, &body, ct, Some("web3")).await;
    let again = http1_keyed(addr, &body, ct, Some("web3")).await;
    for answer in [&first, &again] {
        assert!(answer.contains("grpc-status: 13"), "{answer}");
        assert!(answer.contains("GrpcWebLayer"), "{answer}");
    }
    assert_eq!(shop.runs(), 0, "a keyed gRPC-Web call ran");
}
