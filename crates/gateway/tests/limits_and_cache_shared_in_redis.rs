//! Gateways with `--redis`: a route's rate limit is one limit for every gateway on the
//! prefix, a response cached by one is a hit in another, and a Redis that cannot be
//! reached only makes each gateway decide locally (counted), never a 5xx.
//!
//! The shared tests need `REDIS_URL` (skipped without it, unless
//! `BREAKWATER_REQUIRE_SERVICES=1`); each uses a key prefix of its own and deletes its
//! keys at the end.

#![expect(
    clippy::unwrap_used,
    clippy::print_stderr,
    reason = "test helpers: a failure should fail the test loudly; skips are reported"
)]

mod fixture;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::StatusCode;
use breakwater_gateway::{GatewayConfig, GatewayState, app};
use fixture::*;
use redis::AsyncCommands as _;

const USERS: &str = "user-service";

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

fn unique_prefix(tag: &str) -> String {
    format!("bw-test-gateway-{tag}-{:016x}", rand::random::<u64>())
}

/// A gateway on `redis_url` under `prefix`, routing by `toml`.
fn gateway_on_redis(registry: &str, redis_url: &str, prefix: &str, toml: &str) -> GatewayState {
    let mut config = GatewayConfig::new(8000, registry);
    config.listener_loopback = true;
    config.redis_url = Some(redis_url.to_owned());
    config.redis_prefix = prefix.to_owned();
    config.validate().unwrap();
    let file = config.parse_file(toml, "test config").unwrap();
    let discovery = breakwater_registry::client::Discovery::new(
        breakwater_registry::client::RegistryClient::new(registry),
        breakwater_registry::client::CachePolicy::default(),
    );
    GatewayState::with_file(config, discovery, file)
}

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn keys_under(url: &str, prefix: &str) -> Vec<String> {
    let mut conn = connection(url).await;
    let mut iter = conn
        .scan_match::<_, String>(format!("{prefix}:*"))
        .await
        .unwrap();
    let mut keys = Vec::new();
    while let Some(key) = iter.next_item().await {
        keys.push(key.unwrap());
    }
    keys
}

async fn delete_keys(url: &str, prefix: &str) {
    let keys = keys_under(url, prefix).await;
    if !keys.is_empty() {
        let _: u64 = connection(url).await.del(keys).await.unwrap();
    }
}

