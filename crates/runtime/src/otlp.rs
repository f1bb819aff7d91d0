//! OpenTelemetry trace export over OTLP/HTTP with the JSON encoding (`http/json`).
//!
//! - [`ExportConfig`]: where to send and who we are, read from the standard
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` /
//!   `OTEL_SERVICE_NAME` variables ([`ExportConfig::from_env`]).
//! - [`start`]: spawns the exporter task and returns its [`Tracer`] (the cheap, cloneable
//!   handle spans are recorded through) and the [`Exporter`] (to flush at exit).
//! - [`Tracer`]: [`Tracer::record`] is a `try_send` on a bounded queue, so recording never
//!   blocks a request; a full queue drops the span and counts it. [`install`] makes one
//!   tracer the process's, found by [`Tracer::global`]: when none is installed, every
//!   recording site costs one branch.
//! - [`FinishedSpan`], [`SpanKind`], [`AttrValue`], [`SpanTimer`]: what is recorded.
//!
//! No feature gate: the exporter uses only what this crate already builds (hyper-util's
//! client, serde_json, tokio), so it adds nothing to build time. The opentelemetry +
//! tonic stack would roughly double the dependency tree for one POST per second.
//! Plain `http://` only: the workspace builds no TLS stack, and a collector is normally
//! a local agent or sidecar.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::header::CONTENT_TYPE;
use axum::http::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The base endpoint variable; traces go to `<base>/v1/traces`.
pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The traces endpoint variable, used as given; wins over [`ENDPOINT_ENV`].
pub const TRACES_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// Overrides the component's own `service.name`.
pub const SERVICE_NAME_ENV: &str = "OTEL_SERVICE_NAME";

/// Spans waiting for export before new ones are dropped.
const QUEUE: usize = 4096;
/// Most spans in one POST.
const MAX_BATCH: usize = 512;
/// A partial batch is sent after this long.
const INTERVAL: Duration = Duration::from_secs(1);
/// One POST's deadline: a stuck collector must not hold spans back for long.
const POST_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest collector answer read.
const MAX_ANSWER: usize = 64 * 1024;
/// How long [`Exporter::finish`] waits for the last POST.
const FINISH_TIMEOUT: Duration = Duration::from_secs(3);

/// Why export cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The endpoint is not a usable `http://` URL.
    #[error("{var}={value:?}: {reason}")]
    Endpoint {
        /// The variable it came from.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Where spans go and the resource they describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// The full traces URL, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub endpoint: String,
    /// `service.name`.
    pub service_name: String,
    /// `service.instance.id`.
    pub instance: String,
}

impl ExportConfig {
    /// Export to `endpoint` (a full traces URL) as `service_name` / `instance`.
    pub fn new(
        endpoint: impl Into<String>,
        service_name: impl Into<String>,
        instance: impl Into<String>,
    ) -> Self {
        Self {
            endpoint: endpoint.into(),
            service_name: service_name.into(),
            instance: instance.into(),
        }
    }

    /// Reads the standard variables: `None` when no endpoint is set (export off).
    /// `service` is the component's name, replaced by `OTEL_SERVICE_NAME` when set.
    pub fn from_env(service: &str, instance: &str) -> Result<Option<Self>, OtlpError> {
        Self::from_lookup(service, instance, |name| std::env::var(name).ok())
    }

    fn from_lookup(
        service: &str,
        instance: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, OtlpError> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let endpoint = if let Some(traces) = set(TRACES_ENDPOINT_ENV) {
            check_endpoint(TRACES_ENDPOINT_ENV, traces.trim())?
        } else if let Some(base) = set(ENDPOINT_ENV) {
            let base = check_endpoint(ENDPOINT_ENV, base.trim())?;
            format!("{}/v1/traces", base.trim_end_matches('/'))
        } else {
            return Ok(None);
        };
        let service_name = set(SERVICE_NAME_ENV).unwrap_or_else(|| service.to_owned());
        Ok(Some(Self::new(endpoint, service_name, instance)))
    }
}

