//! The analytics service ("analytics-service", seed 004): metric ingestion with a
//! per-client rate limit and durable storage, summaries through a read-through cache,
//! and a call to the external dependency through a circuit breaker.
//!
//! - [`metric`]: the `POST /api/metrics` body and its checks, and the summary shape.
//! - [`store`]: [`MetricStore`], the embedded [`SqliteMetrics`] and [`PgMetrics`] on
//!   PostgreSQL (`DATABASE_URL`).
//! - [`cache`]: [`SummaryCache`] and the in-process [`MemorySummaryCache`].
//! - [`shared_cache`]: [`RedisSummaryCache`], the cache every instance shares when
//!   Redis is configured.
//! - `limiter`: the per-client limit, in-process, or across instances in Redis
//!   ([`AnalyticsSettings::redis_url`]) with the local limit standing in while Redis
//!   is away.
//! - `POST /events`: the consumer of `order.created` (see [`crate::outbox`]), each event
//!   applied once, as a metric of type [`ORDERS_CREATED`]; with Redis, the same path
//!   applies the entries of the `order.created` stream ([`Configured::events`] is the
//!   [`crate::outbox::stream::EventHandler`] a stream consumer uses).
//! - [`AnalyticsSettings`]: the seed's environment variables, with flag overrides.

pub mod cache;
mod events;
mod limiter;
pub mod metric;
mod peer;
pub mod shared_cache;
pub mod store;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use breakwater_resilience::breaker::{Breaker, BreakerConfig, Outcome, Transition};
use breakwater_resilience::rate_limit::WindowRateLimiter;
use breakwater_resilience::redis_limit::{DistributedLimit, RedisRateLimiter};
use breakwater_runtime::clock::iso8601_now;
use breakwater_runtime::http::{ApiError, Json, method_not_allowed, not_found};
use breakwater_runtime::observe::Caller;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tower_http::cors::CorsLayer;

pub use cache::{Lookup, MemorySummaryCache, SummaryCache, Ticket};
pub use metric::{NewMetric, Summary};
pub use shared_cache::RedisSummaryCache;
pub use store::{Applied, MetricStore, Metrics, PgMetrics, SqliteMetrics};

use crate::outbox::stream::EventHandler;
use crate::settings::{InvalidSetting, check_base_url, check_duration, env_number, env_value};
use crate::upstream::{HttpUpstream, Upstream};
use limiter::ClientLimiter;

/// The name analytics instances register under.
pub const SERVICE_NAME: &str = "analytics-service";

pub use events::ORDERS_CREATED;

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "analytics.db";

/// Where analytics keys live in Redis unless [`AnalyticsSettings::redis_prefix`] says
/// otherwise: rate-limit counters under `<prefix>:rl:`, summaries under
/// `<prefix>:summary:`.
pub const DEFAULT_REDIS_PREFIX: &str = "breakwater:analytics";

