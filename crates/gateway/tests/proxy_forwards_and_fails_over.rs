//! Proxied routes: what reaches the upstream, what comes back, and how a failed instance
//! is survived (or reported).

mod fixture;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use fixture::*;
use http_body_util::BodyExt;
use tower::ServiceExt;

const USERS: &str = "user-service";
const ORDERS: &str = "order-service";

#[tokio::test]
async fn proxy_keeps_method_path_query_and_body() {
    let registry = FakeRegistry::start().await;
    let echo = echo_service("users-a").await;
    registry.set(USERS, vec![instance(USERS, echo.addr)]);
    let gw = gateway(&registry.url);

    let reply = call(
        &gw,
        Request::post("/users?source=test&x=1")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"name":"Ann","email":"ann@example.com"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(reply.json["method"], "POST");
    assert_eq!(reply.json["path"], "/users");
    assert_eq!(reply.json["query"], "source=test&x=1");
    assert_eq!(
        reply.json["body"],
        r#"{"name":"Ann","email":"ann@example.com"}"#
    );
    assert_eq!(reply.json["headers"]["content-type"], "application/json");
    assert_eq!(reply.json["headers"]["content-length"], "40");

    for (method, path) in [
        ("PUT", "/users/2"),
        ("DELETE", "/users/2"),
        ("GET", "/users/2?a=b"),
    ] {
        let reply = call(
            &gw,
            Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{method} {path}");
        assert_eq!(reply.json["method"], method);
        assert_eq!(reply.json["path"], path.split('?').next().unwrap());
    }
}

#[tokio::test]
async fn orders_paths_other_than_the_composed_one_go_to_the_orders_service() {
    let registry = FakeRegistry::start().await;
    let echo = echo_service("orders-a").await;
    registry.set(ORDERS, vec![instance(ORDERS, echo.addr)]);
    let gw = gateway(&registry.url);

    let reply = call(
        &gw,
        Request::post("/orders").body(Body::from("{}")).unwrap(),
    )
    .await;
    assert_eq!(
        (reply.status, &reply.json["instance"]),
        (StatusCode::CREATED, &"orders-a".into())
    );
    let reply = get_json(&gw, "/orders/3").await;
    assert_eq!(reply.json["path"], "/orders/3");
    let reply = call(
        &gw,
        Request::post("/orders/user/1").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        reply.json["method"], "POST",
        "only GET /orders/user/:id is composed"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let registry = FakeRegistry::start().await;
    let echo = echo_service("users-a").await;
    registry.set(USERS, vec![instance(USERS, echo.addr)]);
    let gw = gateway(&registry.url);

    let peer: SocketAddr = "10.1.2.3:40000".parse().unwrap();
    let mut req = Request::get("/users/1")
        .header("host", "gateway.test:8000")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("upgrade", "websocket")
        .header("proxy-authorization", "Basic eDp5")
        .header("proxy-connection", "keep-alive")
        .header("x-forwarded-for", "192.0.2.1")
        .header("authorization", "Bearer end-to-end")
        .body(Body::empty())
        .unwrap();
    req.extensions_mut().insert(ConnectInfo(peer));
    let reply = call(&gw, req).await;
    assert_eq!(reply.status, StatusCode::OK);

    let seen = &reply.json["headers"];
    for gone in [
        "x-private",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            seen.get(gone).is_none(),
            "{gone} reached the upstream: {seen}"
        );
    }
    assert_eq!(seen["host"], echo.addr.to_string());
    assert_eq!(seen["x-forwarded-for"], "192.0.2.1, 10.1.2.3");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "gateway.test:8000");
    assert_eq!(seen["authorization"], "Bearer end-to-end");

    // The upstream really sends them, so their absence below is the gateway's doing.
    let direct = reqwest::get(format!("http://{}/users/1", echo.addr))
        .await
        .unwrap();
    for sent in ECHO_HOP_BY_HOP {
        assert!(
            direct.headers().contains_key(sent),
            "echo does not send {sent}"
        );
    }
    for gone in ECHO_HOP_BY_HOP {
        assert!(
            reply.headers.get(gone).is_none(),
            "{gone} reached the client"
        );
    }
    assert_eq!(reply.headers["x-end-to-end"], "kept");
}

#[tokio::test]
async fn request_id_is_passed_on_or_created_and_returned() {
    let registry = FakeRegistry::start().await;
    let echo = echo_service("users-a").await;
    registry.set(USERS, vec![instance(USERS, echo.addr)]);
    let gw = gateway(&registry.url);

    let reply = call(
        &gw,
        Request::get("/users/1")
            .header("x-request-id", "client-id-42")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.json["headers"]["x-request-id"], "client-id-42");
    assert_eq!(reply.headers["x-request-id"], "client-id-42");

    let reply = get_json(&gw, "/users/1").await;
    let made = reply.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(made.len(), 32);
    assert!(made.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(reply.json["headers"]["x-request-id"], made.as_str());

    let unknown = get_json(&gw, "/nowhere").await;
    assert_eq!(
        unknown.headers["x-request-id"].len(),
        32,
        "gateway-made answers carry one too"
    );
}

#[tokio::test]
async fn a_dead_instance_costs_no_client_error() {
    let registry = FakeRegistry::start().await;
    let a = echo_service("users-a").await;
    let b = echo_service("users-b").await;
    let dead = dead_addr().await;
    registry.set(
        USERS,
        vec![
            instance(USERS, a.addr),
            instance(USERS, dead),
            instance(USERS, b.addr),
        ],
    );
    // Round-robin, so that "both live instances share the load" holds whatever the
    // machine's load does to latencies (P2C over peak EWMA would rightly send every
    // request to the one that happened to answer faster).
    let gw = breakwater_gateway::app(gateway_state_with(
        &registry.url,
        &users_route("[routes.policy]\nbalance = \"round-robin\""),
    ));

    let mut served_by = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..30 {
        let reply = get_json(&gw, &format!("/users/{i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {}", reply.text);
        *served_by
            .entry(reply.json["instance"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for i in 0..9 {
        // Nothing was sent to the dead instance, so even a POST moves on.
        let reply = call(
            &gw,
            Request::post("/users")
                .body(Body::from(format!("{{\"n\":{i}}}")))
                .unwrap(),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "post {i}: {}",
            reply.text
        );
        assert_eq!(
            reply.json["body"],
            format!("{{\"n\":{i}}}"),
            "the body is replayed whole"
        );
    }
    assert_eq!(
        served_by.len(),
        2,
        "both live instances share the load: {served_by:?}"
    );
}

#[tokio::test]
async fn all_instances_dead_is_a_502_naming_the_cause() {
    let registry = FakeRegistry::start().await;
    registry.set(
        USERS,
        vec![
            instance(USERS, dead_addr().await),
            instance(USERS, dead_addr().await),
        ],
    );
    let gw = gateway(&registry.url);

    let reply = get_json(&gw, "/users/1").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.headers["x-breakwater-error"], "connect");
    assert!(
        reply.json["error"]
            .as_str()
            .unwrap()
            .starts_with("Bad gateway: "),
        "{}",
        reply.json
    );
}

#[tokio::test]
async fn no_instance_is_a_503_with_retry_after() {
    let registry = FakeRegistry::start().await;
    registry.set(ORDERS, vec![]);
    let gw = gateway(&registry.url);

    let reply = call(
        &gw,
        Request::post("/orders").body(Body::from("{}")).unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(reply.headers["x-breakwater-error"], "no-instance");
    assert_eq!(
        reply.json,
        serde_json::json!({"error": "No instance of order-service available"})
    );
}

#[tokio::test]
async fn an_unreachable_registry_is_a_503_too() {
    let gw = gateway(&format!("http://{}", dead_addr().await));
    let reply = get_json(&gw, "/users/1").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(reply.headers["x-breakwater-error"], "registry-unreachable");
}

#[tokio::test]
async fn a_stalled_upstream_is_a_504_after_the_try_timeout() {
    let registry = FakeRegistry::start().await;
    let stalled = stalled_upstream().await;
    registry.set(USERS, vec![instance(USERS, stalled.addr)]);
    let gw = breakwater_gateway::app(gateway_state(&registry.url, Duration::from_millis(200)));

    let started = tokio::time::Instant::now();
    let reply = get_json(&gw, "/users/1").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.headers["x-breakwater-error"], "timeout");
    assert_eq!(
        reply.json,
        serde_json::json!({"error": "Upstream timed out"})
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_get_fails_over_from_a_stalled_instance_but_a_post_is_not_replayed() {
    let registry = FakeRegistry::start().await;
    let stalled = stalled_upstream().await;
    let live = echo_service("users-live").await;
    // A round-robin cursor starts at the first instance: the stalled one.
    registry.set(
        USERS,
        vec![instance(USERS, stalled.addr), instance(USERS, live.addr)],
    );

    let gw = breakwater_gateway::app(gateway_state(&registry.url, Duration::from_millis(200)));
    let reply = get_json(&gw, "/users/1").await;
    assert_eq!(
        (reply.status, &reply.json["instance"]),
        (StatusCode::OK, &"users-live".into())
    );

    let gw = breakwater_gateway::app(gateway_state_with(
        &registry.url,
        &users_route(
            "[routes.policy]\nbalance = \"round-robin\"\n[routes.policy.timeout]\nper_try = \"200ms\"",
        ),
    ));
    let reply = call(&gw, Request::post("/users").body(Body::from("{}")).unwrap()).await;
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "the stalled instance may have acted on it"
    );
}

#[tokio::test]
async fn a_hang_up_before_the_answer_fails_over_only_idempotent_requests() {
    let registry = FakeRegistry::start().await;
    let rude = hanging_up_upstream().await;
    let live = echo_service("users-live").await;
    registry.set(
        USERS,
        vec![instance(USERS, rude.addr), instance(USERS, live.addr)],
    );

    let gw = gateway(&registry.url);
    let reply = call(
        &gw,
        Request::put("/users/1").body(Body::from("{}")).unwrap(),
    )
    .await;
    assert_eq!(
        (reply.status, &reply.json["instance"]),
        (StatusCode::OK, &"users-live".into())
    );

    let gw = breakwater_gateway::app(gateway_state_with(
        &registry.url,
        &users_route("[routes.policy]\nbalance = \"round-robin\""),
    ));
    let reply = call(&gw, Request::post("/users").body(Body::from("{}")).unwrap()).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text);
    assert_eq!(reply.headers["x-breakwater-error"], "protocol");
}

#[tokio::test]
async fn bodies_over_the_replay_limit_stream_through_and_are_not_replayed() {
    let registry = FakeRegistry::start().await;
    let echo = echo_service("users-a").await;
    registry.set(USERS, vec![instance(USERS, echo.addr)]);
    let gw = gateway(&registry.url);

    let limit = breakwater_gateway::forward::REPLAY_LIMIT;
    // A declared length past the limit, and one well past the old 1 MiB cap.
    let big = 2 << 20;
    let reply = call(
        &gw,
        Request::put("/users/1")
            .header("content-length", big.to_string())
            .body(Body::from(vec![b'x'; big]))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["body"].as_str().unwrap().len(), big);

    // Without a declared length the gateway reads past the limit, then streams the rest.
    let reply = call(
        &gw,
        Request::post("/users")
            .body(futures_chunks(limit * 3 + 7))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.json["body"].as_str().unwrap().len(), limit * 3 + 7);

    let reply = call(
        &gw,
        Request::post("/users")
            .body(Body::from(vec![b'x'; limit]))
            .unwrap(),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "exactly the limit is kept"
    );
    assert_eq!(reply.json["body"].as_str().unwrap().len(), limit);
}

#[tokio::test]
async fn a_streamed_body_gets_one_try_even_on_a_connect_error() {
    let registry = FakeRegistry::start().await;
    let dead = dead_addr().await;
    let live = echo_service("users-live").await;
    registry.set(
        USERS,
        vec![instance(USERS, dead), instance(USERS, live.addr)],
    );
    let gw = breakwater_gateway::app(gateway_state_with(
        &registry.url,
        &users_route("[routes.policy]\nbalance = \"round-robin\""),
    ));
    let big = breakwater_gateway::forward::REPLAY_LIMIT + 1;
    let reply = call(
        &gw,
        Request::put("/users/1")
            .header("content-length", big.to_string())
            .body(Body::from(vec![b'x'; big]))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text);
    assert_eq!(reply.headers["x-breakwater-error"], "connect");
    // A kept body moves on from the same dead instance.
    let reply = call(
        &gw,
        Request::put("/users/1").body(Body::from("{}")).unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
}

#[tokio::test]
async fn the_response_body_is_streamed_not_buffered() {
    let registry = FakeRegistry::start().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let rx = std::sync::Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let upstream = spawn(axum::Router::new().fallback(move || {
        let rx = rx.clone();
        async move { Body::new(Chunks(rx.lock().await.take().unwrap())) }
    }))
    .await;
    registry.set(USERS, vec![instance(USERS, upstream.addr)]);
    let gw = gateway(&registry.url);

    tx.send(axum::body::Bytes::from_static(b"first"))
        .await
        .unwrap();
    let limit = Duration::from_secs(2);
    let res = tokio::time::timeout(
        limit,
        gw.oneshot(Request::get("/users/1").body(Body::empty()).unwrap()),
    )
    .await
    .expect("the head arrives while the upstream is still sending")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let frame = tokio::time::timeout(limit, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "first");

    tx.send(axum::body::Bytes::from_static(b"second"))
        .await
        .unwrap();
    drop(tx);
    let rest = tokio::time::timeout(limit, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "second");
}

/// A body of `len` bytes in 64 KiB chunks with no size hint, as a chunked upload is.
fn futures_chunks(len: usize) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut left = len;
        while left > 0 {
            let n = left.min(64 << 10);
            if tx
                .send(axum::body::Bytes::from(vec![b'y'; n]))
                .await
                .is_err()
            {
                break;
            }
            left -= n;
        }
    });
    Body::new(Chunks(rx))
}

struct Chunks(tokio::sync::mpsc::Receiver<axum::body::Bytes>);

impl hyper::body::Body for Chunks {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(hyper::body::Frame::data(bytes))))
    }
}

#[tokio::test]
async fn dot_segments_and_unknown_paths_are_refused() {
    let registry = FakeRegistry::start().await;
    let gw = gateway(&registry.url);
    let reply = get_json(&gw, "/users/../admin").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.headers["x-breakwater-error"], "bad-request");

    let reply = get_json(&gw, "/admin").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.headers["x-breakwater-error"], "no-route");
    assert!(reply.json["error"].as_str().unwrap().contains("/admin"));
}
