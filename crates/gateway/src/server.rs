//! The gateway's shared state, its router, reloading, and `run`, which serves it and
//! keeps it registered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{MethodRouter, any, get};
use breakwater_registry::client::{CachePolicy, Discovery, RegistryClient, spawn_registration};
use breakwater_registry::wire::RegisterRequest;
use breakwater_resilience::breaker::Transition;
use breakwater_runtime::CancellationToken;
use breakwater_runtime::serve::{Accepted, DEFAULT_DRAIN, serve_per_core_conns};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::ServiceExt as _;
use tower_http::cors::CorsLayer;

use crate::cache::{RedisLevel, ResponseCache};
use crate::compose;
use crate::config::{ConfigError, FileConfig, GatewayConfig};
use crate::dashboard;
use crate::errors;
use crate::events::{Event, EventHub};
use crate::forward::{self, ClientBody};
use crate::health::{self, GATEWAY_SERVICE};
use crate::limit::SharedLimits;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::route::{Route, RouteMatch, RouteTable};
use crate::stack::{self, RouteLabel};
use crate::upstream::{EjectionChange, EndpointSet, Upstream, UpstreamObserver, Upstreams};

mod conn;

/// Responses the gateway's cache holds at most.
const CACHE_ENTRIES: u64 = 10_000;
/// Largest response body the cache stores.
const CACHE_MAX_BODY: usize = 1 << 20;
/// How often rate limiters forget idle clients.
const LIMITER_SWEEP: Duration = Duration::from_secs(60);

/// Everything a request handler needs. Cheap to clone (one `Arc` inside).
#[derive(Debug, Clone)]
pub struct GatewayState {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: GatewayConfig,
    discovery: Discovery,
    upstreams: Upstreams,
    routes: ArcSwap<RouteTable>,
    metrics: Arc<Metrics>,
    events: Arc<EventHub>,
    cache: ResponseCache,
    /// Where rate limits are shared, when the gateway has Redis.
    shared_limits: Option<SharedLimits>,
    dashboard_page: String,
    /// Serialises reloads, so two at once cannot interleave their table builds.
    reloading: tokio::sync::Mutex<()>,
}

impl GatewayState {
    /// State for `config`, discovering through the registry at `config.registry_url`
    /// with the default cache policy and a watch per service (a registration or expiry
    /// reaches the balancer at once, not after the cache's TTL), routing by the config
    /// file (read now).
    pub fn new(config: GatewayConfig) -> Result<Self, ConfigError> {
        let registry = RegistryClient::new(config.registry_url.clone());
        Self::with_discovery(
            config,
            Discovery::watching(registry, CachePolicy::default()),
        )
    }

    /// State using a discovery the caller built (another cache policy, a shared one).
    pub fn with_discovery(
        config: GatewayConfig,
        discovery: Discovery,
    ) -> Result<Self, ConfigError> {
        let file = config.load_file()?;
        Ok(Self::with_file(config, discovery, file))
    }