fn number(reply: &Reply, header: &str) -> u64 {
    reply.headers[header].to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn one_limit_holds_across_two_gateways() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("limit");
    let registry = FakeRegistry::start().await;
    let (users, calls) = counting_service("users", StatusCode::OK).await;
    registry.set(USERS, vec![instance(USERS, users.addr)]);
    let toml = users_route("[routes.policy.rate_limit]\nrequests = 5\nper = \"1m\"");
    let gateways = [
        app(gateway_on_redis(&registry.url, &url, &prefix, &toml)),
        app(gateway_on_redis(&registry.url, &url, &prefix, &toml)),
    ];

    let mut admitted = 0;
    let mut remaining = Vec::new();
    for i in 0..12 {
        let reply = get_json(&gateways[i % 2], "/users/1").await;
        assert_eq!(number(&reply, "ratelimit-limit"), 5);
        assert_eq!(reply.headers["ratelimit-policy"], "5;w=60");
        match reply.status {
            StatusCode::OK => {
                admitted += 1;
                remaining.push(number(&reply, "ratelimit-remaining"));
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let retry_after = number(&reply, "retry-after");
                assert!((1..=12).contains(&retry_after), "{retry_after}");
                assert_eq!(reply.headers["x-breakwater-error"], "rate-limited");
                assert_eq!(reply.json["error"], "Too many requests");
            }
            other => panic!("request {i}: {other} {}", reply.text),
        }
    }
    assert_eq!(admitted, 5, "exactly the limit, across both gateways");
    assert_eq!(
        remaining,
        [4, 3, 2, 1, 0],
        "one count, whichever gateway asked"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    // No peer through the router: every request is one client, 0.0.0.0.
    assert_eq!(
        keys_under(&url, &prefix).await,
        [format!("{prefix}:limit:/users:ip:0.0.0.0")]
    );
    delete_keys(&url, &prefix).await;
}

#[tokio::test]
async fn a_response_cached_by_one_gateway_is_a_hit_in_another() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("cache");
    let registry = FakeRegistry::start().await;
    let (users, calls) = counting_service("users", StatusCode::OK).await;
    registry.set(USERS, vec![instance(USERS, users.addr)]);
    let toml = users_route("[routes.policy.cache]\nttl = \"30s\"");
    let one = app(gateway_on_redis(&registry.url, &url, &prefix, &toml));
    let other = app(gateway_on_redis(&registry.url, &url, &prefix, &toml));

    let first = get_json(&one, "/users/7?v=1").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["x-cache"], "MISS");
    let key = format!("{prefix}:cache:/users:/users/7?v=1");
    let ttl: i64 = connection(&url).await.pttl(&key).await.unwrap();
    assert!(
        (1..=30_000).contains(&ttl),
        "stored with the route's TTL: {ttl}"
    );

    let second = get_json(&other, "/users/7?v=1").await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(
        second.headers["x-cache"], "HIT",
        "filled by the other gateway"
    );
    assert_eq!(second.text, first.text);
    assert_eq!(
        second.headers["content-type"], first.headers["content-type"],
        "headers travel with the body"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one upstream call in all");

    // Now in the second gateway's own level too, and a new query is a new key.
    assert_eq!(
        get_json(&other, "/users/7?v=1").await.headers["x-cache"],
        "HIT"
    );
    assert_eq!(
        get_json(&other, "/users/7?v=2").await.headers["x-cache"],
        "MISS"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // An entry another version wrote (not decodable) is a miss, then replaced.
    let _: () = connection(&url)
        .await
        .set_ex(format!("{prefix}:cache:/users:/users/8"), "junk", 30)
        .await
        .unwrap();
    let junk = get_json(&one, "/users/8").await;
    assert_eq!(
        (junk.status, &junk.headers["x-cache"]),
        (StatusCode::OK, &"MISS".parse().unwrap())
    );
    assert_eq!(get_json(&other, "/users/8").await.headers["x-cache"], "HIT");
    delete_keys(&url, &prefix).await;
}

#[tokio::test]
async fn an_unreachable_redis_means_local_decisions_not_errors() {
    let closed = dead_addr().await;
    let redis = format!("redis://{closed}");
    let registry = FakeRegistry::start().await;
    let (users, calls) = counting_service("users", StatusCode::OK).await;
    let (orders, _) = counting_service("orders", StatusCode::OK).await;
    registry.set(USERS, vec![instance(USERS, users.addr)]);
    registry.set(
        "order-service",
        vec![instance("order-service", orders.addr)],
    );
    let toml = "[[routes]]\nprefix = \"/users\"\nservice = \"user-service\"\n\
                [routes.policy.rate_limit]\nrequests = 3\nper = \"1m\"\n\
                [routes.policy.cache]\nttl = \"30s\"\n\
                [[routes]]\nprefix = \"/orders\"\nservice = \"order-service\"\n\
                [routes.policy.rate_limit]\nrequests = 3\nper = \"1m\"\n\
                on_redis_error = \"fail_closed\"\n";
    let state = gateway_on_redis(&registry.url, &redis, &unique_prefix("down"), toml);
    let gateway = app(state);

    // fail_open (the default): the local limit decides, the local cache still works.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let reply = get_json(&gateway, "/users/1").await;
        statuses.push((reply.status.as_u16(), reply.headers.get("x-cache").cloned()));
    }
    assert_eq!(statuses[0], (200, Some("MISS".parse().unwrap())));
    assert_eq!(statuses[1], (200, Some("HIT".parse().unwrap())));
    assert_eq!(statuses[2].0, 200);
    assert_eq!(statuses[3], (429, None), "the local limit of 3 holds");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // fail_closed: refused while Redis is away, with the usual 429.
    let refused = get_json(&gateway, "/orders").await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text
    );
    assert!(number(&refused, "retry-after") >= 1);

    let metrics = get_json(&gateway, "/metrics").await.text;
    let count = |kind: &str| -> u64 {
        let line = format!("breakwater_gateway_redis_fallbacks_total{{kind=\"{kind}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .unwrap_or_else(|| panic!("no {kind} fallbacks in {metrics}"))
            .parse()
            .unwrap()
    };
    assert_eq!(
        count("rate_limit"),
        5,
        "every decision was made without Redis"
    );
    assert!(count("cache") >= 1, "{metrics}");
}

#[tokio::test]
async fn a_stalled_redis_delays_a_request_by_its_timeout_at_most() {
    // Accepts connections and never answers: the slowest Redis there is.
    let stalled = stalled_upstream().await;
    let registry = FakeRegistry::start().await;
    let (users, _) = counting_service("users", StatusCode::OK).await;
    registry.set(USERS, vec![instance(USERS, users.addr)]);
    let toml = users_route(
        "[routes.policy.rate_limit]\nrequests = 100\nper = \"1m\"\n\
         [routes.policy.cache]\nttl = \"30s\"",
    );
    let mut config = GatewayConfig::new(8000, registry.url.as_str());
    config.listener_loopback = true;
    config.redis_url = Some(format!("redis://{}", stalled.addr));
    config.redis_prefix = unique_prefix("stalled");
    config.redis_timeout = Duration::from_millis(100);
    let file = config.parse_file(&toml, "test config").unwrap();
    let discovery = breakwater_registry::client::Discovery::new(
        breakwater_registry::client::RegistryClient::new(registry.url.as_str()),
        breakwater_registry::client::CachePolicy::default(),
    );
    let gateway = app(GatewayState::with_file(config, discovery, file));

    for (i, path) in ["/users/1", "/users/1", "/users/2"].iter().enumerate() {
        let started = tokio::time::Instant::now();
        let reply = get_json(&gateway, path).await;
        let took = started.elapsed();
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {}", reply.text);
        // The limit's call (100 ms) and the cache's read (100 ms, then skipped while
        // paused), with room for a slow test machine; never the 2 s of a reply timeout.
        assert!(
            took < Duration::from_millis(800),
            "request {i} took {took:?}"
        );
    }
}
