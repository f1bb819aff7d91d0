//! Handler tests of the analytics service, through `oneshot` on `app(state)`.

use std::sync::Arc;

use axum::http::HeaderMap;
use tokio::sync::Notify;
use tower::ServiceExt;

use super::*;
use crate::fixtures::{ScriptedUpstream, Step, TempDir};

struct World {
    dir: TempDir,
    store: SqliteMetrics,
    upstream: ScriptedUpstream,
    app: Router,
}

async fn world(tag: &str, settings: &AnalyticsSettings, upstream: ScriptedUpstream) -> World {
    let dir = TempDir::new(tag);
    let store = SqliteMetrics::open(&dir.path().join(DATABASE_FILE))
        .await
        .unwrap();
    let app = app_over(store.clone(), settings, upstream.clone());
    World {
        dir,
        store,
        upstream,
        app,
    }
}

fn app_over(
    store: SqliteMetrics,
    settings: &AnalyticsSettings,
    upstream: ScriptedUpstream,
) -> Router {
    let state = AnalyticsState::new(
        store,
        settings.memory_cache(),
        upstream,
        "analytics-service-6000",
        6000,
        settings,
    )
    .unwrap();
    app(state)
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

/// One request from `peer` (a socket address, as the server's connection info gives
/// it), with optional `X-Forwarded-For`.
async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
    peer: &str,
    forwarded: Option<&str>,
) -> Answer {
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    if let Some(f) = forwarded {
        req = req.header("x-forwarded-for", f);
    }
    let mut req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
        .unwrap();
    req.extensions_mut().insert(axum::extract::ConnectInfo(
        peer.parse::<std::net::SocketAddr>().unwrap(),
    ));
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    Answer {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

const PEER: &str = "10.0.0.1:5000";

async fn get(app: &Router, uri: &str) -> Answer {
    send(app, "GET", uri, None, PEER, None).await
}

async fn post_metric(app: &Router, body: &str, peer: &str) -> Answer {
    send(app, "POST", "/api/metrics", Some(body), peer, None).await
}

fn metric(kind: &str, value: f64) -> String {
    json!({"timestamp": "2026-02-15T10:00:00", "value": value, "type": kind}).to_string()
}

/// Settings with a rate limit high enough not to get in the way.
fn unlimited() -> AnalyticsSettings {
    AnalyticsSettings {
        rate_limit_max: 1000,
        ..AnalyticsSettings::default()
    }
}

fn header<'a>(answer: &'a Answer, name: &str) -> &'a str {
    answer.headers[name].to_str().unwrap()
}

#[tokio::test]
async fn health_is_ok() {
    let w = world(
        "health",
        &AnalyticsSettings::default(),
        ScriptedUpstream::answering(),
    )
    .await;
    let a = get(&w.app, "/health").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["status"], "OK");
    assert_eq!(a.body["service"], "analytics-service");
    assert_eq!(a.body["instance"], "analytics-service-6000");
    assert_eq!(a.body["circuit_state"], "CLOSED");
}

#[tokio::test]
async fn a_metric_is_stored_and_summarised_through_the_cache() {
    let w = world("ingest", &unlimited(), ScriptedUpstream::answering()).await;
    let a = post_metric(&w.app, &metric("cpu_usage", 75.0), PEER).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(a.body, json!({"message": "Metric stored successfully"}));

    let a = get(&w.app, "/api/metrics/summary?type=cpu_usage").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.body,
        json!({"type": "cpu_usage", "count": 1, "average_value": 75.0})
    );
    assert_eq!(header(&a, "x-cache"), "MISS");
    let a = get(&w.app, "/api/metrics/summary?type=cpu_usage").await;
    assert_eq!(header(&a, "x-cache"), "HIT");
    assert_eq!(a.body["count"], 1);

    // A POST of the type invalidates its summary; other types stay cached.
    post_metric(&w.app, &metric("mem", 1.0), PEER).await;
    get(&w.app, "/api/metrics/summary?type=mem").await;
    post_metric(&w.app, &metric("cpu_usage", 85.0), PEER).await;
    let a = get(&w.app, "/api/metrics/summary?type=cpu_usage").await;
    assert_eq!(header(&a, "x-cache"), "MISS");
    assert_eq!(
        a.body,
        json!({"type": "cpu_usage", "count": 2, "average_value": 80.0})
    );
    let a = get(&w.app, "/api/metrics/summary?type=mem").await;
    assert_eq!(header(&a, "x-cache"), "HIT");
}

