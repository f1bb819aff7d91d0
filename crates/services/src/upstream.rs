//! The unstable service as its callers (analytics, data) see it: one `GET /data` call
//! to an instance found through discovery, or to a fixed base URL. Timeouts, retries
//! and breakers belong to the callers, which know their own budgets. Each call carries
//! the caller's trace context as a child span (`traceparent`) and its `x-request-id`,
//! and is recorded as a client span when OTLP export is on.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use breakwater_registry::client::Discovery;
use breakwater_runtime::observe::{Caller, OutgoingCall, REQUEST_ID, TRACEPARENT};
use breakwater_runtime::otlp::Tracer;
use serde_json::Value;

use crate::unstable;

/// Largest body accepted from the dependency; anything bigger is a failed call, not a
/// reason to buffer without bound.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// One call of the dependency's `GET /data`.
pub trait Upstream: Send + Sync {
    /// Calls once on behalf of `caller` (the incoming request: the call is a child span
    /// of it) and returns the JSON body of a 2xx answer. No timeout of its own: the
    /// caller wraps it in its per-try deadline.
    fn fetch(&self, caller: &Caller) -> impl Future<Output = Result<Value, UpstreamError>> + Send;
}

/// Why one call of the dependency failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Discovery offered no instance to call.
    #[error("no instance of {service} to call: {reason}")]
    NoInstance {
        /// The service looked up.
        service: String,
        /// What discovery said.
        reason: String,
    },
    /// No answer: refused, reset, or a broken response.
    #[error("call to {url} failed: {reason}")]
    Transport {
        /// The URL called.
        url: String,
        /// What the client said.
        reason: String,
    },
    /// The dependency answered with a non-2xx status.
    #[error("{url} answered {status}")]
    Status {
        /// The URL called.
        url: String,
        /// The status it answered.
        status: u16,
    },
    /// A 2xx answer whose body is not JSON or is too big.
    #[error("{url} answered a body that cannot be used: {reason}")]
    Body {
        /// The URL called.
        url: String,
        /// What is wrong with the body.
        reason: String,
    },
}

impl UpstreamError {
    /// A short label for metrics: `no_instance`, `transport`, `status` or `body`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoInstance { .. } => "no_instance",
            Self::Transport { .. } => "transport",
            Self::Status { .. } => "status",
            Self::Body { .. } => "body",
        }
    }
}

/// Where the dependency is.
#[derive(Debug, Clone)]
pub enum UpstreamTarget {
    /// A fixed base URL (the `external` setting), e.g. `http://127.0.0.1:9000`.
    Url(String),
    /// Instances of "unstable-service" found through the registry.
    Discovered(Discovery),
}

/// [`Upstream`] over HTTP. Calls through discovery rotate over the live instances, so
/// a retry goes to the next instance when there are several.
#[derive(Debug)]
pub struct HttpUpstream {
    target: UpstreamTarget,
    http: reqwest::Client,
    next: AtomicUsize,
    tracer: Option<Tracer>,
}

impl HttpUpstream {
    /// Calls `target` through `http` (a shared, pooled client), recording client spans
    /// into the process's tracer when export is on.
    pub fn new(target: UpstreamTarget, http: reqwest::Client) -> Self {
        Self {
            target,
            http,
            next: AtomicUsize::new(0),
            tracer: Tracer::global().cloned(),
        }
    }

    /// Records client spans into `tracer` instead of the process's.
    #[must_use]
    pub fn with_tracer(self, tracer: Option<Tracer>) -> Self {
        Self { tracer, ..self }
    }

    async fn base_url(&self) -> Result<String, UpstreamError> {
        let discovery = match &self.target {
            UpstreamTarget::Url(url) => return Ok(url.clone()),
            UpstreamTarget::Discovered(discovery) => discovery,
        };
        let no_instance = |reason: String| UpstreamError::NoInstance {
            service: unstable::SERVICE_NAME.to_owned(),
            reason,
        };
        let instances = discovery
            .resolve(unstable::SERVICE_NAME)
            .await
            .map_err(|e| no_instance(e.to_string()))?;
        if instances.is_empty() {
            return Err(no_instance("none registered".to_owned()));
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed) % instances.len();
        Ok(instances[index].base_url())
    }
}

