//! The registry server: the HTTP API of the contract ([`app`]), the reaper that removes
//! each instance at its expiry deadline ([`reap`]), and [`run`] / [`run_with`], which
//! serve both until shutdown over a memory or a shared (Redis) instance table.
//!
//! Beyond the contract, `GET /services/{name}/watch?index=N&timeout=T` is a long poll
//! for watchers: it answers at once (the list, and the service's version in
//! `X-Registry-Index`) when the version differs from `N` (or `N` is absent), else when
//! it changes, or after `T` (default 30 s, at most 60 s; `30`, `30s`, `500ms`) with the
//! same list and index. A shared store's replicas hear each other's changes
//! ([`Store::listen_for_changes`]), so a watcher on any replica wakes.

mod dashboard;
mod request;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use breakwater_runtime::CancellationToken;
use breakwater_runtime::clock::{iso8601_now, now_millis};
use breakwater_runtime::http::{ApiError, Json, Path, method_not_allowed, not_found};
use breakwater_runtime::observe::{self, HttpMetrics};
use breakwater_runtime::serve::{DEFAULT_DRAIN, serve};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::client::REGISTRY_INDEX_HEADER;
use crate::store::{InstanceStore, Recorded, RemoveError, Store, StoreChoice, StoreError};
use crate::wire::{HeartbeatResponse, Instance, RegisterResponse, RemovedResponse, ServiceList};
use request::{RawRegistration, normalise_host, normalise_ip};

/// What the handlers share: the instance table, the reaper's wake-up signal and the
/// start time. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RegistryState {
    store: Store,
    /// Signalled when a deadline earlier than the one the reaper sleeps towards appears.
    sooner_deadline: Arc<Notify>,
    started: Instant,
    /// Cancelled when the server stops, so long polls answer instead of holding the
    /// drain.
    stopping: CancellationToken,
}

impl Default for RegistryState {
    fn default() -> Self {
        Self::new()
    }
}

impl RegistryState {
    /// An empty in-memory registry started now.
    pub fn new() -> Self {
        Self::with_store(Store::default())
    }

    /// A registry started now over `store` (a shared one may already hold instances).
    pub fn with_store(store: Store) -> Self {
        Self {
            store,
            sooner_deadline: Arc::new(Notify::new()),
            started: Instant::now(),
            stopping: CancellationToken::new(),
        }
    }

    /// The instance table.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn recorded(&self, rec: &Recorded) {
        if rec.earliest_deadline {
            self.sooner_deadline.notify_one();
        }
    }
}

/// The registry's routes (see CONTRACTS.md, "Registry").
pub fn app(state: RegistryState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/health", get(health))
        .route("/register", post(register))
        .route("/heartbeat", post(heartbeat))
        .route("/services", get(all_services))
        .route("/services/{name}", get(services))
        .route("/services/{name}/watch", get(watch))
        .route("/services/{name}/{port}", delete(remove))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Why [`run_with`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The chosen store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Serving failed.
    #[error("registry server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves a fresh in-memory registry on `listener` until `shutdown` fires, with its
/// reaper running alongside; returns once both have stopped.
pub async fn run(listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
    serve_state(listener, RegistryState::new(), shutdown).await
}

/// Like [`run`], over the chosen instance table: replicas given the same Redis URL and
/// prefix serve one state. Fails early when the store cannot be opened.
pub async fn run_with(
    listener: TcpListener,
    choice: StoreChoice,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let store = Store::open(&choice).await?;
    Ok(serve_state(listener, RegistryState::with_store(store), shutdown).await?)
}

/// The component name the registry logs its requests under.
pub const REGISTRY_COMPONENT: &str = "registry";

/// [`app`] with `GET /metrics` and the per-request observability layer (request id,
/// trace context, HTTP metrics, one log line per request), as [`serve_state`] serves it.
/// Kept out of [`app`] so handler tests see the bare routes.
pub fn observed_app(state: RegistryState, instance: String, metrics: Arc<HttpMetrics>) -> Router {
    app(state)
        .merge(observe::metrics_router(metrics.clone()))
        .layer(observe::layer(REGISTRY_COMPONENT, instance, metrics))
}

/// Serves `state` on `listener` with its reaper until `shutdown` fires.
pub async fn serve_state(
    listener: TcpListener,
    state: RegistryState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "registry listening");
    }
    let reaper_stop = shutdown.child_token();
    let reaper = tokio::spawn(reap(state.clone(), reaper_stop.clone()));
    let mut state = state;
    state.stopping = shutdown.child_token();
    let store = state.store.clone();
    let listener_stop = reaper_stop.clone();
    let changes = tokio::spawn(async move { store.listen_for_changes(listener_stop).await });
    let instance = match listener.local_addr() {
        Ok(addr) => format!("{REGISTRY_COMPONENT}-{}", addr.port()),
        Err(_) => REGISTRY_COMPONENT.to_owned(),
    };
    let router = observed_app(state, instance, Arc::new(HttpMetrics::new()));
    let served = serve(listener, router, shutdown, DEFAULT_DRAIN).await;
    reaper_stop.cancel();
    if let Err(err) = reaper.await {
        tracing::error!(error = %err, "registry reaper failed");
    }
    if let Err(err) = changes.await {
        tracing::error!(error = %err, "registry change listener failed");
    }
    served
}

