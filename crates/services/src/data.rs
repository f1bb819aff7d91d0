//! The data service ("data-service", seed 000's app): fetches from the unstable
//! dependency with a per-try deadline, jittered retries and a fallback, stores each
//! result under a fresh id in a sharded store, and reports its own figures.
//!
//! The store is [`SqliteShards`] (embedded default) or, when
//! [`DataSettings::redis_urls`] or [`DataSettings::redis_cluster`] is set,
//! [`RedisShards`]; all place a record by [`RecordId::shard`].

mod fetch;
mod metrics;
mod record;
mod redis_store;
mod store;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use breakwater_resilience::retry::{Backoff, RetryPolicy};
use breakwater_runtime::clock::iso8601_now;
use breakwater_runtime::http::{ApiError, Json, Path, method_not_allowed, not_found};
use breakwater_runtime::observe::{Caller, HttpMetrics};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower_http::cors::CorsLayer;

pub use record::{InvalidRecordId, RecordId, fnv1a64, jump_hash};
pub use redis_store::{DEFAULT_REDIS_PREFIX, RedisShards};
pub use store::{DataStore, MAX_SHARDS, MIN_SHARDS, SqliteShards};

use crate::settings::{InvalidSetting, check_base_url, check_duration};
use crate::upstream::{HttpUpstream, Upstream};
use fetch::{FetchPolicy, fetch};
use metrics::{DataMetrics, resident_bytes};

/// The name data instances register under.
pub const SERVICE_NAME: &str = "data-service";

/// The most tries a configuration may ask for.
pub const MAX_ATTEMPTS: u32 = 10;

/// How the data service stores and calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSettings {
    /// Shard files of the embedded store, or logical shards on one Redis server,
    /// [`MIN_SHARDS`]..=[`MAX_SHARDS`]. Default 4.
    pub shards: u32,
    /// Redis instead of the shard files ([`RedisShards`]): one URL holds `shards`
    /// logical shards; 2..=[`MAX_SHARDS`] URLs are one shard each (then `shards` is not
    /// used). Default: none (SQLite).
    pub redis_urls: Vec<String>,
    /// Redis Cluster instead ([`RedisShards::open_cluster`]): URLs of some of its nodes
    /// (one is enough), holding `shards` logical shards, each in one slot. Not with
    /// `redis_urls`. Default: none.
    pub redis_cluster: Vec<String>,
    /// Start of every data key in Redis. Default [`DEFAULT_REDIS_PREFIX`].
    pub redis_prefix: String,
    /// A fixed base URL of the dependency (e.g. `http://127.0.0.1:9000`) instead of
    /// "unstable-service" found through discovery. Default: discovery.
    pub external: Option<String>,
    /// Deadline of one try, 1 ms..=60 s. Default 2 s.
    pub try_timeout: Duration,
    /// Total tries including the first, 1..=[`MAX_ATTEMPTS`]. Default 4.
    pub max_attempts: u32,
    /// Ceiling of the first backoff (doubling per retry, full jitter). Default 100 ms.
    pub backoff_base: Duration,
    /// No backoff's ceiling exceeds this, at most 60 s. Default 1 s.
    pub backoff_max: Duration,
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            shards: 4,
            redis_urls: Vec::new(),
            redis_cluster: Vec::new(),
            redis_prefix: DEFAULT_REDIS_PREFIX.to_owned(),
            external: None,
            try_timeout: Duration::from_secs(2),
            max_attempts: 4,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        }
    }
}

