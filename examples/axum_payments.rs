//! A payments API behind the `Idempotency-Key` layer.
//!
//! ```text
//! cargo run --example axum_payments            # in memory, on 127.0.0.1:3000
//! PORT=8080 PAYMENT_DELAY_MS=500 IDEMPOTENT_REDIS_URL=redis://127.0.0.1:6379 \
//!     cargo run --example axum_payments        # shared by every replica through Redis
//!
//! curl -i -X POST localhost:3000/payments -H 'Idempotency-Key: "k1"' \
//!      -H 'content-type: application/json' -d '{"amount": 1250, "currency": "EUR"}'
//! curl localhost:3000/payments
//! ```
//!
//! - `POST /payments` with `{"amount": <u64>, "currency": <string>}` and an
//!   `Idempotency-Key` (required: 400 without) answers 201 with the new payment and a
//!   `Location: /payments/{id}`; a retry replays both. The handler waits
//!   `PAYMENT_DELAY_MS` (default 100) to make races visible.
//! - `GET /payments`: every payment actually made; `GET /payments/{id}`: one of them.
//!
//! Logs go to standard error, filtered by `RUST_LOG` (default `warn`, which shows the
//! library's warnings: a result that could not be stored, a claim lost, a store failing);
//! `RUST_LOG=idempotent_runtime=debug` shows every call's outcome, by scope and key digest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use idempotent_runtime::http::IdempotencyLayer;
use idempotent_runtime::store::RedisStore;
use idempotent_runtime::Idempotency;
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
struct NewPayment {
    amount: u64,
    currency: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Payment {
    id: String,
    amount: u64,
    currency: String,
}

#[derive(Clone)]
struct Ledger {
    payments: Arc<Mutex<Vec<Payment>>>,
    delay: Duration,
}

fn fresh_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "pay_{nanos:x}{:04x}",
        N.fetch_add(1, Ordering::Relaxed) % 0x10000
    )
}

async fn create(State(ledger): State<Ledger>, Json(req): Json<NewPayment>) -> impl IntoResponse {
    tokio::time::sleep(ledger.delay).await;
    let payment = Payment {
        id: fresh_id(),
        amount: req.amount,
        currency: req.currency,
    };
    ledger
        .payments
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(payment.clone());
    let location = format!("/payments/{}", payment.id);
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(payment),
    )
}

async fn list(State(ledger): State<Ledger>) -> Json<Vec<Payment>> {
    Json(
        ledger
            .payments
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    )
}

async fn one(
    State(ledger): State<Ledger>,
    Path(id): Path<String>,
) -> Result<Json<Payment>, StatusCode> {
    let payments = ledger.payments.lock().unwrap_or_else(|e| e.into_inner());
    payments
        .iter()
        .find(|p| p.id == id)
        .cloned()
        .map(Json)
        .ok_or(StatusCode::NOT_FOUND)
}

/// The application: the layer covers POST (and PATCH) routes, and requires the key.
fn app(engine: Idempotency, delay: Duration) -> Router {
    let ledger = Ledger {
        payments: Arc::default(),
        delay,
    };
    Router::new()
        .route("/payments", post(create).get(list))
        .route("/payments/{id}", get(one))
        .layer(IdempotencyLayer::new(engine).require_key(true))
        .with_state(ledger)
}