/// Timer granularity: an instance is alive at exactly its deadline, so the reaper wakes
/// one tick after it.
const TICK: Duration = Duration::from_millis(1);

/// Removes every instance at its expiry deadline until `shutdown` fires: sleeps until
/// the earliest deadline, and starts over whenever a sooner one is recorded.
pub async fn reap(state: RegistryState, shutdown: CancellationToken) {
    loop {
        let next = state.store.next_reap(Instant::now());
        let expiry = async {
            match next {
                Some(deadline) => tokio::time::sleep_until(deadline + TICK).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = state.sooner_deadline.notified() => {}
            () = expiry => {
                let expired = match state.store.reap_expired(Instant::now()).await {
                    Ok(expired) => expired,
                    Err(err) => {
                        // Reads already skip expired instances; the next sweep retries.
                        tracing::warn!(error = %err, "registry reaper could not sweep the store");
                        Vec::new()
                    }
                };
                for inst in expired {
                    tracing::info!(
                        service = %inst.name, instance = %inst.id,
                        heartbeat_interval = inst.heartbeat_interval,
                        "instance expired (no heartbeat for 1.5 intervals); removed"
                    );
                }
            }
        }
    }
}

/// The peer's IP address when the server provides it (normalised); absent in tests
/// that call the router directly.
#[derive(Debug, Clone, Copy)]
struct Caller(Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Infallible> {
        let info = ConnectInfo::<SocketAddr>::from_request_parts(parts, state).await;
        Ok(Self(
            info.ok().map(|ConnectInfo(addr)| normalise_ip(addr.ip())),
        ))
    }
}

async fn register(
    State(state): State<RegistryState>,
    Caller(caller): Caller,
    Json(raw): Json<RawRegistration>,
) -> Result<Json<RegisterResponse>, ApiError> {
    let reg = raw.validate(caller)?;
    let rec = state
        .store
        .register(reg, Instant::now(), now_millis())
        .await
        .map_err(store_unavailable)?;
    state.recorded(&rec);
    let i = &rec.instance;
    tracing::info!(
        service = %i.name, instance = %i.id, heartbeat_interval = i.heartbeat_interval,
        "instance registered"
    );
    Ok(Json(RegisterResponse {
        id: i.id.clone(),
        heartbeat_interval: i.heartbeat_interval,
        registered_at: i.registered_at,
    }))
}

async fn heartbeat(
    State(state): State<RegistryState>,
    Caller(caller): Caller,
    Json(raw): Json<RawRegistration>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let reg = raw.validate(caller)?;
    let rec = state
        .store
        .heartbeat(reg, Instant::now(), now_millis())
        .await
        .map_err(store_unavailable)?;
    state.recorded(&rec);
    let i = &rec.instance;
    if rec.renewed {
        tracing::trace!(service = %i.name, instance = %i.id, "heartbeat");
    } else {
        tracing::info!(
            service = %i.name, instance = %i.id, heartbeat_interval = i.heartbeat_interval,
            "instance registered by heartbeat"
        );
    }
    Ok(Json(HeartbeatResponse {
        ok: true,
        last_heartbeat: i.last_heartbeat,
        next_heartbeat_in: i.heartbeat_interval,
    }))
}

/// A store failure is the registry's dependency being down: 503, and nothing changed.
fn store_unavailable(err: StoreError) -> ApiError {
    tracing::warn!(error = %err, "registry store failed");
    ApiError::unavailable(err.to_string())
}

async fn services(
    State(state): State<RegistryState>,
    Path(name): Path<String>,
) -> Result<Json<ServiceList>, ApiError> {
    let services = state
        .store
        .list(&name, Instant::now())
        .await
        .map_err(store_unavailable)?;
    Ok(Json(ServiceList { services }))
}

/// Header of a watch answer: the version of the service's instances it shows.
pub const REGISTRY_INDEX: HeaderName = HeaderName::from_static(REGISTRY_INDEX_HEADER);
/// How long a watch waits when it does not say.
pub const DEFAULT_WATCH: Duration = Duration::from_secs(30);
/// The longest wait a watch may ask for.
pub const MAX_WATCH: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize)]
struct WatchQuery {
    index: Option<String>,
    timeout: Option<String>,
}

