//! `POST /events`: the analytics service as a consumer of other services' events.
//!
//! Delivery is at least once, so each event is applied once by its id: the id is
//! marked processed in the same transaction as the effect (see
//! [`MetricStore::record_event`]). `order.created` becomes one metric of type
//! [`ORDERS_CREATED`] whose value is the number of products and whose timestamp is the
//! event's `occurredAt`. Answers: 200 `{"status":"processed"}` or
//! `{"status":"duplicate"}`; 400 for a body that is not an event; 422 for an event
//! type analytics does not consume; 401 when an events token is configured
//! ([`super::AnalyticsSettings::events_token`]) and the request does not carry it as
//! `Authorization: Bearer <token>` (checked before the body is read).
//!
//! The same path serves the Redis Streams consumer ([`crate::outbox::stream`]):
//! [`AnalyticsState`] is its [`EventHandler`]. Either way the event is applied in a
//! span continuing the trace of the request that caused it (the `traceparent` header
//! here, the entry's field there); the answer names that `traceId`.

use axum::Extension;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use breakwater_runtime::http::{ApiError, Json};
use breakwater_runtime::observe::TraceContext;
use serde_json::{Map, Value, json};
use tracing::Instrument;

use super::metric::{NewMetric, parse_timestamp};
use super::store::{Applied, MetricStore};
use super::{AnalyticsState, Shared, SummaryCache};
use crate::outbox::stream::{EventHandler, HandleError, HandleFuture, Handled};
use crate::outbox::{EventsToken, ORDER_CREATED};
use crate::storage::StorageError;

/// The metric type an `order.created` event is recorded as.
pub const ORDERS_CREATED: &str = "orders_created";

/// Largest event body; an order carries at most 100 short product names.
const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Longest event id accepted (ours are 32 hex digits).
const MAX_ID_CHARS: usize = 128;

/// An event checked far enough to apply.
#[derive(Debug, Clone, PartialEq)]
struct Incoming {
    id: String,
    kind: String,
    metric: NewMetric,
}

/// Why a body is refused, and with which status.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    /// Not an event: 400.
    Malformed(String),
    /// An event of a type not consumed here: 422.
    Unknown(String),
}

impl Refusal {
    fn message(&self) -> String {
        match self {
            Self::Malformed(message) => message.clone(),
            Self::Unknown(kind) => format!("Unknown event type '{kind}'"),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Malformed(message) => ApiError::bad_request(message),
            Refusal::Unknown(kind) => {
                ApiError::unprocessable(format!("Unknown event type '{kind}'"))
            }
        }
    }
}

/// `None` when `headers` carry `token` (or no token is required), else the 401 answer
/// naming what is wrong.
fn unauthorized(token: Option<&EventsToken>, headers: &HeaderMap) -> Option<Response> {
    let token = token?;
    let offered = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let message = match offered {
        Some(offered) if token.matches(offered) => return None,
        Some(_) => "Events token does not match: POST /events is only for the system's relays",
        None => "POST /events needs Authorization: Bearer <events token>",
    };
    let mut res = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    res.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(res)
}

pub(super) async fn consume<S: MetricStore, C: SummaryCache, U>(
    State(state): Shared<S, C, U>,
    trace: Option<Extension<TraceContext>>,
    req: Request,
) -> Result<Response, ApiError> {
    if let Some(refused) = unauthorized(state.events_token.as_ref(), req.headers()) {
        return Ok(refused);
    }
    let bytes = axum::body::to_bytes(req.into_body(), MAX_EVENT_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Event must be at most {MAX_EVENT_BYTES} bytes"),
            )
        })?;
    let body: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("Malformed JSON: {e}")))?;
    let event = parse_event(&body)?;
    let trace = trace.map(|Extension(t)| t);
    let applied = apply(&state, &event, trace).await?;
    let status = match applied {
        Applied::New => "processed",
        Applied::Duplicate => "duplicate",
    };
    let mut answer = json!({"status": status, "id": event.id});
    if let Some(trace) = trace {
        answer["traceId"] = Value::from(trace.trace_hex());
    }
    Ok(Json(answer).into_response())
}

