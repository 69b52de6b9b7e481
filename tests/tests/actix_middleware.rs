//! The actix-web middleware, one rule of the HTTP layer's table per test (through
//! `actix_web::test`), then a real server and client: concurrent duplicates and a client
//! that gives up. Last, the tower layer and the middleware on one store.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::{test, web, App, HttpRequest, HttpResponse, HttpServer};
use futures_util::future::{join, join_all};
use idempotent_runtime::actix::IdempotencyMiddleware;
use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::Idempotency;
use idempotent_tests::FaultyStore;
use tokio::sync::{Notify, Semaphore};

/// A slow request: the handler says it has started, then waits until the test lets it go.
struct Gate {
    started: Notify,
    release: Semaphore,
}

/// What the handler counts and waits on.
struct Bank {
    runs: AtomicU32,
    gate: Gate,
}

impl Bank {
    fn new() -> web::Data<Bank> {
        web::Data::new(Bank {
            runs: AtomicU32::new(0),
            gate: Gate {
                started: Notify::new(),
                release: Semaphore::new(0),
            },
        })
    }

    fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }
}

/// Answers 201 (or `x-status`) with two cookies, a Location, a per-connection header and
/// a body naming the run; `x-gate` waits at the gate, `x-big: N` answers N bytes,
/// `x-stream` answers a stream of server-sent events.
async fn pay(bank: web::Data<Bank>, req: HttpRequest, _body: web::Bytes) -> HttpResponse {
    let n = bank.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let has = |name: &str| req.headers().contains_key(name);
    if has("x-gate") {
        bank.gate.started.notify_one();
        let _permit = bank.gate.release.acquire().await;
    }
    let status = req
        .headers()
        .get("x-status")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::CREATED);
    let mut resp = HttpResponse::build(status);
    if has("x-stream") {
        let events = futures_util::stream::iter(
            ["data: 1\n\n", "data: 2\n\n"].map(|e| Ok::<_, actix_web::Error>(web::Bytes::from(e))),
        );
        return resp.content_type("text/event-stream").streaming(events);
    }
    let big: usize = req
        .headers()
        .get("x-big")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    resp.append_header(("set-cookie", "a=1"))
        .append_header(("location", format!("/payments/{n}")))
        .append_header(("set-cookie", "b=2"))
        .append_header(("keep-alive", "timeout=5"))
        .content_type("application/json");
    if has("x-conn") {
        resp.append_header(("connection", "x-conn-only"))
            .append_header(("x-conn-only", "1"));
    }
    if big > 0 {
        resp.body(format!("{{\"id\":{n},\"pad\":\"{}\"}}", "x".repeat(big)))
    } else {
        resp.body(format!("{{\"id\":{n}}}"))
    }
}

fn payments_app(
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
        .route("/payments", web::post().to(pay))
        .route("/payments", web::put().to(pay))
        .route("/payments", web::get().to(pay))
}

fn post(key: Option<&str>, body: &str) -> test::TestRequest {
    let mut r = test::TestRequest::post()
        .uri("/payments")
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .set_payload(body.to_owned());
    if let Some(k) = key {
        r = r.insert_header(("idempotency-key", k));
    }
    r
}

fn mw() -> IdempotencyMiddleware {
    IdempotencyMiddleware::new(Idempotency::memory())
}

/// Status, headers and JSON body of a response.
async fn read(resp: ServiceResponse) -> (StatusCode, header::HeaderMap, serde_json::Value) {
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = test::read_body(resp).await;
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, headers, json)
}

fn assert_problem(status: StatusCode, h: &header::HeaderMap, p: &serde_json::Value, want: u16) {
    assert_eq!(status.as_u16(), want, "{p}");
    assert_eq!(
        h.get(header::CONTENT_TYPE).unwrap(),
        "application/problem+json"
    );
    for field in ["type", "title", "detail"] {
        assert!(
            p[field].as_str().is_some_and(|s| !s.is_empty()),
            "no {field} in {p}"
        );
    }
    assert_eq!(p["status"], want);
}

fn replayed(h: &header::HeaderMap) -> bool {
    h.get("idempotent-replayed").is_some_and(|v| v == "true")
}