#[tokio::test]
async fn a_zero_ttl_never_hits() {
    let settings = AnalyticsSettings {
        summary_ttl: Duration::ZERO,
        ..unlimited()
    };
    let w = world("no-cache", &settings, ScriptedUpstream::answering()).await;
    post_metric(&w.app, &metric("cpu", 1.0), PEER).await;
    for _ in 0..2 {
        let a = get(&w.app, "/api/metrics/summary?type=cpu").await;
        assert_eq!(header(&a, "x-cache"), "MISS");
    }
}

#[tokio::test]
async fn summary_errors_follow_the_contract() {
    let w = world(
        "summary-errors",
        &unlimited(),
        ScriptedUpstream::answering(),
    )
    .await;
    for uri in [
        "/api/metrics/summary",
        "/api/metrics/summary?type=",
        "/api/metrics/summary?kind=cpu",
    ] {
        let a = get(&w.app, uri).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(
            a.body,
            json!({"error": "Query parameter 'type' is required"})
        );
    }
    let a = get(&w.app, "/api/metrics/summary?type=nothing").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body, json!({"message": "No metrics found"}));
    assert_eq!(header(&a, "x-cache"), "MISS");
    // Not cached as a miss: the first metric shows at once.
    post_metric(&w.app, &metric("nothing", 2.0), PEER).await;
    let a = get(&w.app, "/api/metrics/summary?type=nothing").await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn invalid_payloads_are_400s_naming_the_field_and_store_nothing() {
    let w = world("invalid", &unlimited(), ScriptedUpstream::answering()).await;
    let cases = [
        (
            r#"{"value":1,"type":"cpu"}"#,
            "Field 'timestamp' is required",
        ),
        (
            r#"{"timestamp":"nope","value":1,"type":"cpu"}"#,
            "Field 'timestamp' must be an ISO-8601 date-time string, e.g. 2026-02-15T10:00:00Z",
        ),
        (
            r#"{"timestamp":"2026-02-15T10:00:00Z","value":"high","type":"cpu"}"#,
            "Field 'value' must be a number",
        ),
        (
            r#"{"timestamp":"2026-02-15T10:00:00Z","value":1,"type":""}"#,
            "Field 'type' must be a non-empty string of at most 100 characters",
        ),
        (r#"[1,2]"#, "Request body must be a JSON object"),
    ];
    for (body, details) in cases {
        let a = post_metric(&w.app, body, PEER).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(
            a.body,
            json!({"error": "Invalid payload", "details": details}),
            "{body}"
        );
    }
    let a = post_metric(&w.app, r#"{"timestamp":"#, PEER).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["error"], "Invalid payload");
    assert!(
        a.body["details"]
            .as_str()
            .unwrap()
            .starts_with("Malformed JSON"),
        "{}",
        a.body
    );
    let huge = format!(r#"{{"type":"{}"}}"#, "x".repeat(MAX_BODY_BYTES));
    let a = post_metric(&w.app, &huge, PEER).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(a.body["error"].is_string());
    assert_eq!(w.store.summary("cpu").await.unwrap(), None);
}

#[tokio::test]
async fn the_rate_limit_admits_exactly_the_max_per_client() {
    let w = world(
        "rate-limit",
        &AnalyticsSettings::default(),
        ScriptedUpstream::answering(),
    )
    .await;
    for n in 1..=5u32 {
        let a = post_metric(&w.app, &metric("cpu", f64::from(n)), PEER).await;
        assert_eq!(a.status, StatusCode::CREATED, "request {n}");
        assert_eq!(header(&a, "x-ratelimit-limit"), "5");
        assert_eq!(header(&a, "x-ratelimit-remaining"), (5 - n).to_string());
    }
    let a = post_metric(&w.app, &metric("cpu", 6.0), PEER).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        a.body,
        json!({"error": "Too many requests. Try again later."})
    );
    let retry_after: u64 = header(&a, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // The refused request stored nothing.
    assert_eq!(w.store.summary("cpu").await.unwrap().unwrap().count, 5);

    // Another client has its own allowance; reads are not limited.
    let a = post_metric(&w.app, &metric("cpu", 7.0), "10.0.0.2:6000").await;
    assert_eq!(a.status, StatusCode::CREATED);
    for _ in 0..10 {
        let a = get(&w.app, "/api/metrics/summary?type=cpu").await;
        assert_eq!(a.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn clients_behind_the_local_gateway_are_told_apart() {
    let settings = AnalyticsSettings {
        rate_limit_max: 1,
        ..AnalyticsSettings::default()
    };
    let w = world("forwarded", &settings, ScriptedUpstream::answering()).await;
    let gateway = "127.0.0.1:45000";
    for (client, expected) in [
        ("203.0.113.1", StatusCode::CREATED),
        ("203.0.113.2", StatusCode::CREATED),
        ("203.0.113.1", StatusCode::TOO_MANY_REQUESTS),
    ] {
        let a = send(
            &w.app,
            "POST",
            "/api/metrics",
            Some(&metric("cpu", 1.0)),
            gateway,
            Some(client),
        )
        .await;
        assert_eq!(a.status, expected, "{client}");
    }
    // A remote peer's own X-Forwarded-For is not believed.
    let remote = "198.51.100.9:1000";
    let a = send(
        &w.app,
        "POST",
        "/api/metrics",
        Some(&metric("cpu", 1.0)),
        remote,
        Some("203.0.113.3"),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED);
    let a = send(
        &w.app,
        "POST",
        "/api/metrics",
        Some(&metric("cpu", 1.0)),
        remote,
        Some("203.0.113.4"),
    )
    .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn the_window_ends_and_admits_again() {
    let w = world(
        "window",
        &AnalyticsSettings::default(),
        ScriptedUpstream::answering(),
    )
    .await;
    // Paused after the store is open: only requests that never reach SQLite follow
    // (invalid payloads count against the limit too, as in the seed).
    tokio::time::pause();
    for _ in 0..5 {
        let a = post_metric(&w.app, "{}", PEER).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
    }
    let a = post_metric(&w.app, "{}", PEER).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&a, "retry-after"), "60");
    tokio::time::advance(Duration::from_secs(45)).await;
    let a = post_metric(&w.app, "{}", PEER).await;
    assert_eq!(header(&a, "retry-after"), "15");
    tokio::time::advance(Duration::from_secs(15)).await;
    let a = post_metric(&w.app, "{}", PEER).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(header(&a, "x-ratelimit-remaining"), "4");
}

#[tokio::test]
async fn a_created_metric_survives_a_restart() {
    let w = world("durable", &unlimited(), ScriptedUpstream::answering()).await;
    let a = post_metric(&w.app, &metric("disk", 42.0), PEER).await;
    assert_eq!(a.status, StatusCode::CREATED);
    drop(w.app);
    w.store.close().await;

    let reopened = SqliteMetrics::open(&w.dir.path().join(DATABASE_FILE))
        .await
        .unwrap();
    let app = app_over(
        reopened.clone(),
        &unlimited(),
        ScriptedUpstream::answering(),
    );
    let a = get(&app, "/api/metrics/summary?type=disk").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.body,
        json!({"type": "disk", "count": 1, "average_value": 42.0})
    );
    reopened.close().await;
}

#[tokio::test]
async fn a_storage_failure_is_a_500_and_not_a_201() {
    let w = world("closed", &unlimited(), ScriptedUpstream::answering()).await;
    w.store.close().await;
    let a = post_metric(&w.app, &metric("cpu", 1.0), PEER).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(a.body, json!({"error": "Internal storage error"}));
    let a = get(&w.app, "/api/metrics/summary?type=cpu").await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn external_success_is_a_200() {
    let w = world("external-ok", &unlimited(), ScriptedUpstream::answering()).await;
    let a = get(&w.app, "/api/external-data").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.body,
        json!({"circuit_state": "CLOSED", "data": {"external_data": "success"}})
    );
}

#[tokio::test]
async fn the_breaker_opens_tries_once_and_closes() {
    let upstream =
        ScriptedUpstream::scripted(vec![Step::Fail, Step::Fail, Step::Fail], Step::Answer);
    let w = world("breaker", &unlimited(), upstream).await;
    tokio::time::pause();
    let fallback = "Fallback response: External service unavailable";

    for expected in ["CLOSED", "CLOSED", "OPEN"] {
        let a = get(&w.app, "/api/external-data").await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.body["circuit_state"], expected);
        assert_eq!(a.body["message"], fallback);
    }
    // Open: fails fast without calling the dependency.
    let a = get(&w.app, "/api/external-data").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.body["circuit_state"], "OPEN");
    assert_eq!(header(&a, "retry-after"), "30");
    assert_eq!(w.upstream.calls(), 3);
    assert_eq!(get(&w.app, "/health").await.body["circuit_state"], "OPEN");

    tokio::time::advance(Duration::from_secs(30)).await;
    // The one trial call is held open while a second call arrives.
    let release = Arc::new(Notify::new());
    w.upstream
        .push(Step::AnswerWhenReleased(Arc::clone(&release)));
    let trial = tokio::spawn({
        let app = w.app.clone();
        async move { get(&app, "/api/external-data").await }
    });
    while w.upstream.calls() < 4 {
        tokio::task::yield_now().await;
    }
    let second = get(&w.app, "/api/external-data").await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.body["circuit_state"], "HALF_OPEN");
    assert_eq!(second.body["message"], fallback);
    assert_eq!(
        w.upstream.calls(),
        4,
        "only one trial reaches the dependency"
    );

    release.notify_one();
    let trial = trial.await.unwrap();
    assert_eq!(trial.status, StatusCode::OK);
    assert_eq!(
        trial.body,
        json!({"circuit_state": "CLOSED", "data": {"external_data": "success"}})
    );
    let a = get(&w.app, "/api/external-data").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["circuit_state"], "CLOSED");
}

