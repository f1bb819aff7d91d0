//! Per-request observability shared by every axum component: a request id, a W3C trace
//! context for this hop, Prometheus HTTP metrics keyed by route template, exactly one
//! tracing event per request (at debug for the polled routes: health checks, metrics
//! scrapes, heartbeats) and, when OTLP export is on, one server span per request; plus
//! the `GET /metrics` route that renders them.
//!
//! - [`layer`] / [`ObserveLayer`]: the tower layer.
//! - [`TraceContext`], [`RequestId`]: what the layer puts in the request's extensions.
//! - [`Caller`] / [`OutgoingCall`]: an extractor for the incoming request's context, and
//!   one outgoing service-to-service call made on its behalf (a child span, its
//!   `traceparent` and `x-request-id`, and its client span when export is on).
//! - [`HttpMetrics`], [`metrics_router`]: the Prometheus figures and their page.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::otlp::{AttrValue, FinishedSpan, SpanKind, SpanTimer, Tracer};

/// The request id header, taken from the caller or made here, and echoed back.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The route label of requests no route matched; raw paths would be unbounded.
pub const UNMATCHED: &str = "unmatched";
/// The content type of `GET /metrics`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Routes polled by machines (health checks, Prometheus scrapes, registry heartbeats:
/// every instance every 2 s under `up`) whose request lines are logged at debug, and
/// whose spans are exported only when the caller sent a `traceparent` (otherwise each
/// poll would be a one-span trace of its own). They are still counted.
pub const QUIET_ROUTES: &[&str] = &["/health", "/metrics", "/heartbeat"];

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

    /// Whether the trace is sampled (flag bit 0): only sampled spans are exported.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
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
        if let Some(tracer) = Tracer::global() {
            tracer.register(&mut registry);
        }
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
/// `instance`, counting into `metrics` and recording server spans into the process's
/// [`Tracer`] when one is installed. Apply it with `Router::layer` so that the route
/// template ([`MatchedPath`]) is known.
pub fn layer(component: &'static str, instance: String, metrics: Arc<HttpMetrics>) -> ObserveLayer {
    ObserveLayer {
        observer: Arc::new(Observer {
            component,
            instance,
            metrics,
            tracer: Tracer::global().cloned(),
        }),
    }
}

#[derive(Debug, Clone)]
struct Observer {
    component: &'static str,
    instance: String,
    metrics: Arc<HttpMetrics>,
    tracer: Option<Tracer>,
}

/// The tower layer made by [`layer`].
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    observer: Arc<Observer>,
}

impl ObserveLayer {
    /// Records server spans into `tracer` instead of the process's (tests run several
    /// components, each with its own collector, in one process).
    #[must_use]
    pub fn with_tracer(self, tracer: Option<Tracer>) -> Self {
        Self {
            observer: Arc::new(Observer {
                tracer,
                ..(*self.observer).clone()
            }),
        }
    }
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
        let parent = req
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse);
        let trace = parent.map_or_else(TraceContext::new_root, |parent| parent.child());
        let matched = req.extensions().get::<MatchedPath>();
        let route = matched.map_or_else(|| UNMATCHED.to_owned(), |p| p.as_str().to_owned());
        let quiet = matched.is_some_and(|p| QUIET_ROUTES.contains(&p.as_str()));
        let is_matched = matched.is_some();
        let method = req.method().clone();
        // Off (no tracer, or an unsampled trace): one branch, no clock read.
        let span = observer
            .tracer
            .as_ref()
            .filter(|_| trace.sampled() && !(quiet && parent.is_none()))
            .map(|_| (SpanTimer::start(), req.uri().path().to_owned()));
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
            macro_rules! request_line {
                ($level:ident) => {
                    tracing::$level!(
                        component = observer.component,
                        request_id = %request_id,
                        instance = %observer.instance,
                        method = %method,
                        route = %route,
                        status,
                        latency_ms = latency.as_secs_f64() * 1000.0,
                        trace_id = %trace.trace_hex(),
                        "request"
                    )
                };
            }
            if quiet {
                request_line!(debug);
            } else {
                request_line!(info);
            }
            if let (Some(tracer), Some((timer, path))) = (&observer.tracer, span) {
                let mut span = server_span(
                    trace,
                    parent.map(|p| p.span_id),
                    timer.finish(),
                    method.as_str(),
                    is_matched.then_some(route.as_str()),
                    status,
                );
                span.attributes.extend([
                    ("url.path", AttrValue::Str(path)),
                    ("breakwater.request_id", AttrValue::Str(request_id)),
                ]);
                tracer.record(span);
            }
            Ok(response)
        })
    }
}

