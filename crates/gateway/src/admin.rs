//! The admin API under `/admin`:
//!
//! - `GET /admin/routes`: the route table in match order, with each route's policy.
//! - `GET /admin/services`: per service its instances (state healthy / ejected until /
//!   probing, outstanding requests, EWMA latency, failures in a row), its breaker
//!   (state, last transition and its reason) and its retry budget left.
//! - `GET /admin/events`: server-sent events of breaker transitions, ejections,
//!   returns and reloads (the last 100 first, then live).
//! - `POST /admin/reload`: re-reads the config file; 400 with the error if it does not
//!   validate (the running config stays).
//! - `GET /admin/stats?seconds=N`: the dashboard's charts, per route requests/s, error
//!   rate and p50/p99 latency for each of the last N seconds (default 300), and each
//!   instance's attempts and failures ([`stats`]).
//! - `/admin/control[/...]`: `breakwater up`'s control API, forwarded ([`control`]).
//!
//! Access: open when the gateway listens on loopback only; otherwise it needs
//! `Authorization: Bearer <token>` (the token from `BREAKWATER_ADMIN_TOKEN` or the
//! file's `admin.token`), and with no token configured the admin API does not exist
//! (404), so a public gateway never exposes it by accident.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Router};
use breakwater_runtime::http::{ApiError, Json};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::errors::{self, ERROR_HEADER};
use crate::policy::{Policy, RateKey};
use crate::route::Route;
use crate::server::GatewayState;

pub mod control;
pub mod stats;

use stats::{HISTORY_SECONDS, TrafficHistory};

/// The admin routes, to be nested under `/admin`, behind the access check.
pub fn router(state: GatewayState) -> Router<GatewayState> {
    let history = Arc::new(TrafficHistory::new());
    stats::spawn_sampler(&history, state.clone());
    Router::new()
        .route("/routes", get(routes).fallback(errors::wrong_method))
        .route("/services", get(services).fallback(errors::wrong_method))
        .route("/events", get(events).fallback(errors::wrong_method))
        .route("/reload", post(reload).fallback(errors::wrong_method))
        .route(
            "/stats",
            get(traffic)
                .fallback(errors::wrong_method)
                .layer(Extension(history)),
        )
        .route("/control", any(control::forward))
        .route("/control/{*rest}", any(control::forward))
        .route_layer(middleware::from_fn_with_state(state, guard))
}

/// Lets a request through on loopback, or with the right bearer token; otherwise 401,
/// or 404 when no token is configured on a non-loopback listener.
async fn guard(State(state): State<GatewayState>, req: Request, next: Next) -> Response {
    if state.config().listener_loopback {
        return next.run(req).await;
    }
    let Some(token) = state.admin_token() else {
        return errors::no_route(req.method().clone(), req.uri().clone()).await;
    };
    let offered = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match offered {
        Some(offered) if constant_time_eq(offered.as_bytes(), token.as_bytes()) => {
            next.run(req).await
        }
        _ => {
            let mut res = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Admin API needs Authorization: Bearer <token>",
            )
            .into_response();
            let h = res.headers_mut();
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            h.insert(ERROR_HEADER, HeaderValue::from_static("unauthorized"));
            res
        }
    }
}

/// Compares without an early exit, so response timing does not tell how much of a
/// guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `GET /admin/routes`.
async fn routes(State(state): State<GatewayState>) -> Json<Value> {
    let table = state.routes();
    let routes: Vec<Value> = table.routes().iter().map(|r| describe_route(r)).collect();
    Json(json!({ "routes": routes }))
}

fn describe_route(route: &Route) -> Value {
    let spec = &route.spec;
    json!({
        "index": route.index,
        "prefix": spec.prefix,
        "methods": spec.methods.as_ref().map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>()),
        "service": spec.service,
        "rewrite": spec.rewrite,
        "policy": describe_policy(&spec.policy),
    })
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn describe_policy(p: &Policy) -> Value {
    let breaker = p.service.breaker.as_ref().map(|b| {
        let window = match b.window {
            breakwater_resilience::breaker::Window::Count(n) => json!({"calls": n.get()}),
            breakwater_resilience::breaker::Window::Time(n) => json!({"seconds": n.get()}),
        };
        json!({
            "window": window,
            "failure_rate_threshold": b.failure_rate_threshold,
            "slow_call_rate_threshold": b.slow_call_rate_threshold,
            "slow_call_duration_ms": ms(b.slow_call_duration),
            "minimum_calls": b.minimum_calls,
            "consecutive_failures": b.consecutive_failures.map(|n| n.get()),
            "open_for_ms": ms(b.open_for),
            "half_open_probes": b.half_open_probes.get(),
            "probe_deadline_ms": ms(b.probe_deadline),
        })
    });
    json!({
        "balance": p.balance.as_str(),
        "timeout": {"per_try_ms": ms(p.timeout.per_try), "total_ms": ms(p.timeout.total)},
        "retries": {
            "max_attempts": p.retries.max_attempts.get(),
            "backoff_base_ms": ms(p.retries.backoff.base),
            "backoff_max_ms": ms(p.retries.backoff.max),
            "budget_ratio": p.service.budget.ratio,
            "budget_min_per_sec": p.service.budget.min_per_sec,
        },
        "breaker": breaker,
        "outlier": {
            "consecutive_5xx": p.service.outlier.consecutive_5xx,
            "consecutive_connect_failures": p.service.outlier.consecutive_connect_failures,
            "base_ejection_time_ms": ms(p.service.outlier.base_ejection_time),
            "max_ejection_time_ms": ms(p.service.outlier.max_ejection_time),
            "max_ejection_percent": p.service.outlier.max_ejection_percent,
        },
        "rate_limit": p.rate_limit.as_ref().map(|r| json!({
            "requests": r.requests.get(),
            "per_ms": ms(r.per),
            "key": match &r.key {
                RateKey::ClientIp => "ip".to_owned(),
                RateKey::ApiKey => "api-key".to_owned(),
                RateKey::Header(name) => format!("header:{name}"),
            },
        })),
        "cache": p.cache.map(|c| json!({"ttl_ms": ms(c.ttl)})),
        "fallback": p.fallback.as_ref().map(|f| json!({
            "status": f.status.as_u16(),
            "content_type": f.content_type.to_str().unwrap_or_default(),
        })),
    })
}