#[actix_web::test]
async fn a_retry_replays_status_headers_and_body() {
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw(), bank.clone())).await;
    let (s1, h1, b1) =
        read(test::call_service(&app, post(Some("k"), "{}").to_request()).await).await;
    let (s2, h2, b2) =
        read(test::call_service(&app, post(Some("k"), "{}").to_request()).await).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(b1, b2);
    assert_eq!(b2["id"], 1);
    assert!(!replayed(&h1) && replayed(&h2));
    let cookies = |h: &header::HeaderMap| h.get_all("set-cookie").cloned().collect::<Vec<_>>();
    assert_eq!(cookies(&h2), ["a=1", "b=2"], "repeats kept, in order");
    assert_eq!(h2.get("location"), h1.get("location"));
    assert!(
        h2.get("keep-alive").is_none(),
        "hop-by-hop headers are not replayed"
    );
    assert_eq!(bank.runs(), 1);
}

#[actix_web::test]
async fn a_bare_token_and_a_quoted_string_are_the_same_key() {
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw(), bank.clone())).await;
    test::call_service(&app, post(Some("\"k-1\""), "{}").to_request()).await;
    let (_, h, _) =
        read(test::call_service(&app, post(Some("k-1;v=2"), "{}").to_request()).await).await;
    assert!(replayed(&h));
    assert_eq!(bank.runs(), 1);
}

#[actix_web::test]
async fn json_field_order_is_the_same_request_and_another_body_is_422() {
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw(), bank.clone())).await;
    let first = r#"{"amount":5,"currency":"EUR"}"#;
    let same = r#"{ "currency": "EUR", "amount": 5 }"#;
    test::call_service(&app, post(Some("k"), first).to_request()).await;
    let (s, h, _) = read(test::call_service(&app, post(Some("k"), same).to_request()).await).await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(replayed(&h));
    let other = r#"{"amount":6,"currency":"EUR"}"#;
    let (s, h, p) = read(test::call_service(&app, post(Some("k"), other).to_request()).await).await;
    assert_problem(s, &h, &p, 422);
    // Another path or query is another request too.
    let query = post(Some("k"), first).uri("/payments?x=1").to_request();
    let (s, h, p) = read(test::call_service(&app, query).await).await;
    assert_problem(s, &h, &p, 422);
    assert_eq!(bank.runs(), 1);
}

#[actix_web::test]
async fn bad_keys_get_400_and_a_missing_one_400_only_when_required() {
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw(), bank.clone())).await;
    let long = "k".repeat(256);
    for bad in ["a b", "", "\"open", long.as_str()] {
        let (s, h, p) =
            read(test::call_service(&app, post(Some(bad), "{}").to_request()).await).await;
        assert_problem(s, &h, &p, 400);
    }
    let twice = post(Some("a"), "{}")
        .append_header(("idempotency-key", "b"))
        .to_request();
    let (s, h, p) = read(test::call_service(&app, twice).await).await;
    assert_problem(s, &h, &p, 400);
    assert_eq!(bank.runs(), 0);
    // No key: run as usual, each time.
    for _ in 0..2 {
        let (s, _, _) = read(test::call_service(&app, post(None, "{}").to_request()).await).await;
        assert_eq!(s, StatusCode::CREATED);
    }
    assert_eq!(bank.runs(), 2);

    let required = Bank::new();
    let app = test::init_service(payments_app(mw().require_key(true), required.clone())).await;
    let (s, h, p) = read(test::call_service(&app, post(None, "{}").to_request()).await).await;
    assert_problem(s, &h, &p, 400);
    assert_eq!(required.runs(), 0);
}

#[actix_web::test]
async fn other_methods_pass_through() {
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw(), bank.clone())).await;
    for method in [Method::GET, Method::PUT, Method::GET] {
        let req = post(Some("k"), "{}").method(method).to_request();
        let (_, h, _) = read(test::call_service(&app, req).await).await;
        assert!(!replayed(&h));
    }
    assert_eq!(bank.runs(), 3);
    // Configurable: PUT made idempotent.
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw().methods([Method::PUT]), bank.clone())).await;
    for _ in 0..2 {
        let req = post(Some("k"), "{}").method(Method::PUT).to_request();
        test::call_service(&app, req).await;
    }
    assert_eq!(bank.runs(), 1);
}

#[actix_web::test]
async fn a_duplicate_in_flight_gets_409_with_retry_after() {
    let bank = Bank::new();
    let app = test::init_service(payments_app(
        mw().retry_after(Duration::from_secs(3)),
        bank.clone(),
    ))
    .await;
    let slow = || {
        post(Some("k"), "{}")
            .insert_header(("x-gate", "1"))
            .to_request()
    };
    let (first, second) = join(test::call_service(&app, slow()), async {
        bank.gate.started.notified().await;
        let second = read(test::call_service(&app, slow()).await).await;
        bank.gate.release.add_permits(1);
        second
    })
    .await;
    let (s, h, p) = second;
    assert_problem(s, &h, &p, 409);
    assert_eq!(h.get(header::RETRY_AFTER).unwrap(), "3");
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(bank.runs(), 1);
}