impl Upstream for HttpUpstream {
    async fn fetch(&self, caller: &Caller) -> Result<Value, UpstreamError> {
        let call = caller.start_call(self.tracer.as_ref());
        let url = match self.base_url().await {
            Ok(base) => format!("{base}/data"),
            Err(err) => {
                call.finish(SPAN_NAME, "", None, Some(err.to_string()));
                return Err(err);
            }
        };
        match self.call(&url, &call).await {
            Ok((status, body)) => {
                call.finish(SPAN_NAME, &url, Some(status), None);
                Ok(body)
            }
            Err(err) => {
                let status = match &err {
                    UpstreamError::Status { status, .. } => Some(*status),
                    _ => None,
                };
                call.finish(SPAN_NAME, &url, status, Some(err.to_string()));
                Err(err)
            }
        }
    }
}

/// The client span's name.
const SPAN_NAME: &str = "GET /data";

impl HttpUpstream {
    async fn call(&self, url: &str, call: &OutgoingCall) -> Result<(u16, Value), UpstreamError> {
        let transport = |e: reqwest::Error| UpstreamError::Transport {
            url: url.to_owned(),
            reason: e.to_string(),
        };
        let mut request = self.http.get(url).header(TRACEPARENT, call.traceparent());
        if let Some(request_id) = call.request_id() {
            request = request.header(REQUEST_ID, request_id);
        }
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            return Err(UpstreamError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(UpstreamError::Body {
                    url: url.to_owned(),
                    reason: format!("longer than {MAX_BODY_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        let body = serde_json::from_slice(&body).map_err(|e| UpstreamError::Body {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        Ok((status.as_u16(), body))
    }
}

/// What the tests of the callers (data, analytics) need to see a call's trace context:
/// a dependency that records the headers it was called with, and an OTLP collector.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};
    use breakwater_runtime::observe::TraceContext;
    use breakwater_runtime::otlp::{self, ExportConfig, Exporter, Tracer};
    use serde_json::Value;

    use crate::fixtures::spawn_server;

    /// One call the stub saw: its `traceparent` (parsed) and `x-request-id`.
    pub(crate) type Seen = Arc<Mutex<Vec<(Option<TraceContext>, Option<String>)>>>;

    /// A `GET /data` answering `statuses` in turn (then 200), recording each call's
    /// headers; its base URL.
    pub(crate) async fn recording_dependency(statuses: Vec<StatusCode>) -> (String, Seen) {
        let seen: Seen = Arc::default();
        let script = Arc::new(Mutex::new(statuses.into_iter()));
        let calls = seen.clone();
        let router = Router::new().route(
            "/data",
            get(move |headers: HeaderMap| async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                calls.lock().unwrap().push((
                    header("traceparent").and_then(|t| TraceContext::parse(&t)),
                    header("x-request-id"),
                ));
                let status = script.lock().unwrap().next().unwrap_or(StatusCode::OK);
                (status, r#"{"message":"External service OK"}"#)
            }),
        );
        (format!("http://{}", spawn_server(router).await), seen)
    }

    /// Every span an in-process OTLP collector received.
    pub(crate) type Spans = Arc<Mutex<Vec<Value>>>;

    /// An exporter to an in-process collector: its tracer, the exporter to finish, and
    /// the spans received.
    pub(crate) async fn collector(service: &str) -> (Tracer, Exporter, Spans) {
        let spans: Spans = Arc::default();
        let received = spans.clone();
        let router = Router::new().route(
            "/v1/traces",
            post(move |body: String| async move {
                let body: Value = serde_json::from_str(&body).unwrap();
                for rs in body["resourceSpans"].as_array().unwrap() {
                    for ss in rs["scopeSpans"].as_array().unwrap() {
                        received
                            .lock()
                            .unwrap()
                            .extend(ss["spans"].as_array().unwrap().iter().cloned());
                    }
                }
                (StatusCode::OK, "{}")
            }),
        );
        let addr = spawn_server(router).await;
        let (tracer, exporter) = otlp::start(
            ExportConfig::new(format!("http://{addr}/v1/traces"), service, "test-1"),
            breakwater_runtime::CancellationToken::new(),
        );
        (tracer, exporter, spans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{FakeRegistry, dead_port, instance, spawn_server};
    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::get;
    use breakwater_registry::client::{CachePolicy, RegistryClient};
    use serde_json::json;

    fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    async fn answering(status: StatusCode, body: &'static str) -> String {
        let router = Router::new().route("/data", get(move || async move { (status, body) }));
        format!("http://{}", spawn_server(router).await)
    }

    #[tokio::test]
    async fn a_2xx_json_answer_is_returned() {
        let url = answering(StatusCode::OK, r#"{"message":"External service OK"}"#).await;
        let up = HttpUpstream::new(UpstreamTarget::Url(url), client());
        assert_eq!(
            up.fetch(&Caller::default()).await.unwrap(),
            json!({"message": "External service OK"})
        );
    }

    #[tokio::test]
    async fn failures_are_typed() {
        let url = answering(StatusCode::INTERNAL_SERVER_ERROR, "{}").await;
        let err = HttpUpstream::new(UpstreamTarget::Url(url), client())
            .fetch(&Caller::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, UpstreamError::Status { status: 500, .. }),
            "{err}"
        );
        assert_eq!(err.kind(), "status");

        let url = answering(StatusCode::OK, "not json").await;
        let err = HttpUpstream::new(UpstreamTarget::Url(url), client())
            .fetch(&Caller::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "body", "{err}");

        let url = format!("http://127.0.0.1:{}", dead_port().await);
        let err = HttpUpstream::new(UpstreamTarget::Url(url), client())
            .fetch(&Caller::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "transport", "{err}");
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused() {
        let big: &'static str = Box::leak(format!("\"{}\"", "x".repeat(70_000)).into_boxed_str());
        let url = answering(StatusCode::OK, big).await;
        let err = HttpUpstream::new(UpstreamTarget::Url(url), client())
            .fetch(&Caller::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "body", "{err}");
    }

    #[tokio::test]
    async fn discovery_rotates_over_instances_and_reports_none() {
        let a = answering(StatusCode::OK, r#"{"from":"a"}"#).await;
        let b = answering(StatusCode::OK, r#"{"from":"b"}"#).await;
        let port = |url: &str| url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        let (registry, _events) = FakeRegistry::start(vec![
            instance(unstable::SERVICE_NAME, "127.0.0.1", port(&a)),
            instance(unstable::SERVICE_NAME, "127.0.0.1", port(&b)),
        ])
        .await;
        let discovery = Discovery::new(RegistryClient::new(registry), CachePolicy::default());
        let up = HttpUpstream::new(UpstreamTarget::Discovered(discovery), client());
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(
                up.fetch(&Caller::default()).await.unwrap()["from"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        assert_ne!(seen[0], seen[1], "{seen:?}");
        assert_eq!(seen[0], seen[2], "{seen:?}");
        assert_eq!(seen[1], seen[3], "{seen:?}");

        let (empty, _events) = FakeRegistry::start(vec![]).await;
        let discovery = Discovery::new(RegistryClient::new(empty), CachePolicy::default());
        let err = HttpUpstream::new(UpstreamTarget::Discovered(discovery), client())
            .fetch(&Caller::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "no_instance", "{err}");
    }

    #[tokio::test]
    async fn each_call_is_a_child_span_of_the_caller_with_its_request_id() {
        use super::test_support::{collector, recording_dependency};
        use breakwater_runtime::observe::TraceContext;

        let (url, seen) = recording_dependency(vec![StatusCode::SERVICE_UNAVAILABLE]).await;
        let (tracer, exporter, spans) = collector("data-service").await;
        let up = HttpUpstream::new(UpstreamTarget::Url(url), client()).with_tracer(Some(tracer));
        let hop =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let caller = Caller {
            trace: Some(hop),
            request_id: Some("req-9".into()),
        };
        assert_eq!(up.fetch(&caller).await.unwrap_err().kind(), "status");
        up.fetch(&caller).await.unwrap();
        exporter.finish().await;

        // No incoming context: the call still starts a trace of its own.
        up.fetch(&Caller::default()).await.unwrap();
        let all = seen.lock().unwrap().clone();
        let (fresh, fresh_id) = &all[2];
        assert_ne!(fresh.unwrap().trace_id, hop.trace_id);
        assert_eq!(*fresh_id, None);
        let seen = all[..2].to_vec();
        for (trace, request_id) in &seen {
            let trace = trace.unwrap();
            assert_eq!(trace.trace_id, hop.trace_id);
            assert_ne!(trace.span_id, hop.span_id);
            assert_eq!(request_id.as_deref(), Some("req-9"));
        }
        assert_ne!(seen[0].0.unwrap().span_id, seen[1].0.unwrap().span_id);

        let spans = spans.lock().unwrap().clone();
        assert_eq!(spans.len(), 2, "{spans:#?}");
        for (span, (sent, _)) in spans.iter().zip(&seen) {
            assert_eq!(span["name"], "GET /data");
            assert_eq!(span["kind"], 3);
            assert_eq!(span["traceId"], hop.trace_hex());
            assert_eq!(span["parentSpanId"], format!("{:016x}", hop.span_id));
            assert_eq!(span["spanId"], format!("{:016x}", sent.unwrap().span_id));
        }
        assert_eq!(spans[0]["status"]["code"], 2);
        assert_eq!(spans[1]["status"]["code"], 0);
    }
}