async fn engine_from_env() -> Result<Idempotency, idempotent_runtime::Error> {
    Ok(match std::env::var("IDEMPOTENT_REDIS_URL") {
        Ok(url) => {
            eprintln!("idempotency store: Redis at {url}");
            Idempotency::new(
                RedisStore::connect(&url)
                    .await?
                    .with_prefix("axum_payments:"),
            )
        }
        Err(_) => {
            eprintln!("idempotency store: in memory");
            Idempotency::memory()
        }
    })
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
        .unwrap_or(3000);
    let delay_ms: u64 = std::env::var("PAYMENT_DELAY_MS")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(100);
    let app = app(engine_from_env().await?, Duration::from_millis(delay_ms));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! End to end: the app on a real socket, a real HTTP client.
    use super::*;
    use serde_json::{json, Value};

    async fn serve(engine: Idempotency, delay_ms: u64) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = app(engine, Duration::from_millis(delay_ms));
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    async fn pay(
        client: &reqwest::Client,
        base: &str,
        key: Option<&str>,
        body: Value,
    ) -> reqwest::Response {
        let mut req = client.post(format!("{base}/payments")).json(&body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        req.send().await.unwrap()
    }

    async fn made(client: &reqwest::Client, base: &str) -> Vec<Payment> {
        client
            .get(format!("{base}/payments"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sixteen_concurrent_duplicates_make_exactly_one_payment() {
        let base = serve(Idempotency::memory(), 200).await;
        let client = reqwest::Client::new();
        let body = json!({"amount": 1250, "currency": "EUR"});
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (client, base, body) = (client.clone(), base.clone(), body.clone());
                tokio::spawn(
                    async move { pay(&client, &base, Some("\"dup-16\""), body).await.status() },
                )
            })
            .collect();
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
        assert!(
            statuses.contains(&reqwest::StatusCode::CREATED),
            "{statuses:?}"
        );
        assert!(
            statuses
                .iter()
                .all(|s| *s == reqwest::StatusCode::CREATED || *s == reqwest::StatusCode::CONFLICT),
            "{statuses:?}"
        );
        assert_eq!(made(&client, &base).await.len(), 1, "exactly one payment");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_replays_the_201_its_location_and_body() {
        let base = serve(Idempotency::memory(), 0).await;
        let client = reqwest::Client::new();
        let body = json!({"amount": 999, "currency": "USD"});
        let first = pay(&client, &base, Some("k-1"), body.clone()).await;
        assert_eq!(first.status(), reqwest::StatusCode::CREATED);
        let location = first.headers()["location"].clone();
        assert!(first.headers().get("idempotent-replayed").is_none());
        let created: Payment = first.json().await.unwrap();
        assert_eq!(
            location.to_str().unwrap(),
            format!("/payments/{}", created.id)
        );

        let retry = pay(&client, &base, Some("k-1"), body).await;
        assert_eq!(retry.status(), reqwest::StatusCode::CREATED);
        assert_eq!(retry.headers()["location"], location);
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        assert_eq!(retry.json::<Payment>().await.unwrap(), created);
        assert_eq!(made(&client, &base).await, std::slice::from_ref(&created));
        let fetched: Payment = client
            .get(format!("{base}{}", location.to_str().unwrap()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(fetched, created);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_key_is_400_and_a_reused_key_with_another_amount_is_422() {
        let base = serve(Idempotency::memory(), 0).await;
        let client = reqwest::Client::new();
        let missing = pay(
            &client,
            &base,
            None,
            json!({"amount": 1, "currency": "EUR"}),
        )
        .await;
        assert_eq!(missing.status(), reqwest::StatusCode::BAD_REQUEST);
        assert_eq!(
            missing.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = missing.json().await.unwrap();
        assert!(
            problem["type"].is_string()
                && problem["title"].is_string()
                && problem["detail"].is_string()
        );

        pay(
            &client,
            &base,
            Some("k-2"),
            json!({"amount": 1, "currency": "EUR"}),
        )
        .await;
        let reused = pay(
            &client,
            &base,
            Some("k-2"),
            json!({"amount": 2, "currency": "EUR"}),
        )
        .await;
        assert_eq!(reused.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(made(&client, &base).await.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_replicas_on_one_redis_make_one_payment_for_a_retry_on_the_other() {
        let url = std::env::var("IDEMPOTENT_TEST_REDIS")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("axum_payments_test:{}:{}:", std::process::id(), fresh_id());
        let replica = || async {
            let store = RedisStore::connect(&url)
                .await
                .unwrap()
                .with_prefix(prefix.clone());
            serve(Idempotency::new(store), 0).await
        };
        let (a, b) = (replica().await, replica().await);
        let client = reqwest::Client::new();
        let body = json!({"amount": 42, "currency": "EUR"});
        let first = pay(&client, &a, Some("cross"), body.clone()).await;
        let first_body: Payment = first.json().await.unwrap();
        let retry = pay(&client, &b, Some("cross"), body).await;
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        assert_eq!(retry.json::<Payment>().await.unwrap(), first_body);
        assert_eq!(
            made(&client, &a).await.len() + made(&client, &b).await.len(),
            1
        );
    }
}
