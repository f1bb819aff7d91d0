//! Running one service instance as a process part: check its settings, open its
//! storage, serve, stay registered, and stop in order.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use breakwater_registry::client::{CachePolicy, Discovery, RegistryClient, spawn_registration};
use breakwater_registry::wire::RegisterRequest;
use breakwater_resilience::breaker::Transition;
use breakwater_runtime::CancellationToken;
use breakwater_runtime::observe::{self, HttpMetrics};
use breakwater_runtime::serve::{DEFAULT_DRAIN, serve};
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use crate::analytics::{self, AnalyticsSettings, Metrics};
use crate::data::{self, DataSettings, DataState, SqliteShards};
use crate::orders::{self, OrdersState};
use crate::outbox::EventsToken;
use crate::outbox::relay::{HttpTransport, Relay, RelaySettings, RelayStats, Routes};
use crate::outbox::stream::{
    self, ConsumerSettings, ConsumerStats, StreamConsumer, StreamTransport,
};
use crate::settings::InvalidSetting;
use crate::storage::{SharedStore, StorageError, check_database_url};
use crate::unstable::{self, UnstableSettings, UnstableState};
use crate::upstream::{HttpUpstream, UpstreamTarget};
use crate::users::{self, UsersState};

/// The database file inside [`ServiceConfig::data_dir`], shared by users and orders.
pub const DATABASE_FILE: &str = "breakwater.db";

/// The directory inside [`ServiceConfig::data_dir`] holding the data service's shard
/// files, shared by every data instance.
pub const DATA_SHARD_DIR: &str = "data-shards";

/// How long connecting to another service may take; each call has its own limit too.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How the relay caches subscriber instances: briefly, so a consumer that comes back
/// (on a new port) is found within a second.
const RELAY_DISCOVERY: CachePolicy = CachePolicy {
    fresh_for: Duration::from_secs(1),
    stale_for: Duration::from_secs(30),
};

/// Which service an instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    /// "user-service".
    Users,
    /// "order-service".
    Orders,
    /// "analytics-service".
    Analytics,
    /// "data-service".
    Data,
    /// "unstable-service".
    Unstable,
}

impl ServiceKind {
    /// Every kind, in start order for `up` (dependencies before dependents).
    pub const ALL: [Self; 5] = [
        Self::Unstable,
        Self::Users,
        Self::Orders,
        Self::Analytics,
        Self::Data,
    ];

    /// The name the instance registers under.
    pub fn service_name(self) -> &'static str {
        match self {
            Self::Users => users::SERVICE_NAME,
            Self::Orders => orders::SERVICE_NAME,
            Self::Analytics => analytics::SERVICE_NAME,
            Self::Data => data::SERVICE_NAME,
            Self::Unstable => unstable::SERVICE_NAME,
        }
    }
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.service_name())
    }
}

/// Accepts the short name (`users`, `orders`, `analytics`, `data`, `unstable`) or the
/// registry name (`user-service`, ...).
impl FromStr for ServiceKind {
    type Err = UnknownServiceKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "users" | "user-service" => Ok(Self::Users),
            "orders" | "order-service" => Ok(Self::Orders),
            "analytics" | "analytics-service" => Ok(Self::Analytics),
            "data" | "data-service" => Ok(Self::Data),
            "unstable" | "unstable-service" => Ok(Self::Unstable),
            other => Err(UnknownServiceKind(other.to_owned())),
        }
    }
}

/// A service name that is none of the five.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown service {0:?} (expected users, orders, analytics, data or unstable)")]
pub struct UnknownServiceKind(pub String);

/// The settings of the services that have any; each kind reads its own part.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceOptions {
    /// Used by [`ServiceKind::Analytics`].
    pub analytics: AnalyticsSettings,
    /// Used by [`ServiceKind::Data`].
    pub data: DataSettings,
    /// Used by [`ServiceKind::Unstable`].
    pub unstable: UnstableSettings,
    /// The outbox relay of [`ServiceKind::Users`] and [`ServiceKind::Orders`].
    pub outbox: RelaySettings,
    /// Events over Redis Streams: users and orders publish there instead of over HTTP;
    /// analytics consumes there (besides `POST /events`), also when only its own
    /// [`AnalyticsSettings::redis_url`] is set.
    pub events: EventSettings,
    /// `DATABASE_URL`: users, orders and their outbox, and analytics' metrics, on this
    /// PostgreSQL database instead of the SQLite files in the data directory.
    pub database_url: Option<String>,
}

impl ServiceOptions {
    /// Checks the part `kind` uses; the error names the setting.
    pub fn validate(&self, kind: ServiceKind) -> Result<(), InvalidSetting> {
        match kind {
            ServiceKind::Users | ServiceKind::Orders => {
                if let Some(url) = &self.database_url {
                    check_database_url(url)?;
                }
                self.events.validate()?;
                self.outbox.validate()
            }
            ServiceKind::Analytics => {
                if let Some(url) = &self.database_url {
                    check_database_url(url)?;
                }
                self.events.validate()?;
                self.analytics.validate()
            }
            ServiceKind::Data => self.data.validate(),
            ServiceKind::Unstable => self.unstable.validate(),
        }
    }
}

