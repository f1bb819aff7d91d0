//! A registry whose Redis goes away answers 503 with a JSON error naming the store,
//! never a 500 or a panic, and serves again once Redis is back. Starts its own
//! `redis-server` on a free port (skipped when it is not installed, unless
//! `BREAKWATER_REQUIRE_SERVICES=1`).

#![expect(clippy::unwrap_used, reason = "helpers of a test fail it by panicking")]
#![expect(
    clippy::print_stderr,
    reason = "a skipped test says so, as DESIGN.md asks"
)]

use std::process::Stdio;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use breakwater_registry::server::{RegistryState, app};
use breakwater_registry::store::{Store, StoreChoice};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Starts `redis-server` on `port`; `None` when it is not installed (and not required).
async fn redis_server(port: u16) -> Option<tokio::process::Child> {
    let spawned = tokio::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let child = match spawned {
        Ok(child) => child,
        Err(err) => {
            assert!(
                std::env::var("BREAKWATER_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "BREAKWATER_REQUIRE_SERVICES=1 but redis-server cannot start: {err}"
            );
            eprintln!("SKIPPED (no redis-server: {err})");
            return None;
        }
    };
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Some(child);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("redis-server on port {port} did not listen within 5 s");
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

#[tokio::test]
async fn a_lost_redis_gives_503s_and_a_returning_one_serves_again() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Some(mut server) = redis_server(port).await else {
        return;
    };
    let choice = StoreChoice::Redis {
        url: format!("redis://127.0.0.1:{port}"),
        prefix: "outage".to_owned(),
    };
    let state = RegistryState::with_store(Store::open(&choice).await.unwrap());
    let register = json!({"name": "users", "port": 4000, "host": "h"});
    let (status, _) = send(&state, "POST", "/register", Some(register.clone())).await;
    assert_eq!(status, StatusCode::OK);

    server.kill().await.unwrap();
    for (method, uri, body) in [
        ("POST", "/register", Some(register.clone())),
        ("POST", "/heartbeat", Some(register.clone())),
        ("GET", "/services/users", None),
        ("GET", "/services", None),
        ("DELETE", "/services/users/4000", None),
        ("GET", "/health", None),
    ] {
        let (status, body) = send(&state, method, uri, body).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{method} {uri}: {body}"
        );
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("registry store unavailable"),
            "{method} {uri}: {body}"
        );
    }

    // A fresh, empty Redis on the same port: the connection manager reconnects, and a
    // heartbeat fills the table back up.
    let Some(mut server) = redis_server(port).await else {
        return;
    };
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..100 {
        (status, _) = send(&state, "POST", "/heartbeat", Some(register.clone())).await;
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, StatusCode::OK, "reconnected after Redis came back");
    let (_, body) = send(&state, "GET", "/services/users", None).await;
    assert_eq!(body["services"][0]["id"], "users-h-4000");
    server.kill().await.unwrap();
}
