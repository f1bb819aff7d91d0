//! The gateway's own endpoints: composed data (live and fallback), health, dashboard,
//! CORS.

mod fixture;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fixture::*;
use serde_json::{Value, json};

const USERS: &str = "user-service";
const ORDERS: &str = "order-service";

fn keys(v: &Value) -> Vec<&str> {
    let Some(object) = v.as_object() else {
        panic!("not an object: {v}")
    };
    let mut k: Vec<&str> = object.keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

fn assert_timestamp(v: &Value) {
    let Some(s) = v.as_str() else {
        panic!("not a string: {v}")
    };
    assert!(
        s.len() == 24 && s.ends_with('Z') && s.as_bytes()[10] == b'T',
        "{s}"
    );
}

/// A registry listing one users and one orders instance, both alive.
async fn live_system() -> (FakeRegistry, Spawned, Spawned) {
    let registry = FakeRegistry::start().await;
    let users = users_service("users-a").await;
    let orders = orders_service("orders-a").await;
    registry.set(USERS, vec![instance(USERS, users.addr)]);
    registry.set(ORDERS, vec![instance(ORDERS, orders.addr)]);
    (registry, users, orders)
}

#[tokio::test]
async fn users_has_the_contract_shape() {
    let (registry, _u, _o) = live_system().await;
    let reply = get_json(&gateway(&registry.url), "/users").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(keys(&reply.json), ["meta", "users"]);
    assert_eq!(reply.json["users"], seed_users());
    let meta = &reply.json["meta"];
    assert_eq!(keys(meta), ["instance", "source", "timestamp"]);
    assert_eq!(meta["source"], "service-discovery");
    assert_eq!(meta["instance"], "api-gateway-8000");
    assert_timestamp(&meta["timestamp"]);
}

#[tokio::test]
async fn user_orders_has_the_contract_shape() {
    let (registry, _u, _o) = live_system().await;
    let reply = get_json(&gateway(&registry.url), "/orders/user/1").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(keys(&reply.json), ["meta", "orders"]);
    assert_eq!(
        reply.json["orders"],
        json!([
            {"id": 1, "userId": 1, "products": ["Laptop"]},
            {"id": 2, "userId": 1, "products": ["Mouse"]},
        ])
    );
    let meta = &reply.json["meta"];
    assert_eq!(keys(meta), ["instance", "source", "timestamp", "userId"]);
    assert_eq!(meta["userId"], 1);
    assert_eq!(meta["source"], "service-discovery");
}

#[tokio::test]
async fn a_non_integer_user_id_is_a_400() {
    let (registry, _u, _o) = live_system().await;
    let gw = gateway(&registry.url);
    for bad in ["abc", "1.5", "1e3", "99999999999999999999"] {
        let reply = get_json(&gw, &format!("/orders/user/{bad}")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(reply.json, json!({"error": "Invalid user ID"}));
    }
}

#[tokio::test]
async fn users_with_orders_joins_every_user_with_their_orders() {
    let (registry, _u, _o) = live_system().await;
    let reply = get_json(&gateway(&registry.url), "/users-with-orders").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(keys(&reply.json), ["meta", "users"]);
    let users = reply.json["users"].as_array().unwrap();
    assert_eq!(users.len(), 3);
    assert_eq!(users[0]["name"], "John Doe");
    assert_eq!(users[0]["email"], "john@example.com");
    assert_eq!(users[0]["age"], 30);
    assert_eq!(
        users[0]["orders"],
        json!([
            {"id": 1, "userId": 1, "products": ["Laptop"]},
            {"id": 2, "userId": 1, "products": ["Mouse"]},
        ])
    );
    assert_eq!(
        users[2]["orders"],
        json!([{"id": 5, "userId": 3, "products": ["Headphones"]}])
    );
    let meta = &reply.json["meta"];
    assert_eq!(
        keys(meta),
        [
            "instance",
            "source",
            "timestamp",
            "totalOrders",
            "totalUsers"
        ]
    );
    assert_eq!(
        (meta["totalUsers"].as_u64(), meta["totalOrders"].as_u64()),
        (Some(3), Some(5))
    );
    assert_eq!(meta["source"], "service-discovery");
}

#[tokio::test]
async fn no_instance_means_seed_fallback_data() {
    let registry = FakeRegistry::start().await;
    registry.set(USERS, vec![]);
    registry.set(ORDERS, vec![]);
    let gw = gateway(&registry.url);

    let reply = get_json(&gw, "/users").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json["users"],
        json!([
            {"id": 1, "name": "Fallback User", "email": "fallback@example.com", "age": 25},
            {"id": 2, "name": "Default User", "email": "default@example.com", "age": 30},
        ])
    );
    assert!(
        reply.json["meta"]["source"]
            .as_str()
            .unwrap()
            .contains("fallback")
    );
    assert_eq!(reply.json["meta"]["fallbackReason"], "no-instance");

    let reply = get_json(&gw, "/orders/user/2").await;
    assert_eq!(
        reply.json["orders"],
        json!([{"id": 2, "userId": 2, "products": ["Fallback Product"]}])
    );
    assert!(
        reply.json["meta"]["source"]
            .as_str()
            .unwrap()
            .contains("fallback")
    );
    assert_eq!(reply.json["meta"]["userId"], 2);
    let reply = get_json(&gw, "/orders/user/3").await;
    assert_eq!(reply.json["orders"], json!([]));

    let reply = get_json(&gw, "/users-with-orders").await;
    let users = reply.json["users"].as_array().unwrap();
    assert_eq!(users.len(), 2);
    assert_eq!(
        users[0]["orders"],
        json!([{"id": 1, "userId": 1, "products": ["Fallback Product"]}])
    );
    assert_eq!(reply.json["meta"]["totalOrders"], 2);
    assert!(
        reply.json["meta"]["source"]
            .as_str()
            .unwrap()
            .contains("fallback")
    );
}

#[tokio::test]
async fn every_instance_down_means_fallback_data() {
    let registry = FakeRegistry::start().await;
    registry.set(
        USERS,
        vec![
            instance(USERS, dead_addr().await),
            instance(USERS, dead_addr().await),
        ],
    );
    let gw = gateway(&registry.url);
    let reply = get_json(&gw, "/users").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["meta"]["source"], "fallback");
    assert_eq!(reply.json["meta"]["fallbackReason"], "connect");
    assert_eq!(reply.json["users"][0]["name"], "Fallback User");
}