impl DataSettings {
    /// Checks every value; the error names the setting.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        self.policy().map(|_| ())
    }

    fn policy(&self) -> Result<FetchPolicy, InvalidSetting> {
        if !(MIN_SHARDS..=MAX_SHARDS).contains(&self.shards) {
            return Err(InvalidSetting::new(
                "shards",
                format!("{} is outside {MIN_SHARDS}..={MAX_SHARDS}", self.shards),
            ));
        }
        if self.redis_urls.len() > MAX_SHARDS as usize {
            return Err(InvalidSetting::new(
                "redis_urls",
                format!("{} URLs, at most {MAX_SHARDS}", self.redis_urls.len()),
            ));
        }
        for url in &self.redis_urls {
            redis::Client::open(url.as_str())
                .map_err(|e| InvalidSetting::new("redis_urls", format!("{url:?}: {e}")))?;
        }
        if !self.redis_cluster.is_empty() {
            if !self.redis_urls.is_empty() {
                return Err(InvalidSetting::new(
                    "redis_cluster",
                    "give either Redis URLs or a Redis Cluster, not both",
                ));
            }
            redis::cluster::ClusterClient::new(self.redis_cluster.iter().map(String::as_str))
                .map_err(|e| InvalidSetting::new("redis_cluster", e.to_string()))?;
        }
        if self.redis_prefix.is_empty() {
            return Err(InvalidSetting::new("redis_prefix", "must not be empty"));
        }
        if let Some(url) = &self.external {
            check_base_url("external", url)?;
        }
        let minute = Duration::from_secs(60);
        check_duration(
            "try_timeout",
            self.try_timeout,
            Duration::from_millis(1),
            minute,
        )?;
        check_duration("backoff_max", self.backoff_max, Duration::ZERO, minute)?;
        check_duration(
            "backoff_base",
            self.backoff_base,
            Duration::ZERO,
            self.backoff_max,
        )?;
        let max_attempts = NonZeroU32::new(self.max_attempts)
            .filter(|n| n.get() <= MAX_ATTEMPTS)
            .ok_or_else(|| {
                InvalidSetting::new(
                    "max_attempts",
                    format!("{} is outside 1..={MAX_ATTEMPTS}", self.max_attempts),
                )
            })?;
        Ok(FetchPolicy {
            try_timeout: self.try_timeout,
            retry: RetryPolicy {
                max_attempts,
                backoff: Backoff {
                    base: self.backoff_base,
                    max: self.backoff_max,
                },
            },
        })
    }
}

/// What the data handlers share.
#[derive(Debug)]
pub struct DataState<S = SqliteShards, U = HttpUpstream> {
    store: S,
    upstream: U,
    instance: String,
    port: u16,
    policy: FetchPolicy,
    metrics: DataMetrics,
    http_metrics: Option<Arc<HttpMetrics>>,
    started: Instant,
}

impl<S: DataStore, U: Upstream> DataState<S, U> {
    /// State for instance `instance` on `port`, storing in `store` and calling
    /// `upstream` as `settings` say (`settings.shards` and `settings.external` are the
    /// caller's to apply when it builds `store` and `upstream`).
    pub fn new(
        store: S,
        upstream: U,
        instance: impl Into<String>,
        port: u16,
        settings: &DataSettings,
    ) -> Result<Self, InvalidSetting> {
        Ok(Self {
            store,
            upstream,
            instance: instance.into(),
            port,
            policy: settings.policy()?,
            metrics: DataMetrics::new(),
            http_metrics: None,
            started: Instant::now(),
        })
    }

    /// Shows the process's HTTP metrics on this service's `GET /metrics` page too, so
    /// the process has one metrics page with both.
    pub fn with_http_metrics(mut self, metrics: Arc<HttpMetrics>) -> Self {
        self.http_metrics = Some(metrics);
        self
    }
}

/// The data service's routes: `GET /` (also `GET /data`, the gateway's name for it),
/// `GET /data/{id}`, `GET /stats`, `GET /metrics`, `GET /health`, with JSON 404/405
/// fallbacks and permissive CORS. Every request is counted in `totalRequests`.
pub fn app<S: DataStore + 'static, U: Upstream + 'static>(state: DataState<S, U>) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .route("/", get(fetch_and_store::<S, U>))
        .route("/data", get(fetch_and_store::<S, U>))
        .route("/data/{id}", get(read::<S, U>))
        .route("/stats", get(stats::<S, U>))
        .route("/metrics", get(prometheus::<S, U>))
        .route("/health", get(health::<S, U>))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CorsLayer::permissive())
        .layer(middleware::from_fn_with_state(metrics, count_request))
        .with_state(Arc::new(state))
}