    /// State routing by an already validated config file.
    pub fn with_file(config: GatewayConfig, discovery: Discovery, file: FileConfig) -> Self {
        let metrics = Arc::new(Metrics::new());
        let events = Arc::new(EventHub::new());
        let observer = Arc::new(GatewayObserver {
            metrics: Arc::clone(&metrics),
            events: Arc::clone(&events),
        });
        let upstreams = Upstreams::new(observer);
        let (shared_limits, cache) = redis_parts(&config, &metrics);
        let routes = RouteTable::build(file, &upstreams, None, shared_limits.as_ref());
        let dashboard_page = dashboard::render(&config);
        Self {
            inner: Arc::new(Shared {
                config,
                discovery,
                upstreams,
                routes: ArcSwap::from_pointee(routes),
                metrics,
                events,
                cache,
                shared_limits,
                dashboard_page,
                reloading: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The settings this gateway runs with.
    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    /// Service discovery (registry client and cache).
    pub fn discovery(&self) -> &Discovery {
        &self.inner.discovery
    }

    /// The route table in force. A request keeps the one it started with.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.inner.routes.load_full()
    }

    /// Every service's upstream state.
    pub fn upstreams(&self) -> &Upstreams {
        &self.inner.upstreams
    }

    /// The gateway's Prometheus metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The admin event stream's hub.
    pub fn events(&self) -> &EventHub {
        &self.inner.events
    }

    /// The GET response cache.
    pub fn cache(&self) -> &ResponseCache {
        &self.inner.cache
    }

    /// The rendered dashboard page.
    pub fn dashboard_page(&self) -> &str {
        &self.inner.dashboard_page
    }

    /// Where a gateway-made call to `service` for `path` goes and under which policy:
    /// the route that would serve `path` if it reaches `service`, else the first route
    /// to `service`, else the `[defaults]` policy.
    pub fn service_target(&self, service: &str, path: &str) -> (Arc<Upstream>, Policy) {
        let table = self.routes();
        let route = match table.find(&axum::http::Method::GET, path) {
            crate::route::RouteMatch::Found(r) if r.spec.service == service => Some(r),
            _ => table
                .routes()
                .iter()
                .filter(|r| r.spec.service == service)
                .min_by_key(|r| r.index),
        };
        match route {
            Some(r) => (Arc::clone(&r.upstream), r.spec.policy.clone()),
            None => {
                let policy = table.file().defaults.clone();
                let upstream = self.inner.upstreams.get_or_create(service, &policy.service);
                (upstream, policy)
            }
        }
    }

    /// The admin token in force (the process's, else the current file's).
    pub fn admin_token(&self) -> Option<String> {
        let table = self.inner.routes.load();
        self.inner
            .config
            .effective_admin_token(table.file())
            .map(str::to_owned)
    }

    /// Re-reads the config file (or the embedded default) and swaps in a new route
    /// table. Connections and requests in flight are untouched: each request keeps the
    /// table it started with. A file that does not validate changes nothing and is the
    /// error. Cached responses are dropped, since routes may now lead elsewhere.
    pub async fn reload(&self) -> Result<ReloadSummary, ConfigError> {
        let _one_at_a_time = self.inner.reloading.lock().await;
        let config = self.inner.config.clone();
        let loaded = tokio::task::spawn_blocking(move || config.load_file())
            .await
            .unwrap_or_else(|e| {
                Err(ConfigError::Read {
                    path: self.inner.config.config_path.clone().unwrap_or_default(),
                    cause: format!("reading task failed: {e}"),
                })
            });
        let source = self.source_name();
        let file = match loaded {
            Ok(file) => file,
            Err(e) => {
                tracing::error!(source = %source, error = %e, "reload refused; the running config stays");
                self.inner.events.publish(Event::new(
                    "reload",
                    None,
                    None,
                    serde_json::json!({"ok": false, "source": source, "error": e.to_string()}),
                ));
                return Err(e);
            }
        };
        let previous = self.inner.routes.load_full();
        let table = RouteTable::build(
            file,
            &self.inner.upstreams,
            Some(&previous),
            self.inner.shared_limits.as_ref(),
        );
        let summary = ReloadSummary {
            source,
            routes: table.routes().len(),
        };
        self.inner.routes.store(Arc::new(table));
        self.inner.cache.invalidate_all();
        tracing::info!(source = %summary.source, routes = summary.routes, "config reloaded");
        self.inner.events.publish(Event::new(
            "reload",
            None,
            None,
            serde_json::json!({"ok": true, "source": summary.source, "routes": summary.routes}),
        ));
        Ok(summary)
    }

    fn source_name(&self) -> String {
        self.inner
            .config
            .config_path
            .as_ref()
            .map_or_else(|| "embedded".to_owned(), |p| p.display().to_string())
    }
}

/// With `config.redis_url`: where rate limits are shared, and the response cache with
/// Redis as its second level (keys `<redis_prefix>:limit:...` and `...:cache:...`).
/// Without: neither, and a local cache.
fn redis_parts(config: &GatewayConfig, metrics: &Metrics) -> (Option<SharedLimits>, ResponseCache) {
    let local = ResponseCache::new(CACHE_ENTRIES, CACHE_MAX_BODY);
    let Some(url) = &config.redis_url else {
        return (None, local);
    };
    let limits = SharedLimits {
        url: url.clone(),
        prefix: format!("{}:limit", config.redis_prefix),
        timeout: config.redis_timeout,
        fallbacks: metrics.redis_fallbacks("rate_limit"),
    };
    let level = RedisLevel::new(
        url,
        format!("{}:cache", config.redis_prefix),
        config.redis_timeout,
        metrics.redis_fallbacks("cache"),
    );
    let cache = match level {
        Ok(level) => local.with_redis(level),
        // `GatewayConfig::validate` has parsed the URL, so this is not expected.
        Err(e) => {
            tracing::error!(error = %e, "response cache: cannot use Redis; caching locally only");
            local
        }
    };
    (Some(limits), cache)
}

/// What a successful reload loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadSummary {
    /// The file read, or `embedded`.
    pub source: String,
    /// Routes now in force.
    pub routes: usize,
}

/// Sends upstream events to the metrics, the admin event stream and the log.
#[derive(Debug)]
struct GatewayObserver {
    metrics: Arc<Metrics>,
    events: Arc<EventHub>,
}

impl UpstreamObserver for GatewayObserver {
    fn breaker_created(&self, service: &str) {
        self.metrics
            .breaker_state(service, breakwater_resilience::breaker::State::Closed);
    }

    fn breaker_transition(&self, service: &str, transition: &Transition) {
        // The breaker logs its own transitions; here they become metrics and events.
        self.metrics.breaker_state(service, transition.to);
        self.events.publish(Event::new(
            "breaker",
            Some(service.to_owned()),
            None,
            serde_json::json!({
                "from": transition.from.as_str(),
                "to": transition.to.as_str(),
                "reason": transition.reason.to_string(),
                "at_unix_ms": transition.at_unix_ms,
            }),
        ));
    }

    fn endpoints_changed(&self, service: &str, set: &EndpointSet) {
        let ids = set.endpoints.iter().map(|e| &*e.id);
        self.metrics.instances_now(service, ids);
    }

    fn ejection(&self, service: &str, change: &EjectionChange) {
        if change.kind == "ejection" {
            tracing::warn!(
                service,
                instance = %change.instance,
                reason = %change.reason,
                ejected_for_ms = change.ejected_for.map(|d| d.as_millis()),
                times = change.times_ejected,
                "endpoint ejected"
            );
            self.metrics.ejection(service, &change.instance);
        } else {
            tracing::info!(service, instance = %change.instance, reason = %change.reason, "endpoint returned");
        }
        self.metrics.ejected(service, change.ejected_now);
        self.events.publish(Event::new(
            change.kind,
            Some(service.to_owned()),
            Some(change.instance.clone()),
            serde_json::to_value(change).unwrap_or_default(),
        ));
    }
}

/// The gateway's routes: dashboard, health, metrics, the admin API, the composed
/// endpoints, and every path the config file routes (the fallback, [`stack::proxy`]).
/// Unknown paths get a JSON 404.
pub fn app(state: GatewayState) -> Router {
    Router::new()
        .route(
            "/",
            get(dashboard::dashboard).fallback(errors::wrong_method),
        )
        .route(
            "/health",
            with_cors(get(health::health)).fallback(errors::wrong_method),
        )
        .route("/metrics", get(metrics_text).fallback(errors::wrong_method))
        .route("/users", with_cors(get(compose::users)).fallback(proxied()))
        .route(
            "/orders/user/{user_id}",
            with_cors(get(compose::user_orders)).fallback(proxied()),
        )
        .route(
            "/users-with-orders",
            with_cors(get(compose::users_with_orders)).fallback(errors::wrong_method),
        )
        .nest("/admin", crate::admin::router(state.clone()))
        .fallback(stack::proxy)
        .layer(middleware::from_fn_with_state(state.clone(), edge))
        .with_state(state)
}

/// What serves every connection: a proxied request (a path only the route table
/// answers, matched to a route) goes straight to [`stack::serve`], with the request id
/// and request metrics of [`app`]'s middleware done inline; everything else (dashboard,
/// health, metrics, admin, composed routes, 404s and 405s) goes through [`app`]. The
/// hot path so skips the router, its middleware and their per-request boxing. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct Front {
    state: GatewayState,
    router: Router,
}

impl Front {
    /// The front for `state`, with [`app`] behind it.
    pub fn new(state: GatewayState) -> Self {
        let router = app(state.clone());
        Self { state, router }
    }

