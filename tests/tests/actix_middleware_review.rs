//! An outside review of the actix-web middleware: attacks on its request handling (inner
//! errors, panics, waiting duplicates, bodies at the limit, chunked and `Expect` bodies,
//! two servers on one Redis) and on its agreement with the tower layer on one engine.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::{test, web, App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use futures_util::future::join;
use idempotent_runtime::actix::IdempotencyMiddleware;
use idempotent_runtime::store::{MemoryStore, RedisStore};
use idempotent_runtime::Idempotency;
use idempotent_tests::redis_server::{redis_url, unique_prefix};
use idempotent_tests::FaultyStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};

/// Bounds every wait on the middleware: a request that never answers fails the test.
const LIMIT: Duration = Duration::from_secs(20);

struct Bank {
    runs: AtomicU32,
    finished: AtomicU32,
    started: Notify,
    release: Semaphore,
}

impl Bank {
    fn new() -> web::Data<Bank> {
        web::Data::new(Bank {
            runs: AtomicU32::new(0),
            finished: AtomicU32::new(0),
            started: Notify::new(),
            release: Semaphore::new(0),
        })
    }
    fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct Declined;

impl std::fmt::Display for Declined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("card declined")
    }
}

impl ResponseError for Declined {
    fn status_code(&self) -> StatusCode {
        StatusCode::PAYMENT_REQUIRED
    }
    fn error_response(&self) -> HttpResponse {
        HttpResponse::PaymentRequired()
            .insert_header(("x-decline-code", "insufficient_funds"))
            .content_type("application/json")
            .body(r#"{"error":"declined"}"#)
    }
}

/// `x-gate` waits at the gate; `x-panic` panics (after the gate); `x-decline` answers an
/// error through `ResponseError`; `x-empty` answers 204; otherwise 201 with two cookies,
/// a header with an obs-text byte and a binary body naming the run.
async fn pay(
    bank: web::Data<Bank>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, Declined> {
    let n = bank.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let has = |name: &str| req.headers().contains_key(name);
    if has("x-gate") {
        bank.started.notify_one();
        // Each permit lets one request through, once.
        bank.release.acquire().await.expect("gate").forget();
    }
    if has("x-panic") {
        panic!("the handler panics (run {n})");
    }
    if has("x-decline") {
        return Err(Declined);
    }
    if has("x-empty") {
        return Ok(HttpResponse::NoContent().finish());
    }
    bank.finished.fetch_add(1, Ordering::SeqCst);
    let mut out = vec![0xff, 0x00, n as u8];
    out.extend_from_slice(&body);
    Ok(HttpResponse::Created()
        .append_header(("set-cookie", "a=1"))
        .append_header(("set-cookie", "b=2"))
        .append_header(("set-cookie", "c=3"))
        .append_header((
            "x-latin1",
            header::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        ))
        .append_header(("location", format!("/payments/{n}")))
        .content_type("application/octet-stream")
        .body(out))
}

fn app(
    mw: IdempotencyMiddleware,
    bank: web::Data<Bank>,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = ServiceResponse,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(bank)
        .wrap(mw)
        .default_service(web::to(pay))
}

fn post(key: &str, body: &str) -> test::TestRequest {
    test::TestRequest::post()
        .uri("/payments")
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .insert_header(("idempotency-key", key.to_owned()))
        .set_payload(body.to_owned())
}

fn mw() -> IdempotencyMiddleware {
    IdempotencyMiddleware::new(Idempotency::memory())
}

fn replayed(h: &header::HeaderMap) -> bool {
    h.get("idempotent-replayed").is_some_and(|v| v == "true")
}

/// The status of an answer, whether actix-web gives it as a response or as an error (which
/// a server turns into its response).
fn status_of(answer: &Result<ServiceResponse, actix_web::Error>) -> StatusCode {
    match answer {
        Ok(resp) => resp.status(),
        Err(e) => e.as_response_error().status_code(),
    }
}

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("HANG: {what} did not answer within {LIMIT:?}"))
}

