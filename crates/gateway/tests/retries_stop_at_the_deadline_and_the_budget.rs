//! Paused-time tests of the retry loop: the total deadline ends a request with a 504 and
//! no try runs past it; an exhausted retry budget stops retries and the client sees the
//! upstream's failure.

mod fixture;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::StatusCode;
use breakwater_gateway::app;
use fixture::*;
use tokio::time::Instant;

const USERS: &str = "user-service";

#[tokio::test(start_paused = true)]
async fn the_total_deadline_is_a_504_and_no_try_runs_past_it() {
    let registry = FakeRegistry::start().await;
    let a = stalled_upstream().await;
    let b = stalled_upstream().await;
    registry.set(
        USERS,
        vec![instance(USERS, a.addr), instance(USERS, b.addr)],
    );
    let gw = app(gateway_state_with(
        &registry.url,
        &users_route(
            "[routes.policy.timeout]\nper_try = \"1s\"\ntotal = \"2500ms\"\n\
             [routes.policy.retries]\nmax_attempts = 5",
        ),
    ));

    let started = Instant::now();
    let reply = get_traced(&gw, "/users/1").await;
    let took = started.elapsed();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text);
    assert_eq!(reply.headers["x-breakwater-error"], "deadline");
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_millis(2510),
        "the third try is cut at the deadline, not after: {took:?}"
    );
    let trace = trace_of(&reply);
    assert!(
        trace.contains("try1=") && trace.contains("try3="),
        "{trace}"
    );
    assert!(
        !trace.contains("try4="),
        "no try starts past the deadline: {trace}"
    );
    assert_eq!(trace.matches(" timeout ").count(), 3, "{trace}");
}

#[tokio::test(start_paused = true)]
async fn a_retry_never_starts_when_its_backoff_would_reach_the_deadline() {
    let registry = FakeRegistry::start().await;
    let (sick, hits) = counting_service("sick", StatusCode::SERVICE_UNAVAILABLE).await;
    registry.set(USERS, vec![instance(USERS, sick.addr)]);
    // Backoff ceilings 400 ms, 800 ms, 1.6 s: by the third try at the latest, the
    // ceiling reaches past what is left of the 1 s deadline.
    let gw = app(gateway_state_with(
        &registry.url,
        &users_route(
            "[routes.policy.timeout]\ntotal = \"1s\"\n\
             [routes.policy.retries]\nmax_attempts = 10\nbackoff_base = \"400ms\"\nbackoff_max = \"10s\"\n\
             [routes.policy.breaker]\nenabled = false",
        ),
    ));
    let started = Instant::now();
    let reply = get_traced(&gw, "/users/1").await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the last answer is relayed"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        trace_of(&reply).contains("retry=deadline_too_close"),
        "{}",
        trace_of(&reply)
    );
    let hits = hits.load(Ordering::SeqCst);
    assert!((2..=3).contains(&hits), "{hits}");
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_budget_stops_retries_and_the_client_sees_the_failure() {
    let registry = FakeRegistry::start().await;
    let (sick, hits) = counting_service("sick", StatusCode::SERVICE_UNAVAILABLE).await;
    registry.set(USERS, vec![instance(USERS, sick.addr)]);
    // No share of traffic, a floor of 1 retry/s over the 10 s window: 10 retries.
    let state = gateway_state_with(
        &registry.url,
        &users_route(
            "[routes.policy.retries]\nmax_attempts = 3\nbudget_ratio = 0.0\nbudget_min_per_sec = 1\n\
             [routes.policy.breaker]\nenabled = false",
        ),
    );
    let gw = app(state.clone());

    for i in 0..5 {
        let reply = get_traced(&gw, "/users/1").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            trace_of(&reply).contains("try3="),
            "request {i}: {}",
            trace_of(&reply)
        );
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        15,
        "five requests, three tries each"
    );

    let reply = get_traced(&gw, "/users/1").await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the upstream's own answer"
    );
    assert_eq!(reply.json["instance"], "sick");
    let trace = trace_of(&reply);
    assert!(
        trace.contains("budget=exhausted") && !trace.contains("try2="),
        "{trace}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        16,
        "no retry once the budget is spent"
    );

    let metrics = state.metrics().render();
    let line = metrics
        .lines()
        .find(|l| l.contains("retry_budget_exhausted") && l.contains("user-service"))
        .unwrap_or_else(|| panic!("no budget metric in:\n{metrics}"));
    assert!(line.ends_with(" 1"), "{line}");
}