type Shared<S, U> = State<Arc<DataState<S, U>>>;

async fn count_request(State(metrics): State<DataMetrics>, req: Request, next: Next) -> Response {
    metrics.request();
    next.run(req).await
}

async fn health<S: DataStore, U: Upstream>(State(state): Shared<S, U>) -> Json<Value> {
    Json(json!({
        "service": SERVICE_NAME,
        "instance": state.instance,
        "port": state.port,
        "status": "healthy",
        "timestamp": iso8601_now(),
    }))
}

async fn fetch_and_store<S: DataStore, U: Upstream>(
    State(state): Shared<S, U>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let fetched = fetch(&state.upstream, state.policy, &state.metrics, &caller).await;
    let (data, source) = match fetched.data {
        Some(data) => (data, "upstream"),
        None => {
            state.metrics.fallback();
            (json!({"message": "Fallback response"}), "fallback")
        }
    };
    let id = RecordId::random();
    state.store.save(id, &data).await?;
    state.metrics.saved();
    Ok(Json(json!({
        "instance": state.instance,
        "id": id.to_string(),
        "data": data,
        "source": source,
        "attempts": fetched.attempts,
    })))
}

async fn read<S: DataStore, U: Upstream>(
    State(state): Shared<S, U>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id: RecordId = raw
        .parse()
        .map_err(|_| ApiError::bad_request("Invalid data ID"))?;
    let data = state
        .store
        .load(id)
        .await?
        .ok_or_else(|| ApiError::not_found("Data not found"))?;
    Ok(Json(json!({"id": id.to_string(), "data": data})))
}

async fn stats<S: DataStore, U: Upstream>(
    State(state): Shared<S, U>,
) -> Result<Json<Value>, ApiError> {
    let total_saved = state.store.total().await?;
    Ok(Json(json!({
        "instanceId": state.instance,
        "totalSaved": total_saved,
        "totalRequests": state.metrics.requests(),
        "uptimeSeconds": state.started.elapsed().as_secs(),
        "memoryUsage": {"rss": resident_bytes()},
    })))
}

