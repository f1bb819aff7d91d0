//! The resilience engine over real sockets: ejection of a killed instance with no
//! failed request, per-try timeouts, the idempotency rules of retries, the breaker and
//! fallbacks, the decision trace, rate limits and the cache.

mod fixture;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use breakwater_gateway::app;
use fixture::*;
use serde_json::Value;

const USERS: &str = "user-service";
const ORDERS: &str = "order-service";

#[tokio::test]
async fn a_killed_instance_is_ejected_and_no_client_get_fails() {
    let registry = FakeRegistry::start().await;
    let a = echo_service("users-a").await;
    let b = echo_service("users-b").await;
    let c = echo_service("users-c").await;
    let killed_id = format!("{USERS}-{}-{}", c.addr.ip(), c.addr.port());
    registry.set(
        USERS,
        vec![
            instance(USERS, a.addr),
            instance(USERS, b.addr),
            instance(USERS, c.addr),
        ],
    );
    let gateway = serve_gateway(gateway_state_with(
        &registry.url,
        &users_route("[routes.policy.timeout]\nper_try = \"500ms\""),
    ))
    .await;
    let base = format!("http://{}", gateway.addr);
    let client = reqwest::Client::new();
    let failures = Arc::new(AtomicUsize::new(0));
    let served_by_c = Arc::new(AtomicUsize::new(0));
    let mut victim = Some(c);

    let mut tasks = Vec::new();
    for task in 0..4 {
        let (client, base, failures, served_by_c) = (
            client.clone(),
            base.clone(),
            failures.clone(),
            served_by_c.clone(),
        );
        let mut victim = if task == 0 { victim.take() } else { None };
        tasks.push(tokio::spawn(async move {
            for i in 0..150 {
                if i == 30 {
                    // Mid-load: the instance's listener and connections go away.
                    drop(victim.take());
                }
                let res = client.get(format!("{base}/users/{i}")).send().await;
                match res {
                    Ok(r) if r.status() == 200 => {
                        let body: Value = r.json().await.unwrap();
                        if body["instance"] == "users-c" && i > 40 && task == 0 {
                            served_by_c.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    other => {
                        eprintln!("task {task} request {i} failed: {other:?}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0, "every GET succeeded");
    assert_eq!(
        served_by_c.load(Ordering::SeqCst),
        0,
        "nothing came from the dead instance"
    );

    let services: Value = client
        .get(format!("{base}/admin/services"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let users = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == USERS)
        .unwrap();
    let killed = users["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == killed_id.as_str())
        .unwrap();
    assert_eq!(killed["state"], "ejected", "{killed}");
    assert!(
        killed["ejected_until_unix_ms"].as_u64().unwrap() > breakwater_runtime::clock::now_millis()
    );
    let healthy = users["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "healthy")
        .count();
    assert_eq!(healthy, 2);
}

#[tokio::test]
async fn a_stalled_instance_is_cut_by_the_per_try_timeout_and_another_answers() {
    let registry = FakeRegistry::start().await;
    let stalled = stalled_upstream().await;
    let live = echo_service("users-live").await;
    registry.set(
        USERS,
        vec![instance(USERS, stalled.addr), instance(USERS, live.addr)],
    );
    let gw = app(gateway_state_with(
        &registry.url,
        &users_route(
            "[routes.policy]\nbalance = \"round-robin\"\n[routes.policy.timeout]\nper_try = \"150ms\"",
        ),
    ));
    let stalled_id = format!("{USERS}-{}-{}", stalled.addr.ip(), stalled.addr.port());
    for i in 0..7 {
        let started = tokio::time::Instant::now();
        let reply = get_traced(&gw, &format!("/users/{i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        assert_eq!(reply.json["instance"], "users-live");
        let trace = trace_of(&reply);
        if i < 5 {
            // Round-robin moves one step per try, so each request starts at the stalled
            // instance until its fifth timeout in a row ejects it.
            assert!(
                trace.contains(&format!("try1={stalled_id} timeout")),
                "{trace}"
            );
            assert!(trace.contains(" 200 "), "{trace}");
            assert!(started.elapsed() >= Duration::from_millis(150));
            assert!(started.elapsed() < Duration::from_secs(1));
        } else {
            assert!(!trace.contains("try2="), "ejected, so not tried: {trace}");
        }
    }
}

#[tokio::test]
async fn a_post_is_retried_on_a_503_only_with_an_idempotency_key() {
    let registry = FakeRegistry::start().await;
    let (sick, hits) = counting_service("sick", StatusCode::SERVICE_UNAVAILABLE).await;
    let live = echo_service("users-live").await;
    registry.set(
        USERS,
        vec![instance(USERS, sick.addr), instance(USERS, live.addr)],
    );
    let config = users_route(
        "[routes.policy]\nbalance = \"round-robin\"\n[routes.policy.breaker]\nenabled = false",
    );

    // Each gateway's round-robin cursor starts at the sick instance.
    let gw = app(gateway_state_with(&registry.url, &config));
    let reply = call(&gw, Request::post("/users").body(Body::from("{}")).unwrap()).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "relayed, not retried"
    );
    assert_eq!(reply.json["instance"], "sick");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let gw = app(gateway_state_with(&registry.url, &config));
    let reply = call(
        &gw,
        Request::post("/users")
            .header("idempotency-key", "order-42")
            .body(Body::from("{\"n\":1}"))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(reply.json["instance"], "users-live");
    assert_eq!(reply.json["body"], "{\"n\":1}", "the kept body is replayed");
    assert_eq!(reply.json["headers"]["idempotency-key"], "order-42");
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // An idempotent method needs no key.
    let gw = app(gateway_state_with(&registry.url, &config));
    let reply = call(
        &gw,
        Request::delete("/users/3").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn an_open_breaker_serves_the_fallback_or_a_503_with_retry_after() {
    let registry = FakeRegistry::start().await;
    let (users, user_hits) = counting_service("users", StatusCode::INTERNAL_SERVER_ERROR).await;
    let (orders, order_hits) = counting_service("orders", StatusCode::INTERNAL_SERVER_ERROR).await;
    registry.set(USERS, vec![instance(USERS, users.addr)]);
    registry.set(ORDERS, vec![instance(ORDERS, orders.addr)]);
    let breaker = "consecutive_failures = 3\nopen_for = \"30s\"";
    let config = format!(
        "[defaults.retries]\nmax_attempts = 1\n[defaults.breaker]\n{breaker}\n\
         [[routes]]\nprefix = \"/users\"\nservice = \"user-service\"\n\
         [routes.policy.fallback]\nstatus = 200\nbody = '{{\"users\":[],\"fallback\":true}}'\n\
         [[routes]]\nprefix = \"/orders\"\nservice = \"order-service\"\n"
    );
    let state = gateway_state_with(&registry.url, &config);
    let gw = app(state.clone());

    for path in ["/users/1", "/orders/1"] {
        for _ in 0..3 {
            let reply = get_json(&gw, path).await;
            assert_eq!(
                reply.status,
                StatusCode::INTERNAL_SERVER_ERROR,
                "the service's own answer"
            );
            assert!(reply.headers.get("x-breakwater-error").is_none());
        }
    }
    let reply = get_traced(&gw, "/users/1").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json,
        serde_json::json!({"users": [], "fallback": true})
    );
    assert_eq!(reply.headers["x-breakwater-fallback"], "breaker-open");
    assert_eq!(reply.headers["content-type"], "application/json");
    assert!(
        trace_of(&reply).contains("breaker=open"),
        "{}",
        trace_of(&reply)
    );

    let reply = get_json(&gw, "/orders/1").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["x-breakwater-error"], "breaker-open");
    let wait: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((29..=30).contains(&wait), "{wait}");
    assert_eq!(
        (
            user_hits.load(Ordering::SeqCst),
            order_hits.load(Ordering::SeqCst)
        ),
        (3, 3)
    );

    // Transitions reach the event hub through a relay task; let it run.
    let mut events = Vec::new();
    for _ in 0..100 {
        events = state
            .events()
            .recent()
            .into_iter()
            .filter(|e| e.kind == "breaker")
            .collect();
        if events.len() == 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].detail["to"], "OPEN");
}

#[tokio::test]
async fn composed_users_serve_the_seed_fallback_while_the_users_breaker_is_open() {
    let registry = FakeRegistry::start().await;
    let (users, hits) = counting_service("users", StatusCode::INTERNAL_SERVER_ERROR).await;
    registry.set(USERS, vec![instance(USERS, users.addr)]);
    let gw = app(gateway_state_with(
        &registry.url,
        &users_route(
            "[routes.policy.retries]\nmax_attempts = 1\n[routes.policy.breaker]\nconsecutive_failures = 2",
        ),
    ));
    for reason in [
        "upstream-status",
        "upstream-status",
        "breaker-open",
        "breaker-open",
    ] {
        let reply = get_json(&gw, "/users").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(
            reply.json["meta"]["source"]
                .as_str()
                .unwrap()
                .contains("fallback")
        );
        assert_eq!(reply.json["meta"]["fallbackReason"], reason);
        assert_eq!(reply.json["users"][0]["name"], "Fallback User");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "the open breaker spares the service"
    );
}

#[tokio::test]
async fn the_trace_header_lists_the_route_every_try_and_the_decisions() {
    let registry = FakeRegistry::start().await;
    let dead = dead_addr().await;
    let live = echo_service("users-live").await;
    registry.set(
        USERS,
        vec![instance(USERS, dead), instance(USERS, live.addr)],
    );
    let gw = app(gateway_state_with(
        &registry.url,
        &users_route("[routes.policy]\nbalance = \"round-robin\""),
    ));
    let reply = get_traced(&gw, "/users/7").await;
    assert_eq!(reply.status, StatusCode::OK);
    let trace = trace_of(&reply);
    let dead_id = format!("{USERS}-{}-{}", dead.ip(), dead.port());
    let live_id = format!("{USERS}-{}-{}", live.addr.ip(), live.addr.port());
    assert!(
        trace.starts_with("route=/users; breaker=closed; "),
        "{trace}"
    );
    assert!(
        trace.contains(&format!("try1={dead_id} connect-error ")),
        "{trace}"
    );
    assert!(trace.contains("budget=ok"), "{trace}");
    assert!(trace.contains(&format!("try2={live_id} 200 ")), "{trace}");
    assert!(trace.ends_with("ms"), "{trace}");

    let plain = get_json(&gw, "/users/7").await;
    assert!(
        plain.headers.get("x-breakwater-trace").is_none(),
        "only when asked"
    );
}

#[tokio::test]
async fn a_route_rate_limit_answers_429_with_retry_after_and_ratelimit_headers() {
    let registry = FakeRegistry::start().await;
    let echo = echo_service("users-a").await;
    registry.set(USERS, vec![instance(USERS, echo.addr)]);
    let state = gateway_state_with(
        &registry.url,
        &users_route(
            "[routes.policy.rate_limit]\nrequests = 2\nper = \"1m\"\nkey = \"header:x-client\"",
        ),
    );
    let gw = app(state.clone());
    let get = |client: &'static str| {
        Request::get("/users/1")
            .header("x-client", client)
            .header("x-breakwater-trace", "1")
            .body(Body::empty())
            .unwrap()
    };
    for left in ["1", "0"] {
        let reply = call(&gw, get("a")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.headers["ratelimit-remaining"], left);
    }
    let reply = call(&gw, get("a")).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.headers["x-breakwater-error"], "rate-limited");
    assert!(reply.headers.contains_key("retry-after"));
    assert!(trace_of(&reply).contains("limit=rejected"));
    assert_eq!(
        call(&gw, get("b")).await.status,
        StatusCode::OK,
        "another key has its own"
    );
    assert!(state.metrics().render().contains("rate_limited"));
}

#[tokio::test]
async fn a_cached_route_makes_one_upstream_call_for_many_readers() {
    let registry = FakeRegistry::start().await;
    let (users, hits) = counting_service("users", StatusCode::OK).await;
    registry.set(USERS, vec![instance(USERS, users.addr)]);
    let gw = app(gateway_state_with(
        &registry.url,
        &users_route("[routes.policy.cache]\nttl = \"30s\""),
    ));
    let first = get_json(&gw, "/users/1").await;
    assert_eq!(
        (first.status, &first.headers["x-cache"]),
        (StatusCode::OK, &"MISS".parse().unwrap())
    );
    let second = get_json(&gw, "/users/1").await;
    assert_eq!(second.headers["x-cache"], "HIT");
    assert_eq!(second.json, first.json);
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let readers: Vec<_> = (0..10)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move { get_json(&gw, "/users/2").await.status })
        })
        .collect();
    for r in readers {
        assert_eq!(r.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "concurrent misses coalesce into one call"
    );

    let fresh = call(
        &gw,
        Request::get("/users/1")
            .header("cache-control", "no-cache")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(fresh.headers.get("x-cache").is_none());
    assert_eq!(hits.load(Ordering::SeqCst), 3, "no-cache goes upstream");
    let post = call(&gw, Request::post("/users").body(Body::empty()).unwrap()).await;
    assert!(
        post.headers.get("x-cache").is_none(),
        "only GETs are cached"
    );
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_attempts_by_instance() {
    let registry = FakeRegistry::start().await;
    let echo = echo_service("users-a").await;
    registry.set(USERS, vec![instance(USERS, echo.addr)]);
    let gw = app(gateway_state(&registry.url, Duration::from_secs(2)));
    assert_eq!(get_json(&gw, "/users/1").await.status, StatusCode::OK);
    assert_eq!(
        get_json(&gw, "/nowhere").await.status,
        StatusCode::NOT_FOUND
    );
    let text = get_json(&gw, "/metrics").await.text;
    let requests = text
        .lines()
        .find(|l| {
            l.contains("requests_total")
                && l.contains("route=\"/users\"")
                && l.contains("status=\"200\"")
        })
        .unwrap_or_else(|| panic!("{text}"));
    assert!(requests.ends_with(" 1"), "{requests}");
    assert!(text.contains("route=\"unmatched\""), "{text}");
    let id = format!("{USERS}-{}-{}", echo.addr.ip(), echo.addr.port());
    assert!(
        text.lines()
            .any(|l| l.contains("upstream_attempts_total") && l.contains(&id)),
        "{text}"
    );
}
