//! Per-request observability shared by every axum component: a request id, a W3C trace
//! context for this hop, Prometheus HTTP metrics keyed by route template, and exactly one
//! tracing event per request; plus the `GET /metrics` route that renders them.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The request id header, taken from the caller or made here, and echoed back.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The route label of requests no route matched; raw paths would be unbounded.
pub const UNMATCHED: &str = "unmatched";
/// The content type of `GET /metrics`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Longest caller-given request id kept; longer (or non-visible-ASCII) ones are replaced
/// so a client cannot blow up log lines.
const MAX_REQUEST_ID: usize = 128;

type RequestLabels = [(&'static str, String); 3];
type RouteLabel = [(&'static str, String); 1];
type HistogramFamily = Family<RouteLabel, Histogram, fn() -> Histogram>;

/// The request id of the current request, in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// This hop's W3C trace context, in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace this request belongs to (never zero).
    pub trace_id: u128,
    /// This hop's span (never zero).
    pub span_id: u64,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// A new trace, sampled, with a fresh span.
    pub fn new_root() -> Self {
        Self {
            trace_id: nonzero_u128(),
            span_id: nonzero_u64(),
            flags: 1,
        }
    }

    /// Parses a `traceparent` value: version 00, a non-zero 32-hex trace id, a non-zero
    /// 16-hex parent id, 2-hex flags. `None` when it is anything else.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || version != "00" {
            return None;
        }
        let trace_id = hex_field(trace, 32).and_then(|t| u128::from_str_radix(t, 16).ok())?;
        let span_id = hex_field(parent, 16).and_then(|p| u64::from_str_radix(p, 16).ok())?;
        let flags = hex_field(flags, 2).and_then(|f| u8::from_str_radix(f, 16).ok())?;
        (trace_id != 0 && span_id != 0).then_some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The same trace with a fresh span: this hop's span when `self` is the caller's
    /// context, or the outgoing call's span when `self` is this hop's.
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero_u64(),
            ..*self
        }
    }

    /// `00-<trace>-<span>-<flags>`, the `traceparent` value naming this span as parent.
    pub fn header_value(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }

    /// The trace id as 32 lowercase hex characters, as logged.
    pub fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

fn hex_field(s: &str, len: usize) -> Option<&str> {
    (s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(s)
}

fn nonzero_u128() -> u128 {
    loop {
        let v: u128 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

/// A fresh request id: 32 lowercase hex characters.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The HTTP figures of one process: `http_requests_total{method,route,status}` and
/// `http_request_duration_seconds{route}`. Shared by the layer and `GET /metrics`.
#[derive(Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    durations: HistogramFamily,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpMetrics {
    /// Empty figures.
    pub fn new() -> Self {
        fn histogram() -> Histogram {
            // 1 ms .. ~16 s.
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        }
        Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(histogram as fn() -> Histogram),
        }
    }

    /// Counts one answered request.
    pub fn record(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&[
                ("method", method.to_owned()),
                ("route", route.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
        self.durations
            .get_or_create(&[("route", route.to_owned())])
            .observe(seconds);
    }

    /// Requests counted under this method, route template and status.
    pub fn requests(&self, method: &str, route: &str, status: u16) -> u64 {
        self.requests
            .get(&[
                ("method", method.to_owned()),
                ("route", route.to_owned()),
                ("status", status.to_string()),
            ])
            .map_or(0, |c| c.get())
    }

    /// Prometheus text of the HTTP figures.
    pub fn render(&self) -> String {
        self.render_with(|_| {})
    }

    /// Prometheus text of the HTTP figures and whatever `extra` registers: how a
    /// component adds its own metrics to its one `GET /metrics` page.
    pub fn render_with(&self, extra: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route template and status",
            self.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by route template",
            self.durations.clone(),
        );
        extra(&mut registry);
        let mut text = String::new();
        // Writing into a String cannot fail; an error would leave a partial page, which
        // Prometheus rejects whole rather than misreading.
        if encode(&mut text, &registry).is_err() {
            tracing::error!("cannot encode metrics");
        }
        text
    }
}

/// A router answering `GET /metrics` with `metrics`, to merge into a component's router.
pub fn metrics_router(metrics: Arc<HttpMetrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .with_state(metrics)
}

async fn metrics_page(State(metrics): State<Arc<HttpMetrics>>) -> Response {
    ([(CONTENT_TYPE, METRICS_CONTENT_TYPE)], metrics.render()).into_response()
}

/// The observability layer of component `component` (e.g. `"user-service"`), instance
/// `instance`, counting into `metrics`. Apply it with `Router::layer` so that the route
/// template ([`MatchedPath`]) is known.
pub fn layer(component: &'static str, instance: String, metrics: Arc<HttpMetrics>) -> ObserveLayer {
    ObserveLayer {
        observer: Arc::new(Observer {
            component,
            instance,
            metrics,
        }),
    }
}

#[derive(Debug)]
struct Observer {
    component: &'static str,
    instance: String,
    metrics: Arc<HttpMetrics>,
}

/// The tower layer made by [`layer`].
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    observer: Arc<Observer>,
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            observer: self.observer.clone(),
        }
    }
}