fn check_endpoint(var: &'static str, value: &str) -> Result<String, OtlpError> {
    let bad = |reason| OtlpError::Endpoint {
        var,
        value: value.to_owned(),
        reason,
    };
    let uri: Uri = value
        .parse()
        .map_err(|_| bad("not a URL (expected e.g. http://127.0.0.1:4318)"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "https is not supported; point it at a local collector over http",
            ));
        }
        _ => return Err(bad("expected an http:// URL, e.g. http://127.0.0.1:4318")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("the URL has no host"));
    }
    Ok(value.to_owned())
}

/// What a span did for its caller (OTLP `SpanKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Handling a request (2).
    Server,
    /// Making a request (3).
    Client,
}

impl SpanKind {
    fn code(self) -> u8 {
        match self {
            Self::Server => 2,
            Self::Client => 3,
        }
    }
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrValue {
    /// `stringValue`.
    Str(String),
    /// `intValue`.
    Int(i64),
}

impl From<&str> for AttrValue {
    fn from(s: &str) -> Self {
        Self::Str(s.to_owned())
    }
}

impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        Self::Str(s)
    }
}

impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}

impl From<u16> for AttrValue {
    fn from(v: u16) -> Self {
        Self::Int(i64::from(v))
    }
}

/// The start of a span on the wall clock and on tokio's clock: the span's end is the
/// start plus the monotonic elapsed time, so a clock step cannot make it negative.
#[derive(Debug, Clone, Copy)]
pub struct SpanTimer {
    wall: SystemTime,
    started: tokio::time::Instant,
}

impl SpanTimer {
    /// Starts now.
    pub fn start() -> Self {
        Self {
            wall: SystemTime::now(),
            started: tokio::time::Instant::now(),
        }
    }

    /// `(start, end)` in nanoseconds since the Unix epoch, ending now.
    pub fn finish(&self) -> (u64, u64) {
        let start = unix_nanos(self.wall);
        let took = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        (start, start.saturating_add(took))
    }