#[tokio::test]
async fn a_5xx_means_fallback_data() {
    let registry = FakeRegistry::start().await;
    let broken = failing_service().await;
    registry.set(ORDERS, vec![instance(ORDERS, broken.addr)]);
    let reply = get_json(&gateway(&registry.url), "/orders/user/1").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["meta"]["source"], "fallback");
    assert_eq!(reply.json["meta"]["fallbackReason"], "upstream-status");
    assert_eq!(
        reply.json["orders"],
        json!([{"id": 1, "userId": 1, "products": ["Fallback Product"]}])
    );
}

#[tokio::test]
async fn live_users_with_orders_down_are_a_partial_fallback() {
    let registry = FakeRegistry::start().await;
    let users = users_service("users-a").await;
    registry.set(USERS, vec![instance(USERS, users.addr)]);
    registry.set(ORDERS, vec![instance(ORDERS, dead_addr().await)]);
    let reply = get_json(&gateway(&registry.url), "/users-with-orders").await;
    assert_eq!(reply.status, StatusCode::OK);
    let users = reply.json["users"].as_array().unwrap();
    assert_eq!(users[0]["name"], "John Doe", "users are live");
    assert_eq!(
        users[0]["orders"][0]["products"],
        json!(["Fallback Product"])
    );
    assert_eq!(users[2]["orders"], json!([]));
    let source = reply.json["meta"]["source"].as_str().unwrap();
    assert!(
        source.contains("fallback") && source.contains("service-discovery"),
        "{source}"
    );
}