/// The service made by [`ObserveLayer`] around an inner service.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    observer: Arc<Observer>,
}

impl<S> fmt::Debug for Observe<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observe")
            .field("observer", &self.observer)
            .finish_non_exhaustive()
    }
}

impl<S> tower::Service<Request> for Observe<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        // The clone may not be ready; the one that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let observer = self.observer.clone();
        let started = tokio::time::Instant::now();

        let request_id = req
            .headers()
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID)
            .map_or_else(new_request_id, str::to_owned);
        let trace = req
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse)
            .map_or_else(TraceContext::new_root, |parent| parent.child());
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map_or_else(|| UNMATCHED.to_owned(), |p| p.as_str().to_owned());
        let method = req.method().clone();
        req.extensions_mut().insert(RequestId(request_id.clone()));
        req.extensions_mut().insert(trace);

        Box::pin(async move {
            let mut response = inner.call(req).await?;
            let latency = started.elapsed();
            let status = response.status().as_u16();
            if let Ok(value) = HeaderValue::from_str(&request_id) {
                response.headers_mut().insert(REQUEST_ID, value);
            }
            observer
                .metrics
                .record(method.as_str(), &route, status, latency.as_secs_f64());
            tracing::info!(
                component = observer.component,
                request_id = %request_id,
                instance = %observer.instance,
                method = %method,
                route = %route,
                status,
                latency_ms = latency.as_secs_f64() * 1000.0,
                trace_id = %trace.trace_hex(),
                "request"
            );
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::StatusCode;
    use tower::ServiceExt;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn app(metrics: Arc<HttpMetrics>) -> Router {
        Router::new()
            .route(
                "/items/{id}",
                get(|axum::Extension(t): axum::Extension<TraceContext>| async move {
                    t.header_value()
                }),
            )
            .merge(metrics_router(metrics.clone()))
            .layer(layer("test-service", "test-1".into(), metrics))
    }

    async fn call(app: &Router, req: Request) -> (StatusCode, Option<String>, String) {
        let res = app.clone().oneshot(req).await.unwrap();
        let id = res
            .headers()
            .get(REQUEST_ID)
            .map(|v| v.to_str().unwrap().to_owned());
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, id, String::from_utf8(body.to_vec()).unwrap())
    }

    fn get_req(uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn traceparent_parsing_follows_w3c() {
        let t = TraceContext::parse(PARENT).unwrap();
        assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(t.span_id, 0x00f067aa0ba902b7);
        assert_eq!(t.flags, 1);
        assert_eq!(t.header_value(), PARENT);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        let child = t.child();
        assert_eq!(child.trace_id, t.trace_id);
        assert_ne!(child.span_id, t.span_id);
    }

    #[tokio::test]
    async fn request_id_is_echoed_or_generated() {
        let app = app(Arc::new(HttpMetrics::new()));
        let (_, id, _) = call(&app, get_req("/items/1", &[("x-request-id", "abc-123")])).await;
        assert_eq!(id.as_deref(), Some("abc-123"));
        let (_, id, _) = call(&app, get_req("/items/1", &[])).await;
        let id = id.unwrap();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        // Unmatched requests get one too.
        let (status, id, _) = call(&app, get_req("/nowhere", &[])).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(id.is_some());
    }

    #[tokio::test]
    async fn a_valid_traceparent_is_continued_and_an_invalid_one_replaced() {
        let app = app(Arc::new(HttpMetrics::new()));
        let (_, _, body) = call(&app, get_req("/items/1", &[("traceparent", PARENT)])).await;
        let hop = TraceContext::parse(&body).unwrap();
        assert_eq!(hop.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_ne!(hop.span_id, 0x00f067aa0ba902b7);
        assert_eq!(hop.flags, 1);

        let bad = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        let (_, _, body) = call(&app, get_req("/items/1", &[("traceparent", bad)])).await;
        let fresh = TraceContext::parse(&body).unwrap();
        assert_ne!(fresh.trace_id, 0);
        assert_ne!(fresh.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    }

    #[tokio::test]
    async fn metrics_count_route_templates_not_raw_paths() {
        let metrics = Arc::new(HttpMetrics::new());
        let app = app(metrics.clone());
        for uri in ["/items/1", "/items/2", "/nope/3"] {
            call(&app, get_req(uri, &[])).await;
        }
        assert_eq!(metrics.requests("GET", "/items/{id}", 200), 2);
        assert_eq!(metrics.requests("GET", UNMATCHED, 404), 1);
        let (status, _, page) = call(&app, get_req("/metrics", &[])).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            page.contains(
                r#"http_requests_total{method="GET",route="/items/{id}",status="200"} 2"#
            ),
            "{page}"
        );
        assert!(
            page.contains("http_request_duration_seconds_bucket"),
            "{page}"
        );
        assert!(!page.contains("/items/1"), "{page}");
    }
}