    /// `(start, end)` of a span that began at wall-clock `started` (taken without a
    /// timer) and ends now; never ends before it starts.
    pub fn since(started: SystemTime) -> (u64, u64) {
        let start = unix_nanos(started);
        (start, unix_nanos(SystemTime::now()).max(start))
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One finished span, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedSpan {
    /// The trace (non-zero).
    pub trace_id: u128,
    /// This span (non-zero).
    pub span_id: u64,
    /// The parent span, `None` for a root.
    pub parent_span_id: Option<u64>,
    /// E.g. `GET /users/{id}`.
    pub name: String,
    /// Server or client.
    pub kind: SpanKind,
    /// Nanoseconds since the Unix epoch.
    pub start_unix_nano: u64,
    /// Nanoseconds since the Unix epoch.
    pub end_unix_nano: u64,
    /// Semantic-convention attributes (`http.request.method`, ...).
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// `Some(message)` marks the span failed (status code 2); `None` leaves it unset.
    pub error: Option<String>,
}

impl FinishedSpan {
    fn to_json(&self) -> Value {
        let mut span = json!({
            "traceId": format!("{:032x}", self.trace_id),
            "spanId": format!("{:016x}", self.span_id),
            "name": self.name,
            "kind": self.kind.code(),
            // 64-bit integers are strings in the protobuf JSON mapping.
            "startTimeUnixNano": self.start_unix_nano.to_string(),
            "endTimeUnixNano": self.end_unix_nano.to_string(),
            "attributes": self.attributes.iter().map(|(k, v)| key_value(k, v)).collect::<Vec<_>>(),
            "status": match &self.error {
                Some(message) => json!({"code": 2, "message": message}),
                None => json!({"code": 0}),
            },
        });
        if let (Some(parent), Some(fields)) = (self.parent_span_id, span.as_object_mut()) {
            fields.insert(
                "parentSpanId".to_owned(),
                Value::String(format!("{parent:016x}")),
            );
        }
        span
    }
}

fn key_value(key: &str, value: &AttrValue) -> Value {
    match value {
        AttrValue::Str(s) => json!({"key": key, "value": {"stringValue": s}}),
        AttrValue::Int(i) => json!({"key": key, "value": {"intValue": i.to_string()}}),
    }
}

/// The `ExportTraceServiceRequest` body for `spans` of the resource `config` names.
pub fn encode(config: &ExportConfig, spans: &[FinishedSpan]) -> Value {
    json!({
        "resourceSpans": [{
            "resource": {
                "attributes": [
                    key_value("service.name", &AttrValue::Str(config.service_name.clone())),
                    key_value("service.instance.id", &AttrValue::Str(config.instance.clone())),
                    key_value("service.version", &AttrValue::Str(env!("CARGO_PKG_VERSION").to_owned())),
                ],
            },
            "scopeSpans": [{
                "scope": {"name": "breakwater", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans.iter().map(FinishedSpan::to_json).collect::<Vec<_>>(),
            }],
        }],
    })
}

#[derive(Debug, Default)]
struct Counts {
    exported: Counter,
    dropped: Counter,
    failed: Counter,
}

/// Where spans are recorded: a bounded queue to the exporter task. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct Tracer {
    queue: mpsc::Sender<FinishedSpan>,
    counts: Arc<Counts>,
}

static GLOBAL: OnceLock<Tracer> = OnceLock::new();

/// Makes `tracer` the process's, for [`Tracer::global`]. Only the first call wins
/// (`false` after that): components install theirs once at start.
pub fn install(tracer: Tracer) -> bool {
    GLOBAL.set(tracer).is_ok()
}

impl Tracer {
    /// The process's tracer, when export is on.
    pub fn global() -> Option<&'static Tracer> {
        GLOBAL.get()
    }

    /// Queues `span` for export; drops it (counted) when the queue is full or the
    /// exporter has stopped. Never waits.
    pub fn record(&self, span: FinishedSpan) {
        if self.queue.try_send(span).is_err() {
            self.counts.dropped.inc();
        }
    }

    /// Spans dropped so far.
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.get()
    }

    /// Adds `otlp_spans_exported_total`, `otlp_spans_dropped_total` and
    /// `otlp_export_failures_total` to a metrics page.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "otlp_spans_exported",
            "Spans the OTLP collector accepted",
            self.counts.exported.clone(),
        );
        registry.register(
            "otlp_spans_dropped",
            "Spans dropped: export queue full, or their batch failed",
            self.counts.dropped.clone(),
        );
        registry.register(
            "otlp_export_failures",
            "OTLP export POSTs that failed or were refused",
            self.counts.failed.clone(),
        );
    }
}

/// The running exporter task.
#[derive(Debug)]
pub struct Exporter {
    task: JoinHandle<()>,
    close: CancellationToken,
}

impl Exporter {
    /// Sends what is still queued and stops (waiting at most a few seconds): call it
    /// after the component has drained, so the last requests' spans leave too.
    pub async fn finish(self) {
        self.close.cancel();
        if tokio::time::timeout(FINISH_TIMEOUT, self.task)
            .await
            .is_err()
        {
            tracing::warn!("OTLP exporter did not finish in time; last spans lost");
        }
    }
}

/// Starts exporting to `config.endpoint`: batches of up to 512 spans, or whatever is
/// queued every second; everything queued is sent at once when `shutdown` fires and
/// again by [`Exporter::finish`].
pub fn start(config: ExportConfig, shutdown: CancellationToken) -> (Tracer, Exporter) {
    let (queue, spans) = mpsc::channel(QUEUE);
    let counts = Arc::new(Counts::default());
    let close = CancellationToken::new();
    let sender = Sender {
        client: Client::builder(TokioExecutor::new()).build_http(),
        config,
        counts: counts.clone(),
    };
    let task = tokio::spawn(run(sender, spans, shutdown, close.clone()));
    (Tracer { queue, counts }, Exporter { task, close })
}