#[tokio::test]
async fn a_failed_trial_reopens_and_a_stall_is_a_failure() {
    let settings = AnalyticsSettings {
        circuit_failure_threshold: 1,
        ..unlimited()
    };
    let w = world("breaker-reopen", &settings, ScriptedUpstream::stalling()).await;
    tokio::time::pause();
    let started = Instant::now();
    let a = get(&w.app, "/api/external-data").await;
    // Cut by the 2 s timeout (the paused clock rounds timers up to the millisecond).
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_secs(2), "{elapsed:?}");
    assert!(elapsed <= Duration::from_millis(2_010), "{elapsed:?}");
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.body["circuit_state"], "OPEN");

    tokio::time::advance(Duration::from_secs(30)).await;
    let a = get(&w.app, "/api/external-data").await;
    assert_eq!(a.body["circuit_state"], "OPEN", "the failed trial re-opens");
    assert_eq!(w.upstream.calls(), 2);
    let a = get(&w.app, "/api/external-data").await;
    assert_eq!(a.body["circuit_state"], "OPEN");
    assert_eq!(w.upstream.calls(), 2);
}

#[tokio::test]
async fn unknown_paths_and_methods_are_json_errors() {
    let w = world("fallbacks", &unlimited(), ScriptedUpstream::answering()).await;
    let a = get(&w.app, "/api/nope").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(a.body["error"].is_string());
    let a = get(&w.app, "/api/metrics").await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(a.body["error"].is_string());
}