    /// Answers `req` from the client at `peer`, as hyper's service calls it (owning its
    /// `Front`, never failing). A proxied answer's body is the upstream's stream itself,
    /// not boxed. The proxied path is written out here rather than in an `async fn` of
    /// its own: each nested future is one more copy of it per request.
    pub async fn handle<B>(
        self: Arc<Self>,
        req: hyper::Request<B>,
        peer: SocketAddr,
    ) -> Result<hyper::Response<ClientBody>, std::convert::Infallible>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let Some(route) = self.fast_route(req.method(), req.uri().path()) else {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            // Boxed: the router's future is large, and held inline it would enlarge
            // (and so make dearer to move) the fast path's future too.
            return match Box::pin(self.router.clone().oneshot(req)).await {
                Ok(res) => Ok(res.map(ClientBody::Other)),
                Err(never) => match never {},
            };
        };
        let (parts, body) = req.into_parts();
        let (mut res, id) = self
            .serve_route(route, parts, body, peer, forward::Fields::Map)
            .await;
        res.headers_mut().insert(forward::REQUEST_ID, id);
        Ok(res)
    }

    /// Serves a request [`Front::fast_route`] matched to `route`, with the request id
    /// and request metrics of [`app`]'s middleware done inline. `fields`: as for
    /// [`stack::serve`]. Returns the response and the request id, which the caller
    /// sets on it (as `x-request-id`, replacing any the response has): the gateway's
    /// own connection loop writes it straight into the head, and a response that
    /// carries none of the gateway's fields then never needs a map.
    pub async fn serve_route<B>(
        &self,
        route: Arc<Route>,
        mut parts: axum::http::request::Parts,
        body: B,
        peer: SocketAddr,
        fields: forward::Fields,
    ) -> (hyper::Response<ClientBody>, HeaderValue)
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let started = Instant::now();
        // One pass over the client's names decides which are looked up at all.
        let seen = forward::Seen::of(&parts.headers);
        let client_id = if seen.has(forward::Seen::REQUEST_ID) {
            forward::client_request_id(&mut parts.headers)
        } else {
            None
        };
        // A fresh id is not written into the client's headers (a hashed insert, often a
        // grow of the map): the outbound request carries it as an added field.
        let (id, fresh_id) = match client_id {
            Some(id) => (id, None),
            None => {
                let id = forward::new_request_id();
                (id.clone(), Some(id))
            }
        };
        let method = parts.method.clone();
        // The peer goes along in the arrival: in the request's extensions it would cost
        // a map allocation per request. Pinned where it is made, as in `conn::serve`.
        let serving = std::pin::pin!(stack::serve(
            &self.state,
            &route,
            parts,
            body,
            stack::Arrival {
                peer: Some(peer),
                fresh_id,
                seen,
                fields,
            }
        ));
        let res = serving.await;
        self.state.metrics().request(
            &route.label,
            &method,
            res.status().as_u16(),
            started.elapsed(),
        );
        (res, id)
    }

    /// The route of a request the fast path serves: a path only the route table
    /// answers, matched to a route. `None`: the router answers it.
    pub fn fast_route(&self, method: &axum::http::Method, path: &str) -> Option<Arc<Route>> {
        if gateway_path(path) {
            return None;
        }
        // A guard, not a clone of the table's `Arc`: only the route's count moves.
        match self.state.inner.routes.load().find(method, path) {
            RouteMatch::Found(route) => Some(Arc::clone(route)),
            RouteMatch::WrongMethod | RouteMatch::NotFound => None,
        }
    }
}

