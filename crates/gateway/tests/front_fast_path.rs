//! The [`Front`] that serves every connection: proxied routes take its fast path (no
//! router), everything else goes through `app`; both must look the same from outside.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failure should fail the test loudly"
)]

mod fixture;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use breakwater_gateway::Front;
use fixture::*;

const USERS: &str = "user-service";

async fn through(front: &Front, req: Request<Body>) -> Reply {
    let peer: SocketAddr = "10.1.2.3:40000".parse().unwrap();
    let res = front.clone().handle(req, peer).await;
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(res.into_body(), 8 << 20)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Reply {
        status,
        headers,
        json,
        text,
    }
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn proxied_requests_keep_ids_headers_and_metrics() {
    let registry = FakeRegistry::start().await;
    let echo = echo_service("users-a").await;
    registry.set(USERS, vec![instance(USERS, echo.addr)]);
    let front = Front::new(gateway_state(&registry.url, Duration::from_secs(10)));

    let reply = through(
        &front,
        Request::get("/users/1?x=1")
            .header("x-request-id", "client-id-42")
            .header("host", "gateway.test:8000")
            .header("connection", "keep-alive, x-private")
            .header("x-private", "secret")
            .header("te", "trailers")
            .header("x-forwarded-for", "192.0.2.1")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = &reply.json["headers"];
    assert_eq!(seen["x-request-id"], "client-id-42");
    assert_eq!(reply.headers["x-request-id"], "client-id-42");
    assert!(seen.get("x-private").is_none(), "{seen}");
    assert!(seen.get("te").is_none(), "{seen}");
    assert_eq!(seen["x-forwarded-for"], "192.0.2.1, 10.1.2.3");
    assert_eq!(seen["x-forwarded-host"], "gateway.test:8000");
    assert_eq!(seen["host"], echo.addr.to_string());
    assert_eq!(reply.json["query"], "x=1");
    for gone in ["x-hop-response", "keep-alive", "proxy-authenticate"] {
        assert!(
            reply.headers.get(gone).is_none(),
            "{gone} reached the client"
        );
    }
    assert_eq!(reply.headers["x-end-to-end"], "kept");

    // No usable id from the client: one is made and sent both ways.
    let reply = through(&front, get("/users/2")).await;
    let made = reply.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(made.len(), 32);
    assert_eq!(reply.json["headers"]["x-request-id"], made.as_str());

    // Both requests are counted under the route, as the router's middleware does.
    let metrics = through(&front, get("/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics.text.contains(
            r#"breakwater_gateway_requests_total{route="/users",method="GET",status="200"} 2"#
        ),
        "{}",
        metrics.text
    );
}

#[tokio::test]
async fn gateway_paths_and_misses_go_through_the_router() {
    let registry = FakeRegistry::start().await;
    let front = Front::new(gateway_state(&registry.url, Duration::from_secs(10)));

    let health = through(&front, get("/health")).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.headers["x-request-id"].len(), 32);

    let unknown = through(&front, get("/nowhere")).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert!(unknown.json["error"].is_string(), "{}", unknown.text);
    assert_eq!(unknown.headers["x-request-id"].len(), 32);

    let wrong = through(
        &front,
        Request::post("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);

    let metrics = through(&front, get("/metrics")).await;
    assert!(
        metrics.text.contains(
            r#"breakwater_gateway_requests_total{route="unmatched",method="GET",status="404"} 1"#
        ),
        "{}",
        metrics.text
    );
}