/// `GET /admin/services`.
async fn services(State(state): State<GatewayState>) -> Json<Value> {
    let now = Instant::now();
    let services: Vec<Value> = state
        .upstreams()
        .all()
        .iter()
        .map(|up| {
            let snap = up.snapshot(now);
            let breaker = snap.breaker.as_ref().map(|b| {
                json!({
                    "state": b.state.as_str(),
                    "calls": b.calls,
                    "failure_rate": b.failure_rate,
                    "slow_call_rate": b.slow_call_rate,
                    "consecutive_failures": b.consecutive_failures,
                    "retry_after_ms": b.retry_after.map(ms),
                    "last_transition": b.last_transition.as_ref().map(|t| json!({
                        "from": t.from.as_str(),
                        "to": t.to.as_str(),
                        "reason": t.reason.to_string(),
                        "at_unix_ms": t.at_unix_ms,
                    })),
                })
            });
            json!({
                "service": snap.service,
                "instances": snap.instances,
                "breaker": breaker,
                "retry_budget_remaining": snap.retry_budget_remaining,
            })
        })
        .collect();
    Json(json!({ "services": services }))
}

/// The query of `GET /admin/stats`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    seconds: Option<String>,
}

/// `GET /admin/stats`.
async fn traffic(
    Extension(history): Extension<Arc<TrafficHistory>>,
    query: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let seconds = match query {
        Err(e) => {
            return ApiError::bad_request(format!("Invalid query: {}", e.body_text()))
                .into_response();
        }
        Ok(Query(StatsQuery { seconds: None })) => HISTORY_SECONDS,
        Ok(Query(StatsQuery {
            seconds: Some(text),
        })) => match text.parse::<usize>() {
            Ok(n) if (1..=HISTORY_SECONDS).contains(&n) => n,
            _ => {
                return ApiError::bad_request(format!(
                    "seconds must be a whole number from 1 to {HISTORY_SECONDS}, not {text:?}"
                ))
                .into_response();
            }
        },
    };
    let instances: Vec<Value> = history
        .instances()
        .into_iter()
        .map(|((service, instance), totals)| {
            json!({
                "service": service,
                "instance": instance,
                "attempts": totals.attempts,
                "failures": totals.failures,
            })
        })
        .collect();
    Json(json!({
        "interval_ms": 1000,
        "seconds": history.last(seconds),
        "instances": instances,
    }))
    .into_response()
}

/// `GET /admin/events`.
async fn events(State(state): State<GatewayState>) -> Response {
    crate::events::sse(state.events())
}

/// `POST /admin/reload`.
async fn reload(State(state): State<GatewayState>) -> Response {
    match state.reload().await {
        Ok(summary) => {
            Json(json!({"reloaded": true, "source": summary.source, "routes": summary.routes}))
                .into_response()
        }
        Err(e) => {
            let mut res = ApiError::bad_request(format!("Reload refused: {e}")).into_response();
            res.headers_mut()
                .insert(ERROR_HEADER, HeaderValue::from_static("bad-config"));
            res
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    async fn get(app: Router, uri: &str) -> (StatusCode, Value) {
        use tower::ServiceExt as _;
        let res = app
            .oneshot(
                axum::http::Request::get(uri)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn stats_fill_once_a_second_and_check_their_query() {
        let mut config = crate::GatewayConfig::new(8000, "http://127.0.0.1:9");
        config.listener_loopback = true;
        let state = GatewayState::new(config).unwrap();
        let app = crate::app(state.clone());
        for _ in 0..3 {
            state.metrics().request(
                "users",
                &axum::http::Method::GET,
                200,
                std::time::Duration::from_millis(2),
            );
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        let (status, body) = get(app.clone(), "/admin/stats?seconds=60").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let seconds = body["seconds"].as_array().unwrap();
        assert!(!seconds.is_empty(), "{body}");
        let requests: u64 = seconds
            .iter()
            .map(|s| s["total"]["requests"].as_u64().unwrap())
            .sum();
        assert!(requests >= 1, "{body}");
        assert!(
            seconds
                .iter()
                .any(|s| s["routes"]["users"]["p50_ms"].is_number())
        );

        for bad in ["0", "301", "x", "-1"] {
            let (status, body) = get(app.clone(), &format!("/admin/stats?seconds={bad}")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(
                body["error"].as_str().unwrap().contains("seconds"),
                "{body}"
            );
        }
        let (status, _) = get(app, "/admin/stats?nonsense=1").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}