// ---------------------------------------------------------------------------------------
// Inner errors, panics, ResponseError
// ---------------------------------------------------------------------------------------

/// An inner middleware (authentication, say) answers `Err(403)`: without the idempotency
/// middleware a client gets 403; with it, it must still get 403 (tower passes `Err` on).
#[actix_web::test]
async fn an_inner_middlewares_error_is_passed_on() {
    let bank = Bank::new();
    let deny = |req: actix_web::dev::ServiceRequest, srv: &_| {
        let fut = if req.headers().contains_key("x-deny") {
            None
        } else {
            Some(Service::call(srv, req))
        };
        async move {
            match fut {
                Some(f) => f.await,
                None => Err(actix_web::error::ErrorForbidden("denied")),
            }
        }
    };
    // Baseline: no idempotency middleware.
    let plain = test::init_service(
        App::new()
            .app_data(bank.clone())
            .wrap_fn(deny)
            .default_service(web::to(pay)),
    )
    .await;
    let baseline = plain
        .call(post("k", "{}").insert_header(("x-deny", "1")).to_request())
        .await;
    assert_eq!(status_of(&baseline), StatusCode::FORBIDDEN);

    let svc = test::init_service(
        App::new()
            .app_data(bank.clone())
            .wrap_fn(deny)
            .wrap(mw())
            .default_service(web::to(pay)),
    )
    .await;
    let answer = bounded(
        "an inner error",
        svc.call(post("k", "{}").insert_header(("x-deny", "1")).to_request()),
    )
    .await;
    let shown = match &answer {
        Ok(r) => format!("Ok({})", r.status()),
        Err(e) => format!("Err({} {e})", e.as_response_error().status_code()),
    };
    assert_eq!(
        status_of(&answer),
        StatusCode::FORBIDDEN,
        "the inner middleware's 403 became {shown}"
    );
    // The key is free: the same request, allowed, runs.
    let ok = bounded("the retry", svc.call(post("k", "{}").to_request())).await;
    assert_eq!(status_of(&ok), StatusCode::CREATED);
    assert_eq!(bank.runs(), 1);
}

/// A handler that panics: the caller gets an answer (no hang), the key is not stored, and
/// a retry runs and is stored.
#[actix_web::test]
async fn a_panicking_handler_answers_500_and_frees_its_key() {
    let bank = Bank::new();
    let svc = test::init_service(app(mw(), bank.clone())).await;
    let first = bounded(
        "a panicking handler",
        svc.call(post("k", "{}").insert_header(("x-panic", "1")).to_request()),
    )
    .await;
    assert_eq!(status_of(&first), StatusCode::INTERNAL_SERVER_ERROR);
    let retry = bounded(
        "the retry",
        test::call_service(&svc, post("k", "{}").to_request()),
    )
    .await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(!replayed(retry.headers()));
    let again = bounded(
        "a replay",
        test::call_service(&svc, post("k", "{}").to_request()),
    )
    .await;
    assert!(replayed(again.headers()));
    assert_eq!(bank.runs(), 2);
}