/// Where events travel when Redis is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSettings {
    /// The Redis holding the event streams; `None`: HTTP delivery through discovery.
    pub redis_url: Option<String>,
    /// Start of the stream keys, `<prefix>:events:<topic>`. Default
    /// [`stream::DEFAULT_PREFIX`].
    pub prefix: String,
    /// The secret shared by the HTTP relays of users and orders (which send it) and
    /// analytics' `POST /events` (which then requires it). `None`: not sent, and
    /// analytics accepts events from any caller.
    pub token: Option<EventsToken>,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            redis_url: None,
            prefix: stream::DEFAULT_PREFIX.to_owned(),
            token: None,
        }
    }
}

impl EventSettings {
    /// Checks the URL and the prefix; the error names `REDIS_URL` or `events_prefix`.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if let Some(url) = &self.redis_url {
            redis::Client::open(url.as_str())
                .map_err(|e| InvalidSetting::new("REDIS_URL", format!("{url:?}: {e}")))?;
        }
        if self.prefix.is_empty() {
            return Err(InvalidSetting::new("events_prefix", "must not be empty"));
        }
        Ok(())
    }
}

/// Where an instance is reachable, where it keeps its data, and how it behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// The port advertised to the registry (and used in the instance id).
    pub port: u16,
    /// The host advertised to the registry; `None` lets the registry use the caller's
    /// address.
    pub host: Option<String>,
    /// The registry's base URL, e.g. `http://127.0.0.1:3000`.
    pub registry_url: String,
    /// Directory holding [`DATABASE_FILE`]; created if missing.
    pub data_dir: PathBuf,
    /// Seconds between heartbeats (the registry expires the instance after 1.5x).
    pub heartbeat_interval_secs: u64,
    /// Settings of the analytics, data and unstable services.
    pub options: ServiceOptions,
}