/// Largest `POST /api/metrics` body; a metric is three short fields.
const MAX_BODY_BYTES: usize = 16 * 1024;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// How the analytics service limits, caches and calls. Field docs name the environment
/// variable each one is read from by [`AnalyticsSettings::from_env_and`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnalyticsSettings {
    /// `RATE_LIMIT_WINDOW` (whole seconds): the rate-limit window, 1 ms..=1 day. Default 60 s.
    pub rate_limit_window: Duration,
    /// `RATE_LIMIT_MAX`: `POST /api/metrics` admitted per client per window,
    /// 1..=1 000 000. Default 5.
    pub rate_limit_max: u32,
    /// `CIRCUIT_FAILURE_THRESHOLD`: consecutive failures that open the breaker,
    /// 1..=1000. Default 3.
    pub circuit_failure_threshold: u32,
    /// `CIRCUIT_RESET_TIMEOUT` (whole seconds): how long the breaker stays open before
    /// one trial call, 1 ms..=1 day. Default 30 s.
    pub circuit_reset_timeout: Duration,
    /// A fixed base URL of the external dependency instead of "unstable-service"
    /// through discovery. No environment variable. Default: discovery.
    pub external: Option<String>,
    /// Deadline of one external call; a call past it is a failure. 1 ms..=60 s.
    /// Default 2 s.
    pub external_timeout: Duration,
    /// How long a summary stays cached, 0 (no caching)..=1 day. Default 60 s.
    pub summary_ttl: Duration,
    /// `REDIS_URL`: when set, the rate limit holds across every instance sharing this
    /// Redis (falling back to a per-instance limit while Redis is down) and summaries
    /// are cached there ([`RedisSummaryCache`]). Default: none, all in-process.
    pub redis_url: Option<String>,
    /// Start of every analytics key in Redis, so deployments can share one server. No
    /// environment variable. Default [`DEFAULT_REDIS_PREFIX`].
    pub redis_prefix: String,
    /// When set, `POST /events` requires `Authorization: Bearer <token>` (the token the
    /// system's relays send). Not read here: the CLI's `--events-token`
    /// (`BREAKWATER_EVENTS_TOKEN`). Default: none, events accepted from any caller.
    pub events_token: Option<crate::outbox::EventsToken>,
}

impl Default for AnalyticsSettings {
    fn default() -> Self {
        Self {
            rate_limit_window: Duration::from_secs(60),
            rate_limit_max: 5,
            circuit_failure_threshold: 3,
            circuit_reset_timeout: Duration::from_secs(30),
            external: None,
            external_timeout: Duration::from_secs(2),
            summary_ttl: Duration::from_secs(60),
            redis_url: None,
            redis_prefix: DEFAULT_REDIS_PREFIX.to_owned(),
            events_token: None,
        }
    }
}

/// Values given on the command line; each one that is `Some` wins over the
/// environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnalyticsOverrides {
    /// Overrides `RATE_LIMIT_WINDOW`.
    pub rate_limit_window: Option<Duration>,
    /// Overrides `RATE_LIMIT_MAX`.
    pub rate_limit_max: Option<u32>,
    /// Overrides `CIRCUIT_FAILURE_THRESHOLD`.
    pub circuit_failure_threshold: Option<u32>,
    /// Overrides `CIRCUIT_RESET_TIMEOUT`.
    pub circuit_reset_timeout: Option<Duration>,
    /// Sets [`AnalyticsSettings::external`].
    pub external: Option<String>,
    /// Sets [`AnalyticsSettings::external_timeout`].
    pub external_timeout: Option<Duration>,
    /// Sets [`AnalyticsSettings::summary_ttl`].
    pub summary_ttl: Option<Duration>,
    /// Overrides `REDIS_URL`.
    pub redis_url: Option<String>,
    /// Sets [`AnalyticsSettings::redis_prefix`].
    pub redis_prefix: Option<String>,
}

impl AnalyticsSettings {
    /// Defaults, then the process environment (`RATE_LIMIT_WINDOW`, `RATE_LIMIT_MAX`,
    /// `CIRCUIT_FAILURE_THRESHOLD`, `CIRCUIT_RESET_TIMEOUT`, `REDIS_URL`; unset or empty
    /// means the default), then `overrides`; validated. The error names the variable or setting.
    pub fn from_env_and(overrides: &AnalyticsOverrides) -> Result<Self, InvalidSetting> {
        Self::from_lookup_and(&|name| std::env::var(name).ok(), overrides)
    }

