//! The `Idempotency-Key` layer, one rule per test, through `tower::ServiceExt::oneshot`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use idempotent_runtime::http::{IdempotencyLayer, ResponseBody};
use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::Idempotency;
use idempotent_tests::FaultyStore;
use tower::{Layer, Service, ServiceExt};

type Handler =
    tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<ResponseBody>, Infallible>;

/// A handler that counts its runs and answers 201 with two cookies, a Location and a body
/// naming the run; `status` and `body_len` vary the answer per test.
fn payments(layer: IdempotencyLayer, runs: Arc<AtomicU32>, status: StatusCode) -> Handler {
    let handler = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let runs = runs.clone();
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let delay = req
                .headers()
                .get("x-delay-ms")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let resp = Response::builder()
                .status(status)
                .header("set-cookie", "a=1")
                .header("location", format!("/payments/{n}"))
                .header("set-cookie", "b=2")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(format!("{{\"id\":{n}}}"))))
                .unwrap();
            Ok::<_, Infallible>(resp)
        }
    });
    tower::util::BoxCloneSyncService::new(layer.layer(handler))
}

fn post(key: Option<&str>, body: &str) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri("/payments")
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

async fn send(svc: &Handler, req: Request<Full<Bytes>>) -> (StatusCode, http::HeaderMap, Bytes) {
    let resp = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::new(Idempotency::memory())
}

fn json(b: &Bytes) -> serde_json::Value {
    serde_json::from_slice(b).unwrap()
}

