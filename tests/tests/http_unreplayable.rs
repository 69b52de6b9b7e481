//! A handler that ran and answered with a response the HTTP layers cannot store (over
//! `max_response_body`, of unknown length, of a streaming content type) keeps its key:
//! the request that ran it gets its response as it comes, and the duplicate that waited
//! for it, in this process or another, and every retry for the TTL get a 500 problem
//! (`unreplayable-response`) saying it cannot be replayed; the handler never runs a
//! second time. Before, the key was released, and all of them ran the handler again.
//!
//! The tower layer and the actix-web middleware, against every store (memory, Redis,
//! PostgreSQL), each with two replicas (two engines) on one store.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use idempotent_runtime::http::{IdempotencyLayer, ResponseBody};
use idempotent_runtime::store::Store;
use idempotent_runtime::Idempotency;
use idempotent_tests::{each_store, FaultyStore, Runs};
use tokio::sync::{Notify, Semaphore};
use tower::{Layer, ServiceExt};

const BOUND: Duration = Duration::from_secs(30);

/// The largest response body the layers store in these tests.
const LIMIT: usize = 16;

/// How the handler answers: every one a 201 the layers cannot store.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    /// A body of known length, over [`LIMIT`].
    OverLimit,
    /// A body of unknown length (a stream), small enough to store were it known.
    UnknownLength,
    /// A `text/event-stream` body of known length, small enough to store.
    EventStream,
}

const ANSWERS: [Answer; 3] = [
    Answer::UnknownLength,
    Answer::OverLimit,
    Answer::EventStream,
];

impl Answer {
    fn header(self) -> &'static str {
        match self {
            Answer::OverLimit => "over",
            Answer::UnknownLength => "stream",
            Answer::EventStream => "sse",
        }
    }

    fn from_header(v: Option<&[u8]>) -> Self {
        match v {
            Some(b"stream") => Answer::UnknownLength,
            Some(b"sse") => Answer::EventStream,
            _ => Answer::OverLimit,
        }
    }

    /// The body of run `n`, in its pieces: two for a stream.
    fn pieces(self, n: u32) -> [String; 2] {
        match self {
            Answer::OverLimit => [
                format!("{{\"id\":{n},"),
                format!("\"pad\":\"{}\"}}", "x".repeat(32)),
            ],
            Answer::UnknownLength => ["{\"id\":".to_owned(), format!("{n}}}")],
            Answer::EventStream => [format!("data: {n}\n"), "\n".to_owned()],
        }
    }

    fn body(self, n: u32) -> String {
        self.pieces(n).concat()
    }

    fn content_type(self) -> &'static str {
        match self {
            Answer::EventStream => "text/event-stream",
            _ => "application/json",
        }
    }
}

/// A slow request: the handler says it has started, then waits until the test lets it go.
struct Gate {
    started: Notify,
    release: Semaphore,
}

impl Gate {
    /// Waits for a pass, and keeps it: one [`Semaphore::add_permits`] lets one request by.
    async fn pass(&self) {
        if let Ok(permit) = self.release.acquire().await {
            permit.forget();
        }
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            started: Notify::new(),
            release: Semaphore::new(0),
        }
    }
}

/// What a retry or a waiting duplicate must get: the stored problem, marked as a replay.
fn assert_unreplayable(who: &str, status: u16, replayed: bool, body: &[u8]) {
    let text = String::from_utf8_lossy(body);
    assert_eq!(status, 500, "{who}: {text}");
    let p: serde_json::Value = serde_json::from_slice(body).expect("a problem");
    assert_eq!(
        p["type"], "urn:idempotent:problem:unreplayable-response",
        "{who}: {p}"
    );
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("answered 201")),
        "{who}: {p}"
    );
    assert!(replayed, "{who}: not marked as a replay");
}

// ---------------------------------------------------------------------------------------
// The tower layer
// ---------------------------------------------------------------------------------------

type Handler =
    tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<ResponseBody>, Infallible>;

