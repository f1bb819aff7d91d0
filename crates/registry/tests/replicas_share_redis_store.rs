//! Two registry replicas over one Redis table agree on everything: registration,
//! heartbeats, expiry and removal. Needs `REDIS_URL`; skipped without it unless
//! `BREAKWATER_REQUIRE_SERVICES=1`.

#![expect(clippy::unwrap_used, reason = "helpers of a test fail it by panicking")]
#![expect(
    clippy::print_stderr,
    reason = "a skipped test says so, as DESIGN.md asks"
)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use breakwater_registry::server::{RegistryState, RunError, app, run_with};
use breakwater_registry::store::redis::RedisStore;
use breakwater_registry::store::{Store, StoreChoice};
use breakwater_runtime::CancellationToken;
use serde_json::{Value, json};
use tower::ServiceExt;

/// The Redis URL, or `None` when the test should be skipped.
fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("BREAKWATER_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "BREAKWATER_REQUIRE_SERVICES=1 but REDIS_URL is not set"
            );
            eprintln!("SKIPPED (no REDIS_URL)");
            None
        }
    }
}

fn prefix() -> String {
    format!("bw-test-registry-{:016x}", rand::random::<u64>())
}

/// Two replicas (each with its own connection) over one prefix.
async fn replicas(url: &str, prefix: &str) -> (RegistryState, RegistryState) {
    let choice = StoreChoice::Redis {
        url: url.to_owned(),
        prefix: prefix.to_owned(),
    };
    let a = Store::open(&choice).await.unwrap();
    let b = Store::open(&choice).await.unwrap();
    (RegistryState::with_store(a), RegistryState::with_store(b))
}

async fn clear(url: &str, prefix: &str) {
    RedisStore::connect(url, prefix)
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
}