fn assert_problem(
    status: StatusCode,
    headers: &http::HeaderMap,
    body: &Bytes,
    expected: StatusCode,
) {
    assert_eq!(status, expected, "{}", String::from_utf8_lossy(body));
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    let p = json(body);
    for field in ["type", "title", "detail"] {
        assert!(
            p[field].as_str().is_some_and(|s| !s.is_empty()),
            "no {field} in {p}"
        );
    }
    assert_eq!(p["status"], expected.as_u16());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_replays_status_every_header_in_order_and_the_body() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(layer(), runs.clone(), StatusCode::CREATED);
    let (s1, h1, b1) = send(&svc, post(Some("\"k1\""), r#"{"amount":5}"#)).await;
    let (s2, h2, b2) = send(&svc, post(Some("\"k1\""), r#"{"amount":5}"#)).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(b1, b2);
    assert_eq!(h2["location"], "/payments/1");
    let cookies: Vec<_> = h2.get_all("set-cookie").iter().collect();
    assert_eq!(
        cookies,
        ["a=1", "b=2"],
        "repeated headers stay repeated, in order"
    );
    assert!(h1.get("idempotent-replayed").is_none());
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_token_and_a_quoted_string_are_the_same_key() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(layer(), runs.clone(), StatusCode::CREATED);
    send(&svc, post(Some("abc-123"), "{}")).await;
    let (_, h, _) = send(&svc, post(Some("\"abc-123\""), "{}")).await;
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_field_order_is_the_same_request_and_another_body_is_422() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(layer(), runs.clone(), StatusCode::CREATED);
    send(&svc, post(Some("k"), r#"{"amount":5,"currency":"EUR"}"#)).await;
    let (s, h, _) = send(
        &svc,
        post(Some("k"), r#"{ "currency": "EUR", "amount": 5 }"#),
    )
    .await;
    assert_eq!(
        (s, &h["idempotent-replayed"]),
        (
            StatusCode::CREATED,
            &"true".parse::<http::HeaderValue>().unwrap()
        )
    );
    let (s, h, b) = send(&svc, post(Some("k"), r#"{"amount":6,"currency":"EUR"}"#)).await;
    assert_problem(s, &h, &b, StatusCode::UNPROCESSABLE_ENTITY);
    let mut other_path = post(Some("k"), r#"{"amount":5,"currency":"EUR"}"#);
    *other_path.uri_mut() = "/refunds".parse().unwrap();
    let (s, h, b) = send(&svc, other_path).await;
    assert_problem(s, &h, &b, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_get_400_and_a_missing_one_400_only_when_required() {
    let runs = Arc::new(AtomicU32::new(0));
    let optional = payments(layer(), runs.clone(), StatusCode::CREATED);
    let (s, _, _) = send(&optional, post(None, "{}")).await;
    assert_eq!(s, StatusCode::CREATED, "no key: passed through");
    send(&optional, post(None, "{}")).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "without a key nothing is deduplicated"
    );

    let required = payments(layer().require_key(true), runs.clone(), StatusCode::CREATED);
    let (s, h, b) = send(&required, post(None, "{}")).await;
    assert_problem(s, &h, &b, StatusCode::BAD_REQUEST);
    let long = "k".repeat(256);
    for bad in ["\"\"", "", "\"unterminated", long.as_str()] {
        let (s, h, b) = send(&required, post(Some(bad), "{}")).await;
        assert_problem(s, &h, &b, StatusCode::BAD_REQUEST);
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the handler never ran for a bad key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_pass_through() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(layer(), runs.clone(), StatusCode::OK);
    for _ in 0..2 {
        let mut req = post(Some("k"), "");
        *req.method_mut() = Method::GET;
        let (_, h, _) = send(&svc, req).await;
        assert!(h.get("idempotent-replayed").is_none());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let put_too = payments(layer().methods([Method::PUT]), runs.clone(), StatusCode::OK);
    for _ in 0..2 {
        let mut req = post(Some("k"), "");
        *req.method_mut() = Method::PUT;
        send(&put_too, req).await;
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "PUT covered when configured"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_in_flight_gets_409_with_retry_after_or_waits_when_configured() {
    for wait in [false, true] {
        let runs = Arc::new(AtomicU32::new(0));
        let l = if wait {
            layer().wait_for_in_flight()
        } else {
            layer()
        };
        let svc = payments(l, runs.clone(), StatusCode::CREATED);
        let slow = || {
            let mut r = post(Some("k"), "{}");
            r.headers_mut().insert("x-delay-ms", "300".parse().unwrap());
            r
        };
        let first = {
            let svc = svc.clone();
            let req = slow();
            tokio::spawn(async move { send(&svc, req).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (s, h, b) = send(&svc, slow()).await;
        if wait {
            assert_eq!(s, StatusCode::CREATED);
            assert_eq!(h["idempotent-replayed"], "true");
            assert_eq!(json(&b)["id"], 1);
        } else {
            assert_problem(s, &h, &b, StatusCode::CONFLICT);
            assert_eq!(h[header::RETRY_AFTER], "1");
        }
        assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_503_and_the_handler_does_not_run() {
    let store = FaultyStore::new(MemoryStore::new());
    store.set_down(true);
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(
        IdempotencyLayer::new(Idempotency::new(store.clone())),
        runs.clone(),
        StatusCode::CREATED,
    );
    let (s, h, b) = send(&svc, post(Some("k"), "{}")).await;
    assert_problem(s, &h, &b, StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.get(header::RETRY_AFTER).is_some());
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    store.set_down(false);
    assert_eq!(
        send(&svc, post(Some("k"), "{}")).await.0,
        StatusCode::CREATED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_429_are_not_stored_unless_configured() {
    for status in [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let runs = Arc::new(AtomicU32::new(0));
        let svc = payments(layer(), runs.clone(), status);
        for _ in 0..2 {
            let (s, h, _) = send(&svc, post(Some("k"), "{}")).await;
            assert_eq!(s, status);
            assert!(h.get("idempotent-replayed").is_none());
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "{status}: a retry runs again"
        );
    }
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(
        layer().store_status(|_| true),
        runs.clone(),
        StatusCode::INTERNAL_SERVER_ERROR,
    );
    send(&svc, post(Some("k"), "{}")).await;
    let (_, h, _) = send(&svc, post(Some("k"), "{}")).await;
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_over_the_limit_is_413_and_the_handler_does_not_run() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(
        layer().max_request_body(64),
        runs.clone(),
        StatusCode::CREATED,
    );
    let (s, h, b) = send(
        &svc,
        post(Some("k"), &format!("{{\"pad\":\"{}\"}}", "x".repeat(100))),
    )
    .await;
    assert_problem(s, &h, &b, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// What a retry of a request whose response could not be stored gets: a 500 problem
/// saying so, marked as a replay.
fn assert_unreplayable(status: StatusCode, headers: &http::HeaderMap, body: &Bytes) {
    assert_problem(status, headers, body, StatusCode::INTERNAL_SERVER_ERROR);
    let p = json(body);
    assert_eq!(p["type"], "urn:idempotent:problem:unreplayable-response");
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("answered 201")),
        "{p}"
    );
    assert_eq!(headers["idempotent-replayed"], "true");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_too_large_to_store_reaches_its_client_and_is_never_run_again() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(
        layer().max_response_body(4),
        runs.clone(),
        StatusCode::CREATED,
    );
    let (s, h, b) = send(&svc, post(Some("k"), "{}")).await;
    assert_eq!(
        (s, json(&b)["id"].as_u64()),
        (StatusCode::CREATED, Some(1)),
        "passed unchanged"
    );
    assert_eq!(h.get_all("set-cookie").iter().count(), 2);
    assert!(h.get("idempotent-replayed").is_none());
    let (s, h, b) = send(&svc, post(Some("k"), "{}")).await;
    assert_unreplayable(s, &h, &b);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the retry ran again");

    // A status that is not stored comes first: a large 503 frees the key, as a small one.
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(
        layer().max_response_body(4),
        runs.clone(),
        StatusCode::SERVICE_UNAVAILABLE,
    );
    for n in 1..=2 {
        let (s, _, b) = send(&svc, post(Some("k"), "{}")).await;
        assert_eq!(
            (s, json(&b)["id"].as_u64()),
            (StatusCode::SERVICE_UNAVAILABLE, Some(n))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_responses_reach_their_client_and_are_never_run_again() {
    let runs = Arc::new(AtomicU32::new(0));
    let counter = runs.clone();
    let handler = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let chunks = futures_util::stream::iter([Ok::<_, Infallible>(http_body::Frame::data(
                Bytes::from(format!("chunk-{n}")),
            ))]);
            let resp = Response::builder()
                .status(StatusCode::CREATED)
                .body(StreamBody::new(chunks))
                .unwrap();
            Ok::<_, Infallible>(resp)
        }
    });
    let svc = tower::util::BoxCloneSyncService::new(layer().layer(handler));
    let (s, h, b) = send(&svc, post(Some("k"), "{}")).await;
    assert_eq!((s, b.as_ref()), (StatusCode::CREATED, &b"chunk-0"[..]));
    assert!(h.get("idempotent-replayed").is_none());
    let (s, h, b) = send(&svc, post(Some("k"), "{}")).await;
    assert_unreplayable(s, &h, &b);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the retry ran again");

    // A known length, but a streaming content type: not stored either.
    let runs = Arc::new(AtomicU32::new(0));
    let counter = runs.clone();
    let sse = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let resp = Response::builder()
                .status(StatusCode::CREATED)
                .header("content-type", "text/event-stream; charset=utf-8")
                .body(Full::new(Bytes::from(format!("data: {n}\n\n"))))
                .unwrap();
            Ok::<_, Infallible>(resp)
        }
    });
    let svc = tower::util::BoxCloneSyncService::new(layer().layer(sse));
    let (s, h, b) = send(&svc, post(Some("k"), "{}")).await;
    assert_eq!((s, b.as_ref()), (StatusCode::CREATED, &b"data: 0\n\n"[..]));
    assert_eq!(h[header::CONTENT_TYPE], "text/event-stream; charset=utf-8");
    let (s, h, b) = send(&svc, post(Some("k"), "{}")).await;
    assert_unreplayable(s, &h, &b);
    assert!(json(&b)["detail"]
        .as_str()
        .is_some_and(|d| d.contains("text/event-stream")));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the retry ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_share_a_key() {
    let runs = Arc::new(AtomicU32::new(0));
    let l = layer().scope_with(|parts| {
        parts
            .headers
            .get("x-account")?
            .to_str()
            .ok()
            .map(str::to_owned)
    });
    let svc = payments(l, runs.clone(), StatusCode::CREATED);
    for account in ["acct_1", "acct_2", "acct_1", "acct|odd"] {
        let mut req = post(Some("same-key"), "{}");
        req.headers_mut()
            .insert("x-account", account.parse().unwrap());
        send(&svc, req).await;
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "acct_1 twice replays; the others run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_replayed() {
    let handler = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        let resp = Response::builder()
            .header("connection", "x-conn-only")
            .header("x-conn-only", "1")
            .header("keep-alive", "timeout=5")
            .header("x-kept", "yes")
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap();
        Ok::<_, Infallible>(resp)
    });
    let mut svc = layer().layer(handler);
    let _ = svc
        .ready()
        .await
        .unwrap()
        .call(post(Some("k"), "{}"))
        .await
        .unwrap();
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(post(Some("k"), "{}"))
        .await
        .unwrap();
    let h = resp.headers();
    assert_eq!(h["x-kept"], "yes");
    for gone in ["connection", "x-conn-only", "keep-alive"] {
        assert!(h.get(gone).is_none(), "{gone} replayed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_works_on_a_postcard_engine() {
    let engine = Idempotency::builder()
        .codec(idempotent_runtime::Codec::Postcard)
        .build()
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(
        IdempotencyLayer::new(engine),
        runs.clone(),
        StatusCode::CREATED,
    );
    let (_, _, b1) = send(&svc, post(Some("k"), "{}")).await;
    let (_, h2, b2) = send(&svc, post(Some("k"), "{}")).await;
    assert_eq!(b1, b2);
    assert_eq!(h2.get_all("set-cookie").iter().count(), 2);
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A handler that charges, says so, then waits for `gate` before it answers 201 with the
/// charge's number: a slow handler whose side effect is made early.
fn charging(
    layer: IdempotencyLayer,
    charges: Arc<AtomicU32>,
    charged: Arc<tokio::sync::Notify>,
    gate: Arc<tokio::sync::Notify>,
) -> Handler {
    let handler = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let (charges, charged, gate) = (charges.clone(), charged.clone(), gate.clone());
        async move {
            let n = charges.fetch_add(1, Ordering::SeqCst) + 1;
            charged.notify_one();
            gate.notified().await;
            let resp = Response::builder()
                .status(StatusCode::CREATED)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(format!("{{\"id\":{n}}}"))))
                .unwrap();
            Ok::<_, Infallible>(resp)
        }
    });
    tower::util::BoxCloneSyncService::new(layer.layer(handler))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_gives_up_neither_stops_the_handler_nor_frees_its_key() {
    for wait in [true, false] {
        let charges = Arc::new(AtomicU32::new(0));
        let charged = Arc::new(tokio::sync::Notify::new());
        let gate = Arc::new(tokio::sync::Notify::new());
        let l = if wait {
            layer().wait_for_in_flight()
        } else {
            layer()
        };
        let svc = charging(l, charges.clone(), charged.clone(), gate.clone());
        let first = {
            let svc = svc.clone();
            tokio::spawn(async move { send(&svc, post(Some("k"), "{}")).await })
        };
        charged.notified().await;
        // The client times out and goes away: the server drops the layer's future.
        first.abort();
        assert!(first.await.is_err());
        if wait {
            let retry = {
                let svc = svc.clone();
                tokio::spawn(async move { send(&svc, post(Some("k"), "{}")).await })
            };
            gate.notify_one();
            let (s, h, b) = retry.await.unwrap();
            assert_eq!(s, StatusCode::CREATED);
            assert_eq!(h["idempotent-replayed"], "true");
            assert_eq!(json(&b)["id"], 1, "the first request's response");
        } else {
            let (s, h, b) = send(&svc, post(Some("k"), "{}")).await;
            assert_problem(s, &h, &b, StatusCode::CONFLICT);
            gate.notify_one();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let (s, h, b) = loop {
                let (s, h, b) = send(&svc, post(Some("k"), "{}")).await;
                if s != StatusCode::CONFLICT || tokio::time::Instant::now() > deadline {
                    break (s, h, b);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            assert_eq!(s, StatusCode::CREATED);
            assert_eq!(h["idempotent-replayed"], "true");
            assert_eq!(json(&b)["id"], 1);
        }
        assert_eq!(
            charges.load(Ordering::SeqCst),
            1,
            "charged once (wait: {wait})"
        );
    }
}