async fn prometheus<S: DataStore, U: Upstream>(
    State(state): Shared<S, U>,
) -> Result<Response, ApiError> {
    let stored = state.store.total().await?;
    Ok((
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        match &state.http_metrics {
            Some(http) => http.render_with(|registry| state.metrics.register(registry, stored)),
            None => state.metrics.render(stored),
        },
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{ScriptedUpstream, TempDir, call};
    use crate::upstream::UpstreamTarget;
    use axum::http::StatusCode;

    struct World {
        _dir: TempDir,
        store: SqliteShards,
        app: Router,
    }

    /// Settings whose waits are short enough for real time: handler tests use real
    /// SQLite, whose worker threads do not mix with a paused clock (the pool's own
    /// timers would jump ahead while a query runs). The timing itself is tested with
    /// paused time in `fetch`.
    fn quick() -> DataSettings {
        DataSettings {
            try_timeout: Duration::from_millis(50),
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(4),
            ..DataSettings::default()
        }
    }

    async fn world<U: Upstream + 'static>(
        tag: &str,
        upstream: U,
        settings: &DataSettings,
    ) -> World {
        let dir = TempDir::new(tag);
        let store = SqliteShards::open(dir.path(), settings.shards)
            .await
            .unwrap();
        let state =
            DataState::new(store.clone(), upstream, "data-service-7000", 7000, settings).unwrap();
        World {
            _dir: dir,
            store,
            app: app(state),
        }
    }

    #[tokio::test]
    async fn health_names_the_instance() {
        let w = world("health", ScriptedUpstream::answering(), &quick()).await;
        let (status, body) = call(&w.app, "GET", "/health", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["service"], "data-service");
        assert_eq!(body["instance"], "data-service-7000");
        assert_eq!(body["status"], "healthy");
    }

    #[tokio::test]
    async fn an_answer_is_stored_and_read_back() {
        let w = world("answer", ScriptedUpstream::answering(), &quick()).await;
        for path in ["/", "/data"] {
            let (status, body) = call(&w.app, "GET", path, None).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["instance"], "data-service-7000");
            assert_eq!(body["data"], json!({"message": "External service OK"}));
            assert_eq!(body["source"], "upstream");
            assert_eq!(body["attempts"], 1);
            let id = body["id"].as_str().unwrap();
            assert!(id.parse::<RecordId>().is_ok(), "{id}");

            let (status, stored) = call(&w.app, "GET", &format!("/data/{id}"), None).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(stored, json!({"id": id, "data": body["data"]}));
        }
        assert_eq!(w.store.total().await.unwrap(), 2);
    }

    #[tokio::test]
    async fn four_failures_give_the_stored_fallback() {
        let upstream = ScriptedUpstream::failing();
        let w = world("fallback", upstream.clone(), &quick()).await;
        let (status, body) = call(&w.app, "GET", "/", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["data"], json!({"message": "Fallback response"}));
        assert_eq!(body["source"], "fallback");
        assert_eq!(body["attempts"], 4);
        assert_eq!(upstream.calls(), 4);
        let id = body["id"].as_str().unwrap();
        let (status, stored) = call(&w.app, "GET", &format!("/data/{id}"), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(stored["data"], json!({"message": "Fallback response"}));

        let (_, text) = call_text(&w.app, "/metrics").await;
        for line in [
            "data_upstream_attempts_total{outcome=\"status\"} 4",
            "data_fallbacks_total 1",
            "data_saved_total 1",
            "data_stored_records 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }

    #[tokio::test]
    async fn a_stalled_dependency_is_cut_per_try() {
        let upstream = ScriptedUpstream::stalling();
        let w = world("stalled", upstream.clone(), &quick()).await;
        let started = Instant::now();
        let (status, body) = call(&w.app, "GET", "/", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["source"], "fallback");
        assert_eq!(upstream.calls(), 4);
        // Four 50 ms tries and at most 1 + 2 + 4 ms of backoff, plus slack.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    }

    #[tokio::test]
    async fn reads_say_what_is_wrong() {
        let w = world("read", ScriptedUpstream::answering(), &quick()).await;
        let missing = RecordId::random();
        let (status, body) = call(&w.app, "GET", &format!("/data/{missing}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, json!({"error": "Data not found"}));
        for bad in ["abc", "1", &missing.to_string().to_uppercase(), "%20"] {
            let (status, body) = call(&w.app, "GET", &format!("/data/{bad}"), None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(body, json!({"error": "Invalid data ID"}), "{bad}");
        }
    }

    #[tokio::test]
    async fn stats_count_requests_and_shared_saves() {
        let w = world("stats", ScriptedUpstream::answering(), &quick()).await;
        call(&w.app, "GET", "/", None).await;
        call(&w.app, "GET", "/nope", None).await;
        // Another instance on the same files saves too.
        let other = SqliteShards::open(w._dir.path(), 4).await.unwrap();
        other
            .save(RecordId::random(), &json!({"from": "elsewhere"}))
            .await
            .unwrap();
        let (status, body) = call(&w.app, "GET", "/stats", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["instanceId"], "data-service-7000");
        assert_eq!(body["totalSaved"], 2);
        assert_eq!(body["totalRequests"], 3);
        assert!(body["uptimeSeconds"].as_u64().unwrap() < 60, "{body}");
        if cfg!(target_os = "linux") {
            assert!(body["memoryUsage"]["rss"].as_u64().unwrap() > 0, "{body}");
        }
        other.close().await;
    }

    #[tokio::test]
    async fn a_storage_failure_is_a_500() {
        let w = world("closed", ScriptedUpstream::answering(), &quick()).await;
        w.store.close().await;
        let (status, body) = call(&w.app, "GET", "/", None).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body, json!({"error": "Internal storage error"}));
        let (status, _) = call(&w.app, "GET", "/stats", None).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    /// Real sockets: a dependency that accepts and never answers is cut by the per-try
    /// deadline, tries are spread by backoff, and the fallback is stored.
    #[tokio::test]
    async fn a_real_stalled_dependency_falls_back_quickly() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn({
            let accepted = Arc::clone(&accepted);
            async move {
                let mut held = Vec::new();
                while let Ok((conn, _)) = listener.accept().await {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    held.push(conn);
                }
            }
        });
        let settings = DataSettings {
            try_timeout: Duration::from_millis(150),
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
            external: Some(format!("http://{addr}")),
            ..DataSettings::default()
        };
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let upstream = HttpUpstream::new(UpstreamTarget::Url(format!("http://{addr}")), http);
        let w = world("real-stall", upstream, &settings).await;
        let started = Instant::now();
        let (status, body) = call(&w.app, "GET", "/", None).await;
        let elapsed = started.elapsed();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["source"], "fallback");
        assert_eq!(body["attempts"], 4);
        // Each try opened its own connection: the stalled one is not reused.
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(1_500), "{elapsed:?}");
    }

    #[tokio::test]
    async fn the_dependency_sees_the_incoming_trace_with_a_new_span_per_try() {
        use crate::upstream::test_support::recording_dependency;
        use breakwater_runtime::observe::{self, TraceContext};

        let (url, seen) = recording_dependency(vec![StatusCode::SERVICE_UNAVAILABLE]).await;
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let upstream = HttpUpstream::new(UpstreamTarget::Url(url), http);
        let w = world("traced", upstream, &quick()).await;
        let app = w.app.clone().layer(observe::layer(
            SERVICE_NAME,
            "data-service-7000".into(),
            Arc::new(HttpMetrics::new()),
        ));
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let res = tower::ServiceExt::oneshot(
            app,
            axum::http::Request::get("/data")
                .header("traceparent", parent)
                .header("x-request-id", "req-data-1")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK);

        let parent = TraceContext::parse(parent).unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "one failed try, one retry: {seen:?}");
        let spans: Vec<u64> = seen
            .iter()
            .map(|(trace, request_id)| {
                let trace = trace.expect("every try carries a traceparent");
                assert_eq!(trace.trace_id, parent.trace_id);
                assert_eq!(request_id.as_deref(), Some("req-data-1"));
                trace.span_id
            })
            .collect();
        assert!(!spans.contains(&parent.span_id), "{spans:?}");
        assert_ne!(spans[0], spans[1], "each try is its own span");
    }

    #[test]
    fn settings_validation_names_the_setting() {
        assert!(DataSettings::default().validate().is_ok());
        let d = DataSettings::default;
        let cases = [
            (DataSettings { shards: 1, ..d() }, "shards"),
            (DataSettings { shards: 65, ..d() }, "shards"),
            (
                DataSettings {
                    max_attempts: 0,
                    ..d()
                },
                "max_attempts",
            ),
            (
                DataSettings {
                    max_attempts: 11,
                    ..d()
                },
                "max_attempts",
            ),
            (
                DataSettings {
                    try_timeout: Duration::ZERO,
                    ..d()
                },
                "try_timeout",
            ),
            (
                DataSettings {
                    backoff_base: Duration::from_secs(2),
                    ..d()
                },
                "backoff_base",
            ),
            (
                DataSettings {
                    backoff_max: Duration::from_secs(61),
                    ..d()
                },
                "backoff_max",
            ),
            (
                DataSettings {
                    external: Some("ftp://x".into()),
                    ..d()
                },
                "external",
            ),
        ];
        for (settings, name) in cases {
            assert_eq!(
                settings.validate().unwrap_err().setting,
                name,
                "{settings:?}"
            );
        }
    }

    async fn call_text(app: &Router, uri: &str) -> (StatusCode, String) {
        use tower::ServiceExt;
        let res = app
            .clone()
            .oneshot(
                axum::http::Request::get(uri)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = res.status();
        let content_type = res.headers()[CONTENT_TYPE].to_str().unwrap().to_owned();
        assert!(content_type.starts_with("application/openmetrics-text"));
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }
}
