//! Edges of the `Idempotency-Key` layer: the header's syntax (structured-field parameters,
//! bare keys) and JSON bodies whose meaning a lossy parse would blur. One rule per test,
//! through the real layer on `Idempotency::memory()`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use idempotent_runtime::http::{IdempotencyLayer, ResponseBody};
use idempotent_runtime::Idempotency;
use tower::{Layer, ServiceExt};

type Handler =
    tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<ResponseBody>, Infallible>;

/// A handler behind a fresh layer on a memory store; it counts its runs in `runs` and
/// answers 201 with a body naming the run.
fn payments(runs: Arc<AtomicU32>) -> Handler {
    let handler = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let runs = runs.clone();
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let resp = Response::builder()
                .status(StatusCode::CREATED)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(format!("{{\"id\":{n}}}"))))
                .unwrap();
            Ok::<_, Infallible>(resp)
        }
    });
    let layer = IdempotencyLayer::new(Idempotency::memory());
    tower::util::BoxCloneSyncService::new(layer.layer(handler))
}

/// A JSON POST to `/payments` with the given key.
fn post(key: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri("/payments")
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
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

fn assert_problem(
    status: StatusCode,
    headers: &http::HeaderMap,
    body: &Bytes,
    expected: StatusCode,
) {
    assert_eq!(status, expected, "{}", String::from_utf8_lossy(body));
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    let p: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(p["status"], expected.as_u16());
}

fn replayed(headers: &http::HeaderMap) -> bool {
    headers
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_field_key_with_parameters_is_read_and_its_parameters_ignored() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(runs.clone());
    let (s1, h1, b1) = send(&svc, post("\"k1\";x=1", r#"{"amount":5}"#)).await;
    assert_eq!(s1, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b1));
    assert!(!replayed(&h1));
    let (s2, h2, b2) = send(&svc, post("\"k1\"", r#"{"amount":5}"#)).await;
    assert_eq!(s2, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b2));
    assert!(replayed(&h2), "the same key without its parameters replays");
    assert_eq!(b1, b2);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_keys_outside_token_syntax_are_400() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(runs.clone());
    for bad in ["has space", "a,b"] {
        let (s, h, b) = send(&svc, post(bad, "{}")).await;
        assert_problem(s, &h, &b, StatusCode::BAD_REQUEST);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the handler never ran");
    for good in ["8e03978e-40d5-43e8-bc93-6894a57f9324", "abc_DEF-123:/+="] {
        let (s, _, b) = send(&svc, post(good, "{}")).await;
        assert_eq!(
            s,
            StatusCode::CREATED,
            "{good}: {}",
            String::from_utf8_lossy(&b)
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_numbers_beyond_f64_are_told_apart() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(runs.clone());
    let (s, _, _) = send(&svc, post("k", r#"{"amount":18446744073709551616}"#)).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, h, b) = send(&svc, post("k", r#"{"amount":18446744073709551617}"#)).await;
    assert_problem(s, &h, &b, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_json_keys_are_not_collapsed() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(runs.clone());
    let (s, _, _) = send(&svc, post("k", r#"{"to":"alice","to":"mallory"}"#)).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, h, b) = send(&svc, post("k", r#"{"to":"mallory"}"#)).await;
    assert_problem(s, &h, &b, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserialised_json_still_replays() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc = payments(runs.clone());
    let first = r#"{"amount":18446744073709551616,"to":{"name":"ALICE","tags":["A",{"y":1,"x":0.1000000000000000000001}]}}"#;
    let again = "{ \"to\" : { \"tags\" : [ \"\\u0041\" , { \"x\" : 0.1000000000000000000001 , \"y\" : 1 } ] ,\n \"name\" : \"\\u0041LICE\" } , \"amount\" : 18446744073709551616 }";
    let (s, h, _) = send(&svc, post("k", first)).await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(!replayed(&h));
    let (s, h, b) = send(&svc, post("k", again)).await;
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
    assert!(
        replayed(&h),
        "the same payload, serialised otherwise, replays"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
