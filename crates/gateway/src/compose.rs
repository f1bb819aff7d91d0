//! The aggregated endpoints: `/users`, `/orders/user/:userId` and `/users-with-orders`.
//!
//! Each asks the users and/or orders service through [`stack::dispatch`] under the
//! policy of the route that serves that path (so it gets the same discovery,
//! balancing, retries, ejection and breaker as proxied calls) and wraps the answer with
//! a `meta` block. When a service cannot answer (breaker open, no instance, every try
//! failed, a 5xx, or a body that is not the expected JSON), the seed's fallback data
//! stands in and `meta.source` says `fallback` (`meta.fallbackReason` names the cause,
//! e.g. `breaker-open`); a 4xx from a service is its own answer and is relayed.

use std::sync::Arc;

use axum::extract::State;
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use breakwater_runtime::clock::iso8601_now;
use breakwater_runtime::http::{Json, Path};
use breakwater_runtime::observe::{self, TraceContext};
use breakwater_runtime::otlp::{SpanTimer, Tracer};
use http_body_util::{BodyExt, Limited};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::errors::GatewayError;
use crate::forward::{self, Outbound, REQUEST_ID};
use crate::server::GatewayState;
use crate::stack;
use crate::stack::GatewaySpan;
use crate::trace::Trace;

/// Registry name of the users service.
pub const USER_SERVICE: &str = "user-service";
/// Registry name of the orders service.
pub const ORDER_SERVICE: &str = "order-service";

/// `meta.source` when every part came from the services.
pub const SOURCE_LIVE: &str = "service-discovery";
/// `meta.source` when the main data is the seed's fallback.
pub const SOURCE_FALLBACK: &str = "fallback";
/// `meta.source` when users are live but some users' orders are fallback data.
pub const SOURCE_PARTIAL: &str = "service-discovery + fallback";

/// A composed call reads the service's whole JSON answer; past this it is not a sane one.
const MAX_SERVICE_BODY: usize = 4 << 20;
/// Orders lookups in flight at once for one `/users-with-orders` request, so a long
/// user list cannot flood the orders service.
const ORDER_LOOKUPS_IN_FLIGHT: usize = 16;

/// The seed's users, served when the users service cannot answer.
pub fn fallback_users() -> Vec<Value> {
    vec![
        json!({"id": 1, "name": "Fallback User", "email": "fallback@example.com", "age": 25}),
        json!({"id": 2, "name": "Default User", "email": "default@example.com", "age": 30}),
    ]
}

/// The seed's orders of `user_id`, served when the orders service cannot answer.
pub fn fallback_orders(user_id: i64) -> Vec<Value> {
    [(1, 1), (2, 2)]
        .into_iter()
        .filter(|&(_, owner)| owner == user_id)
        .map(|(id, owner)| json!({"id": id, "userId": owner, "products": ["Fallback Product"]}))
        .collect()
}

/// What a service said to a composed call that the gateway can use.
enum Answer {
    /// The array under the expected field.
    Items(Vec<Value>),
    /// A 4xx: the service's own verdict, relayed as it is.
    Refused(Response),
}

/// `GET /users`.
pub async fn users(State(state): State<GatewayState>, headers: HeaderMap) -> Response {
    traced(&headers, "/users", |call| users_answer(state, call)).await
}

async fn users_answer(state: GatewayState, call: Propagated) -> Response {
    let (users, source) = match fetch_items(&state, USER_SERVICE, "/users", "users", call).await {
        Ok(Answer::Items(users)) => (users, Source::Live),
        Ok(Answer::Refused(res)) => return res,
        Err(e) => (fallback_users(), Source::fallback(USER_SERVICE, &e)),
    };
    let mut meta = source.meta(&state);
    meta.insert("timestamp".into(), iso8601_now().into());
    Json(json!({"users": users, "meta": meta})).into_response()
}