#[test]
fn settings_come_from_the_environment_then_the_flags() {
    let none = AnalyticsOverrides::default();
    let empty = |_: &str| None;
    assert_eq!(
        AnalyticsSettings::from_lookup_and(&empty, &none).unwrap(),
        AnalyticsSettings::default()
    );
    let env = |name: &str| {
        match name {
            "RATE_LIMIT_WINDOW" => Some("10"),
            "RATE_LIMIT_MAX" => Some("7"),
            "CIRCUIT_FAILURE_THRESHOLD" => Some("4"),
            "CIRCUIT_RESET_TIMEOUT" => Some("5"),
            "PORT" => Some("8000"),
            _ => None,
        }
        .map(str::to_owned)
    };
    let from_env = AnalyticsSettings::from_lookup_and(&env, &none).unwrap();
    assert_eq!(from_env.rate_limit_window, Duration::from_secs(10));
    assert_eq!(from_env.rate_limit_max, 7);
    assert_eq!(from_env.circuit_failure_threshold, 4);
    assert_eq!(from_env.circuit_reset_timeout, Duration::from_secs(5));
    assert_eq!(port_from_lookup(&env).unwrap(), Some(8000));
    assert_eq!(port_from_lookup(&empty).unwrap(), None);

    let flags = AnalyticsOverrides {
        rate_limit_max: Some(9),
        external: Some("http://127.0.0.1:9000/".into()),
        ..AnalyticsOverrides::default()
    };
    let both = AnalyticsSettings::from_lookup_and(&env, &flags).unwrap();
    assert_eq!(both.rate_limit_max, 9);
    assert_eq!(both.rate_limit_window, Duration::from_secs(10));
    assert_eq!(both.external.as_deref(), Some("http://127.0.0.1:9000/"));
}