/// The server span of one answered request: named `<method> <route>` (the method alone
/// when no route matched), with the HTTP attributes, failed on a 5xx only (a 4xx is the
/// client's error). The times are `(start, end)` in Unix nanoseconds, as
/// [`SpanTimer::finish`] and [`SpanTimer::since`] give them.
pub fn server_span(
    trace: TraceContext,
    parent_span_id: Option<u64>,
    (start_unix_nano, end_unix_nano): (u64, u64),
    method: &str,
    route: Option<&str>,
    status: u16,
) -> FinishedSpan {
    let mut attributes = vec![
        ("http.request.method", AttrValue::from(method)),
        ("http.response.status_code", AttrValue::from(status)),
    ];
    let name = match route {
        Some(route) => {
            attributes.push(("http.route", AttrValue::from(route)));
            format!("{method} {route}")
        }
        None => method.to_owned(),
    };
    FinishedSpan {
        trace_id: trace.trace_id,
        span_id: trace.span_id,
        parent_span_id,
        name,
        kind: SpanKind::Server,
        start_unix_nano,
        end_unix_nano,
        attributes,
        error: (status >= 500).then(|| format!("status {status}")),
    }
}

/// The incoming request's context, as an extractor: what a handler passes on to the
/// services it calls. Empty outside the observe layer (a root trace is started then).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// This hop's trace context; each call goes out as a child span of it.
    pub trace: Option<TraceContext>,
    /// The incoming request's id.
    pub request_id: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(Self {
            trace: parts.extensions.get::<TraceContext>().copied(),
            request_id: parts
                .extensions
                .get::<RequestId>()
                .map(|RequestId(id)| id.clone()),
        })
    }
}

impl Caller {
    /// Starts one outgoing call (one try: a retry is another call, with its own span),
    /// recording its client span into `tracer` when it finishes.
    pub fn start_call(&self, tracer: Option<&Tracer>) -> OutgoingCall {
        let (trace, parent) = match self.trace {
            Some(hop) => (hop.child(), Some(hop.span_id)),
            None => (TraceContext::new_root(), None),
        };
        OutgoingCall {
            trace,
            parent,
            request_id: self.request_id.clone(),
            recording: tracer
                .filter(|_| trace.sampled())
                .map(|t| (t.clone(), SpanTimer::start())),
        }
    }
}

/// One outgoing call on behalf of a [`Caller`]: send [`OutgoingCall::traceparent`] and
/// [`OutgoingCall::request_id`], then [`OutgoingCall::finish`] with the outcome.
#[derive(Debug)]
pub struct OutgoingCall {
    trace: TraceContext,
    parent: Option<u64>,
    request_id: Option<String>,
    recording: Option<(Tracer, SpanTimer)>,
}

impl OutgoingCall {
    /// This call's context (its span is the callee's parent).
    pub fn trace(&self) -> TraceContext {
        self.trace
    }

    /// The `traceparent` header value to send.
    pub fn traceparent(&self) -> String {
        self.trace.header_value()
    }