/// The layer over a handler that counts its runs in `runs`, waits at `gate` when asked
/// (`x-gate`), and answers as `x-answer` says.
fn tower_app(layer: IdempotencyLayer, runs: Runs, gate: Arc<Gate>) -> Handler {
    let handler = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let (runs, gate) = (runs.clone(), gate.clone());
        async move {
            let n = runs.next();
            if req.headers().contains_key("x-gate") {
                gate.started.notify_one();
                gate.pass().await;
            }
            let answer = Answer::from_header(req.headers().get("x-answer").map(|v| v.as_bytes()));
            let [a, b] = answer.pieces(n);
            let body: ResponseBody = match answer {
                Answer::UnknownLength => {
                    let frames = [a, b].map(|p| Ok(http_body::Frame::data(Bytes::from(p))));
                    StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
                }
                _ => Full::new(Bytes::from(a + &b))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            };
            let resp = Response::builder()
                .status(StatusCode::CREATED)
                .header(header::CONTENT_TYPE, answer.content_type())
                .header("set-cookie", "a=1")
                .header("set-cookie", "b=2")
                .body(body)
                .expect("response");
            Ok::<_, Infallible>(resp)
        }
    });
    tower::util::BoxCloneSyncService::new(layer.layer(handler))
}

fn tower_request(key: &str, answer: Answer, gate: bool) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri("/payments")
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", key)
        .header("x-answer", answer.header());
    if gate {
        b = b.header("x-gate", "1");
    }
    b.body(Full::new(Bytes::from_static(b"{\"amount\":1250}")))
        .expect("request")
}

/// Status, whether it is marked as a replay, its `Set-Cookie`s and body.
async fn tower_send(svc: Handler, req: Request<Full<Bytes>>) -> (u16, bool, usize, Bytes) {
    let resp = tokio::time::timeout(BOUND, svc.oneshot(req))
        .await
        .expect("answers")
        .expect("infallible");
    let (parts, body) = resp.into_parts();
    let replayed = parts
        .headers
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let cookies = parts.headers.get_all("set-cookie").iter().count();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status.as_u16(), replayed, cookies, body)
}

fn replica(store: &FaultyStore<Arc<dyn Store>>) -> IdempotencyLayer {
    let engine = Idempotency::builder()
        .store(store.clone())
        .build()
        .expect("engine");
    IdempotencyLayer::new(engine)
        .wait_for_in_flight()
        .max_response_body(LIMIT)
}

/// A leader held at the gate on one replica, a duplicate that waits for it on the other
/// (it has reached the store before the leader is let go), then retries through both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tower_a_response_that_cannot_be_stored_reaches_its_caller_and_never_runs_again() {
    for (name, store) in each_store().await {
        let store = FaultyStore::new(store);
        for answer in ANSWERS {
            let (runs, gate) = (Runs::default(), Arc::new(Gate::default()));
            let here = tower_app(replica(&store), runs.clone(), gate.clone());
            let there = tower_app(replica(&store), runs.clone(), gate.clone());
            let key = format!("tower-{answer:?}");
            let leader = tokio::spawn(tower_send(here.clone(), tower_request(&key, answer, true)));
            gate.started.notified().await;
            let claims = store.claims();
            let duplicate = tokio::spawn(tower_send(
                there.clone(),
                tower_request(&key, answer, false),
            ));
            idempotent_tests::eventually(BOUND, "the duplicate reaches the store", || {
                store.claims() > claims
            })
            .await;
            gate.release.add_permits(1);
            let (status, replayed, cookies, body) = leader.await.expect("leader");
            let who = format!("{name}, {answer:?}");
            assert_eq!(status, 201, "{who}: {}", String::from_utf8_lossy(&body));
            assert!(!replayed, "{who}");
            assert_eq!(cookies, 2, "{who}: the handler's own response, unchanged");
            assert_eq!(body, answer.body(1), "{who}: the handler's own response");
            let (status, replayed, _, body) = duplicate.await.expect("duplicate");
            assert_unreplayable(
                &format!("{who}, the waiting duplicate"),
                status,
                replayed,
                &body,
            );
            for (at, svc) in [("here", &here), ("there", &there)] {
                let (status, replayed, _, body) =
                    tower_send(svc.clone(), tower_request(&key, answer, false)).await;
                assert_unreplayable(&format!("{who}, a retry {at}"), status, replayed, &body);
            }
            assert_eq!(runs.count(), 1, "{who}: the handler ran again");
        }
    }
}