    /// [`AnalyticsSettings::from_env_and`] reading variables through `lookup`.
    pub fn from_lookup_and(
        lookup: &dyn Fn(&str) -> Option<String>,
        overrides: &AnalyticsOverrides,
    ) -> Result<Self, InvalidSetting> {
        let mut settings = Self::default();
        let day = DAY.as_secs();
        if let Some(secs) = env_number(lookup, "RATE_LIMIT_WINDOW", 1, day)? {
            settings.rate_limit_window = Duration::from_secs(secs);
        }
        if let Some(max) = env_number(lookup, "RATE_LIMIT_MAX", 1, 1_000_000)? {
            settings.rate_limit_max = u32::try_from(max).unwrap_or(u32::MAX);
        }
        if let Some(n) = env_number(lookup, "CIRCUIT_FAILURE_THRESHOLD", 1, 1000)? {
            settings.circuit_failure_threshold = u32::try_from(n).unwrap_or(u32::MAX);
        }
        if let Some(secs) = env_number(lookup, "CIRCUIT_RESET_TIMEOUT", 1, day)? {
            settings.circuit_reset_timeout = Duration::from_secs(secs);
        }
        settings.redis_url = env_value(lookup, "REDIS_URL");
        let o = overrides.clone();
        settings.rate_limit_window = o.rate_limit_window.unwrap_or(settings.rate_limit_window);
        settings.rate_limit_max = o.rate_limit_max.unwrap_or(settings.rate_limit_max);
        settings.circuit_failure_threshold = o
            .circuit_failure_threshold
            .unwrap_or(settings.circuit_failure_threshold);
        settings.circuit_reset_timeout = o
            .circuit_reset_timeout
            .unwrap_or(settings.circuit_reset_timeout);
        settings.external = o.external.or(settings.external);
        settings.external_timeout = o.external_timeout.unwrap_or(settings.external_timeout);
        settings.summary_ttl = o.summary_ttl.unwrap_or(settings.summary_ttl);
        settings.redis_url = o.redis_url.or(settings.redis_url);
        settings.redis_prefix = o.redis_prefix.unwrap_or(settings.redis_prefix);
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every value; the error names the variable or setting.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let ms = Duration::from_millis(1);
        check_duration("RATE_LIMIT_WINDOW", self.rate_limit_window, ms, DAY)?;
        check_duration("CIRCUIT_RESET_TIMEOUT", self.circuit_reset_timeout, ms, DAY)?;
        check_duration(
            "external_timeout",
            self.external_timeout,
            ms,
            Duration::from_secs(60),
        )?;
        check_duration("summary_ttl", self.summary_ttl, Duration::ZERO, DAY)?;
        if !(1..=1_000_000).contains(&self.rate_limit_max) {
            return Err(InvalidSetting::new(
                "RATE_LIMIT_MAX",
                format!("{} is outside 1..=1000000", self.rate_limit_max),
            ));
        }
        if !(1..=1000).contains(&self.circuit_failure_threshold) {
            return Err(InvalidSetting::new(
                "CIRCUIT_FAILURE_THRESHOLD",
                format!("{} is outside 1..=1000", self.circuit_failure_threshold),
            ));
        }
        if let Some(url) = &self.external {
            check_base_url("external", url)?;
        }
        if let Some(url) = &self.redis_url {
            redis::Client::open(url.as_str())
                .map_err(|e| InvalidSetting::new("REDIS_URL", format!("{url:?}: {e}")))?;
        }
        if self.redis_prefix.is_empty() {
            return Err(InvalidSetting::new("redis_prefix", "must not be empty"));
        }
        Ok(())
    }

    /// The breaker: seed 004's consecutive-failures mode with exactly one trial. No call
    /// can be slow (the timeout ends it first) and a trial cannot outlive its deadline.
    fn breaker_config(&self) -> BreakerConfig {
        let threshold = NonZeroU32::new(self.circuit_failure_threshold).unwrap_or(NonZeroU32::MIN);
        let mut config = BreakerConfig::consecutive(threshold, self.circuit_reset_timeout);
        config.slow_call_duration = self.external_timeout + Duration::from_secs(1);
        config.probe_deadline = self.external_timeout + Duration::from_secs(1);
        config
    }

    /// A summary cache with this TTL and the default capacity.
    pub fn memory_cache(&self) -> MemorySummaryCache {
        MemorySummaryCache::new(self.summary_ttl, cache::DEFAULT_CAPACITY)
    }