impl WatchQuery {
    fn index(&self) -> Result<Option<u64>, ApiError> {
        match self.index.as_deref() {
            None | Some("") => Ok(None),
            Some(raw) => raw.parse().map(Some).map_err(|_| {
                ApiError::bad_request(format!(
                    "Invalid index: {raw:?} is not a non-negative integer"
                ))
            }),
        }
    }

    fn timeout(&self) -> Result<Duration, ApiError> {
        let Some(raw) = self.timeout.as_deref().filter(|t| !t.is_empty()) else {
            return Ok(DEFAULT_WATCH);
        };
        let parsed = match raw.parse::<u64>() {
            Ok(secs) => Some(Duration::from_secs(secs)),
            Err(_) => humantime::parse_duration(raw).ok(),
        };
        parsed.filter(|t| *t <= MAX_WATCH).ok_or_else(|| {
            ApiError::bad_request(format!(
                "Invalid timeout: {raw:?} must be seconds or a duration such as 30s, at most 60s"
            ))
        })
    }
}

/// The long poll described in the module docs.
async fn watch(
    State(state): State<RegistryState>,
    Path(name): Path<String>,
    query: Result<Query<WatchQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::bad_request(format!("Invalid query: {}", e.body_text())))?;
    let (index, timeout) = (query.index()?, query.timeout()?);
    let deadline = Instant::now() + timeout;
    // Subscribed before the version is read: a change in between still wakes us.
    let mut woken = state.store.subscribe();
    let version = loop {
        let version = state
            .store
            .version(&name)
            .await
            .map_err(store_unavailable)?;
        if index.is_none_or(|seen| seen != version) {
            break version;
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break version,
            () = state.stopping.cancelled() => break version,
            changed = woken.changed() => if changed.is_err() { break version },
        }
    };
    // Listed after the version was read, so the list is at least that new; a change in
    // between makes the next watch with this index answer at once.
    let services = state
        .store
        .list(&name, Instant::now())
        .await
        .map_err(store_unavailable)?;
    let mut response = Json(ServiceList { services }).into_response();
    response
        .headers_mut()
        .insert(REGISTRY_INDEX, HeaderValue::from(version));
    Ok(response)
}

async fn all_services(
    State(state): State<RegistryState>,
) -> Result<Json<BTreeMap<String, Vec<Instance>>>, ApiError> {
    Ok(Json(
        state
            .store
            .list_all(Instant::now())
            .await
            .map_err(store_unavailable)?,
    ))
}

#[derive(Debug, Deserialize)]
struct HostQuery {
    host: Option<String>,
}

async fn remove(
    State(state): State<RegistryState>,
    Path((name, port)): Path<(String, String)>,
    query: Result<Query<HostQuery>, QueryRejection>,
) -> Result<Json<RemovedResponse>, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::bad_request(format!("Invalid query: {}", e.body_text())))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "Invalid port: {port:?} is not an integer from 1 to 65535"
            ))
        })?;
    let host = match query.host.as_deref() {
        None | Some("") => None,
        Some(h) => Some(
            normalise_host(h)
                .map_err(|reason| ApiError::bad_request(format!("Invalid host: {reason}")))?,
        ),
    };
    let removed = state
        .store
        .remove(&name, port, host.as_deref(), Instant::now())
        .await
        .map_err(|e| match e {
            RemoveError::Store(err) => store_unavailable(err),
            e @ (RemoveError::ServiceNotFound | RemoveError::InstanceNotFound) => {
                ApiError::not_found(e.to_string())
            }
        })?;
    for i in &removed {
        tracing::info!(service = %i.name, instance = %i.id, "instance deregistered");
    }
    Ok(Json(RemovedResponse {
        message: "Service removed successfully".to_owned(),
    }))
}

async fn health(State(state): State<RegistryState>) -> Result<Json<serde_json::Value>, ApiError> {
    let all = state
        .store
        .list_all(Instant::now())
        .await
        .map_err(store_unavailable)?;
    let instances: usize = all.values().map(Vec::len).sum();
    Ok(Json(serde_json::json!({
        "service": "service-registry",
        "status": "healthy",
        "timestamp": iso8601_now(),
        "uptimeSeconds": state.started.elapsed().as_secs(),
        "services": all.len(),
        "instances": instances,
    })))
}

async fn dashboard(State(state): State<RegistryState>) -> Result<Html<String>, ApiError> {
    let all = state
        .store
        .list_all(Instant::now())
        .await
        .map_err(store_unavailable)?;
    Ok(Html(dashboard::render(
        &all,
        now_millis(),
        state.started.elapsed().as_secs(),
    )))
}

#[cfg(test)]
mod tests;