/// Why an instance could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A setting has a value it cannot take (a usage error: exit 64).
    #[error(transparent)]
    Setting(#[from] InvalidSetting),
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened or prepared.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The HTTP client for calls to other services could not be built.
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    /// Serving failed.
    #[error("server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// The server task panicked or was aborted.
    #[error("server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs one instance of `kind` on `listener` until `shutdown` fires: checks the
/// settings, opens its storage under `data_dir` (users and orders share
/// [`DATABASE_FILE`], analytics has [`analytics::DATABASE_FILE`], data has its shards in
/// [`DATA_SHARD_DIR`], unstable stores nothing), serves, registers once serving
/// (heartbeating meanwhile), and on shutdown drains requests and deregisters before
/// returning.
pub async fn run(
    kind: ServiceKind,
    listener: TcpListener,
    config: ServiceConfig,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    config.options.validate(kind)?;
    let service = kind.service_name();
    let instance = format!("{service}-{}", config.port);
    let port = config.port;
    let registry = RegistryClient::new(config.registry_url.clone());

    // Built before storage opens, so that no error leaves an open database behind.
    let relay_http = http_client()?;
    let metrics = Arc::new(HttpMetrics::new());
    let stream_transport = match &config.options.events.redis_url {
        Some(url) if matches!(kind, ServiceKind::Users | ServiceKind::Orders) => Some(
            StreamTransport::new(url, config.options.events.prefix.clone())
                .map_err(|e| InvalidSetting::new("REDIS_URL", format!("{url:?}: {e}")))?,
        ),
        _ => None,
    };
    let (router, storage, events) = build(kind, &config, &instance, &registry, &metrics).await?;
    let consumer_stats = events.as_ref().map(StreamConsumer::stats);
    let relay_stop = shutdown.child_token();
    let (relay, relay_stats) = match &storage {
        Storage::Shared(store) => {
            let (outbox, settings) = (store.outbox(), config.options.outbox);
            let (task, stats) = match stream_transport {
                Some(transport) => {
                    let relay = Relay::new(outbox, transport, Routes::SYSTEM, settings, &instance);
                    let stats = relay.stats();
                    (tokio::spawn(relay.run(relay_stop.clone())), stats)
                }
                None => {
                    let transport = HttpTransport::new(
                        Discovery::watching(registry.clone(), RELAY_DISCOVERY),
                        relay_http,
                    )
                    .with_token(config.options.events.token.clone());
                    let relay = Relay::new(outbox, transport, Routes::SYSTEM, settings, &instance);
                    let stats = relay.stats();
                    (tokio::spawn(relay.run(relay_stop.clone())), stats)
                }
            };
            (Some(task), Some(stats))
        }
        _ => (None, None),
    };
    let router = observed(
        kind,
        router,
        &instance,
        metrics,
        consumer_stats,
        relay_stats,
    );
    let consumer = events.map(|consumer| tokio::spawn(consumer.run(relay_stop.clone())));

    let local = listener.local_addr().ok();
    tracing::info!(service, %instance, port, ?local, registry = %config.registry_url, "service starting");
    let server = tokio::spawn(serve(listener, router, shutdown.clone(), DEFAULT_DRAIN));

    // A child token so the registration also ends when the server stops on its own.
    let registration_stop = shutdown.child_token();
    let registration = spawn_registration(
        registry,
        register_request(kind, &instance, &config),
        registration_stop.clone(),
    );

    let served = server.await;
    registration_stop.cancel();
    relay_stop.cancel();
    if let Err(error) = registration.await {
        tracing::warn!(service, %instance, %error, "registration task failed");
    }
    // Before the storage closes: the relay writes delivery marks into it, the
    // consumer applies events to it.
    if let Some(relay) = relay
        && let Err(error) = relay.await
    {
        tracing::warn!(service, %instance, %error, "outbox relay failed");
    }
    if let Some(consumer) = consumer
        && let Err(error) = consumer.await
    {
        tracing::warn!(service, %instance, %error, "event consumer failed");
    }
    storage.close().await;
    tracing::info!(service, %instance, port, "service stopped");
    served?.map_err(ServiceError::Serve)
}

/// What an instance opened and must close before it exits.
#[derive(Debug)]
enum Storage {
    Shared(SharedStore),
    Metrics(Metrics),
    Shards(SqliteShards),
    Nothing,
}

impl Storage {
    async fn close(&self) {
        match self {
            Self::Shared(store) => store.close().await,
            Self::Metrics(store) => store.close().await,
            Self::Shards(store) => store.close().await,
            Self::Nothing => {}
        }
    }
}

/// `router` with `GET /metrics` (data has its own, which shows `metrics` too; a stream
/// consumer's and an outbox relay's counters join the page) and the observability
/// layer over every route, so each request is logged and counted once; events a
/// request causes carry its trace context ([`crate::outbox::trace_scope`]).
fn observed(
    kind: ServiceKind,
    router: Router,
    instance: &str,
    metrics: Arc<HttpMetrics>,
    consumer: Option<Arc<ConsumerStats>>,
    relay: Option<Arc<RelayStats>>,
) -> Router {
    let router = match (kind, consumer, relay) {
        (ServiceKind::Data, _, _) => router,
        (_, None, None) => router.merge(observe::metrics_router(metrics.clone())),
        (_, consumer, relay) => {
            let metrics = metrics.clone();
            router.route(
                "/metrics",
                axum::routing::get(move || async move {
                    let page = metrics.render_with(|registry| {
                        if let Some(stats) = &consumer {
                            stats.register(registry);
                        }
                        if let Some(stats) = &relay {
                            stats.register(registry);
                        }
                    });
                    ([(CONTENT_TYPE, observe::METRICS_CONTENT_TYPE)], page)
                }),
            )
        }
    };
    router
        // Inside the observe layer, which gives the request its trace context.
        .layer(axum::middleware::from_fn(crate::outbox::trace_scope))
        .layer(observe::layer(
            kind.service_name(),
            instance.to_owned(),
            metrics,
        ))
}

/// Opens what `kind` stores into and builds its router; data's `GET /metrics` shows
/// `metrics` beside its own figures. Analytics with Redis also gets its stream
/// consumer, to run beside the server.
async fn build(
    kind: ServiceKind,
    config: &ServiceConfig,
    instance: &str,
    registry: &RegistryClient,
    metrics: &Arc<HttpMetrics>,
) -> Result<(Router, Storage, Option<StreamConsumer>), ServiceError> {
    let port = config.port;
    let options = &config.options;
    if kind != ServiceKind::Unstable {
        create_dir(&config.data_dir).await?;
    }
    // Watching: a change in the registry reaches the cache at once, not after its TTL.
    let discovery = || Discovery::watching(registry.clone(), CachePolicy::default());
    let mut consumer = None;
    let (router, storage) = match kind {
        ServiceKind::Users => {
            let store = SharedStore::open(
                options.database_url.as_deref(),
                &config.data_dir.join(DATABASE_FILE),
            )
            .await?;
            let router = users::app(UsersState {
                store: store.clone(),
                instance: instance.to_owned(),
                port,
            });
            (router, Storage::Shared(store))
        }
        ServiceKind::Orders => {
            let store = SharedStore::open(
                options.database_url.as_deref(),
                &config.data_dir.join(DATABASE_FILE),
            )
            .await?;
            let router = orders::app(OrdersState {
                store: store.clone(),
                instance: instance.to_owned(),
                port,
                users: discovery(),
                http: http_client()?,
            });
            (router, Storage::Shared(store))
        }
        ServiceKind::Analytics => {
            let settings = &AnalyticsSettings {
                events_token: options
                    .events
                    .token
                    .clone()
                    .or_else(|| options.analytics.events_token.clone()),
                ..options.analytics.clone()
            };
            if settings.events_token.is_none() {
                tracing::warn!(
                    %instance,
                    "POST /events accepts events from any caller: no events token \
                     (--events-token / BREAKWATER_EVENTS_TOKEN)"
                );
            }
            let upstream = HttpUpstream::new(
                target(settings.external.as_deref(), discovery),
                http_client()?,
            );
            let store = Metrics::open(
                options.database_url.as_deref(),
                &config.data_dir.join(analytics::DATABASE_FILE),
            )
            .await?;
            let built = analytics::configured(store.clone(), upstream, instance, port, settings);
            let built = match built {
                Ok(built) => built,
                Err(err) => {
                    store.close().await;
                    return Err(err.into());
                }
            };
            tokio::spawn(log_transitions(built.transitions));
            let events = &options.events;
            if let Some(url) = events.redis_url.as_ref().or(settings.redis_url.as_ref()) {
                let reader = ConsumerSettings::new(
                    events.prefix.clone(),
                    analytics::SERVICE_NAME,
                    instance,
                    &[crate::outbox::ORDER_CREATED],
                );
                match StreamConsumer::new(url, built.events, reader) {
                    Ok(c) => consumer = Some(c),
                    Err(e) => {
                        store.close().await;
                        let message = format!("{url:?}: {e}");
                        return Err(InvalidSetting::new("REDIS_URL", message).into());
                    }
                }
            }
            (built.router, Storage::Metrics(store))
        }
        ServiceKind::Data => {
            let settings = &options.data;
            let upstream = HttpUpstream::new(
                target(settings.external.as_deref(), discovery),
                http_client()?,
            );
            if !settings.redis_urls.is_empty() || !settings.redis_cluster.is_empty() {
                let store = if settings.redis_cluster.is_empty() {
                    data::RedisShards::open(
                        &settings.redis_urls,
                        settings.shards,
                        &settings.redis_prefix,
                    )
                    .await?
                } else {
                    data::RedisShards::open_cluster(
                        &settings.redis_cluster,
                        settings.shards,
                        &settings.redis_prefix,
                    )
                    .await?
                };
                let state = DataState::new(store, upstream, instance, port, settings)?
                    .with_http_metrics(metrics.clone());
                return Ok((data::app(state), Storage::Nothing, None));
            }
            let dir = config.data_dir.join(DATA_SHARD_DIR);
            create_dir(&dir).await?;
            let store = SqliteShards::open(&dir, settings.shards).await?;
            let state = match DataState::new(store.clone(), upstream, instance, port, settings) {
                Ok(state) => state.with_http_metrics(metrics.clone()),
                Err(err) => {
                    store.close().await;
                    return Err(err.into());
                }
            };
            (data::app(state), Storage::Shards(store))
        }
        ServiceKind::Unstable => {
            let state = UnstableState::new(instance, port, &options.unstable)?;
            (unstable::app(state), Storage::Nothing)
        }
    };
    Ok((router, storage, consumer))
}

async fn create_dir(path: &std::path::Path) -> Result<(), ServiceError> {
    tokio::fs::create_dir_all(path)
        .await
        .map_err(|source| ServiceError::DataDir {
            path: path.to_path_buf(),
            source,
        })
}

/// The dependency at a fixed URL, or found through discovery.
fn target(external: Option<&str>, discovery: impl FnOnce() -> Discovery) -> UpstreamTarget {
    match external {
        Some(url) => UpstreamTarget::Url(url.trim_end_matches('/').to_owned()),
        None => UpstreamTarget::Discovered(discovery()),
    }
}

/// The pooled client for calls to other services; each call sets its own deadline.
fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        // Calls between services stay inside the system; a proxy taken from the
        // environment would only add a hop that may not reach them.
        .no_proxy()
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
}