/// `GET /orders/user/:userId`; a non-integer id is a 400 `Invalid user ID`.
pub async fn user_orders(
    State(state): State<GatewayState>,
    Path(raw_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Ok(user_id) = raw_id.parse::<i64>() else {
        return GatewayError::bad_request("Invalid user ID").into_response();
    };
    traced(&headers, "/orders/user/{userId}", |call| {
        user_orders_answer(state, user_id, call)
    })
    .await
}

async fn user_orders_answer(state: GatewayState, user_id: i64, call: Propagated) -> Response {
    let (orders, source) = match orders_of(&state, user_id, call).await {
        Ok(Answer::Items(orders)) => (orders, Source::Live),
        Ok(Answer::Refused(res)) => return res,
        Err(e) => (
            fallback_orders(user_id),
            Source::fallback(ORDER_SERVICE, &e),
        ),
    };
    let mut meta = serde_json::Map::new();
    meta.insert("userId".into(), user_id.into());
    meta.extend(source.meta(&state));
    meta.insert("timestamp".into(), iso8601_now().into());
    Json(json!({"orders": orders, "meta": meta})).into_response()
}

/// `GET /users-with-orders`: the users, then every user's orders fetched concurrently.
pub async fn users_with_orders(State(state): State<GatewayState>, headers: HeaderMap) -> Response {
    traced(&headers, "/users-with-orders", |call| {
        users_with_orders_answer(state, call)
    })
    .await
}

async fn users_with_orders_answer(state: GatewayState, call: Propagated) -> Response {
    let (mut users, users_source) =
        match fetch_items(&state, USER_SERVICE, "/users", "users", call.clone()).await {
            Ok(Answer::Items(users)) => (users, Source::Live),
            Ok(Answer::Refused(res)) => return res,
            Err(e) => (fallback_users(), Source::fallback(USER_SERVICE, &e)),
        };

    let ids: Vec<Option<i64>> = users
        .iter()
        .map(|u| u.get("id").and_then(Value::as_i64))
        .collect();
    let mut orders: Vec<Option<Vec<Value>>> = vec![None; users.len()];
    let mut first_failure: Option<GatewayError> = None;
    let mut failures = 0_usize;

    let permits = Arc::new(Semaphore::new(ORDER_LOOKUPS_IN_FLIGHT));
    let mut lookups = JoinSet::new();
    for (index, user_id) in ids.iter().enumerate() {
        let Some(user_id) = *user_id else { continue };
        let (state, call, permits) = (state.clone(), call.clone(), permits.clone());
        lookups.spawn(async move {
            // The semaphore is never closed, so a permit always comes.
            let _permit = permits.acquire_owned().await.ok();
            let found = match orders_of(&state, user_id, call).await {
                Ok(Answer::Items(items)) => Ok(items),
                Ok(Answer::Refused(res)) => Err(GatewayError::UpstreamStatus {
                    service: ORDER_SERVICE.to_owned(),
                    status: res.status(),
                }),
                Err(e) => Err(e),
            };
            (index, found)
        });
    }
    while let Some(joined) = lookups.join_next().await {
        match joined {
            Ok((index, Ok(items))) => {
                if let Some(slot) = orders.get_mut(index) {
                    *slot = Some(items);
                }
            }
            Ok((_, Err(e))) => {
                failures += 1;
                first_failure.get_or_insert(e);
            }
            Err(e) => {
                failures += 1;
                tracing::error!(error = %e, "orders lookup task failed");
            }
        }
    }
    if failures > 0 {
        let cause = first_failure
            .as_ref()
            .map_or("task-failed", GatewayError::cause);
        tracing::warn!(
            service = ORDER_SERVICE,
            failures,
            cause,
            error = first_failure.as_ref().map(tracing::field::display),
            "orders unavailable for some users; serving fallback orders for them"
        );
    }

    let mut total_orders = 0_usize;
    for ((user, user_id), found) in users.iter_mut().zip(&ids).zip(orders) {
        let list = match (found, user_id) {
            (Some(items), _) => items,
            (None, Some(id)) => fallback_orders(*id),
            (None, None) => Vec::new(),
        };
        total_orders += list.len();
        if let Value::Object(fields) = user {
            fields.insert("orders".into(), Value::Array(list));
        }
    }

    let source = match users_source {
        Source::Live if failures > 0 => Source::Partial {
            reason: first_failure
                .as_ref()
                .map_or("task-failed", GatewayError::cause),
        },
        other => other,
    };
    let mut meta = serde_json::Map::new();
    meta.insert("totalUsers".into(), users.len().into());
    meta.insert("totalOrders".into(), total_orders.into());
    meta.extend(source.meta(&state));
    meta.insert("timestamp".into(), iso8601_now().into());
    Json(json!({"users": users, "meta": meta})).into_response()
}

/// Where a composed answer's data came from.
#[derive(Debug, Clone, Copy)]
enum Source {
    Live,
    Fallback { reason: &'static str },
    Partial { reason: &'static str },
}

impl Source {
    /// Logs the failure once, here where it is handled, and names its cause.
    fn fallback(service: &str, err: &GatewayError) -> Self {
        tracing::warn!(service, cause = err.cause(), error = %err, "serving fallback data");
        Self::Fallback {
            reason: err.cause(),
        }
    }

    fn meta(self, state: &GatewayState) -> serde_json::Map<String, Value> {
        let mut meta = serde_json::Map::new();
        let (source, reason) = match self {
            Self::Live => (SOURCE_LIVE, None),
            Self::Fallback { reason } => (SOURCE_FALLBACK, Some(reason)),
            Self::Partial { reason } => (SOURCE_PARTIAL, Some(reason)),
        };
        meta.insert("source".into(), source.into());
        if let Some(reason) = reason {
            meta.insert("fallbackReason".into(), reason.into());
        }
        meta.insert("instance".into(), state.config().instance.clone().into());
        meta
    }
}

async fn orders_of(
    state: &GatewayState,
    user_id: i64,
    call: Propagated,
) -> Result<Answer, GatewayError> {
    let path = format!("/orders/user/{user_id}");
    fetch_items(state, ORDER_SERVICE, &path, "orders", call).await
}

/// GETs `path` from `service` and takes the array under `field` from its JSON answer.
async fn fetch_items(
    state: &GatewayState,
    service: &str,
    path: &str,
    field: &str,
    call: Propagated,
) -> Result<Answer, GatewayError> {
    let invalid = |cause: String| GatewayError::InvalidResponse {
        service: service.to_owned(),
        cause,
    };
    let (upstream, policy) = state.service_target(service, path);
    let path = PathAndQuery::try_from(path).map_err(|e| invalid(e.to_string()))?;
    let res = stack::dispatch(
        state,
        &upstream,
        &policy,
        Outbound::get(path, call.request_id, call.span),
        &mut Trace::off(),
    )
    .await?;
    let status = res.status();
    if status.is_server_error() {
        return Err(GatewayError::UpstreamStatus {
            service: service.to_owned(),
            status,
        });
    }
    if !status.is_success() {
        return Ok(Answer::Refused(forward::client_response(res)));
    }
    // The head arrived within the try timeout; the body gets as long again, so a service
    // that stalls mid-body cannot hold the composed answer forever.
    let body = tokio::time::timeout(
        policy.timeout.per_try,
        Limited::new(res.into_body(), MAX_SERVICE_BODY).collect(),
    )
    .await
    .map_err(|_| GatewayError::Timeout {
        service: service.to_owned(),
    })?
    .map_err(|e| invalid(format!("reading body: {}", forward::error_chain(&*e))))?
    .to_bytes();
    let mut value: Value =
        serde_json::from_slice(&body).map_err(|e| invalid(format!("not JSON: {e}")))?;
    match value.get_mut(field).map(Value::take) {
        Some(Value::Array(items)) => Ok(Answer::Items(items)),
        _ => Err(invalid(format!("no {field:?} array in the answer"))),
    }
}

/// What every call of one composed answer passes on: the request's id (as the
/// request-id middleware set it; a fresh one only outside the gateway's router) and the
/// gateway's span as `traceparent`, so users and orders continue the caller's trace.
#[derive(Clone)]
struct Propagated {
    request_id: HeaderValue,
    span: TraceContext,
}

/// Answers a composed route inside the gateway's own span (a child of the caller's
/// `traceparent`, or a new trace), exported when OTLP export is on.
async fn traced<F>(
    headers: &HeaderMap,
    route: &'static str,
    answer: impl FnOnce(Propagated) -> F,
) -> Response
where
    F: Future<Output = Response>,
{
    let span = GatewaySpan::start(headers);
    let call = Propagated {
        request_id: headers
            .get(REQUEST_ID)
            .cloned()
            .unwrap_or_else(forward::new_request_id),
        span: span.context,
    };
    let res = answer(call).await;
    if let (Some(tracer), Some(started)) = (
        Tracer::global().filter(|_| span.context.sampled()),
        span.started,
    ) {
        tracer.record(observe::server_span(
            span.context,
            span.parent_span_id,
            SpanTimer::since(started),
            "GET",
            Some(route),
            res.status().as_u16(),
        ));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_orders_are_filtered_by_user() {
        assert_eq!(
            fallback_orders(1),
            [json!({"id": 1, "userId": 1, "products": ["Fallback Product"]})]
        );
        assert_eq!(
            fallback_orders(2),
            [json!({"id": 2, "userId": 2, "products": ["Fallback Product"]})]
        );
        assert!(fallback_orders(3).is_empty());
    }

    #[test]
    fn fallback_users_are_the_seed_values() {
        let users = fallback_users();
        assert_eq!(users.len(), 2);
        assert_eq!(users[0]["name"], "Fallback User");
        assert_eq!(users[0]["email"], "fallback@example.com");
        assert_eq!(users[0]["age"], 25);
        assert_eq!(users[1]["name"], "Default User");
        assert_eq!(users[1]["email"], "default@example.com");
        assert_eq!(users[1]["age"], 30);
    }

    #[test]
    fn every_fallback_source_says_fallback() {
        assert!(SOURCE_FALLBACK.contains("fallback"));
        assert!(SOURCE_PARTIAL.contains("fallback"));
        assert!(!SOURCE_LIVE.contains("fallback"));
    }
}