    /// The shared summary cache with this TTL, when [`redis_url`](Self::redis_url) is
    /// set. It does not connect yet; the error names `REDIS_URL`.
    pub fn redis_cache(&self) -> Result<Option<RedisSummaryCache>, InvalidSetting> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        let prefix = self.redis_prefix.clone();
        RedisSummaryCache::new(url, prefix, self.summary_ttl)
            .map(Some)
            .map_err(|e| InvalidSetting::new("REDIS_URL", format!("{url:?}: {e}")))
    }

    /// The per-client limiter: in Redis (fixed window, fail-open) when `redis_url` is
    /// set, else in-process.
    fn limiter(&self) -> Result<ClientLimiter, InvalidSetting> {
        let limit = NonZeroU32::new(self.rate_limit_max).unwrap_or(NonZeroU32::MIN);
        let Some(url) = &self.redis_url else {
            return Ok(ClientLimiter::Local(WindowRateLimiter::new(
                limit,
                self.rate_limit_window,
            )));
        };
        let shared = DistributedLimit::FixedWindow {
            limit,
            window: self.rate_limit_window,
        };
        RedisRateLimiter::new(url, format!("{}:rl", self.redis_prefix), shared)
            .map(ClientLimiter::shared)
            .map_err(|e| InvalidSetting::new("REDIS_URL", format!("{url:?}: {e}")))
    }
}

/// The `PORT` variable (seed 004), if set: the port to listen on. Unset or empty is
/// `None`; anything but 1..=65535 is an error naming `PORT`.
pub fn port_from_env() -> Result<Option<u16>, InvalidSetting> {
    port_from_lookup(&|name| std::env::var(name).ok())
}

fn port_from_lookup(
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<u16>, InvalidSetting> {
    if env_value(lookup, "PORT").is_none() {
        return Ok(None);
    }
    let port = env_number(lookup, "PORT", 1, u64::from(u16::MAX))?;
    Ok(port.and_then(|p| u16::try_from(p).ok()))
}

/// What the analytics handlers share.
#[derive(Debug)]
pub struct AnalyticsState<S = SqliteMetrics, C = MemorySummaryCache, U = HttpUpstream> {
    store: S,
    cache: C,
    upstream: U,
    instance: String,
    port: u16,
    limiter: ClientLimiter,
    breaker: Breaker,
    external_timeout: Duration,
    events_token: Option<crate::outbox::EventsToken>,
}

impl<S: MetricStore, C: SummaryCache, U: Upstream> AnalyticsState<S, C, U> {
    /// State for instance `instance` on `port`, behaving as `settings` say
    /// (`settings.external`, `settings.summary_ttl` and, for the cache,
    /// `settings.redis_url` are the caller's to apply when it builds `upstream` and
    /// `cache`; the rate limiter follows `settings.redis_url` here).
    pub fn new(
        store: S,
        cache: C,
        upstream: U,
        instance: impl Into<String>,
        port: u16,
        settings: &AnalyticsSettings,
    ) -> Result<Self, InvalidSetting> {
        settings.validate()?;
        Ok(Self {
            store,
            cache,
            upstream,
            instance: instance.into(),
            port,
            limiter: settings.limiter()?,
            breaker: Breaker::named(SERVICE_NAME, settings.breaker_config()),
            external_timeout: settings.external_timeout,
            events_token: settings.events_token.clone(),
        })
    }

    /// The breaker's transitions, for logging and events.
    pub fn breaker_transitions(&self) -> broadcast::Receiver<Transition> {
        self.breaker.subscribe()
    }
}

/// The analytics service's routes: `GET /health`, `POST /api/metrics` (rate limited
/// per client), `GET /api/metrics/summary`, `GET /api/external-data`, `POST /events`
/// (internal: events from other services' outboxes; not rate limited, and only with the
/// events token when [`AnalyticsSettings::events_token`] is set), with JSON 404/405
/// fallbacks and permissive CORS.
pub fn app<S, C, U>(state: AnalyticsState<S, C, U>) -> Router
where
    S: MetricStore + 'static,
    C: SummaryCache + 'static,
    U: Upstream + 'static,
{
    shared_app(Arc::new(state))
}

fn shared_app<S, C, U>(state: Arc<AnalyticsState<S, C, U>>) -> Router
where
    S: MetricStore + 'static,
    C: SummaryCache + 'static,
    U: Upstream + 'static,
{
    Router::new()
        .route("/health", get(health::<S, C, U>))
        .route("/api/metrics", post(ingest::<S, C, U>))
        .route("/api/metrics/summary", get(summary::<S, C, U>))
        .route("/api/external-data", get(external_data::<S, C, U>))
        .route("/events", post(events::consume::<S, C, U>))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CorsLayer::permissive())
        .with_state(state)
}