async fn run(
    sender: Sender,
    mut spans: mpsc::Receiver<FinishedSpan>,
    shutdown: CancellationToken,
    close: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Not `interval`: its first tick is immediate, which would send a lone first span.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + INTERVAL, INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown_seen = false;
    loop {
        tokio::select! {
            () = close.cancelled() => {
                drain(&mut spans, &mut batch);
                sender.send_all(&mut batch).await;
                return;
            }
            () = shutdown.cancelled(), if !shutdown_seen => {
                // The process may be killed soon after; what is queued leaves now. The
                // task keeps running so spans of the drain still go out at `finish`.
                shutdown_seen = true;
                drain(&mut spans, &mut batch);
                sender.send_all(&mut batch).await;
            }
            span = spans.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    if batch.len() >= MAX_BATCH {
                        sender.send_all(&mut batch).await;
                    }
                }
                None => {
                    sender.send_all(&mut batch).await;
                    return;
                }
            },
            _ = tick.tick() => sender.send_all(&mut batch).await,
        }
    }
}

fn drain(spans: &mut mpsc::Receiver<FinishedSpan>, batch: &mut Vec<FinishedSpan>) {
    while let Ok(span) = spans.try_recv() {
        batch.push(span);
    }
}

struct Sender {
    client: Client<HttpConnector, String>,
    config: ExportConfig,
    counts: Arc<Counts>,
}

impl Sender {
    /// POSTs `batch` in chunks of [`MAX_BATCH`] and empties it.
    async fn send_all(&self, batch: &mut Vec<FinishedSpan>) {
        for chunk in batch.chunks(MAX_BATCH) {
            let n = chunk.len() as u64;
            match self.post(chunk).await {
                Ok(()) => {
                    self.counts.exported.inc_by(n);
                }
                Err(reason) => {
                    self.counts.failed.inc();
                    self.counts.dropped.inc_by(n);
                    tracing::debug!(endpoint = %self.config.endpoint, %reason, spans = n, "OTLP export failed");
                }
            }
        }
        batch.clear();
    }