/// Applies `event` once, in a span of `trace` (this consumer's hop of the trace that
/// caused the event) when there is one.
async fn apply<S: MetricStore, C: SummaryCache, U>(
    state: &AnalyticsState<S, C, U>,
    event: &Incoming,
    trace: Option<TraceContext>,
) -> Result<Applied, StorageError> {
    let span = tracing::info_span!(
        "event",
        event = %event.id,
        kind = %event.kind,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    if let Some(trace) = trace {
        span.record("trace_id", trace.trace_hex());
        span.record("span_id", format!("{:016x}", trace.span_id));
    }
    async {
        let applied = state
            .store
            .record_event(&event.id, &event.kind, &event.metric)
            .await?;
        match applied {
            Applied::New => {
                // After the commit, as for `POST /api/metrics`.
                state.cache.invalidate(&event.metric.kind).await;
                tracing::info!("event applied");
            }
            Applied::Duplicate => tracing::info!("duplicate event ignored"),
        }
        Ok(applied)
    }
    .instrument(span)
    .await
}

impl<S, C, U> EventHandler for AnalyticsState<S, C, U>
where
    S: MetricStore + 'static,
    C: SummaryCache + 'static,
    U: Send + Sync + 'static,
{
    fn handle<'a>(&'a self, event: &'a [u8], trace: Option<TraceContext>) -> HandleFuture<'a> {
        Box::pin(async move {
            if event.len() > MAX_EVENT_BYTES {
                return Err(HandleError::Refused(format!(
                    "Event must be at most {MAX_EVENT_BYTES} bytes"
                )));
            }
            let body: Value = serde_json::from_slice(event)
                .map_err(|e| HandleError::Refused(format!("Malformed JSON: {e}")))?;
            let incoming = parse_event(&body).map_err(|r| HandleError::Refused(r.message()))?;
            match apply(self, &incoming, trace).await {
                Ok(Applied::New) => Ok(Handled::Applied),
                Ok(Applied::Duplicate) => Ok(Handled::Duplicate),
                Err(e) => Err(HandleError::Unavailable(e.to_string())),
            }
        })
    }
}

/// Checks the envelope `{id, type, occurredAt, data}` and the data of the types
/// consumed here.
fn parse_event(body: &Value) -> Result<Incoming, Refusal> {
    let malformed = |m: &str| Refusal::Malformed(m.to_owned());
    let fields = body
        .as_object()
        .ok_or_else(|| malformed("Event must be a JSON object"))?;
    let id = fields
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| {
            !id.is_empty()
                && id.chars().count() <= MAX_ID_CHARS
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
        .ok_or_else(|| {
            Refusal::Malformed(format!(
                "Field 'id' must be a string of 1 to {MAX_ID_CHARS} letters, digits, '-', '_' or '.'"
            ))
        })?;
    let kind = fields
        .get("type")
        .and_then(Value::as_str)
        .filter(|k| !k.trim().is_empty())
        .ok_or_else(|| malformed("Field 'type' must be a non-empty string"))?;
    let occurred_at = fields
        .get("occurredAt")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("Field 'occurredAt' must be an ISO-8601 date-time string"))?;
    let occurred_ms = parse_timestamp(occurred_at)
        .ok_or_else(|| malformed("Field 'occurredAt' must be an ISO-8601 date-time string"))?;
    let data = fields
        .get("data")
        .and_then(Value::as_object)
        .ok_or_else(|| malformed("Field 'data' must be an object"))?;
    let value = match kind {
        ORDER_CREATED => order_created_value(data)?,
        other => return Err(Refusal::Unknown(other.to_owned())),
    };
    Ok(Incoming {
        id: id.to_owned(),
        kind: kind.to_owned(),
        metric: NewMetric {
            timestamp: occurred_at.to_owned(),
            timestamp_ms: occurred_ms,
            value,
            kind: ORDERS_CREATED.to_owned(),
        },
    })
}

/// The metric value of an `order.created`: its number of products.
fn order_created_value(data: &Map<String, Value>) -> Result<f64, Refusal> {
    for key in ["orderId", "userId"] {
        if data
            .get(key)
            .and_then(Value::as_i64)
            .is_none_or(|id| id <= 0)
        {
            return Err(Refusal::Malformed(format!(
                "Field 'data.{key}' must be a positive integer"
            )));
        }
    }
    let products = data
        .get("products")
        .and_then(Value::as_array)
        .filter(|items| !items.is_empty() && items.iter().all(Value::is_string))
        .ok_or_else(|| {
            Refusal::Malformed(
                "Field 'data.products' must be a non-empty array of strings".to_owned(),
            )
        })?;
    // At most 64 KiB of body: the count fits an f64 exactly.
    #[expect(
        clippy::cast_precision_loss,
        reason = "a product count bounded by the body size is exact in f64"
    )]
    Ok(products.len() as f64)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;
    use crate::analytics::{
        AnalyticsSettings, AnalyticsState, DATABASE_FILE, MetricStore, SqliteMetrics,
    };
    use crate::fixtures::{ScriptedUpstream, TempDir};

    /// Analytics with `token` as its events token; POSTs `event` with `authorization`.
    async fn post_event(
        token: Option<&str>,
        authorization: Option<&str>,
        event: &Value,
    ) -> (StatusCode, Value) {
        let dir = TempDir::new("events-auth");
        let store = SqliteMetrics::open(&dir.path().join(DATABASE_FILE))
            .await
            .unwrap();
        let settings = AnalyticsSettings {
            events_token: token.map(|t| EventsToken::new(t).unwrap()),
            ..AnalyticsSettings::default()
        };
        let state = AnalyticsState::new(
            store.clone(),
            settings.memory_cache(),
            ScriptedUpstream::answering(),
            "analytics-service-6000",
            6000,
            &settings,
        )
        .unwrap();
        let mut req = axum::http::Request::builder()
            .method("POST")
            .uri("/events")
            .header("content-type", "application/json");
        if let Some(value) = authorization {
            req = req.header("authorization", value);
        }
        let req = req.body(Body::from(event.to_string())).unwrap();
        let res = crate::analytics::app(state).oneshot(req).await.unwrap();
        let status = res.status();
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(res.headers()["www-authenticate"], "Bearer");
        }
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let applied = store
            .summary(ORDERS_CREATED)
            .await
            .unwrap()
            .map_or(0, |s| s.count);
        store.close().await;
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            applied > 0,
            status.is_success(),
            "only an accepted event is applied: {body}"
        );
        (status, body)
    }

    #[tokio::test]
    async fn with_a_token_configured_post_events_needs_it() {
        let event = order_event("e1");
        let (status, body) = post_event(Some("right-token"), None, &event).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer"),
            "{body}"
        );
        for wrong in [
            "Bearer wrong-token",
            "Bearer right-toke",
            "right-token",
            "Basic x",
        ] {
            let (status, body) = post_event(Some("right-token"), Some(wrong), &event).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}: {body}");
            assert!(body["error"].is_string(), "{body}");
        }
        let (status, body) =
            post_event(Some("right-token"), Some("Bearer right-token"), &event).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "processed");
    }

    #[tokio::test]
    async fn without_a_token_configured_events_are_accepted_as_before() {
        let (status, body) = post_event(None, None, &order_event("e2")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "processed");
        let (status, _) = post_event(None, Some("Bearer anything"), &order_event("e3")).await;
        assert_eq!(status, StatusCode::OK);
    }

    fn order_event(id: &str) -> Value {
        json!({
            "id": id,
            "type": "order.created",
            "occurredAt": "2026-02-15T10:00:00.000Z",
            "data": {"orderId": 6, "userId": 2, "products": ["Pen", "Ink"],
                     "timestamp": "2026-02-15T10:00:00.000Z"},
        })
    }

    #[test]
    fn an_order_created_becomes_a_metric_of_its_product_count() {
        let event = parse_event(&order_event("abc123")).unwrap();
        assert_eq!(event.id, "abc123");
        assert_eq!(event.kind, "order.created");
        assert_eq!(
            event.metric,
            NewMetric {
                timestamp: "2026-02-15T10:00:00.000Z".into(),
                timestamp_ms: 1_771_149_600_000,
                value: 2.0,
                kind: "orders_created".into(),
            }
        );
    }

    #[test]
    fn unknown_types_and_malformed_events_are_told_apart() {
        let mut user = order_event("u1");
        user["type"] = json!("user.created");
        assert_eq!(
            parse_event(&user),
            Err(Refusal::Unknown("user.created".into()))
        );
        let cases: Vec<(Value, &str)> = vec![
            (json!([]), "Event must be a JSON object"),
            (
                {
                    let mut e = order_event("x");
                    e["id"] = json!("has space");
                    e
                },
                "Field 'id'",
            ),
            (
                {
                    let mut e = order_event("x");
                    e["type"] = json!("");
                    e
                },
                "Field 'type'",
            ),
            (
                {
                    let mut e = order_event("x");
                    e["occurredAt"] = json!("soon");
                    e
                },
                "Field 'occurredAt'",
            ),
            (
                {
                    let mut e = order_event("x");
                    e["data"] = json!(1);
                    e
                },
                "Field 'data'",
            ),
            (
                {
                    let mut e = order_event("x");
                    e["data"]["products"] = json!([]);
                    e
                },
                "Field 'data.products'",
            ),
            (
                {
                    let mut e = order_event("x");
                    e["data"]["orderId"] = json!("6");
                    e
                },
                "Field 'data.orderId'",
            ),
        ];
        for (body, start) in cases {
            match parse_event(&body) {
                Err(Refusal::Malformed(m)) => assert!(m.starts_with(start), "{m} / {body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }
}