#[test]
fn bad_settings_name_the_variable() {
    let bad = |var: &'static str, value: &'static str| {
        move |name: &str| (name == var).then(|| value.to_owned())
    };
    for (var, value) in [
        ("RATE_LIMIT_WINDOW", "0"),
        ("RATE_LIMIT_WINDOW", "1m"),
        ("RATE_LIMIT_MAX", "-1"),
        ("CIRCUIT_FAILURE_THRESHOLD", "0"),
        ("CIRCUIT_RESET_TIMEOUT", "x"),
    ] {
        let err =
            AnalyticsSettings::from_lookup_and(&bad(var, value), &AnalyticsOverrides::default())
                .unwrap_err();
        assert_eq!(err.setting, var, "{var}={value}");
    }
    assert_eq!(
        port_from_lookup(&bad("PORT", "70000")).unwrap_err().setting,
        "PORT"
    );
    let flags = AnalyticsOverrides {
        rate_limit_max: Some(0),
        ..AnalyticsOverrides::default()
    };
    let err = AnalyticsSettings::from_lookup_and(&|_| None, &flags).unwrap_err();
    assert_eq!(err.setting, "RATE_LIMIT_MAX");
    let flags = AnalyticsOverrides {
        external: Some("https://x".into()),
        ..AnalyticsOverrides::default()
    };
    let err = AnalyticsSettings::from_lookup_and(&|_| None, &flags).unwrap_err();
    assert_eq!(err.setting, "external");
}

fn order_event(id: &str, products: usize) -> String {
    let products: Vec<String> = (0..products).map(|i| format!("p{i}")).collect();
    json!({
        "id": id,
        "type": "order.created",
        "occurredAt": "2026-02-15T10:00:00.000Z",
        "data": {"orderId": 6, "userId": 2, "products": products,
                 "timestamp": "2026-02-15T10:00:00.000Z"},
    })
    .to_string()
}

async fn post_event(app: &Router, body: &str) -> Answer {
    send(app, "POST", "/events", Some(body), PEER, None).await
}

#[tokio::test]
async fn an_event_is_applied_once_however_often_it_arrives() {
    // A rate limit of 1 shows that internal events are not limited.
    let settings = AnalyticsSettings {
        rate_limit_max: 1,
        ..AnalyticsSettings::default()
    };
    let w = world("events-once", &settings, ScriptedUpstream::answering()).await;
    let first = post_event(&w.app, &order_event("e1", 3)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.body, json!({"status": "processed", "id": "e1"}));
    for _ in 0..3 {
        let again = post_event(&w.app, &order_event("e1", 3)).await;
        assert_eq!(again.status, StatusCode::OK);
        assert_eq!(again.body, json!({"status": "duplicate", "id": "e1"}));
    }
    let summary = get(&w.app, "/api/metrics/summary?type=orders_created").await;
    assert_eq!(
        summary.body,
        json!({"type": "orders_created", "count": 1, "average_value": 3.0})
    );
    // A new event invalidates the cached summary.
    assert_eq!(
        post_event(&w.app, &order_event("e2", 1)).await.body["status"],
        "processed"
    );
    let summary = get(&w.app, "/api/metrics/summary?type=orders_created").await;
    assert_eq!(summary.body["count"], 2);
    assert_eq!(header(&summary, "x-cache"), "MISS");
}