#[actix_web::test]
async fn a_duplicate_in_flight_on_another_replica_waits_when_configured() {
    // Two replicas, each with its own engine, on one store.
    let store = FaultyStore::new(MemoryStore::new());
    let bank = Bank::new();
    let replica = || mw_on(Idempotency::new(store.clone())).wait_for_in_flight();
    let a = test::init_service(payments_app(replica(), bank.clone())).await;
    let b = test::init_service(payments_app(replica(), bank.clone())).await;
    let slow = || {
        post(Some("k"), "{}")
            .insert_header(("x-gate", "1"))
            .to_request()
    };
    let ((first, second), ()) = join(
        join(test::call_service(&a, slow()), async {
            bank.gate.started.notified().await;
            test::call_service(&b, slow()).await
        }),
        async {
            // The second replica has asked the store for the key, which the first holds.
            while store.claims() < 2 {
                actix_web::rt::time::sleep(Duration::from_millis(1)).await;
            }
            bank.gate.release.add_permits(1);
        },
    )
    .await;
    let (s1, _, b1) = read(first).await;
    let (s2, h2, b2) = read(second).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(b1, b2);
    assert!(replayed(&h2));
    assert_eq!(bank.runs(), 1);
}

fn mw_on(idem: Idempotency) -> IdempotencyMiddleware {
    IdempotencyMiddleware::new(idem)
}

#[actix_web::test]
async fn a_store_outage_is_503_and_the_handler_does_not_run() {
    let store = FaultyStore::new(MemoryStore::new());
    store.set_down(true);
    let bank = Bank::new();
    let app = test::init_service(payments_app(
        mw_on(Idempotency::new(store.clone())),
        bank.clone(),
    ))
    .await;
    let (s, h, p) = read(test::call_service(&app, post(Some("k"), "{}").to_request()).await).await;
    assert_problem(s, &h, &p, 503);
    assert!(h.get(header::RETRY_AFTER).is_some());
    assert_eq!(bank.runs(), 0);
    store.set_down(false);
    let (s, _, _) = read(test::call_service(&app, post(Some("k"), "{}").to_request()).await).await;
    assert_eq!(s, StatusCode::CREATED);
}

#[actix_web::test]
async fn server_errors_and_429_are_not_stored_unless_configured() {
    for status in ["500", "503", "429"] {
        let bank = Bank::new();
        let app = test::init_service(payments_app(mw(), bank.clone())).await;
        for _ in 0..2 {
            let req = post(Some("k"), "{}")
                .insert_header(("x-status", status))
                .to_request();
            let (s, h, _) = read(test::call_service(&app, req).await).await;
            assert_eq!(s.as_str(), status);
            assert!(!replayed(&h));
        }
        assert_eq!(bank.runs(), 2, "{status} was stored");
    }
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw().store_status(|_| true), bank.clone())).await;
    for _ in 0..2 {
        let req = post(Some("k"), "{}")
            .insert_header(("x-status", "503"))
            .to_request();
        test::call_service(&app, req).await;
    }
    assert_eq!(bank.runs(), 1);
    // A 4xx is the request's answer: stored.
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw(), bank.clone())).await;
    for _ in 0..2 {
        let req = post(Some("k"), "{}")
            .insert_header(("x-status", "404"))
            .to_request();
        test::call_service(&app, req).await;
    }
    assert_eq!(bank.runs(), 1);
}

#[actix_web::test]
async fn a_request_body_over_the_limit_is_413_and_the_handler_does_not_run() {
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw().max_request_body(16), bank.clone())).await;
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(32));
    let (s, h, p) = read(test::call_service(&app, post(Some("k"), &body).to_request()).await).await;
    assert_problem(s, &h, &p, 413);
    assert_eq!(bank.runs(), 0);
}

/// What a retry of a request whose response could not be stored gets: a 500 problem
/// saying so, marked as a replay.
fn assert_unreplayable(s: StatusCode, h: &header::HeaderMap, p: &serde_json::Value) {
    assert_problem(s, h, p, 500);
    assert_eq!(p["type"], "urn:idempotent:problem:unreplayable-response");
    assert!(replayed(h), "{p}");
}