/// Logs each breaker transition once, where it is observed; ends with the breaker.
async fn log_transitions(mut transitions: broadcast::Receiver<Transition>) {
    loop {
        match transitions.recv().await {
            Ok(t) => tracing::warn!(
                from = %t.from,
                to = %t.to,
                reason = %t.reason,
                "external dependency circuit breaker changed state"
            ),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "breaker transitions were missed");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn register_request(kind: ServiceKind, instance: &str, config: &ServiceConfig) -> RegisterRequest {
    let mut metadata = Map::new();
    metadata.insert("instance".into(), Value::from(instance));
    metadata.insert("version".into(), Value::from(env!("CARGO_PKG_VERSION")));
    RegisterRequest {
        name: kind.service_name().to_owned(),
        port: config.port,
        heartbeat_interval: Some(config.heartbeat_interval_secs),
        host: config.host.clone(),
        metadata: Some(metadata),
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use breakwater_runtime::observe::TraceContext;

    use super::*;
    use crate::fixtures::{FakeRegistry, RegistryEvent, TempDir};
    use crate::storage::SqliteStore;
    use tokio::sync::mpsc::UnboundedReceiver;

    const WAIT: Duration = Duration::from_secs(10);
    const TRACE_PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const TRACE_ID: u128 = 0x4bf92f3577b34da6a3ce929d0e0e4736;

    async fn next_event(events: &mut UnboundedReceiver<RegistryEvent>) -> RegistryEvent {
        tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap()
    }

    async fn start(
        kind: ServiceKind,
        registry_url: &str,
        data_dir: &std::path::Path,
        shutdown: &CancellationToken,
    ) -> (u16, tokio::task::JoinHandle<Result<(), ServiceError>>) {
        start_with(
            kind,
            registry_url,
            data_dir,
            shutdown,
            ServiceOptions::default(),
        )
        .await
    }

    async fn start_with(
        kind: ServiceKind,
        registry_url: &str,
        data_dir: &std::path::Path,
        shutdown: &CancellationToken,
        options: ServiceOptions,
    ) -> (u16, tokio::task::JoinHandle<Result<(), ServiceError>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = ServiceConfig {
            port,
            host: Some("127.0.0.1".into()),
            registry_url: registry_url.to_owned(),
            data_dir: data_dir.to_path_buf(),
            heartbeat_interval_secs: 30,
            options,
        };
        (
            port,
            tokio::spawn(run(kind, listener, config, shutdown.clone())),
        )
    }

    #[tokio::test]
    async fn instances_register_serve_each_other_and_deregister() {
        let dir = TempDir::new("run");
        // A data dir that does not exist yet: run creates it.
        let data_dir = dir.path().join("data");
        let (registry_url, mut events) = FakeRegistry::start(vec![]).await;
        let shutdown = CancellationToken::new();

        let (users_port, users) =
            start(ServiceKind::Users, &registry_url, &data_dir, &shutdown).await;
        assert_eq!(
            next_event(&mut events).await,
            RegistryEvent::Registered {
                name: "user-service".into(),
                port: users_port
            }
        );
        let (orders_port, orders) =
            start(ServiceKind::Orders, &registry_url, &data_dir, &shutdown).await;
        assert_eq!(
            next_event(&mut events).await,
            RegistryEvent::Registered {
                name: "order-service".into(),
                port: orders_port
            }
        );
        assert!(data_dir.join(DATABASE_FILE).exists());

        let http = reqwest::Client::new();
        let health: Value = http
            .get(format!("http://127.0.0.1:{users_port}/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(health["instance"], format!("user-service-{users_port}"));

        // The orders instance finds the users instance through the registry.
        let created = http
            .post(format!("http://127.0.0.1:{orders_port}/orders"))
            .json(&serde_json::json!({"userId": 2, "products": ["Lamp"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), reqwest::StatusCode::CREATED);
        let order: Value = created.json().await.unwrap();
        assert_eq!(order["userId"], 2);

        shutdown.cancel();
        users.await.unwrap().unwrap();
        orders.await.unwrap().unwrap();
        let mut gone = vec![next_event(&mut events).await, next_event(&mut events).await];
        gone.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            gone,
            vec![
                RegistryEvent::Deregistered {
                    name: "order-service".into(),
                    port: orders_port
                },
                RegistryEvent::Deregistered {
                    name: "user-service".into(),
                    port: users_port
                },
            ]
        );
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", users_port))
                .await
                .is_err()
        );
    }

    /// Polls `check` every 20 ms until it gives a value, for at most 5 s.
    async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, check: impl Fn() -> F) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(value) = check().await {
                return value;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn an_order_reaches_analytics_exactly_once_even_when_analytics_was_down() {
        let dir = TempDir::new("events-e2e");
        let (registry_url, mut events) = FakeRegistry::start(vec![]).await;
        let shutdown = CancellationToken::new();
        let options = ServiceOptions {
            outbox: RelaySettings {
                poll_interval: Duration::from_millis(10),
                backoff: breakwater_resilience::retry::Backoff {
                    base: Duration::from_millis(20),
                    max: Duration::from_millis(100),
                },
                ..RelaySettings::default()
            },
            // The relays send it; analytics refuses events without it.
            events: EventSettings {
                token: Some(EventsToken::new("relay-secret").unwrap()),
                ..EventSettings::default()
            },
            ..ServiceOptions::default()
        };
        let mut tasks = Vec::new();
        for kind in [ServiceKind::Users, ServiceKind::Orders] {
            let (port, task) =
                start_with(kind, &registry_url, dir.path(), &shutdown, options.clone()).await;
            assert!(matches!(
                next_event(&mut events).await,
                RegistryEvent::Registered { .. }
            ));
            tasks.push((kind, port, task));
        }
        let orders_port = tasks[1].1;

        // No analytics instance exists while the order is created.
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let created = http
            .post(format!("http://127.0.0.1:{orders_port}/orders"))
            .header("traceparent", TRACE_PARENT)
            .json(&serde_json::json!({"userId": 1, "products": ["Lamp", "Bulb"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), reqwest::StatusCode::CREATED);

        let shared = SqliteStore::open(&dir.path().join(DATABASE_FILE))
            .await
            .unwrap();
        let outbox = shared.outbox();
        let order_event = || async {
            let rows = outbox.records().await.unwrap();
            rows.into_iter()
                .find(|r| r.topic == crate::outbox::ORDER_CREATED)
        };
        // The relay keeps trying.
        let pending = eventually("two failed deliveries", || async {
            order_event().await.filter(|r| r.attempts >= 2)
        })
        .await;
        assert_eq!(pending.delivered_at, None);
        // The event carries the order request's trace, as orders' span.
        let carried = TraceContext::parse(pending.traceparent.as_deref().unwrap()).unwrap();
        assert_eq!(carried.trace_id, TRACE_ID);

        // Analytics comes up; the relay finds it and delivers.
        let (analytics_port, analytics_task) = start_with(
            ServiceKind::Analytics,
            &registry_url,
            dir.path(),
            &shutdown,
            options.clone(),
        )
        .await;
        tasks.push((ServiceKind::Analytics, analytics_port, analytics_task));
        let delivered = eventually("the event delivered", || async {
            order_event().await.filter(|r| r.delivered_at.is_some())
        })
        .await;
        assert_eq!(delivered.id, pending.id);

        let metrics = analytics::SqliteMetrics::open(&dir.path().join(analytics::DATABASE_FILE))
            .await
            .unwrap();
        let summary = analytics::MetricStore::summary(&metrics, analytics::ORDERS_CREATED)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((summary.count, summary.average_value), (1, 2.0));

        // The relays count on their instance's metrics page; nothing was refused for good.
        let page = http
            .get(format!("http://127.0.0.1:{orders_port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(page.contains("breakwater_outbox_dead_total 0"), "{page}");
        assert!(page.contains("breakwater_outbox_retried_total"), "{page}");

        // Someone else posting the same event without the token is refused.
        let injected = http
            .post(format!("http://127.0.0.1:{analytics_port}/events"))
            .header("content-type", "application/json")
            .body(delivered.payload.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(injected.status(), reqwest::StatusCode::UNAUTHORIZED);

        // A second delivery of the same event (as after a lost acknowledgement), as the
        // relay sends it: analytics continues the order's trace.
        let again = http
            .post(format!("http://127.0.0.1:{analytics_port}/events"))
            .header("content-type", "application/json")
            .header("traceparent", delivered.traceparent.clone().unwrap())
            .bearer_auth("relay-secret")
            .body(delivered.payload.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), reqwest::StatusCode::OK);
        let again: Value = again.json().await.unwrap();
        assert_eq!(again["status"], "duplicate");
        assert_eq!(again["traceId"], format!("{TRACE_ID:032x}"));
        let summary = analytics::MetricStore::summary(&metrics, analytics::ORDERS_CREATED)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(summary.count, 1);

        shutdown.cancel();
        for (_, _, task) in tasks {
            task.await.unwrap().unwrap();
        }
        metrics.close().await;
        shared.close().await;
    }

    #[tokio::test]
    async fn with_redis_an_order_reaches_analytics_over_its_stream_in_its_trace() {
        let Some(url) = crate::redis_fixtures::redis_url() else {
            return;
        };
        let prefix = crate::redis_fixtures::prefix("service-streams");
        let dir = TempDir::new("events-streams");
        // Nobody is registered: delivery cannot be going over HTTP through discovery.
        let (registry_url, _events) = FakeRegistry::start(vec![]).await;
        let shutdown = CancellationToken::new();
        let options = ServiceOptions {
            outbox: RelaySettings {
                poll_interval: Duration::from_millis(10),
                ..RelaySettings::default()
            },
            events: EventSettings {
                redis_url: Some(url.clone()),
                prefix: prefix.clone(),
                token: None,
            },
            ..ServiceOptions::default()
        };
        let (orders_port, orders) = start_with(
            ServiceKind::Orders,
            &registry_url,
            dir.path(),
            &shutdown,
            options.clone(),
        )
        .await;
        let shared = SqliteStore::open(&dir.path().join(DATABASE_FILE))
            .await
            .unwrap();
        // Written as the orders handler writes it (under its request's trace), into the
        // file the running orders instance's relay watches.
        let order = crate::storage::NewOrder {
            user_id: 1,
            products: vec!["Lamp".into(), "Bulb".into(), "Shade".into()],
        };
        crate::outbox::with_traceparent(
            Some(TRACE_PARENT.to_owned()),
            crate::storage::OrderStore::create_order(&shared, &order),
        )
        .await
        .unwrap();
        let outbox = shared.outbox();
        let delivered = eventually("the event in its stream", || async {
            let rows = outbox.records().await.unwrap();
            rows.into_iter().find(|r| r.delivered_at.is_some())
        })
        .await;
        assert_eq!(delivered.traceparent.as_deref(), Some(TRACE_PARENT));
        assert!(orders_port > 0);

        let (analytics_port, analytics) = start_with(
            ServiceKind::Analytics,
            &registry_url,
            dir.path(),
            &shutdown,
            options.clone(),
        )
        .await;
        let metrics = analytics::SqliteMetrics::open(&dir.path().join(analytics::DATABASE_FILE))
            .await
            .unwrap();
        let summary = eventually("the event applied by analytics", || async {
            analytics::MetricStore::summary(&metrics, analytics::ORDERS_CREATED)
                .await
                .unwrap()
        })
        .await;
        assert_eq!((summary.count, summary.average_value), (1, 3.0));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let health = format!("http://127.0.0.1:{analytics_port}/health");
        assert!(http.get(health).send().await.unwrap().status().is_success());
        let page = http
            .get(format!("http://127.0.0.1:{analytics_port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(page.contains("breakwater_events_applied_total 1"), "{page}");
        assert!(
            page.contains("breakwater_events_dead_lettered_total 0"),
            "{page}"
        );
        assert!(
            page.contains(r#"http_requests_total{method="GET",route="/health",status="200"} 1"#),
            "one page with both sets: {page}"
        );

        shutdown.cancel();
        orders.await.unwrap().unwrap();
        analytics.await.unwrap().unwrap();
        metrics.close().await;
        shared.close().await;
        crate::redis_fixtures::delete_keys(&url, &prefix).await;
    }

    #[tokio::test]
    async fn an_unusable_data_dir_is_reported() {
        let dir = TempDir::new("bad-data-dir");
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = ServiceConfig {
            port: 1,
            host: None,
            registry_url: "http://127.0.0.1:1".into(),
            data_dir: file.join("sub"),
            heartbeat_interval_secs: 30,
            options: ServiceOptions::default(),
        };
        let err = run(
            ServiceKind::Users,
            listener,
            config,
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ServiceError::DataDir { .. }), "{err}");
    }

    async fn get_text(router: &Router, uri: &str) -> (u16, String) {
        let req = axum::http::Request::builder()
            .uri(uri)
            .body(axum::body::Body::empty())
            .unwrap();
        let res = tower::ServiceExt::oneshot(router.clone(), req)
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn an_observed_service_answers_metrics_by_route_template() {
        let metrics = Arc::new(HttpMetrics::new());
        let state = UnstableState::new("unstable-service-9000", 9000, &UnstableSettings::default())
            .unwrap();
        let router = observed(
            ServiceKind::Unstable,
            unstable::app(state),
            "unstable-service-9000",
            metrics.clone(),
            None,
            None,
        );
        assert_eq!(get_text(&router, "/health").await.0, 200);
        assert_eq!(get_text(&router, "/no/such/path").await.0, 404);
        let (status, page) = get_text(&router, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            page.contains(r#"http_requests_total{method="GET",route="/health",status="200"} 1"#),
            "{page}"
        );
        assert!(
            page.contains(r#"http_requests_total{method="GET",route="unmatched",status="404"} 1"#),
            "{page}"
        );
    }

    #[tokio::test]
    async fn the_data_service_keeps_one_metrics_page_with_both_sets() {
        let dir = TempDir::new("observed-data");
        let settings = DataSettings::default();
        let store = SqliteShards::open(dir.path(), settings.shards)
            .await
            .unwrap();
        let metrics = Arc::new(HttpMetrics::new());
        let state = DataState::new(
            store.clone(),
            crate::fixtures::ScriptedUpstream::failing(),
            "data-service-7000",
            7000,
            &settings,
        )
        .unwrap()
        .with_http_metrics(metrics.clone());
        let router = observed(
            ServiceKind::Data,
            data::app(state),
            "data-service-7000",
            metrics,
            None,
            None,
        );
        assert_eq!(get_text(&router, "/health").await.0, 200);
        let (status, page) = get_text(&router, "/metrics").await;
        assert_eq!(status, 200);
        assert!(page.contains("data_requests_total"), "{page}");
        assert!(
            page.contains(r#"http_requests_total{method="GET",route="/health",status="200"} 1"#),
            "{page}"
        );
        assert_eq!(page.matches("# EOF").count(), 1, "{page}");
        store.close().await;
    }

    #[test]
    fn kinds_parse_and_name_themselves() {
        assert_eq!("users".parse::<ServiceKind>(), Ok(ServiceKind::Users));
        assert_eq!(
            "order-service".parse::<ServiceKind>(),
            Ok(ServiceKind::Orders)
        );
        for kind in ServiceKind::ALL {
            assert_eq!(kind.service_name().parse::<ServiceKind>(), Ok(kind));
            let short = kind.service_name().trim_end_matches("-service");
            let short = if short == "user" || short == "order" {
                format!("{short}s")
            } else {
                short.to_owned()
            };
            assert_eq!(short.parse::<ServiceKind>(), Ok(kind), "{short}");
        }
        assert!("gateway".parse::<ServiceKind>().is_err());
        assert_eq!(ServiceKind::Users.to_string(), "user-service");
        assert_eq!(ServiceKind::Data.service_name(), "data-service");
        assert_eq!(ServiceKind::Analytics.service_name(), "analytics-service");
        assert_eq!(ServiceKind::Unstable.service_name(), "unstable-service");
    }

    async fn get_json(http: &reqwest::Client, url: String) -> (reqwest::StatusCode, Value) {
        let res = http.get(url).send().await.unwrap();
        (res.status(), res.json().await.unwrap())
    }

    #[tokio::test]
    async fn analytics_data_and_unstable_find_each_other_and_deregister() {
        let dir = TempDir::new("run-three");
        let (registry_url, mut events) = FakeRegistry::start(vec![]).await;
        let shutdown = CancellationToken::new();
        let options = ServiceOptions {
            unstable: UnstableSettings {
                failure_rate: 0.0,
                delay_rate: 0.0,
                seed: Some(1),
                ..UnstableSettings::default()
            },
            ..ServiceOptions::default()
        };

        let mut started = Vec::new();
        for kind in [
            ServiceKind::Unstable,
            ServiceKind::Data,
            ServiceKind::Analytics,
        ] {
            let (port, task) =
                start_with(kind, &registry_url, dir.path(), &shutdown, options.clone()).await;
            assert_eq!(
                next_event(&mut events).await,
                RegistryEvent::Registered {
                    name: kind.service_name().into(),
                    port
                }
            );
            started.push((kind, port, task));
        }
        let port_of = |wanted: ServiceKind| {
            started
                .iter()
                .find(|(kind, _, _)| *kind == wanted)
                .map(|(_, port, _)| *port)
                .unwrap()
        };
        let (data_port, analytics_port) =
            (port_of(ServiceKind::Data), port_of(ServiceKind::Analytics));
        assert!(
            dir.path()
                .join(DATA_SHARD_DIR)
                .join("shard-3-of-4.db")
                .exists()
        );
        assert!(dir.path().join(analytics::DATABASE_FILE).exists());

        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        // Data reaches unstable through discovery and stores its answer.
        let (status, body) = get_json(&http, format!("http://127.0.0.1:{data_port}/")).await;
        assert_eq!(status, reqwest::StatusCode::OK);
        assert_eq!(body["source"], "upstream", "{body}");
        assert_eq!(body["data"]["message"], "External service OK");
        assert_eq!(body["instance"], format!("data-service-{data_port}"));
        let id = body["id"].as_str().unwrap();
        let (status, stored) =
            get_json(&http, format!("http://127.0.0.1:{data_port}/data/{id}")).await;
        assert_eq!(status, reqwest::StatusCode::OK);
        assert_eq!(stored["data"], body["data"]);

        // So does analytics, through its breaker; and the peer address is its client.
        let (status, body) = get_json(
            &http,
            format!("http://127.0.0.1:{analytics_port}/api/external-data"),
        )
        .await;
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
        assert_eq!(body["circuit_state"], "CLOSED");
        let metric =
            serde_json::json!({"timestamp": "2026-02-15T10:00:00Z", "value": 1, "type": "t"});
        for n in 0..6 {
            let res = http
                .post(format!("http://127.0.0.1:{analytics_port}/api/metrics"))
                .json(&metric)
                .send()
                .await
                .unwrap();
            let expected = if n < 5 { 201 } else { 429 };
            assert_eq!(res.status().as_u16(), expected, "request {n}");
        }

        shutdown.cancel();
        let mut gone = Vec::new();
        for (_, _, task) in started {
            task.await.unwrap().unwrap();
            gone.push(next_event(&mut events).await);
        }
        assert_eq!(gone.len(), 3);
        assert!(
            gone.iter()
                .all(|e| matches!(e, RegistryEvent::Deregistered { .. }))
        );
    }

    #[tokio::test]
    async fn bad_settings_stop_the_start_and_name_the_setting() {
        let dir = TempDir::new("bad-settings");
        let data_dir = dir.path().join("never-created");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = ServiceConfig {
            port: 1,
            host: None,
            registry_url: "http://127.0.0.1:1".into(),
            data_dir: data_dir.clone(),
            heartbeat_interval_secs: 30,
            options: ServiceOptions {
                data: DataSettings {
                    shards: 1,
                    ..DataSettings::default()
                },
                ..ServiceOptions::default()
            },
        };
        let err = run(
            ServiceKind::Data,
            listener,
            config,
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        let ServiceError::Setting(setting) = err else {
            panic!("expected a setting error, got {err}");
        };
        assert_eq!(setting.setting, "shards");
        assert!(!data_dir.exists(), "nothing is created before the check");
    }
}