/// The client of the request that ran the handler goes away while it runs: the handler
/// runs on, its key is kept, and the retry (which waits for it) is told it cannot be
/// replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tower_a_client_that_gives_up_on_such_a_response_does_not_free_its_key() {
    for (name, store) in each_store().await {
        let store = FaultyStore::new(store);
        for answer in ANSWERS {
            let (runs, gate) = (Runs::default(), Arc::new(Gate::default()));
            let svc = tower_app(replica(&store), runs.clone(), gate.clone());
            let key = format!("tower-gone-{answer:?}");
            let first = tokio::spawn(tower_send(svc.clone(), tower_request(&key, answer, true)));
            gate.started.notified().await;
            first.abort();
            assert!(first.await.is_err(), "the client went away");
            let retry = tokio::spawn(tower_send(svc.clone(), tower_request(&key, answer, false)));
            gate.release.add_permits(1);
            let (status, replayed, _, body) = retry.await.expect("retry");
            let who = format!("{name}, {answer:?}, the retry");
            assert_unreplayable(&who, status, replayed, &body);
            assert_eq!(runs.count(), 1, "{who}: the handler ran again");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The actix-web middleware, on real servers
// ---------------------------------------------------------------------------------------

mod actix {
    use super::*;
    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
    use idempotent_runtime::actix::IdempotencyMiddleware;

    struct Shop {
        runs: Runs,
        gate: Gate,
    }

    async fn pay(shop: web::Data<Shop>, req: HttpRequest, _body: web::Bytes) -> HttpResponse {
        let n = shop.runs.next();
        if req.headers().contains_key("x-gate") {
            shop.gate.started.notify_one();
            shop.gate.pass().await;
        }
        let answer = Answer::from_header(req.headers().get("x-answer").map(|v| v.as_bytes()));
        let [a, b] = answer.pieces(n);
        let mut resp = HttpResponse::Created();
        resp.content_type(answer.content_type())
            .append_header(("set-cookie", "a=1"))
            .append_header(("set-cookie", "b=2"));
        match answer {
            Answer::UnknownLength => {
                let chunks = [a, b].map(|p| Ok::<_, actix_web::Error>(web::Bytes::from(p)));
                resp.streaming(futures_util::stream::iter(chunks))
            }
            _ => resp.body(a + &b),
        }
    }

    /// A replica on `store`, served on a loopback port; its base URL.
    fn serve(store: &FaultyStore<Arc<dyn Store>>, shop: web::Data<Shop>) -> String {
        let engine = Idempotency::builder()
            .store(store.clone())
            .build()
            .expect("engine");
        let mw = IdempotencyMiddleware::new(engine)
            .wait_for_in_flight()
            .max_response_body(LIMIT);
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shop.clone())
                .wrap(mw.clone())
                .route("/payments", web::post().to(pay))
        })
        .workers(1)
        .bind(("127.0.0.1", 0))
        .expect("bind");
        let addr = server.addrs()[0];
        actix_web::rt::spawn(server.run());
        format!("http://{addr}")
    }

    async fn send(
        client: reqwest::Client,
        base: String,
        key: String,
        answer: Answer,
        gate: bool,
    ) -> (u16, bool, usize, Bytes) {
        let mut req = client
            .post(format!("{base}/payments"))
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .header("x-answer", answer.header())
            .body("{\"amount\":1250}");
        if gate {
            req = req.header("x-gate", "1");
        }

        let resp = tokio::time::timeout(BOUND, req.send())
            .await
            .expect("answers")
            .expect("request");
        let status = resp.status().as_u16();
        let replayed = resp
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let cookies = resp.headers().get_all("set-cookie").iter().count();
        let body = resp.bytes().await.expect("body");
        (status, replayed, cookies, body)
    }

    /// The same as the tower layer's test, through two actix-web servers (each with a
    /// worker thread of its own) on one store.
    #[actix_web::test]
    async fn actix_a_response_that_cannot_be_stored_reaches_its_caller_and_never_runs_again() {
        let client = reqwest::Client::new();
        for (name, store) in each_store().await {
            let store = FaultyStore::new(store);
            let shop = web::Data::new(Shop {
                runs: Runs::default(),
                gate: Gate::default(),
            });
            let (here, there) = (serve(&store, shop.clone()), serve(&store, shop.clone()));
            for answer in ANSWERS {
                let before = shop.runs.count();
                let key = format!("actix-{answer:?}");
                let call = |base: &String, gate| {
                    tokio::spawn(send(
                        client.clone(),
                        base.clone(),
                        key.clone(),
                        answer,
                        gate,
                    ))
                };
                let leader = call(&here, true);
                shop.gate.started.notified().await;
                let claims = store.claims();
                let duplicate = call(&there, false);
                idempotent_tests::eventually(BOUND, "the duplicate reaches the store", || {
                    store.claims() > claims
                })
                .await;
                shop.gate.release.add_permits(1);
                let (status, replayed, cookies, body) = leader.await.expect("leader");
                let who = format!("{name}, {answer:?}");
                assert_eq!(status, 201, "{who}: {}", String::from_utf8_lossy(&body));
                assert!(!replayed, "{who}");
                assert_eq!(cookies, 2, "{who}: the handler's own response, unchanged");
                assert_eq!(
                    body,
                    answer.body(before + 1),
                    "{who}: the handler's own response"
                );
                let (status, replayed, _, body) = duplicate.await.expect("duplicate");
                assert_unreplayable(
                    &format!("{who}, the waiting duplicate"),
                    status,
                    replayed,
                    &body,
                );
                for (at, base) in [("here", &here), ("there", &there)] {
                    let (status, replayed, _, body) = call(base, false).await.expect("retry");
                    assert_unreplayable(&format!("{who}, a retry {at}"), status, replayed, &body);
                }
                assert_eq!(
                    shop.runs.count(),
                    before + 1,
                    "{who}: the handler ran again"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The status the problem names, and the limit's edge
// ---------------------------------------------------------------------------------------

/// A handler answering `x-status` (default 201) with `x-len` bytes of known length, or,
/// with `x-stream`, a stream of unknown length.
fn sized_handler(runs: Runs) -> impl Fn(&http::HeaderMap) -> Response<ResponseBody> + Clone {
    move |h: &http::HeaderMap| {
        runs.next();
        let num = |name: &str| -> Option<u16> { h.get(name)?.to_str().ok()?.parse().ok() };
        let status = StatusCode::from_u16(num("x-status").unwrap_or(201)).expect("status");
        let body = Bytes::from("x".repeat(usize::from(num("x-len").unwrap_or(1))));
        let body: ResponseBody = if h.contains_key("x-stream") {
            let frames = [Ok(http_body::Frame::data(body))];
            StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
        } else {
            Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync()
        };
        Response::builder()
            .status(status)
            .body(body)
            .expect("response")
    }
}

fn sized_request(key: &str, headers: &[(&'static str, String)]) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri("/payments")
        .header("idempotency-key", key);
    for (name, value) in headers {
        b = b.header(*name, value);
    }
    b.body(Full::new(Bytes::new())).expect("request")
}

/// The problem names the status the handler answered, whatever it was (a stored 4xx
/// too); a body of exactly `max_response_body` bytes is stored and replayed, one byte more
/// is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_the_problem_names_the_handlers_status_and_the_limit_is_inclusive() {
    let runs = Runs::default();
    let answer = sized_handler(runs.clone());
    let handler = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let resp = answer(req.headers());
        async move { Ok::<_, Infallible>(resp) }
    });
    let svc: Handler = tower::util::BoxCloneSyncService::new(
        IdempotencyLayer::new(Idempotency::memory())
            .max_response_body(LIMIT)
            .layer(handler),
    );
    let send = |key, headers: Vec<_>| {
        let req = sized_request(key, &headers);
        let svc = svc.clone();
        async move {
            let (status, replayed, _, body) = tower_send(svc, req).await;
            (status, replayed, body)
        }
    };
    the_status_named_and_the_limits_edge(send, &runs).await;
}

/// The same through the actix-web middleware.
#[actix_web::test]
async fn actix_the_problem_names_the_handlers_status_and_the_limit_is_inclusive() {
    use actix_web::{test, web, App, HttpRequest, HttpResponse};
    use idempotent_runtime::actix::IdempotencyMiddleware;

    let runs = Runs::default();
    let counted = runs.clone();
    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(Idempotency::memory()).max_response_body(LIMIT))
            .default_service(web::to(move |req: HttpRequest| {
                counted.next();
                let num = |name: &str| -> Option<u16> {
                    req.headers().get(name)?.to_str().ok()?.parse().ok()
                };
                let status = actix_web::http::StatusCode::from_u16(num("x-status").unwrap_or(201))
                    .expect("status");
                let body = web::Bytes::from("x".repeat(usize::from(num("x-len").unwrap_or(1))));
                let stream = req.headers().contains_key("x-stream");
                async move {
                    let mut resp = HttpResponse::build(status);
                    if stream {
                        let chunks = [Ok::<_, actix_web::Error>(body)];
                        resp.streaming(futures_util::stream::iter(chunks))
                    } else {
                        resp.body(body)
                    }
                }
            })),
    )
    .await;
    let call = |key: &str, headers: &[(&'static str, String)]| {
        let mut r = test::TestRequest::post()
            .uri("/payments")
            .insert_header(("idempotency-key", key.to_owned()));
        for (name, value) in headers {
            r = r.insert_header((*name, value.clone()));
        }
        r.to_request()
    };
    let app = &app;
    let send = |key, headers: Vec<_>| {
        let req = call(key, &headers);
        async move {
            let resp = test::call_service(app, req).await;
            let status = resp.status().as_u16();
            let replayed = resp.headers().contains_key("idempotent-replayed");
            (status, replayed, test::read_body(resp).await)
        }
    };
    the_status_named_and_the_limits_edge(send, &runs).await;
}

/// A streamed 400's key answers with a problem naming 400; a body of exactly [`LIMIT`]
/// bytes is stored and replayed, and one of a byte more answers the problem. `send` sends
/// a request with a key and headers; the handler answers as `sized_handler` does.
async fn the_status_named_and_the_limits_edge<F, Fut>(send: F, runs: &Runs)
where
    F: Fn(&'static str, Vec<(&'static str, String)>) -> Fut,
    Fut: std::future::Future<Output = (u16, bool, Bytes)>,
{
    let streamed_400 = || vec![("x-status", "400".to_owned()), ("x-stream", "1".to_owned())];
    assert_eq!(send("s", streamed_400()).await.0, 400);
    let (status, replayed, body) = send("s", streamed_400()).await;
    assert_eq!(status, 500);
    assert!(replayed);
    let p: serde_json::Value = serde_json::from_slice(&body).expect("problem");
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("answered 400")),
        "{p}"
    );
    assert_eq!(runs.count(), 1);

    let at_limit = || vec![("x-len", LIMIT.to_string())];
    let over = || vec![("x-len", (LIMIT + 1).to_string())];
    for _ in 0..2 {
        let (status, _, body) = send("at", at_limit()).await;
        assert_eq!((status, body.len()), (201, LIMIT), "stored and replayed");
    }
    assert_eq!(runs.count(), 2, "a body at the limit is stored");
    let (status, _, body) = send("over", over()).await;
    assert_eq!((status, body.len()), (201, LIMIT + 1));
    let (status, replayed, body) = send("over", over()).await;
    assert_unreplayable("one byte over the limit", status, replayed, &body);
    assert_eq!(runs.count(), 3);
}