#[actix_web::test]
async fn a_response_too_large_to_store_reaches_its_client_and_is_never_run_again() {
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw().max_response_body(64), bank.clone())).await;
    let big = || {
        post(Some("k"), "{}")
            .insert_header(("x-big", "100"))
            .to_request()
    };
    let (s, h, b) = read(test::call_service(&app, big()).await).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(b["id"], 1);
    assert_eq!(b["pad"].as_str().map(str::len), Some(100), "the whole body");
    assert_eq!(h.get_all("set-cookie").count(), 2);
    assert!(!replayed(&h));
    let (s, h, p) = read(test::call_service(&app, big()).await).await;
    assert_unreplayable(s, &h, &p);
    assert!(p["detail"]
        .as_str()
        .is_some_and(|d| d.contains("answered 201")));
    assert_eq!(bank.runs(), 1);

    // A status that is not stored comes first: a large 503 frees the key, as a small one.
    let unstored = || {
        post(Some("k2"), "{}")
            .insert_header(("x-big", "100"))
            .insert_header(("x-status", "503"))
            .to_request()
    };
    for _ in 0..2 {
        let (s, h, _) = read(test::call_service(&app, unstored()).await).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!replayed(&h));
    }
    assert_eq!(bank.runs(), 3);
}

#[actix_web::test]
async fn a_streaming_response_reaches_its_client_and_is_never_run_again() {
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw(), bank.clone())).await;
    let stream = || {
        post(Some("k"), "{}")
            .insert_header(("x-stream", "1"))
            .to_request()
    };
    let resp = test::call_service(&app, stream()).await;
    assert_eq!(
        resp.headers().get(header::CONTENT_TYPE).unwrap(),
        "text/event-stream"
    );
    assert_eq!(test::read_body(resp).await, "data: 1\n\ndata: 2\n\n");
    let (s, h, p) = read(test::call_service(&app, stream()).await).await;
    assert_unreplayable(s, &h, &p);
    assert_eq!(bank.runs(), 1);
}