/// A [`Front`] of one worker thread: `serve_per_core_with` clones the per-connection
/// maker once per worker, and this clone makes a new `Arc`, so the clone each request
/// takes touches a count that no other thread writes (a shared one would bounce
/// between cores on every request).
struct PerThread(Arc<Front>);

impl Clone for PerThread {
    fn clone(&self) -> Self {
        Self(Arc::new(Front::clone(&self.0)))
    }
}

/// Paths [`app`] answers itself rather than through the route table (its routes other
/// than the fallback): keep it in step with them. Wider than exact (any
/// `/orders/user/...`) is fine: the router then decides, as it always did.
fn gateway_path(path: &str) -> bool {
    matches!(
        path,
        "/" | "/health" | "/metrics" | "/users" | "/users-with-orders" | "/admin"
    ) || path.starts_with("/admin/")
        || path.starts_with("/orders/user/")
}

/// Permissive CORS on a gateway-answered route (as the seed had). Preflights are
/// answered here; proxied routes are left to the services so headers are not doubled.
fn with_cors(route: MethodRouter<GatewayState>) -> MethodRouter<GatewayState> {
    route
        .options(|| async { StatusCode::NO_CONTENT })
        .layer(CorsLayer::permissive())
}

/// The other methods of a composed path go through the route table like any path.
fn proxied() -> MethodRouter<GatewayState> {
    any(stack::proxy)
}