/// [`app`] over `store` and `upstream` with everything else as `settings` say: the
/// summary cache in Redis when [`AnalyticsSettings::redis_url`] is set, else in
/// process. Also returns the breaker's transitions, for logging.
pub fn configured_app<S, U>(
    store: S,
    upstream: U,
    instance: &str,
    port: u16,
    settings: &AnalyticsSettings,
) -> Result<(Router, broadcast::Receiver<Transition>), InvalidSetting>
where
    S: MetricStore + 'static,
    U: Upstream + 'static,
{
    let built = configured(store, upstream, instance, port, settings)?;
    Ok((built.router, built.transitions))
}

/// What [`configured`] builds.
pub struct Configured {
    /// The routes ([`app`]).
    pub router: Router,
    /// The breaker's transitions, for logging.
    pub transitions: broadcast::Receiver<Transition>,
    /// The state behind `router` as an event handler: what `POST /events` applies
    /// through, for a stream consumer to apply through too.
    pub events: Arc<dyn EventHandler>,
}

impl std::fmt::Debug for Configured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Configured").finish_non_exhaustive()
    }
}

/// [`configured_app`], also handing out the state as an [`EventHandler`].
pub fn configured<S, U>(
    store: S,
    upstream: U,
    instance: &str,
    port: u16,
    settings: &AnalyticsSettings,
) -> Result<Configured, InvalidSetting>
where
    S: MetricStore + 'static,
    U: Upstream + 'static,
{
    fn finish<S, C, U>(state: AnalyticsState<S, C, U>) -> Configured
    where
        S: MetricStore + 'static,
        C: SummaryCache + 'static,
        U: Upstream + 'static,
    {
        let transitions = state.breaker_transitions();
        let state = Arc::new(state);
        Configured {
            router: shared_app(Arc::clone(&state)),
            transitions,
            events: state,
        }
    }
    Ok(match settings.redis_cache()? {
        Some(cache) => finish(AnalyticsState::new(
            store, cache, upstream, instance, port, settings,
        )?),
        None => {
            let cache = settings.memory_cache();
            finish(AnalyticsState::new(
                store, cache, upstream, instance, port, settings,
            )?)
        }
    })
}

type Shared<S, C, U> = State<Arc<AnalyticsState<S, C, U>>>;

async fn health<S, C, U>(State(state): Shared<S, C, U>) -> Json<Value> {
    let now = Instant::now();
    Json(json!({
        "status": "OK",
        "service": SERVICE_NAME,
        "instance": state.instance,
        "port": state.port,
        "timestamp": iso8601_now(),
        "circuit_state": state.breaker.state(now).as_str(),
    }))
}

const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

