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
    let res = std::sync::Arc::new(front.clone())
        .handle(req, peer)
        .await
        .unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(Body::new(res.into_body()), 8 << 20)
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

/// Splits a `traceparent` into (trace id, parent span id, flags), checking its form.
fn traceparent_parts(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    assert!(hex(parts[1], 32) && parts[1] != "0".repeat(32), "{value}");
    assert!(hex(parts[2], 16) && parts[2] != "0".repeat(16), "{value}");
    assert!(hex(parts[3], 2), "{value}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test]
async fn the_gateway_forwards_its_own_span_in_the_callers_trace_or_a_new_one() {
    let registry = FakeRegistry::start().await;
    let echo = echo_service("users-a").await;
    registry.set(USERS, vec![instance(USERS, echo.addr)]);
    let front = Front::new(gateway_state(&registry.url, Duration::from_secs(10)));
    let seen = |reply: &Reply| {
        reply.json["headers"]["traceparent"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    // A caller's trace: same trace id and flags, the gateway's own span as the parent.
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let reply = through(
        &front,
        Request::get("/users/1")
            .header("traceparent", caller)
            .header("tracestate", "vendor=1")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let (trace, span, flags) = traceparent_parts(&seen(&reply));
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(span, "00f067aa0ba902b7");
    assert_eq!(flags, "00");
    assert_eq!(reply.json["headers"]["tracestate"], "vendor=1");

    // Each request is its own span.
    let again = through(
        &front,
        Request::get("/users/1")
            .header("traceparent", caller)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let (trace_again, span_again, _) = traceparent_parts(&seen(&again));
    assert_eq!(trace_again, trace);
    assert_ne!(span_again, span);

    // None, or one that is not valid: a new sampled trace.
    let fresh = through(&front, get("/users/1")).await;
    let (new_trace, _, new_flags) = traceparent_parts(&seen(&fresh));
    assert_ne!(new_trace, trace);
    assert_eq!(new_flags, "01");
    let invalid = through(
        &front,
        Request::get("/users/1")
            .header(
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            )
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let (other_trace, other_span, other_flags) = traceparent_parts(&seen(&invalid));
    assert_ne!(other_trace, "0".repeat(32));
    assert_ne!(other_trace, new_trace);
    assert_ne!(other_span, "00f067aa0ba902b7");
    assert_eq!(other_flags, "01");
}

/// hyper moves each request's future into its dispatcher, so every byte of it is
/// copied per request: the rare, large branches (the router, the cache, a shared rate
/// limit check, registry fetches, connecting) are boxed to keep it small. Before they
/// were, it was 12 KiB here (debug build); this catches one creeping back in.
#[tokio::test]
async fn the_fast_paths_future_stays_small() {
    let registry = FakeRegistry::start().await;
    let front = Front::new(gateway_state(&registry.url, Duration::from_secs(10)));
    let peer: SocketAddr = "10.1.2.3:40000".parse().unwrap();
    let future = std::sync::Arc::new(front).handle(get("/users/1"), peer);
    let size = std::mem::size_of_val(&future);
    assert!(size <= 6 << 10, "the front's future is {size} bytes");
}