/// `GET /metrics`: Prometheus text, or OpenMetrics when the scraper asks for it.
async fn metrics_text(
    State(state): State<GatewayState>,
    headers: axum::http::HeaderMap,
) -> Response {
    state.metrics().response(&headers)
}

/// Runs around every request: gives it an `x-request-id` (the client's, if usable, else
/// a fresh one) returned on the response, and records it in the request metrics under
/// its route (the config route's prefix, the gateway path, or `unmatched`).
async fn edge(State(state): State<GatewayState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let res = forward::tag_request_id(req, next).await;
    let label = match (res.extensions().get::<RouteLabel>(), &matched) {
        (Some(route), _) => &*route.0,
        (None, Some(path)) => path.as_str(),
        (None, None) => "unmatched",
    };
    state
        .metrics()
        .request(label, &method, res.status().as_u16(), started.elapsed());
    res
}

/// Why [`run`] stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The settings or the config file are invalid (the CLI exits 64).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Serving failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Serves the gateway on `listener` until `shutdown` fires, registered in the registry
/// as `api-gateway` the whole time: it registers once it is serving, deregisters when
/// shutdown starts, and returns after the drain and the deregistration. SIGHUP reloads
/// the config file.
///
/// The listener's real port wins over `config.port` (so port 0 works), and its address
/// decides whether `/admin` needs a token. Invalid settings or an invalid config file
/// are a [`RunError::Config`], before anything is served.
pub async fn run(
    listener: TcpListener,
    mut config: GatewayConfig,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let local = listener.local_addr()?;
    config.adopt_port(local.port());
    config.listener_loopback = local.ip().is_loopback();
    config.validate()?;
    let state = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || GatewayState::new(config))
            .await
            .map_err(std::io::Error::other)??
    };
    let port = local.port();
    let registration_req = RegisterRequest {
        name: GATEWAY_SERVICE.to_owned(),
        port,
        heartbeat_interval: Some(state.config().heartbeat_interval_secs),
        host: state.config().advertise_host.clone(),
        metadata: Some(serde_json::Map::from_iter([(
            "instance".to_owned(),
            state.config().instance.clone().into(),
        )])),
    };
    tracing::info!(
        port,
        instance = %state.config().instance,
        registry = %state.config().registry_url,
        config = %state.source_name(),
        routes = state.routes().routes().len(),
        admin = if state.config().listener_loopback { "loopback" } else if state.admin_token().is_some() { "token" } else { "disabled" },
        "gateway listening"
    );

    let background = shutdown.child_token();
    spawn_reload_on_sighup(state.clone(), background.clone())?;
    spawn_limiter_sweep(state.clone(), background.clone());

    let workers = std::thread::available_parallelism().unwrap_or(std::num::NonZeroUsize::MIN);
    let front = PerThread(Arc::new(Front::new(state.clone())));
    let per_connection = move |accepted: Accepted| conn::serve(Arc::clone(&front.0), accepted);
    let server = tokio::spawn(serve_per_core_conns(
        listener,
        per_connection,
        shutdown.clone(),
        DEFAULT_DRAIN,
        workers,
    ));
    // A child token: if serving fails on its own, the registration still ends (and
    // deregisters) without cancelling the caller's token for everyone else.
    let registered = shutdown.child_token();
    let registration = spawn_registration(
        state.discovery().client().clone(),
        registration_req,
        registered.clone(),
    );

    let served = server
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    registered.cancel();
    background.cancel();
    if let Err(e) = registration.await {
        tracing::error!(error = %e, "registration task failed");
    }
    if let Err(e) = &served {
        tracing::error!(error = %e, "gateway server failed");
    }
    Ok(served?)
}

fn spawn_reload_on_sighup(state: GatewayState, stop: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                got = hangups.recv() => {
                    if got.is_none() {
                        break;
                    }
                    tracing::info!(signal = "SIGHUP", "reloading config");
                    // A refused reload is logged and published by reload() itself.
                    let _ = state.reload().await;
                }
            }
        }
    });
    Ok(())
}

fn spawn_limiter_sweep(state: GatewayState, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(LIMITER_SWEEP);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = every.tick() => {
                    for route in state.routes().routes() {
                        if let Some(limiter) = &route.limiter {
                            limiter.retain_recent();
                        }
                    }
                }
            }
        }
    });
}