async fn ingest<S: MetricStore, C: SummaryCache, U: Upstream>(
    State(state): Shared<S, C, U>,
    req: Request,
) -> Response {
    let key = peer::client_key(&req);
    let info = match state.limiter.check(&key).await {
        Ok(info) => info,
        Err(limited) => {
            tracing::info!(client = %key, limit = limited.limit, "metrics rate limit reached");
            let mut res = (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({"error": "Too many requests. Try again later."})),
            )
                .into_response();
            let headers = res.headers_mut();
            headers.insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from(whole_seconds(limited.retry_after)),
            );
            headers.insert(X_RATELIMIT_LIMIT, HeaderValue::from(limited.limit));
            headers.insert(X_RATELIMIT_REMAINING, HeaderValue::from(0u32));
            return res;
        }
    };
    let mut res = match store_metric(&state, req.into_body()).await {
        Ok(()) => (
            StatusCode::CREATED,
            Json(json!({"message": "Metric stored successfully"})),
        )
            .into_response(),
        Err(rejection) => rejection,
    };
    let headers = res.headers_mut();
    headers.insert(X_RATELIMIT_LIMIT, HeaderValue::from(info.limit));
    headers.insert(X_RATELIMIT_REMAINING, HeaderValue::from(info.remaining));
    res
}

/// Reads, checks and stores one metric; the error is the response to send.
async fn store_metric<S: MetricStore, C: SummaryCache, U>(
    state: &AnalyticsState<S, C, U>,
    body: Body,
) -> Result<(), Response> {
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body must be at most {MAX_BODY_BYTES} bytes"),
            )
            .into_response()
        })?;
    let invalid = |details: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "Invalid payload", "details": details})),
        )
            .into_response()
    };
    let body: Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("Malformed JSON: {e}")))?;
    let metric = metric::parse_metric(&body).map_err(invalid)?;
    state
        .store
        .record(&metric)
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    // After the commit: a summary computed from now on includes this metric.
    state.cache.invalidate(&metric.kind).await;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct SummaryQuery {
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn summary<S: MetricStore, C: SummaryCache, U>(
    State(state): Shared<S, C, U>,
    query: Result<Query<SummaryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let required = || ApiError::bad_request("Query parameter 'type' is required");
    let Query(query) = query.map_err(|_| required())?;
    let kind = query.kind.filter(|k| !k.is_empty()).ok_or_else(required)?;
    let (summary, cache) = match state.cache.get(&kind).await {
        Lookup::Hit(summary) => (Some(summary), "HIT"),
        Lookup::Miss(ticket) => {
            let summary = state.store.summary(&kind).await?;
            if let Some(summary) = &summary {
                state.cache.put(summary, ticket).await;
            }
            (summary, "MISS")
        }
    };
    let mut res = match summary {
        Some(summary) => Json(summary).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "No metrics found"})),
        )
            .into_response(),
    };
    res.headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(cache));
    Ok(res)
}

async fn external_data<S, C, U: Upstream>(
    State(state): Shared<S, C, U>,
    caller: Caller,
) -> Response {
    let permit = match state.breaker.try_acquire(Instant::now()) {
        Ok(permit) => permit,
        Err(rejected) => {
            let circuit = state.breaker.state(Instant::now());
            let mut res = unavailable(circuit.as_str());
            res.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from(whole_seconds(rejected.retry_after)),
            );
            return res;
        }
    };
    let started = Instant::now();
    let outcome =
        match tokio::time::timeout(state.external_timeout, state.upstream.fetch(&caller)).await {
            Ok(Ok(_)) => Outcome::Success,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "external dependency failed");
                Outcome::Failure
            }
            Err(_) => {
                tracing::warn!(timeout = ?state.external_timeout, "external dependency timed out");
                Outcome::Failure
            }
        };
    let now = Instant::now();
    state
        .breaker
        .record(permit, outcome, now.saturating_duration_since(started), now);
    let circuit = state.breaker.state(now).as_str();
    match outcome {
        Outcome::Success => Json(json!({
            "circuit_state": circuit,
            "data": {"external_data": "success"},
        }))
        .into_response(),
        Outcome::Failure => unavailable(circuit),
    }
}

fn unavailable(circuit: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "circuit_state": circuit,
            "message": "Fallback response: External service unavailable",
            "error": "External service unavailable",
        })),
    )
        .into_response()
}

/// Whole seconds for `Retry-After`, rounded up so a client never comes back early.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests;