#[tokio::test]
async fn health_reports_discovery_and_cache() {
    let (registry, _u, _o) = live_system().await;
    let gw = gateway(&registry.url);
    let _ = get_json(&gw, "/users").await;

    let reply = get_json(&gw, "/health").await;
    assert_eq!(reply.status, StatusCode::OK);
    let h = &reply.json;
    assert_eq!(
        keys(h),
        [
            "cache",
            "instance",
            "port",
            "service",
            "serviceDiscovery",
            "status",
            "timestamp"
        ]
    );
    assert_eq!(h["service"], "api-gateway");
    assert_eq!(h["instance"], "api-gateway-8000");
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["port"], 8000);
    assert_timestamp(&h["timestamp"]);
    assert_eq!(
        h["serviceDiscovery"],
        json!({"status": "connected", "server": registry.url})
    );
    let cached = &h["cache"]["user-service"];
    assert_eq!(keys(cached), ["cached", "services", "ttl"]);
    assert_eq!(
        (cached["cached"].as_bool(), cached["services"].as_u64()),
        (Some(true), Some(1))
    );
}

#[tokio::test]
async fn health_says_disconnected_when_the_registry_is_down() {
    let gw = gateway(&format!("http://{}", dead_addr().await));
    let _ = get_json(&gw, "/users").await;
    let reply = get_json(&gw, "/health").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["serviceDiscovery"]["status"], "disconnected");
}

#[tokio::test]
async fn composed_routes_allow_cross_origin_calls() {
    let (registry, _u, _o) = live_system().await;
    let gw = gateway(&registry.url);
    for path in ["/users", "/health", "/users-with-orders", "/orders/user/1"] {
        let reply = call(
            &gw,
            Request::get(path)
                .header("origin", "http://elsewhere.test")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(reply.headers["access-control-allow-origin"], "*", "{path}");
    }
    let preflight = Request::options("/users")
        .header("origin", "http://elsewhere.test")
        .header("access-control-request-method", "GET")
        .body(Body::empty())
        .unwrap();
    let reply = call(&gw, preflight).await;
    assert!(reply.status.is_success(), "{}", reply.status);
    assert!(reply.headers.contains_key("access-control-allow-methods"));
}

#[tokio::test]
async fn the_dashboard_is_a_self_contained_page() {
    let registry = FakeRegistry::start().await;
    let reply = get_json(&gateway(&registry.url), "/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    for id in [
        "id=\"users\"",
        "id=\"orders\"",
        "id=\"users-with-orders\"",
        "id=\"health\"",
        "id=\"refresh-slider\"",
    ] {
        assert!(reply.text.contains(id), "{id}");
    }
    assert!(reply.text.contains(&format!("href=\"{}/\"", registry.url)));
    assert!(reply.text.contains("target=\"_blank\""));

    let reply = call(
        &gateway(&registry.url),
        Request::post("/").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(reply.json["error"].is_string());
}

/// A users service that answers `/users` with one user and keeps the `traceparent` and
/// `x-request-id` of every request it gets.
async fn recording_users() -> (
    Spawned,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    let router = axum::Router::new().route(
        "/users",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let log = std::sync::Arc::clone(&log);
            async move {
                let text = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                log.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((text("traceparent"), text("x-request-id")));
                axum::Json(json!({"users": [{"id": 7, "name": "T", "email": "t@x", "age": 1}]}))
            }
        }),
    );
    (spawn(router).await, seen)
}

#[tokio::test]
async fn composed_calls_continue_the_callers_trace_in_the_gateways_own_span() {
    let registry = FakeRegistry::start().await;
    let (users, seen) = recording_users().await;
    registry.set(USERS, vec![instance(USERS, users.addr)]);
    let gw = gateway(&registry.url);

    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let reply = call(
        &gw,
        Request::get("/users")
            .header("traceparent", caller)
            .header("x-request-id", "req-composed-1")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
    assert_eq!(reply.json["users"][0]["id"], 7);

    // No caller trace: the gateway starts a new sampled one.
    let fresh = get_json(&gw, "/users").await;
    assert_eq!(fresh.status, StatusCode::OK);

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let parts = |v: &str| v.split('-').map(str::to_owned).collect::<Vec<_>>();
    let first = parts(&seen[0].0);
    assert_eq!(first.len(), 4, "{seen:?}");
    assert_eq!(first[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(
        first[2], "00f067aa0ba902b7",
        "the gateway's own span is the parent"
    );
    assert_eq!(first[3], "01");
    assert_eq!(seen[0].1, "req-composed-1");
    let second = parts(&seen[1].0);
    assert_eq!(second.len(), 4, "{seen:?}");
    assert_ne!(second[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(second[3], "01");
}
