//! The admin API: what it shows, who may use it, and its event stream.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failure should fail the test loudly"
)]

mod fixture;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use breakwater_gateway::{GatewayConfig, GatewayState, app};
use fixture::*;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

const USERS: &str = "user-service";

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

#[tokio::test]
async fn routes_lists_the_table_in_match_order_with_policies() {
    let registry = FakeRegistry::start().await;
    let gw = app(gateway_state(&registry.url, Duration::from_secs(3)));
    let reply = get_json(&gw, "/admin/routes").await;
    assert_eq!(reply.status, StatusCode::OK);
    let routes = reply.json["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 7);
    let prefixes: Vec<&str> = routes
        .iter()
        .map(|r| r["prefix"].as_str().unwrap())
        .collect();
    assert_eq!(
        prefixes,
        [
            "/api/external-data",
            "/api/metrics",
            "/stress-test",
            "/orders",
            "/users",
            "/data/",
            "/data"
        ],
        "longest prefix first, then file order"
    );
    let data = &routes[6];
    assert_eq!(
        keys(data),
        ["index", "methods", "policy", "prefix", "rewrite", "service"]
    );
    assert_eq!(
        (&data["service"], &data["rewrite"]),
        (&"data-service".into(), &"/".into())
    );
    let policy = &data["policy"];
    assert_eq!(
        keys(policy),
        [
            "balance",
            "breaker",
            "cache",
            "fallback",
            "outlier",
            "rate_limit",
            "retries",
            "timeout"
        ]
    );
    assert_eq!(policy["balance"], "p2c");
    assert_eq!(
        policy["timeout"]["per_try_ms"], 3000,
        "the --try-timeout override"
    );
    assert_eq!(policy["timeout"]["total_ms"], 15000);
    assert_eq!(policy["retries"]["max_attempts"], 3);
    assert_eq!(policy["breaker"]["open_for_ms"], 30000);
    assert_eq!(policy["outlier"]["max_ejection_percent"], 50);
    assert!(policy["rate_limit"].is_null() && policy["cache"].is_null());
}

#[tokio::test]
async fn services_show_instances_breaker_and_budget() {
    let registry = FakeRegistry::start().await;
    let echo = echo_service("users-a").await;
    let dead = dead_addr().await;
    registry.set(
        USERS,
        vec![instance(USERS, echo.addr), instance(USERS, dead)],
    );
    let gw = app(gateway_state(&registry.url, Duration::from_secs(2)));
    for i in 0..4 {
        assert_eq!(
            get_json(&gw, &format!("/users/{i}")).await.status,
            StatusCode::OK
        );
    }
    let reply = get_json(&gw, "/admin/services").await;
    assert_eq!(reply.status, StatusCode::OK);
    let services = reply.json["services"].as_array().unwrap();
    let users = services.iter().find(|s| s["service"] == USERS).unwrap();
    assert_eq!(
        keys(users),
        ["breaker", "instances", "retry_budget_remaining", "service"]
    );
    let instances = users["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2);
    assert_eq!(
        keys(&instances[0]),
        [
            "address",
            "consecutive_connect_failures",
            "consecutive_failures",
            "ejected_until_unix_ms",
            "ewma_ms",
            "id",
            "outstanding",
            "state",
            "times_ejected"
        ]
    );
    let live = instances
        .iter()
        .find(|i| i["address"] == echo.addr.to_string())
        .unwrap();
    assert_eq!(
        (&live["state"], &live["outstanding"]),
        (&"healthy".into(), &0.into())
    );
    assert!(live["ewma_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(users["breaker"]["state"], "CLOSED");
    assert!(users["breaker"]["last_transition"].is_null());
    assert!(users["retry_budget_remaining"].as_u64().unwrap() > 0);
}

fn locked_state(registry_url: &str, token: Option<&str>) -> GatewayState {
    let mut config = GatewayConfig::new(8000, registry_url);
    config.admin_token = token.map(str::to_owned);
    assert!(!config.listener_loopback);
    GatewayState::new(config).unwrap()
}

async fn admin_status(gw: &axum::Router, auth: Option<&str>) -> Reply {
    let mut req = Request::get("/admin/routes");
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    call(gw, req.body(Body::empty()).unwrap()).await
}

#[tokio::test]
async fn off_loopback_the_admin_api_needs_the_token_or_does_not_exist() {
    let registry = FakeRegistry::start().await;
    let gw = app(locked_state(&registry.url, None));
    let reply = admin_status(&gw, Some("Bearer anything")).await;
    assert_eq!(
        reply.status,
        StatusCode::NOT_FOUND,
        "no token configured: no admin API"
    );
    assert_eq!(reply.headers["x-breakwater-error"], "no-route");

    let gw = app(locked_state(&registry.url, Some("s3cret")));
    let reply = admin_status(&gw, None).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.headers["www-authenticate"], "Bearer");
    assert!(reply.json["error"].as_str().unwrap().contains("Bearer"));
    assert_eq!(
        admin_status(&gw, Some("Bearer wrong")).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        admin_status(&gw, Some("s3cret")).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        admin_status(&gw, Some("Bearer s3cret")).await.status,
        StatusCode::OK
    );
    // The rest of the gateway needs no token.
    assert_eq!(get_json(&gw, "/health").await.status, StatusCode::OK);

    // A token in the config file works too.
    let dir = TempDir::new("admin-token");
    let path = dir.0.join("breakwater.toml");
    std::fs::write(&path, "[admin]\ntoken = \"from-file\"\n").unwrap();
    let mut config = GatewayConfig::new(8000, &registry.url);
    config.config_path = Some(path);
    let gw = app(GatewayState::new(config).unwrap());
    assert_eq!(
        admin_status(&gw, Some("Bearer from-file")).await.status,
        StatusCode::OK
    );
}

/// The dashboard reads the event stream with `fetch`, so the stream takes the token the
/// way every other admin call does: in the `Authorization` header, never in the URL
/// (where access logs, history and `Referer` would keep it).
#[tokio::test]
async fn off_loopback_the_event_stream_takes_the_token_in_the_header_only() {
    let registry = FakeRegistry::start().await;
    let gw = app(locked_state(&registry.url, Some("s3cret")));
    let events = |uri: &str, auth: Option<&str>| {
        let mut req = Request::get(uri).header("accept", "text/event-stream");
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        gw.clone().oneshot(req.body(Body::empty()).unwrap())
    };
    for uri in [
        "/admin/events",
        "/admin/events?token=s3cret",
        "/admin/events?access_token=s3cret",
    ] {
        let res = events(uri, None).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(res.headers()["x-breakwater-error"], "unauthorized");
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
    }
    let res = events("/admin/events", Some("Bearer wrong")).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    let res = events("/admin/events", Some("Bearer s3cret"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
}

#[tokio::test]
async fn events_stream_reloads_and_ejections_as_server_sent_events() {
    let registry = FakeRegistry::start().await;
    let dead = dead_addr().await;
    let live = echo_service("users-a").await;
    registry.set(
        USERS,
        vec![instance(USERS, dead), instance(USERS, live.addr)],
    );
    let gw = app(gateway_state_with(
        &registry.url,
        &users_route("[routes.policy]\nbalance = \"round-robin\""),
    ));
    let res = gw
        .clone()
        .oneshot(Request::get("/admin/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );

    // Three connect failures in a row eject the dead instance.
    for i in 0..6 {
        assert_eq!(
            get_json(&gw, &format!("/users/{i}")).await.status,
            StatusCode::OK
        );
    }
    // No config file: a reload reads the embedded one.
    let reload = call(
        &gw,
        Request::post("/admin/reload").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(reload.status, StatusCode::OK, "{}", reload.text);
    assert_eq!(
        reload.json,
        serde_json::json!({"reloaded": true, "source": "embedded", "routes": 7})
    );

    let mut body = res.into_body();
    let mut seen = String::new();
    let read = async {
        while !(seen.contains("\"reload\"") && seen.contains("\"ejection\"")) {
            let frame = body.frame().await.unwrap().unwrap();
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or_else(|_| panic!("no reload and ejection events in: {seen}"));
    assert!(seen.contains("data: "), "{seen}");
    let dead_id = format!("{USERS}-{}-{}", dead.ip(), dead.port());
    assert!(seen.contains(&dead_id), "{seen}");

    let wrong = call(
        &gw,
        Request::get("/admin/reload").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
}