#[tokio::test]
async fn concurrent_duplicates_apply_once() {
    let w = world(
        "events-race",
        &AnalyticsSettings::default(),
        ScriptedUpstream::answering(),
    )
    .await;
    let body = order_event("race", 2);
    let answers = futures_join(&w.app, &body).await;
    let processed = answers
        .iter()
        .filter(|a| a.body["status"] == "processed")
        .count();
    assert_eq!(
        processed,
        1,
        "{:?}",
        answers.iter().map(|a| &a.body).collect::<Vec<_>>()
    );
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    let summary = w.store.summary(ORDERS_CREATED).await.unwrap().unwrap();
    assert_eq!(summary.count, 1);
}

/// Sends `body` to `/events` eight times at once.
async fn futures_join(app: &Router, body: &str) -> Vec<Answer> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (app, body) = (app.clone(), body.to_owned());
        tasks.spawn(async move { post_event(&app, &body).await });
    }
    let mut answers = Vec::new();
    while let Some(answer) = tasks.join_next().await {
        answers.push(answer.unwrap());
    }
    answers
}

#[tokio::test]
async fn unknown_and_malformed_events_are_refused_and_change_nothing() {
    let w = world(
        "events-bad",
        &AnalyticsSettings::default(),
        ScriptedUpstream::answering(),
    )
    .await;
    let user = json!({"id": "u1", "type": "user.created", "occurredAt": "2026-02-15T10:00:00Z",
                      "data": {"userId": 4, "email": "a@b.c"}});
    let a = post_event(&w.app, &user.to_string()).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        a.body,
        json!({"error": "Unknown event type 'user.created'"})
    );

    let a = post_event(&w.app, "{not json").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(
        a.body["error"]
            .as_str()
            .unwrap()
            .starts_with("Malformed JSON"),
        "{}",
        a.body
    );

    let no_products = order_event("e1", 0);
    let a = post_event(&w.app, &no_products).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        a.body,
        json!({"error": "Field 'data.products' must be a non-empty array of strings"})
    );
    // A refused event did not mark its id: the valid one is applied.
    assert_eq!(
        post_event(&w.app, &order_event("e1", 1)).await.body["status"],
        "processed"
    );
    let big = "x".repeat(70_000);
    let a = post_event(&w.app, &big).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(w.dir.path().exists());
}

mod on_redis;

#[tokio::test]
async fn external_data_passes_the_incoming_trace_on() {
    use crate::upstream::test_support::recording_dependency;
    use crate::upstream::{HttpUpstream, UpstreamTarget};
    use breakwater_runtime::observe::{self, HttpMetrics, TraceContext};

    let dir = TempDir::new("external-traced");
    let store = SqliteMetrics::open(&dir.path().join(DATABASE_FILE))
        .await
        .unwrap();
    let (url, seen) = recording_dependency(vec![]).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let settings = unlimited();
    let state = AnalyticsState::new(
        store,
        settings.memory_cache(),
        HttpUpstream::new(UpstreamTarget::Url(url), http),
        "analytics-service-6000",
        6000,
        &settings,
    )
    .unwrap();
    let app = app(state).layer(observe::layer(
        SERVICE_NAME,
        "analytics-service-6000".into(),
        Arc::new(HttpMetrics::new()),
    ));
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut req = axum::http::Request::get("/api/external-data")
        .header("traceparent", parent)
        .header("x-request-id", "req-analytics-1")
        .body(Body::empty())
        .unwrap();
    req.extensions_mut().insert(axum::extract::ConnectInfo(
        PEER.parse::<std::net::SocketAddr>().unwrap(),
    ));
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let parent = TraceContext::parse(parent).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (trace, request_id) = &seen[0];
    let trace = trace.unwrap();
    assert_eq!(trace.trace_id, parent.trace_id);
    assert_ne!(trace.span_id, parent.span_id);
    assert_eq!(request_id.as_deref(), Some("req-analytics-1"));
}
