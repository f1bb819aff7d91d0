//! Handler tests through `oneshot`, and the reaper under paused time.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The app as a dual-stack server would see an IPv4 client.
fn router(state: &RegistryState) -> Router {
    let peer: SocketAddr = "[::ffff:10.0.0.5]:51234".parse().unwrap();
    app(state.clone()).layer(MockConnectInfo(peer))
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
    raw(state, req.body(body).unwrap()).await
}

async fn raw(state: &RegistryState, req: Request<Body>) -> (StatusCode, Value) {
    let res = router(state).oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

async fn post(state: &RegistryState, path: &str, body: Value) -> (StatusCode, Value) {
    send(state, "POST", path, Some(body)).await
}

async fn get(state: &RegistryState, path: &str) -> (StatusCode, Value) {
    send(state, "GET", path, None).await
}

#[tokio::test]
async fn register_defaults_host_to_the_normalised_caller_and_interval_to_30() {
    let state = RegistryState::new();
    let before = now_millis();
    let (status, body) = post(
        &state,
        "/register",
        json!({"name": "user-service", "port": 4000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], "user-service-10.0.0.5-4000");
    assert_eq!(body["heartbeatInterval"], 30);
    assert!(body["registeredAt"].as_u64().unwrap() >= before);

    let (status, body) = get(&state, "/services/user-service").await;
    assert_eq!(status, StatusCode::OK);
    let list = body["services"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    let i = &list[0];
    assert_eq!(i["id"], "user-service-10.0.0.5-4000");
    assert_eq!(i["name"], "user-service");
    assert_eq!(i["host"], "10.0.0.5");
    assert_eq!(i["port"], 4000);
    assert_eq!(i["heartbeatInterval"], 30);
    assert_eq!(i["status"], "healthy");
    assert_eq!(i["registeredAt"], i["lastHeartbeat"]);
    assert_eq!(i["metadata"], json!({}));
}

#[tokio::test]
async fn register_with_explicit_host_interval_and_metadata() {
    let state = RegistryState::new();
    let body = json!({
        "name": "order-service", "port": 5001, "host": "::ffff:127.0.0.1",
        "heartbeatInterval": 5, "metadata": {"version": "1.2"}
    });
    let (status, res) = post(&state, "/register", body).await;
    assert_eq!(status, StatusCode::OK, "{res}");
    assert_eq!(res["id"], "order-service-127.0.0.1-5001");
    assert_eq!(res["heartbeatInterval"], 5);
    let (_, all) = get(&state, "/services").await;
    assert_eq!(all.as_object().unwrap().len(), 1);
    assert_eq!(all["order-service"][0]["host"], "127.0.0.1");
    assert_eq!(all["order-service"][0]["metadata"]["version"], "1.2");
}

#[tokio::test]
async fn unknown_service_lists_empty_and_all_services_starts_empty() {
    let state = RegistryState::new();
    assert_eq!(
        get(&state, "/services/nobody").await,
        (StatusCode::OK, json!({"services": []}))
    );
    assert_eq!(get(&state, "/services").await, (StatusCode::OK, json!({})));
}

#[tokio::test]
async fn heartbeat_renews_and_registers_unknown_instances() {
    let state = RegistryState::new();
    // Unknown: registered by the heartbeat (a restarted registry fills back up).
    let (status, hb) = post(
        &state,
        "/heartbeat",
        json!({"name": "svc", "port": 4000, "heartbeatInterval": 7}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{hb}");
    assert_eq!(hb["ok"], true);
    assert_eq!(hb["nextHeartbeatIn"], 7);
    assert!(hb["lastHeartbeat"].as_u64().unwrap() > 0);
    let (_, list) = get(&state, "/services/svc").await;
    let registered_at = list["services"][0]["registeredAt"].clone();
    assert_eq!(list["services"][0]["heartbeatInterval"], 7);

    let (status, hb) = post(&state, "/heartbeat", json!({"name": "svc", "port": 4000})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(hb["nextHeartbeatIn"], 7, "interval kept when omitted");
    let (_, list) = get(&state, "/services/svc").await;
    assert_eq!(list["services"][0]["registeredAt"], registered_at);
    assert_eq!(state.store().as_memory().unwrap().len(), 1);
}

#[tokio::test]
async fn register_and_heartbeat_validate_their_bodies() {
    let state = RegistryState::new();
    for path in ["/register", "/heartbeat"] {
        for (body, status, message) in [
            (json!({}), 400, "Name and port are required"),
            (json!({"name": "svc"}), 400, "Name and port are required"),
            (json!({"port": 4000}), 400, "Name and port are required"),
            (
                json!({"name": "Bad_Name", "port": 4000}),
                400,
                "Invalid name",
            ),
            (
                json!({"name": "x".repeat(64), "port": 4000}),
                400,
                "Invalid name",
            ),
            (json!({"name": "svc", "port": 0}), 400, "Invalid port"),
            (json!({"name": "svc", "port": -5}), 400, "Invalid port"),
            (json!({"name": "svc", "port": 65536}), 400, "Invalid port"),
            (json!({"name": "svc", "port": "4000"}), 400, "Invalid port"),
            (
                json!({"name": "svc", "port": 1, "heartbeatInterval": 0}),
                400,
                "Invalid heartbeatInterval",
            ),
            (
                json!({"name": "svc", "port": 1, "heartbeatInterval": 3601}),
                400,
                "Invalid heartbeatInterval",
            ),
            (
                json!({"name": "svc", "port": 1, "host": "no spaces"}),
                400,
                "Invalid host",
            ),
            (
                json!({"name": "svc", "port": 1, "metadata": "x"}),
                400,
                "Invalid metadata",
            ),
            (json!([1, 2]), 400, "Invalid JSON body"),
        ] {
            let (got, res) = post(&state, path, body.clone()).await;
            assert_eq!(got.as_u16(), status, "{path} {body}: {res}");
            let err = res["error"].as_str().unwrap();
            assert!(err.starts_with(message), "{path} {body}: {err}");
        }
    }
    let malformed = Request::post("/register")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"name\":"))
        .unwrap();
    let (status, res) = raw(&state, malformed).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        res["error"].as_str().unwrap().starts_with("Malformed JSON"),
        "{res}"
    );
    let untyped = Request::post("/register").body(Body::from("{}")).unwrap();
    let (status, res) = raw(&state, untyped).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(res["error"].is_string());
    assert!(
        state.store().as_memory().unwrap().is_empty(),
        "a rejected request stores nothing"
    );
}

#[tokio::test]
async fn port_bounds_are_inclusive() {
    let state = RegistryState::new();
    for port in [1, 65535] {
        let (status, res) = post(
            &state,
            "/register",
            json!({"name": "svc", "port": port, "host": "h"}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{res}");
    }
    let (status, _) = post(
        &state,
        "/register",
        json!({"name": "a".repeat(63), "port": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn delete_removes_and_names_what_was_not_found() {
    let state = RegistryState::new();
    for host in ["10.0.0.1", "10.0.0.2"] {
        let (status, _) = post(
            &state,
            "/register",
            json!({"name": "svc", "port": 4000, "host": host}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _) = post(
        &state,
        "/register",
        json!({"name": "svc", "port": 4001, "host": "10.0.0.1"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let not_found = |msg: &str| (StatusCode::NOT_FOUND, json!({"error": msg}));
    assert_eq!(
        send(&state, "DELETE", "/services/other/4000", None).await,
        not_found("Service not found")
    );
    assert_eq!(
        send(&state, "DELETE", "/services/svc/4999", None).await,
        not_found("Service instance not found")
    );
    assert_eq!(
        send(&state, "DELETE", "/services/svc/4000?host=10.0.0.9", None).await,
        not_found("Service instance not found")
    );
    let (status, res) = send(&state, "DELETE", "/services/svc/notaport", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        res["error"].as_str().unwrap().starts_with("Invalid port"),
        "{res}"
    );
    let (status, _) = send(&state, "DELETE", "/services/svc/0", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let ok = (
        StatusCode::OK,
        json!({"message": "Service removed successfully"}),
    );
    assert_eq!(
        send(
            &state,
            "DELETE",
            "/services/svc/4000?host=::ffff:10.0.0.2",
            None
        )
        .await,
        ok
    );
    let (_, list) = get(&state, "/services/svc").await;
    assert_eq!(list["services"].as_array().unwrap().len(), 2);
    assert_eq!(send(&state, "DELETE", "/services/svc/4000", None).await, ok);
    assert_eq!(
        send(&state, "DELETE", "/services/svc/4001?host=", None).await,
        ok
    );
    assert_eq!(get(&state, "/services").await, (StatusCode::OK, json!({})));
    assert_eq!(
        send(&state, "DELETE", "/services/svc/4001", None).await,
        not_found("Service not found")
    );
    assert!(state.store().as_memory().unwrap().is_empty());
}

#[tokio::test]
async fn health_counts_services_and_instances() {
    let state = RegistryState::new();
    for (name, port) in [("a", 1), ("a", 2), ("b", 1)] {
        post(&state, "/register", json!({"name": name, "port": port})).await;
    }
    let (status, h) = get(&state, "/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["service"], "service-registry");
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["services"], 2);
    assert_eq!(h["instances"], 3);
    assert!(h["uptimeSeconds"].is_u64());
    assert!(h["timestamp"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn dashboard_is_escaped_html() {
    let state = RegistryState::new();
    post(
        &state,
        "/register",
        json!({"name": "svc", "port": 1, "metadata": {"x": "<b>&"}}),
    )
    .await;
    let res = router(&state)
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let ctype = res.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(ctype.starts_with("text/html"), "{ctype}");
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    let html = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(html.contains("svc-10.0.0.5-1"), "{html}");
    assert!(html.contains("&lt;b&gt;&amp;"), "{html}");
    assert!(!html.contains("<b>"));
}

#[tokio::test]
async fn unknown_paths_and_methods_are_json_errors() {
    let state = RegistryState::new();
    let (status, res) = get(&state, "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(res["error"].is_string());
    let (status, res) = send(&state, "GET", "/register", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(res["error"].is_string());
}

/// Lets the reaper run after the clock moved, without moving it further.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn instance_expires_at_exactly_one_and_a_half_intervals_and_is_reaped() {
    let state = RegistryState::new();
    let stop = CancellationToken::new();
    let reaper = tokio::spawn(reap(state.clone(), stop.clone()));
    let (status, _) = post(
        &state,
        "/register",
        json!({"name": "svc", "port": 1, "heartbeatInterval": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    tokio::time::sleep(ms(2999)).await;
    let (_, list) = get(&state, "/services/svc").await;
    assert_eq!(
        list["services"].as_array().unwrap().len(),
        1,
        "alive at 2.999 s"
    );

    tokio::time::sleep(ms(2)).await;
    settle().await;
    // No read since 2.999 s: only the reaper can have removed it.
    assert_eq!(
        state.store().as_memory().unwrap().len(),
        0,
        "reaped at 3.001 s"
    );
    assert_eq!(get(&state, "/services").await.1, json!({}));
    assert_eq!(
        get(&state, "/services/svc").await.1,
        json!({"services": []})
    );
    assert_eq!(get(&state, "/health").await.1["instances"], 0);

    stop.cancel();
    reaper.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn reads_never_return_an_expired_instance_even_before_the_reaper_runs() {
    // No reaper at all: filtering at read time alone hides the instance.
    let state = RegistryState::new();
    post(
        &state,
        "/register",
        json!({"name": "svc", "port": 1, "heartbeatInterval": 2}),
    )
    .await;
    tokio::time::sleep(ms(3000)).await;
    assert_eq!(
        get(&state, "/services/svc").await.1["services"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    tokio::time::sleep(ms(1)).await;
    assert_eq!(
        get(&state, "/services/svc").await.1,
        json!({"services": []})
    );
    assert_eq!(get(&state, "/services").await.1, json!({}));
    assert_eq!(
        state.store().as_memory().unwrap().len(),
        1,
        "reads do not remove"
    );
}

#[tokio::test(start_paused = true)]
async fn heartbeat_extends_life() {
    let state = RegistryState::new();
    let stop = CancellationToken::new();
    let reaper = tokio::spawn(reap(state.clone(), stop.clone()));
    post(
        &state,
        "/register",
        json!({"name": "svc", "port": 1, "heartbeatInterval": 2}),
    )
    .await;
    tokio::time::sleep(ms(2000)).await;
    let (status, _) = post(&state, "/heartbeat", json!({"name": "svc", "port": 1})).await;
    assert_eq!(status, StatusCode::OK);

    // Past the first deadline (3 s) but within the renewed one (2 s + 3 s).
    tokio::time::sleep(ms(2999)).await;
    settle().await;
    assert_eq!(state.store().as_memory().unwrap().len(), 1);
    assert_eq!(
        get(&state, "/services/svc").await.1["services"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    tokio::time::sleep(ms(2)).await;
    settle().await;
    assert_eq!(state.store().as_memory().unwrap().len(), 0);
    stop.cancel();
    reaper.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_sooner_deadline_wakes_the_reaper() {
    let state = RegistryState::new();
    let stop = CancellationToken::new();
    let reaper = tokio::spawn(reap(state.clone(), stop.clone()));
    post(
        &state,
        "/register",
        json!({"name": "slow", "port": 1, "heartbeatInterval": 60}),
    )
    .await;
    settle().await; // the reaper is now asleep until 90 s
    post(
        &state,
        "/register",
        json!({"name": "fast", "port": 1, "heartbeatInterval": 1}),
    )
    .await;
    tokio::time::sleep(ms(1501)).await;
    settle().await;
    assert_eq!(state.store().as_memory().unwrap().len(), 1);
    assert_eq!(
        state
            .store()
            .as_memory()
            .unwrap()
            .list("slow", Instant::now())
            .len(),
        1
    );
    stop.cancel();
    reaper.await.unwrap();
}

#[tokio::test]
async fn the_observed_app_answers_metrics_and_request_ids() {
    let state = RegistryState::new();
    let metrics = Arc::new(HttpMetrics::new());
    let router = observed_app(state, "registry-3000".into(), metrics.clone());
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let router = router.layer(MockConnectInfo(peer));
    let req = Request::builder()
        .uri("/services/users")
        .header("x-request-id", "r-1")
        .body(Body::empty())
        .unwrap();
    let res = router.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-request-id"], "r-1");
    assert_eq!(metrics.requests("GET", "/services/{name}", 200), 1);

    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .unwrap();
    let res = router.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let page = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    let page = String::from_utf8(page.to_vec()).unwrap();
    assert!(
        page.contains(
            r#"http_requests_total{method="GET",route="/services/{name}",status="200"} 1"#
        ),
        "{page}"
    );
}

/// A watch call: status, body and the `X-Registry-Index` it answered with.
async fn watch(state: &RegistryState, uri: &str) -> (StatusCode, Value, Option<u64>) {
    let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
    let res = router(state).oneshot(req).await.unwrap();
    let status = res.status();
    let index = res
        .headers()
        .get("x-registry-index")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap(), index)
}

fn count(list: &Value) -> usize {
    list["services"].as_array().unwrap().len()
}

#[tokio::test(start_paused = true)]
async fn a_watch_wakes_on_registration_and_on_expiry() {
    let state = RegistryState::new();
    let stop = CancellationToken::new();
    let reaper = tokio::spawn(reap(state.clone(), stop.clone()));

    // No index: at once, with the version (nothing happened yet).
    let (status, list, index) = watch(&state, "/services/svc/watch").await;
    assert_eq!((status, count(&list), index), (StatusCode::OK, 0, Some(0)));

    let started = Instant::now();
    let waiting = tokio::spawn({
        let state = state.clone();
        async move { watch(&state, "/services/svc/watch?index=0&timeout=60s").await }
    });
    tokio::time::sleep(ms(10_000)).await;
    assert!(!waiting.is_finished(), "nothing changed: still waiting");
    post(
        &state,
        "/register",
        json!({"name": "svc", "port": 1, "heartbeatInterval": 2}),
    )
    .await;
    let (status, list, index) = waiting.await.unwrap();
    assert_eq!((status, count(&list), index), (StatusCode::OK, 1, Some(1)));
    assert_eq!(started.elapsed(), ms(10_000), "woken by the registration");

    // A renewal is no change; the expiry is.
    let registered = Instant::now();
    let waiting = tokio::spawn({
        let state = state.clone();
        async move { watch(&state, "/services/svc/watch?index=1&timeout=60").await }
    });
    tokio::time::sleep(ms(1000)).await;
    post(&state, "/heartbeat", json!({"name": "svc", "port": 1})).await;
    let (status, list, index) = waiting.await.unwrap();
    assert_eq!((status, count(&list), index), (StatusCode::OK, 0, Some(2)));
    let woken = registered.elapsed();
    assert!(
        woken > ms(4000) && woken < ms(4100),
        "woken at the expiry (1 s + 3 s after the renewal), not the timeout: {woken:?}"
    );

    // Another service's change does not answer this watch.
    let other = tokio::spawn({
        let state = state.clone();
        async move { watch(&state, "/services/svc/watch?index=2&timeout=5s").await }
    });
    post(&state, "/register", json!({"name": "other", "port": 2})).await;
    let before = Instant::now();
    let (status, list, index) = other.await.unwrap();
    assert_eq!((status, count(&list), index), (StatusCode::OK, 0, Some(2)));
    assert!(before.elapsed() >= ms(4900), "answered at its timeout");

    stop.cancel();
    reaper.await.unwrap();
}

#[tokio::test]
async fn a_watch_answers_at_once_for_a_stale_index_and_checks_its_query() {
    let state = RegistryState::new();
    post(&state, "/register", json!({"name": "svc", "port": 1})).await;
    post(&state, "/register", json!({"name": "svc", "port": 2})).await;
    let (status, list, index) = watch(&state, "/services/svc/watch?index=1&timeout=60s").await;
    assert_eq!((status, count(&list), index), (StatusCode::OK, 2, Some(2)));
    let (status, _) = send(&state, "DELETE", "/services/svc/1", None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, list, index) = watch(&state, "/services/svc/watch?index=2").await;
    assert_eq!((count(&list), index), (1, Some(3)));

    for (query, error) in [
        ("index=x", "Invalid index"),
        ("index=-1", "Invalid index"),
        ("timeout=61s", "Invalid timeout"),
        ("timeout=soon", "Invalid timeout"),
    ] {
        let (status, body) = get(&state, &format!("/services/svc/watch?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert!(
            body["error"].as_str().unwrap().starts_with(error),
            "{query}: {body}"
        );
    }
    // The contract's routes beside it are unchanged.
    assert_eq!(count(&get(&state, "/services/svc").await.1), 1);
}