/// A waiting duplicate on another replica, while the first handler panics: it must get an
/// answer (it runs the handler itself, the panic having stored nothing), never hang.
#[actix_web::test]
async fn a_waiting_duplicate_is_answered_when_the_first_handler_panics() {
    let store = FaultyStore::new(MemoryStore::new());
    let bank = Bank::new();
    let replica =
        || IdempotencyMiddleware::new(Idempotency::new(store.clone())).wait_for_in_flight();
    let a = test::init_service(app(replica(), bank.clone())).await;
    let b = test::init_service(app(replica(), bank.clone())).await;
    let first = post("k", "{}")
        .insert_header(("x-gate", "1"))
        .insert_header(("x-panic", "1"))
        .to_request();
    let ((first, second), ()) = bounded(
        "a duplicate waiting on a panicking handler",
        join(
            join(a.call(first), async {
                bank.started.notified().await;
                b.call(post("k", "{}").to_request()).await
            }),
            async {
                while store.claims() < 2 {
                    actix_web::rt::time::sleep(Duration::from_millis(1)).await;
                }
                bank.release.add_permits(1);
            },
        ),
    )
    .await;
    assert_eq!(status_of(&first), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(status_of(&second), StatusCode::CREATED);
    assert_eq!(bank.runs(), 2);
}

/// A handler's error through `ResponseError` (402 with a header and a JSON body) is a
/// response like any other: stored, and replayed exactly.
#[actix_web::test]
async fn a_response_error_is_stored_and_replayed_exactly() {
    let bank = Bank::new();
    let svc = test::init_service(app(mw(), bank.clone())).await;
    let declined = || {
        post("k", "{}")
            .insert_header(("x-decline", "1"))
            .to_request()
    };
    let first = test::call_service(&svc, declined()).await;
    let (s1, h1) = (first.status(), first.headers().clone());
    let b1 = test::read_body(first).await;
    let second = test::call_service(&svc, declined()).await;
    let (s2, h2) = (second.status(), second.headers().clone());
    let b2 = test::read_body(second).await;
    assert_eq!(
        (s1, s2),
        (StatusCode::PAYMENT_REQUIRED, StatusCode::PAYMENT_REQUIRED)
    );
    assert_eq!(b1, b2);
    assert_eq!(h2.get("x-decline-code").unwrap(), "insufficient_funds");
    assert_eq!(h1.get(header::CONTENT_TYPE), h2.get(header::CONTENT_TYPE));
    assert!(replayed(&h2));
    assert_eq!(bank.runs(), 1);
}

/// A 204 without a body: stored and replayed as a 204.
#[actix_web::test]
async fn a_204_is_stored_and_replayed() {
    let bank = Bank::new();
    let svc = test::init_service(app(mw(), bank.clone())).await;
    for n in 0..2 {
        let resp = test::call_service(
            &svc,
            post("k", "{}").insert_header(("x-empty", "1")).to_request(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(replayed(resp.headers()), n == 1);
        assert!(test::read_body(resp).await.is_empty());
    }
    assert_eq!(bank.runs(), 1);
}

/// The response as replayed keeps every header value byte for byte (obs-text included)
/// and the three cookies in order, and the binary body.
#[actix_web::test]
async fn a_replay_keeps_obs_text_cookies_in_order_and_a_binary_body() {
    let bank = Bank::new();
    let svc = test::init_service(app(mw(), bank.clone())).await;
    let first = test::call_service(&svc, post("k", "{}").to_request()).await;
    let h1 = first.headers().clone();
    let b1 = test::read_body(first).await;
    let second = test::call_service(&svc, post("k", "{}").to_request()).await;
    let h2 = second.headers().clone();
    let b2 = test::read_body(second).await;
    assert_eq!(b1, b2);
    assert_eq!(&b1[..3], &[0xff, 0, 1]);
    let cookies = |h: &header::HeaderMap| h.get_all("set-cookie").cloned().collect::<Vec<_>>();
    assert_eq!(cookies(&h2), ["a=1", "b=2", "c=3"]);
    assert_eq!(cookies(&h1), cookies(&h2));
    assert_eq!(h2.get("x-latin1").unwrap().as_bytes(), b"caf\xe9");
    assert_eq!(h1.get("x-latin1"), h2.get("x-latin1"));
    assert_eq!(bank.runs(), 1);
}

// ---------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------

#[actix_web::test]
async fn a_body_exactly_at_the_limit_runs_and_one_byte_more_is_413() {
    let bank = Bank::new();
    let svc = test::init_service(app(mw().max_request_body(64), bank.clone())).await;
    let at = "x".repeat(64);
    let resp = test::call_service(
        &svc,
        post("at", &at)
            .insert_header((header::CONTENT_TYPE, "text/plain"))
            .to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let over = "x".repeat(65);
    let resp = test::call_service(
        &svc,
        post("over", &over)
            .insert_header((header::CONTENT_TYPE, "text/plain"))
            .to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(bank.runs(), 1);
}

/// Serves `app` on a listener of our own, so that the address is known.
fn serve_on(
    mw: IdempotencyMiddleware,
    bank: web::Data<Bank>,
    workers: usize,
) -> (std::net::SocketAddr, actix_web::dev::ServerHandle) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let server = HttpServer::new(move || app(mw.clone(), bank.clone()))
        .workers(workers)
        .shutdown_timeout(1)
        .listen(listener)
        .expect("listen")
        .run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    (addr, handle)
}

/// Sends raw HTTP/1.1 bytes; with `expect`, waits for `100 Continue` before the body.
/// Gives the whole response text (the connection is closed by the request).
async fn raw(addr: std::net::SocketAddr, head: &str, body: &[u8], expect: bool) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.unwrap();
    if expect {
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before 100 Continue");
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 100"),
            "expected 100 Continue, got {text}"
        );
    }
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A chunked body with `Expect: 100-continue`, then the same bytes with a Content-Length:
/// the same request, replayed; and a body over the limit sent chunked is 413.
#[actix_web::test]
async fn chunked_and_expect_continue_bodies_are_read_whole() {
    let bank = Bank::new();
    let (addr, handle) = serve_on(mw().max_request_body(32), bank.clone(), 1);
    let body = r#"{"amount":1250,"cur":"EUR"}"#; // 27 bytes
    let chunked = format!(
        "{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        10,
        &body[..10],
        body.len() - 10,
        &body[10..]
    );
    let head = "POST /payments HTTP/1.1\r\nhost: x\r\nconnection: close\r\nidempotency-key: ch\r\n\
                content-type: application/json\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n";
    let first = bounded(
        "a chunked request",
        raw(addr, head, chunked.as_bytes(), true),
    )
    .await;
    assert!(first.starts_with("HTTP/1.1 201"), "{first}");
    assert!(
        !first.to_ascii_lowercase().contains("idempotent-replayed"),
        "{first}"
    );
    let head2 = format!(
        "POST /payments HTTP/1.1\r\nhost: x\r\nconnection: close\r\nidempotency-key: ch\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let second = bounded("a sized request", raw(addr, &head2, body.as_bytes(), false)).await;
    assert!(second.starts_with("HTTP/1.1 201"), "{second}");
    assert!(
        second
            .to_ascii_lowercase()
            .contains("idempotent-replayed: true"),
        "{second}"
    );
    // Over the limit, chunked: 413 and no run.
    let big = "y".repeat(40);
    let chunked = format!(
        "{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        20,
        &big[..20],
        20,
        &big[20..]
    );
    let head3 =
        "POST /payments HTTP/1.1\r\nhost: x\r\nconnection: close\r\nidempotency-key: big\r\n\
                 transfer-encoding: chunked\r\n\r\n";
    let third = bounded(
        "an oversized chunked request",
        raw(addr, head3, chunked.as_bytes(), false),
    )
    .await;
    assert!(third.starts_with("HTTP/1.1 413"), "{third}");
    assert_eq!(bank.runs(), 1);
    handle.stop(false).await;
}

/// A 204 over the wire: the original and the replay carry neither a body nor a
/// Content-Length (RFC 9110, section 8.6).
#[actix_web::test]
async fn a_204_replay_over_the_wire_has_no_content_length() {
    let bank = Bank::new();
    let (addr, handle) = serve_on(mw(), bank.clone(), 1);
    let head = "POST /payments HTTP/1.1\r\nhost: x\r\nconnection: close\r\nidempotency-key: e\r\n\
                x-empty: 1\r\ncontent-length: 2\r\n\r\n";
    let first = bounded("a 204", raw(addr, head, b"{}", false)).await;
    let second = bounded("a 204 replay", raw(addr, head, b"{}", false)).await;
    for r in [&first, &second] {
        assert!(r.starts_with("HTTP/1.1 204"), "{r}");
        assert!(!r.to_ascii_lowercase().contains("content-length"), "{r}");
    }
    assert!(second
        .to_ascii_lowercase()
        .contains("idempotent-replayed: true"));
    assert_eq!(bank.runs(), 1);
    handle.stop(false).await;
}

// ---------------------------------------------------------------------------------------
// Two servers on one Redis
// ---------------------------------------------------------------------------------------

async fn redis_engine(prefix: &str) -> (Idempotency, FaultyStore<RedisStore>) {
    let store = RedisStore::connect(&redis_url())
        .await
        .expect("redis")
        .with_prefix(prefix.to_owned());
    let faulty = FaultyStore::new(store);
    (Idempotency::new(faulty.clone()), faulty)
}

async fn send(
    client: &reqwest::Client,
    addr: std::net::SocketAddr,
    key: &str,
    extra: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client
        .post(format!("http://{addr}/payments"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(r#"{"amount":1250}"#);
    for (n, v) in extra {
        req = req.header(*n, *v);
    }
    req.send().await.expect("request")
}

/// Two servers, each with its own engine and Redis connection: a duplicate on B waits for
/// A's handler and replays it; then A's handler panics while B's duplicate waits: B runs.
#[actix_web::test]
async fn two_servers_on_one_redis_wait_for_each_other_and_survive_a_panic() {
    let prefix = unique_prefix();
    let bank = Bank::new();
    let (ea, _sa) = redis_engine(&prefix).await;
    let (eb, sb) = redis_engine(&prefix).await;
    let (a, ha) = serve_on(
        IdempotencyMiddleware::new(ea).wait_for_in_flight(),
        bank.clone(),
        2,
    );
    let (b, hb) = serve_on(
        IdempotencyMiddleware::new(eb).wait_for_in_flight(),
        bank.clone(),
        2,
    );
    let client = reqwest::Client::new();

    for (key, panics) in [("r1", false), ("r2", true)] {
        let before_claims = sb.claims();
        let runs_before = bank.runs();
        eprintln!("phase {key}: B claims so far {before_claims}");
        let mut first_extra = vec![("x-gate", "1")];
        if panics {
            first_extra.push(("x-panic", "1"));
        }
        let ((r1, r2), ()) = bounded(
            "two servers",
            join(
                join(send(&client, a, key, &first_extra), async {
                    bank.started.notified().await;
                    send(&client, b, key, &[]).await
                }),
                async {
                    // B has asked Redis for the key A holds, at least twice: it waits.
                    while sb.claims() < before_claims + 2 {
                        actix_web::rt::time::sleep(Duration::from_millis(2)).await;
                    }
                    eprintln!(
                        "phase {key}: B has claimed {} times; releasing A",
                        sb.claims()
                    );
                    bank.release.add_permits(1);
                },
            ),
        )
        .await;
        let (s1, s2) = (r1.status(), r2.status());
        let rep2 = r2.headers().get("idempotent-replayed").is_some();
        let (b1, b2) = (r1.bytes().await.unwrap(), r2.bytes().await.unwrap());
        if panics {
            assert_eq!(s1, reqwest::StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(s2, reqwest::StatusCode::CREATED);
            assert!(!rep2);
            assert_eq!(bank.runs(), runs_before + 2);
        } else {
            assert_eq!(
                (s1, s2),
                (reqwest::StatusCode::CREATED, reqwest::StatusCode::CREATED)
            );
            assert!(rep2);
            assert_eq!(b1, b2);
            assert_eq!(bank.runs(), runs_before + 1);
        }
    }
    ha.stop(false).await;
    hb.stop(false).await;
}

/// A server stops (gracefully) while a handler whose client gave up still runs: as the
/// module docs say, the handler may be dropped where it is; then its key stays claimed
/// until its lease runs out, and a retry on a second server runs it again. (A one-second
/// lease, so the test does not wait out the default ten.)
#[actix_web::test]
async fn a_worker_that_stops_mid_handler() {
    let store = FaultyStore::new(MemoryStore::new());
    let bank = Bank::new();
    let engine = || {
        Idempotency::builder()
            .store(store.clone())
            .lease(Duration::from_secs(1))
            .build()
            .expect("engine")
    };
    let (a, ha) = serve_on(IdempotencyMiddleware::new(engine()), bank.clone(), 1);
    let (b, hb) = serve_on(IdempotencyMiddleware::new(engine()), bank.clone(), 1);
    let client = reqwest::Client::new();
    {
        let abandoned = send(&client, a, "stop", &[("x-gate", "1")]);
        tokio::select! {
            _ = abandoned => panic!("the gate is closed"),
            () = bank.started.notified() => {}
        }
    }
    // The client is gone; the handler waits at the gate. Stop server A.
    bounded("a graceful stop", ha.stop(true)).await;
    bank.release.add_permits(1);
    let stopped = std::time::Instant::now();
    let mut statuses = Vec::new();
    let retry = loop {
        let r = bounded("a retry on B", send(&client, b, "stop", &[])).await;
        statuses.push(r.status().as_u16());
        if r.status() != reqwest::StatusCode::CONFLICT
            || stopped.elapsed() > Duration::from_secs(15)
        {
            break r;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "after A stopped mid-handler: retry on B -> {} (replayed: {:?}) after {:?}, {} 409s first; \
         handler runs started {}, finished {}",
        retry.status(),
        retry.headers().get("idempotent-replayed"),
        stopped.elapsed(),
        statuses.iter().filter(|s| **s == 409).count(),
        bank.runs(),
        bank.finished.load(Ordering::SeqCst),
    );
    // Whether the stopping worker still ran the handler to its end depends on when it
    // stopped: then the retry is a replay; otherwise the dropped handler never finished
    // and the retry, after the lease, ran it again. Never two finished runs.
    assert_eq!(retry.status(), reqwest::StatusCode::CREATED);
    if retry.headers().get("idempotent-replayed").is_some() {
        assert_eq!(bank.runs(), 1);
    } else {
        assert_eq!(bank.runs(), 2, "the retry ran the dropped handler again");
    }
    assert_eq!(bank.finished.load(Ordering::SeqCst), 1, "one run finished");
    hb.stop(false).await;
}

// ---------------------------------------------------------------------------------------
// The tower layer and the middleware on one engine
// ---------------------------------------------------------------------------------------

fn tower_router(idem: Idempotency, runs: Arc<AtomicU32>, with_query: bool) -> axum::Router {
    axum::Router::new()
        .fallback(move |body: axum::body::Bytes| {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let mut resp = axum::response::Response::new(axum::body::Body::from({
                    let mut out = vec![0xfe, n as u8];
                    out.extend_from_slice(&body);
                    out
                }));
                *resp.status_mut() = axum::http::StatusCode::CREATED;
                let h = resp.headers_mut();
                h.append("set-cookie", "t1=1".parse().unwrap());
                h.append("set-cookie", "t2=2".parse().unwrap());
                h.append(
                    "x-latin1",
                    axum::http::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
                );
                resp
            }
        })
        .layer(idempotent_runtime::http::IdempotencyLayer::new(idem).fingerprint_query(with_query))
}

async fn via_tower(
    router: &axum::Router,
    uri: &str,
    key: &str,
    ct: &[u8],
    body: &'static [u8],
) -> (u16, Vec<(String, Vec<u8>)>, Vec<u8>) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let req = axum::http::Request::post(uri)
        .header(
            "content-type",
            axum::http::HeaderValue::from_bytes(ct).unwrap(),
        )
        .header("idempotency-key", key)
        .body(axum::body::Body::from(body))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

fn actix_req(uri: &str, key: &str, ct: &[u8], body: &'static [u8]) -> test::TestRequest {
    test::TestRequest::post()
        .uri(uri)
        .insert_header((
            header::CONTENT_TYPE,
            header::HeaderValue::from_bytes(ct).unwrap(),
        ))
        .insert_header(("idempotency-key", key.to_owned()))
        .set_payload(body)
}

async fn via_actix<S, R>(svc: &S, req: R) -> (u16, Vec<(String, Vec<u8>)>, Vec<u8>)
where
    S: Service<R, Response = ServiceResponse, Error = actix_web::Error>,
{
    let resp = test::call_service(svc, req).await;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let body = test::read_body(resp).await.to_vec();
    (status, headers, body)
}

fn get<'a>(h: &'a [(String, Vec<u8>)], name: &str) -> Vec<&'a [u8]> {
    h.iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| &v[..])
        .collect()
}

/// Requests of every awkward shape, first through one and then through the other, on one
/// engine: the second is always a replay of the first, byte for byte.
#[actix_web::test]
async fn the_tower_layer_and_the_middleware_agree_on_awkward_requests() {
    for with_query in [true, false] {
        let idem = Idempotency::memory();
        let tower_runs = Arc::new(AtomicU32::new(0));
        let router = tower_router(idem.clone(), tower_runs.clone(), with_query);
        let bank = Bank::new();
        let svc = test::init_service(app(
            IdempotencyMiddleware::new(idem.clone()).fingerprint_query(with_query),
            bank.clone(),
        ))
        .await;
        let cases: &[(&str, &[u8], &[u8])] = &[
            ("/payments?", b"application/json", br#"{"a":1}"#),
            (
                "/pay%6Dents?x=%20&y",
                b"application/json",
                br#"{"b":[1,2.50]}"#,
            ),
            (
                "/p%C3%A9/%2F?q=%E9",
                b"application/json; charset=utf-8",
                b" { \"c\" : \"\\u00e9\" } ",
            ),
            ("/payments", b"text/plain", b"\xff\x00binary"),
            ("/payments", b"application/j\xe9son", br#"{"a":1}"#),
            (
                "/payments",
                b"APPLICATION/Problem+JSON ; x=1",
                br#"{"z":1,"a":2}"#,
            ),
            ("/payments", b"application/json", b""),
        ];
        for (i, (uri, ct, body)) in cases.iter().enumerate() {
            // Tower first, then actix.
            let key = format!("t{i}");
            let t = via_tower(&router, uri, &key, ct, body).await;
            let a = via_actix(&svc, actix_req(uri, &key, ct, body).to_request()).await;
            assert_eq!(t.0, 201, "tower {uri}");
            assert_eq!(
                a.0,
                201,
                "actix after tower {uri} (query {with_query}): {:?}",
                String::from_utf8_lossy(&a.2)
            );
            assert_eq!(
                get(&a.1, "idempotent-replayed"),
                [b"true"],
                "actix replays tower's {uri}"
            );
            assert_eq!(a.2, t.2, "body of {uri}");
            assert_eq!(get(&a.1, "set-cookie"), get(&t.1, "set-cookie"));
            assert_eq!(get(&a.1, "x-latin1"), [b"caf\xe9"]);
            // Actix first, then tower.
            let key = format!("a{i}");
            let a = via_actix(&svc, actix_req(uri, &key, ct, body).to_request()).await;
            let t = via_tower(&router, uri, &key, ct, body).await;
            assert_eq!(a.0, 201, "actix {uri}");
            assert_eq!(t.0, 201, "tower after actix {uri}");
            assert_eq!(
                get(&t.1, "idempotent-replayed"),
                [b"true"],
                "tower replays actix's {uri}"
            );
            assert_eq!(t.2, a.2);
            assert_eq!(get(&t.1, "set-cookie"), [&b"a=1"[..], b"b=2", b"c=3"]);
            assert_eq!(get(&t.1, "x-latin1"), [b"caf\xe9"]);
        }
        assert_eq!(
            (tower_runs.load(Ordering::SeqCst), bank.runs()),
            (cases.len() as u32, cases.len() as u32)
        );
    }
}

/// The same key with another request across the two: 422 both ways, with the query off
/// and on; tenants through `scope_with` on both never share a key.
#[actix_web::test]
async fn the_tower_layer_and_the_middleware_agree_on_mismatches_and_tenants() {
    let idem = Idempotency::memory();
    let tower_runs = Arc::new(AtomicU32::new(0));
    let router = tower_router(idem.clone(), tower_runs.clone(), true);
    let bank = Bank::new();
    let svc = test::init_service(app(IdempotencyMiddleware::new(idem.clone()), bank.clone())).await;
    let t = via_tower(&router, "/payments?x=1", "m", b"application/json", b"{}").await;
    assert_eq!(t.0, 201);
    for uri in ["/payments?x=2", "/payments", "/payments?", "/other?x=1"] {
        let a = via_actix(
            &svc,
            actix_req(uri, "m", b"application/json", b"{}").to_request(),
        )
        .await;
        assert_eq!(a.0, 422, "{uri}");
    }
    // Tenants: tower reads `x-tenant`, actix reads it too.
    let tenant_router = axum::Router::new()
        .fallback(|| async { (axum::http::StatusCode::CREATED, "tower") })
        .layer(
            idempotent_runtime::http::IdempotencyLayer::new(idem.clone()).scope_with(|p| {
                p.headers
                    .get("x-tenant")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            }),
        );
    let tenant_svc = test::init_service(app(
        IdempotencyMiddleware::new(idem.clone()).scope_with(|r| {
            r.headers()
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        }),
        bank.clone(),
    ))
    .await;
    {
        use tower::ServiceExt;
        let req = axum::http::Request::post("/payments")
            .header("idempotency-key", "tk")
            .header("x-tenant", "acme")
            .body(axum::body::Body::from("{}"))
            .unwrap();
        assert_eq!(
            tenant_router.clone().oneshot(req).await.unwrap().status(),
            201
        );
    }
    let runs = bank.runs();
    let same_tenant = test::call_service(
        &tenant_svc,
        post("tk", "{}")
            .insert_header(("x-tenant", "acme"))
            .insert_header((header::CONTENT_TYPE, "text/plain"))
            .to_request(),
    )
    .await;
    // The tower request had no content type: compared by bytes; the same here.
    assert!(replayed(same_tenant.headers()), "{}", same_tenant.status());
    let other_tenant = test::call_service(
        &tenant_svc,
        post("tk", "{}")
            .insert_header(("x-tenant", "globex"))
            .insert_header((header::CONTENT_TYPE, "text/plain"))
            .to_request(),
    )
    .await;
    assert!(!replayed(other_tenant.headers()));
    assert_eq!(other_tenant.status(), StatusCode::CREATED);
    assert_eq!(bank.runs(), runs + 1);
}

// ---------------------------------------------------------------------------------------
// A response body that breaks half-way
// ---------------------------------------------------------------------------------------

/// The handler made its side effect, then its response body (of announced length) fails
/// half-way: the client gets 502, and that 502 is what the key keeps, so a retry gets it
/// again rather than running the handler a second time (the first version released the
/// key).
#[actix_web::test]
async fn a_response_that_breaks_half_way_is_not_run_again() {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let svc = test::init_service(App::new().wrap(mw()).default_service(web::to(move || {
        r.fetch_add(1, Ordering::SeqCst);
        async {
            let chunks = futures_util::stream::iter([
                Ok::<_, actix_web::Error>(web::Bytes::from_static(b"12345")),
                Err(actix_web::error::ErrorInternalServerError("disk gone")),
            ]);
            HttpResponse::Created().body(actix_web::body::SizedStream::new(10, chunks))
        }
    })))
    .await;
    let first = bounded("a broken body", svc.call(post("k", "{}").to_request())).await;
    let retry = bounded("its retry", svc.call(post("k", "{}").to_request())).await;
    eprintln!(
        "broken body: first {}, retry {}, runs {}",
        status_of(&first),
        status_of(&retry),
        runs.load(Ordering::SeqCst)
    );
    assert_eq!(status_of(&first), StatusCode::BAD_GATEWAY);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the retry ran the handler again"
    );
}