#[actix_web::test]
async fn tenants_never_share_a_key() {
    let bank = Bank::new();
    let tenant = |r: &HttpRequest| {
        r.headers()
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let app = test::init_service(payments_app(mw().scope_with(tenant), bank.clone())).await;
    let as_tenant = |t: &str| {
        post(Some("k"), "{}")
            .insert_header(("x-tenant", t.to_owned()))
            .to_request()
    };
    let (_, _, a) = read(test::call_service(&app, as_tenant("acme")).await).await;
    let (_, _, b) = read(test::call_service(&app, as_tenant("globex")).await).await;
    let (_, h, a2) = read(test::call_service(&app, as_tenant("acme")).await).await;
    assert_ne!(a, b);
    assert_eq!(a, a2);
    assert!(replayed(&h));
    assert_eq!(bank.runs(), 2);
}

#[actix_web::test]
async fn the_tower_layer_and_the_middleware_share_one_store() {
    use tower::ServiceExt;
    let idem = Idempotency::memory();
    let axum_runs = Arc::new(AtomicU32::new(0));
    let runs = axum_runs.clone();
    let router = axum::Router::new()
        .route(
            "/payments",
            axum::routing::post(move || {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                async move { (axum::http::StatusCode::CREATED, format!("{{\"id\":{n}}}")) }
            }),
        )
        .layer(idempotent_runtime::http::IdempotencyLayer::new(
            idem.clone(),
        ));
    let req = axum::http::Request::post("/payments")
        .header("content-type", "application/json")
        .header("idempotency-key", "shared")
        .body(axum::body::Body::from(r#"{"a":1,"b":2}"#))
        .unwrap();
    let resp = router.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), axum::http::StatusCode::CREATED);

    let bank = Bank::new();
    let app = test::init_service(payments_app(mw_on(idem), bank.clone())).await;
    // The same request (its JSON in another order) through actix: a replay.
    let (s, h, b) =
        read(test::call_service(&app, post(Some("shared"), r#"{"b":2,"a":1}"#).to_request()).await)
            .await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(replayed(&h));
    assert_eq!(b["id"], 1);
    let (s, h, p) =
        read(test::call_service(&app, post(Some("shared"), r#"{"a":1}"#).to_request()).await).await;
    assert_problem(s, &h, &p, 422);
    assert_eq!((axum_runs.load(Ordering::SeqCst), bank.runs()), (1, 0));
}

/// Serves the app on a loopback port with two workers; its base URL.
fn serve(mw: IdempotencyMiddleware, bank: web::Data<Bank>) -> String {
    let server = HttpServer::new(move || payments_app(mw.clone(), bank.clone()))
        .workers(2)
        .bind(("127.0.0.1", 0))
        .expect("bind");
    let addr = server.addrs()[0];
    actix_web::rt::spawn(server.run());
    format!("http://{addr}")
}

async fn pay_over_http(client: &reqwest::Client, base: &str, gate: bool) -> reqwest::StatusCode {
    let mut req = client
        .post(format!("{base}/payments"))
        .header("idempotency-key", "dup-16")
        .header("content-type", "application/json")
        .body("{\"amount\":1250}");
    if gate {
        req = req.header("x-gate", "1");
    }
    req.send().await.expect("request").status()
}

#[actix_web::test]
async fn sixteen_concurrent_duplicates_on_a_real_server_make_one_payment() {
    let bank = Bank::new();
    let base = serve(mw(), bank.clone());
    let client = reqwest::Client::new();
    let answered = AtomicU32::new(0);
    let calls = (0..16).map(|_| async {
        let status = pay_over_http(&client, &base, true).await;
        answered.fetch_add(1, Ordering::SeqCst);
        status
    });
    let (statuses, ()) = join(join_all(calls), async {
        // One holds the key at the gate; the fifteen others are refused meanwhile.
        bank.gate.started.notified().await;
        while answered.load(Ordering::SeqCst) < 15 {
            actix_web::rt::time::sleep(Duration::from_millis(1)).await;
        }
        bank.gate.release.add_permits(1);
    })
    .await;
    let created = statuses
        .iter()
        .filter(|s| **s == reqwest::StatusCode::CREATED)
        .count();
    let conflict = statuses
        .iter()
        .filter(|s| **s == reqwest::StatusCode::CONFLICT)
        .count();
    assert_eq!((created, conflict), (1, 15), "{statuses:?}");
    assert_eq!(bank.runs(), 1);
    // Afterwards every retry is a replay.
    assert_eq!(
        pay_over_http(&client, &base, false).await,
        reqwest::StatusCode::CREATED
    );
    assert_eq!(bank.runs(), 1);
}

#[actix_web::test]
async fn a_client_that_gives_up_neither_stops_the_handler_nor_frees_its_key() {
    let bank = Bank::new();
    let base = serve(mw().wait_for_in_flight(), bank.clone());
    let client = reqwest::Client::new();
    {
        let abandoned = pay_over_http(&client, &base, true);
        let started = bank.gate.started.notified();
        // The client gives up once the handler has started: its request is dropped.
        tokio::select! {
            _ = abandoned => panic!("the gate is closed"),
            () = started => {}
        }
    }
    bank.gate.release.add_permits(1);
    let retry = client
        .post(format!("{base}/payments"))
        .header("idempotency-key", "dup-16")
        .header("content-type", "application/json")
        .body("{\"amount\":1250}")
        .send()
        .await
        .expect("retry");
    assert_eq!(retry.status(), reqwest::StatusCode::CREATED);
    assert_eq!(retry.headers().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(bank.runs(), 1);
}

#[actix_web::test]
async fn headers_that_connection_names_are_not_replayed() {
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw(), bank.clone())).await;
    let req = || {
        post(Some("k"), "{}")
            .insert_header(("x-conn", "1"))
            .to_request()
    };
    test::call_service(&app, req()).await;
    let (_, h, _) = read(test::call_service(&app, req()).await).await;
    assert!(replayed(&h));
    assert!(h.get("location").is_some());
    for gone in ["connection", "x-conn-only", "keep-alive"] {
        assert!(h.get(gone).is_none(), "{gone} replayed");
    }
}

#[actix_web::test]
async fn the_middleware_works_on_a_postcard_engine() {
    let idem = Idempotency::builder()
        .codec(idempotent_runtime::Codec::Postcard)
        .build()
        .expect("engine");
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw_on(idem), bank.clone())).await;
    let (s1, _, b1) =
        read(test::call_service(&app, post(Some("k"), "{}").to_request()).await).await;
    let (s2, h2, b2) =
        read(test::call_service(&app, post(Some("k"), "{}").to_request()).await).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(b1, b2);
    assert!(replayed(&h2));
    assert_eq!(bank.runs(), 1);
}

/// The service answers through `Service::call` too, not only `test::call_service`.
#[actix_web::test]
async fn the_middleware_is_an_ordinary_actix_service() {
    let bank = Bank::new();
    let app = test::init_service(payments_app(mw(), bank.clone())).await;
    let resp = app.call(post(Some("k"), "{}").to_request()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}