    /// The `x-request-id` to send, when the caller had one.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// Records the client span (when export is on): `name` like `GET /data`, `url` the
    /// URL called, `status` the answer's status if any, `error` why the call failed
    /// (transport error, timeout, or a status the caller treats as failure).
    pub fn finish(self, name: &str, url: &str, status: Option<u16>, error: Option<String>) {
        let Some((tracer, timer)) = self.recording else {
            return;
        };
        let (start_unix_nano, end_unix_nano) = timer.finish();
        let method = name.split(' ').next().unwrap_or(name);
        let mut attributes = vec![
            ("http.request.method", AttrValue::from(method)),
            ("url.full", AttrValue::from(url)),
        ];
        if let Some(status) = status {
            attributes.push(("http.response.status_code", AttrValue::from(status)));
        }
        tracer.record(FinishedSpan {
            trace_id: self.trace.trace_id,
            span_id: self.trace.span_id,
            parent_span_id: self.parent,
            name: name.to_owned(),
            kind: SpanKind::Client,
            start_unix_nano,
            end_unix_nano,
            attributes,
            error,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::StatusCode;
    use serde_json::Value;
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

    #[tokio::test]
    async fn server_and_client_spans_reach_the_collector_in_the_callers_trace() {
        use crate::otlp::tests::{Collector, attr};
        use crate::otlp::{ExportConfig, start};

        let collector = Collector::start().await;
        let (tracer, exporter) = start(
            ExportConfig::new(collector.endpoint(), "test-service", "test-1"),
            tokio_util::sync::CancellationToken::new(),
        );
        let call_tracer = tracer.clone();
        let metrics = Arc::new(HttpMetrics::new());
        let app = Router::new()
            .route(
                "/calls/{id}",
                get(move |caller: Caller| async move {
                    let call = caller.start_call(Some(&call_tracer));
                    let sent = call.traceparent();
                    call.finish(
                        "GET /data",
                        "http://dep/data",
                        Some(503),
                        Some("503".into()),
                    );
                    sent
                }),
            )
            .layer(layer("test-service", "test-1".into(), metrics).with_tracer(Some(tracer)));

        let (_, id, sent) = call(
            &app,
            get_req(
                "/calls/7",
                &[("traceparent", PARENT), ("x-request-id", "r-1")],
            ),
        )
        .await;
        assert_eq!(id.as_deref(), Some("r-1"));
        let (status, _, _) = call(&app, get_req("/nowhere", &[])).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        exporter.finish().await;

        let spans = collector.spans();
        assert_eq!(spans.len(), 3, "{spans:#?}");
        let find = |name: &str| {
            spans
                .iter()
                .find(|s| s["name"] == name)
                .unwrap_or_else(|| panic!("no span {name}: {spans:#?}"))
                .clone()
        };
        let server = find("GET /calls/{id}");
        let client = find("GET /data");
        let unmatched = find("GET");
        let caller = TraceContext::parse(PARENT).unwrap();
        assert_eq!(server["traceId"], caller.trace_hex());
        assert_eq!(server["parentSpanId"], format!("{:016x}", caller.span_id));
        assert_eq!(server["kind"], 2);
        assert_eq!(server["resource.service.name"], "test-service");
        assert_eq!(server["resource.service.instance.id"], "test-1");
        assert_eq!(attr(&server, "http.route"), "/calls/{id}");
        assert_eq!(attr(&server, "url.path"), "/calls/7");
        assert_eq!(attr(&server, "http.response.status_code"), "200");
        assert_eq!(attr(&server, "breakwater.request_id"), "r-1");
        assert_eq!(server["status"]["code"], 0);
        // The client span is the server span's child, and what was sent names it.
        let sent = TraceContext::parse(&sent).unwrap();
        assert_eq!(client["traceId"], caller.trace_hex());
        assert_eq!(client["parentSpanId"], server["spanId"]);
        assert_eq!(client["spanId"], format!("{:016x}", sent.span_id));
        assert_eq!(client["kind"], 3);
        assert_eq!(client["status"]["code"], 2);
        assert_eq!(attr(&client, "url.full"), "http://dep/data");
        // No traceparent: a new root trace, and no route template to name it by.
        assert!(unmatched.get("parentSpanId").is_none(), "{unmatched}");
        assert_ne!(unmatched["traceId"], caller.trace_hex());
        assert_eq!(attr(&unmatched, "http.route"), Value::Null);
    }

    #[tokio::test]
    async fn unsampled_traces_and_untraced_polls_are_not_recorded() {
        use crate::otlp::tests::Collector;
        use crate::otlp::{ExportConfig, start};

        let collector = Collector::start().await;
        let (tracer, exporter) = start(
            ExportConfig::new(collector.endpoint(), "test-service", "test-1"),
            tokio_util::sync::CancellationToken::new(),
        );
        let app =
            Router::new()
                .route(
                    "/items/{id}",
                    get(
                        |axum::Extension(t): axum::Extension<TraceContext>| async move {
                            t.header_value()
                        },
                    ),
                )
                .route("/health", get(|| async { "ok" }))
                .layer(
                    layer(
                        "test-service",
                        "test-1".into(),
                        Arc::new(HttpMetrics::new()),
                    )
                    .with_tracer(Some(tracer)),
                );
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let (_, _, body) = call(&app, get_req("/items/1", &[("traceparent", unsampled)])).await;
        assert!(body.ends_with("-00"), "{body}");
        call(&app, get_req("/items/1", &[("traceparent", PARENT)])).await;
        // A poll on its own is no trace worth exporting; one inside a trace is.
        call(&app, get_req("/health", &[])).await;
        call(&app, get_req("/health", &[("traceparent", PARENT)])).await;
        exporter.finish().await;
        let spans = collector.spans();
        let names: Vec<_> = spans.iter().map(|s| s["name"].clone()).collect();
        assert_eq!(names, ["GET /items/{id}", "GET /health"], "{spans:#?}");
        assert!(spans.iter().all(|s| s.get("parentSpanId").is_some()));
    }
}