async fn send(
    state: &RegistryState,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    let body = match body {
        Some(v) => {
            req = req.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let res = app(state.clone())
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn listed(state: &RegistryState, name: &str) -> Vec<Value> {
    let (status, body) = send(state, "GET", &format!("/services/{name}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["services"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn replicas_agree_on_register_heartbeat_expiry_and_delete() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix();
    let (a, b) = replicas(&url, &prefix).await;

    // Register on A, discover on B.
    let (status, body) = send(
        &a,
        "POST",
        "/register",
        Some(json!({"name": "users", "port": 4000, "host": "10.0.0.1",
                    "heartbeatInterval": 1, "metadata": {"zone": "a"}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], "users-10.0.0.1-4000");
    let registered_at = body["registeredAt"].as_u64().unwrap();
    let on_b = listed(&b, "users").await;
    assert_eq!(on_b.len(), 1);
    assert_eq!(on_b[0]["id"], "users-10.0.0.1-4000");
    assert_eq!(on_b[0]["heartbeatInterval"], 1);
    assert_eq!(on_b[0]["registeredAt"], registered_at);
    assert_eq!(on_b[0]["status"], "healthy");
    assert_eq!(on_b[0]["metadata"], json!({"zone": "a"}));
    let (_, all) = send(&b, "GET", "/services", None).await;
    assert_eq!(all["users"].as_array().unwrap().len(), 1);

    // Heartbeats on B keep it alive on A well past one lease (1.5 s).
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (status, hb) = send(
            &b,
            "POST",
            "/heartbeat",
            Some(json!({"name": "users", "port": 4000, "host": "10.0.0.1"})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{hb}");
        assert_eq!(
            hb["nextHeartbeatIn"], 1,
            "interval kept from the registration"
        );
        let on_a = listed(&a, "users").await;
        assert_eq!(on_a.len(), 1, "alive on A after a heartbeat on B");
        assert_eq!(
            on_a[0]["registeredAt"], registered_at,
            "a renewal keeps registeredAt"
        );
        assert_eq!(on_a[0]["metadata"], json!({"zone": "a"}));
    }

    // No more heartbeats: gone from both once the lease (1.5 x 1 s) has run out.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(listed(&a, "users").await.is_empty(), "expired on A");
    assert!(listed(&b, "users").await.is_empty(), "expired on B");
    let (_, all) = send(&a, "GET", "/services", None).await;
    assert_eq!(all, json!({}));
    let (status, _) = send(&b, "DELETE", "/services/users/4000", None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "an expired instance cannot be deleted"
    );

    // DELETE on one is seen by the other, and names what was not found.
    for (port, host) in [(5000, "10.0.0.1"), (5000, "10.0.0.2"), (5001, "10.0.0.1")] {
        let (status, _) = send(
            &b,
            "POST",
            "/register",
            Some(json!({"name": "orders", "port": port, "host": host})),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(listed(&a, "orders").await.len(), 3);
    let (status, body) = send(&a, "DELETE", "/services/orders/5002", None).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            json!({"error": "Service instance not found"})
        )
    );
    let (status, body) = send(&a, "DELETE", "/services/nope/5000", None).await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, json!({"error": "Service not found"}))
    );
    let (status, body) = send(&a, "DELETE", "/services/orders/5000?host=10.0.0.2", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<Value> = listed(&b, "orders")
        .await
        .iter()
        .map(|i| i["id"].clone())
        .collect();
    assert_eq!(
        ids,
        [json!("orders-10.0.0.1-5000"), json!("orders-10.0.0.1-5001")],
        "ordered by id"
    );
    let (status, _) = send(&a, "DELETE", "/services/orders/5000", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&a, "DELETE", "/services/orders/5001", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(listed(&b, "orders").await.is_empty());
    let (_, health) = send(&b, "GET", "/health", None).await;
    assert_eq!(
        (health["services"].clone(), health["instances"].clone()),
        (json!(0), json!(0))
    );

    clear(&url, &prefix).await;
}

#[tokio::test]
async fn an_expiry_is_swept_once_however_many_replicas_sweep() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix();
    let a = RedisStore::connect(&url, &prefix).await.unwrap();
    let b = RedisStore::connect(&url, &prefix).await.unwrap();
    let (status, _) = send(
        &RegistryState::with_store(Store::Redis(a.clone())),
        "POST",
        "/heartbeat",
        Some(json!({"name": "data", "port": 7000, "host": "h", "heartbeatInterval": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        a.reap_expired().await.unwrap().is_empty(),
        "alive: nothing to sweep"
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (first, second) = tokio::join!(a.reap_expired(), b.reap_expired());
    let mut swept = first.unwrap();
    swept.extend(second.unwrap());
    assert_eq!(swept.len(), 1, "reported by exactly one replica");
    assert_eq!(swept[0].id, "data-h-7000");
    // The service's version (and the set naming it) outlive its instances, so a
    // watcher still compares against the right one; nothing else is left.
    assert_eq!(
        a.clear().await.unwrap(),
        2,
        "the sweep left only the version keys behind"
    );
}

#[tokio::test]
async fn run_with_an_unreachable_redis_fails_before_serving() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Port 1 on loopback refuses connections.
    let choice = StoreChoice::Redis {
        url: "redis://127.0.0.1:1".to_owned(),
        prefix: prefix(),
    };
    let result = run_with(listener, choice, CancellationToken::new()).await;
    assert!(matches!(result, Err(RunError::Store(_))), "{result:?}");
}

#[tokio::test]
async fn run_with_serves_a_shared_table_over_http() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix();
    let choice = StoreChoice::Redis {
        url: url.clone(),
        prefix: prefix.clone(),
    };
    let shutdown = CancellationToken::new();
    let mut addrs = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        servers.push(tokio::spawn(run_with(
            listener,
            choice.clone(),
            shutdown.clone(),
        )));
    }
    let http = reqwest::Client::new();
    let res = http
        .post(format!("http://{}/register", addrs[0]))
        .json(&json!({"name": "users", "port": 4100}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = http
        .get(format!("http://{}/services/users", addrs[1]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["services"][0]["id"], "users-127.0.0.1-4100",
        "host defaults to the caller"
    );
    shutdown.cancel();
    for server in servers {
        server.await.unwrap().unwrap();
    }
    clear(&url, &prefix).await;
}