    async fn post(&self, spans: &[FinishedSpan]) -> Result<(), String> {
        let body = encode(&self.config, spans).to_string();
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.config.endpoint)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            // Read to the end (a partial-success note at most) so the pooled connection
            // is reused by the next batch.
            axum::body::to_bytes(axum::body::Body::new(response.into_body()), MAX_ANSWER)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(status)
        };
        let status = tokio::time::timeout(POST_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {POST_TIMEOUT:?}"))??;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("collector answered {status}"))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    use axum::Router;
    use axum::routing::post;

    /// An in-process OTLP/HTTP collector: every JSON body POSTed to `/v1/traces`.
    pub(crate) struct Collector {
        pub(crate) base: String,
        bodies: Arc<Mutex<Vec<Value>>>,
    }

    impl Collector {
        pub(crate) async fn start() -> Self {
            let bodies = Arc::new(Mutex::new(Vec::new()));
            let seen = bodies.clone();
            let app = Router::new().route(
                "/v1/traces",
                post(
                    move |headers: axum::http::HeaderMap, body: String| async move {
                        assert_eq!(headers[CONTENT_TYPE], "application/json");
                        seen.lock()
                            .unwrap()
                            .push(serde_json::from_str(&body).unwrap());
                        "{}"
                    },
                ),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            Self { base, bodies }
        }

        pub(crate) fn endpoint(&self) -> String {
            format!("{}/v1/traces", self.base)
        }

        pub(crate) fn posts(&self) -> usize {
            self.bodies.lock().unwrap().len()
        }

        /// Every span received, each with its resource's attributes merged in under
        /// `resource.<key>`.
        pub(crate) fn spans(&self) -> Vec<Value> {
            let mut out = Vec::new();
            for body in self.bodies.lock().unwrap().iter() {
                for rs in body["resourceSpans"].as_array().unwrap() {
                    let resource: HashMap<String, Value> = rs["resource"]["attributes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|kv| {
                            (
                                kv["key"].as_str().unwrap().to_owned(),
                                kv["value"]["stringValue"].clone(),
                            )
                        })
                        .collect();
                    for ss in rs["scopeSpans"].as_array().unwrap() {
                        for span in ss["spans"].as_array().unwrap() {
                            let mut span = span.clone();
                            for (k, v) in &resource {
                                span[format!("resource.{k}")] = v.clone();
                            }
                            out.push(span);
                        }
                    }
                }
            }
            out
        }

        /// Waits (up to 5 s) until at least `n` spans arrived.
        pub(crate) async fn wait_for(&self, n: usize) -> Vec<Value> {
            for _ in 0..100 {
                let spans = self.spans();
                if spans.len() >= n {
                    return spans;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("fewer than {n} spans arrived: {:?}", self.spans());
        }
    }

    /// The value of attribute `key` of a received span.
    pub(crate) fn attr(span: &Value, key: &str) -> Value {
        span["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|kv| kv["key"] == key)
            .map_or(Value::Null, |kv| {
                let v = &kv["value"];
                if v.get("stringValue").is_some() {
                    v["stringValue"].clone()
                } else {
                    v["intValue"].clone()
                }
            })
    }

    fn span(trace_id: u128, span_id: u64, parent: Option<u64>) -> FinishedSpan {
        FinishedSpan {
            trace_id,
            span_id,
            parent_span_id: parent,
            name: "GET /x".into(),
            kind: SpanKind::Client,
            start_unix_nano: 1_700_000_000_000_000_000,
            end_unix_nano: 1_700_000_000_000_500_000,
            attributes: vec![
                ("http.request.method", "GET".into()),
                ("http.response.status_code", AttrValue::from(503u16)),
            ],
            error: Some("503".into()),
        }
    }

    #[test]
    fn spans_are_encoded_per_the_otlp_json_mapping() {
        let config = ExportConfig::new("http://c/v1/traces", "user-service", "user-service-4000");
        let body = encode(
            &config,
            &[span(
                0x4bf92f3577b34da6a3ce929d0e0e4736,
                0xf067aa0ba902b7,
                Some(1),
            )],
        );
        let rs = &body["resourceSpans"][0];
        assert_eq!(
            rs["resource"]["attributes"][0],
            json!({"key": "service.name", "value": {"stringValue": "user-service"}})
        );
        assert_eq!(
            rs["resource"]["attributes"][1],
            json!({"key": "service.instance.id", "value": {"stringValue": "user-service-4000"}})
        );
        let s = &rs["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s["spanId"], "00f067aa0ba902b7");
        assert_eq!(s["parentSpanId"], "0000000000000001");
        assert_eq!(s["kind"], 3);
        assert_eq!(s["startTimeUnixNano"], "1700000000000000000");
        assert_eq!(s["endTimeUnixNano"], "1700000000000500000");
        assert_eq!(
            s["attributes"][1],
            json!({"key": "http.response.status_code", "value": {"intValue": "503"}})
        );
        assert_eq!(s["status"], json!({"code": 2, "message": "503"}));

        let root = encode(&config, &[span(1, 2, None)]);
        let s = &root["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert!(s.get("parentSpanId").is_none(), "{s}");
    }

    #[test]
    fn the_endpoint_comes_from_the_standard_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(
            ExportConfig::from_lookup("s", "s-1", env(&[])).unwrap(),
            None
        );
        assert_eq!(
            ExportConfig::from_lookup("s", "s-1", env(&[(ENDPOINT_ENV, "")])).unwrap(),
            None
        );
        let c = ExportConfig::from_lookup(
            "user-service",
            "user-service-4000",
            env(&[(ENDPOINT_ENV, "http://127.0.0.1:4318/")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://127.0.0.1:4318/v1/traces");
        assert_eq!(c.service_name, "user-service");
        assert_eq!(c.instance, "user-service-4000");

        let c = ExportConfig::from_lookup(
            "user-service",
            "i",
            env(&[
                (ENDPOINT_ENV, "http://127.0.0.1:4318"),
                (TRACES_ENDPOINT_ENV, "http://collector:9999/custom"),
                (SERVICE_NAME_ENV, "users"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://collector:9999/custom");
        assert_eq!(c.service_name, "users");

        for bad in [
            "https://collector:4318",
            "collector:4318",
            "not a url",
            "http://",
        ] {
            let pairs: &'static [(&'static str, &'static str)] = vec![(ENDPOINT_ENV, bad)].leak();
            let err = ExportConfig::from_lookup("s", "i", env(pairs)).unwrap_err();
            assert!(err.to_string().contains(ENDPOINT_ENV), "{err}");
        }
    }

    #[tokio::test]
    async fn spans_are_batched_to_the_collector_and_flushed_at_finish() {
        let collector = Collector::start().await;
        let shutdown = CancellationToken::new();
        let (tracer, exporter) = start(
            ExportConfig::new(collector.endpoint(), "svc", "svc-1"),
            shutdown.clone(),
        );
        for i in 1..=3 {
            tracer.record(span(7, i, None));
        }
        // Within the 1 s interval.
        let spans = collector.wait_for(3).await;
        assert_eq!(collector.posts(), 1, "one batch: {spans:?}");
        assert_eq!(spans[0]["resource.service.name"], "svc");
        assert_eq!(spans[0]["resource.service.instance.id"], "svc-1");

        // The shutdown token sends what is queued at once, not at the next tick (~1 s
        // away: the first batch just left on one).
        tracer.record(span(8, 1, None));
        let cancelled = tokio::time::Instant::now();
        shutdown.cancel();
        collector.wait_for(4).await;
        assert!(cancelled.elapsed() < Duration::from_millis(500));
        // Recorded during the drain: finish sends it without waiting for the interval.
        tracer.record(span(8, 2, None));
        exporter.finish().await;
        let spans = collector.spans();
        assert_eq!(spans.len(), 5, "{spans:?}");
        assert_eq!(tracer.dropped(), 0);
        // After the exporter stopped, recording drops (counted) instead of blocking.
        tracer.record(span(9, 1, None));
        assert_eq!(tracer.dropped(), 1);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let collector = Collector::start().await;
        let (tracer, exporter) = start(
            ExportConfig::new(collector.endpoint(), "svc", "svc-1"),
            CancellationToken::new(),
        );
        // The exporter task cannot run until this test yields: the queue fills.
        for i in 1..=(QUEUE as u64 + 10) {
            tracer.record(span(3, i, None));
        }
        assert_eq!(tracer.dropped(), 10);
        exporter.finish().await;
        assert_eq!(collector.spans().len(), QUEUE);
        // Sent in batches of at most 512.
        assert_eq!(collector.posts(), QUEUE.div_ceil(MAX_BATCH));
    }

    #[tokio::test]
    async fn an_unreachable_collector_costs_counted_drops_not_blocking() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        drop(listener);
        let (tracer, exporter) = start(
            ExportConfig::new(dead, "svc", "svc-1"),
            CancellationToken::new(),
        );
        tracer.record(span(1, 1, None));
        exporter.finish().await;
        assert_eq!(tracer.dropped(), 1);
        assert_eq!(tracer.counts.failed.get(), 1);
        let mut page = Registry::default();
        tracer.register(&mut page);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &page).unwrap();
        assert!(text.contains("otlp_spans_dropped_total 1"), "{text}");
    }
}
