//! The gateway's shared state, its router, and `run`, which serves it and keeps it
//! registered.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{MethodRouter, any, get};
use breakwater_registry::client::{CachePolicy, Discovery, RegistryClient, spawn_registration};
use breakwater_registry::wire::RegisterRequest;
use breakwater_runtime::CancellationToken;
use breakwater_runtime::serve::{DEFAULT_DRAIN, serve};
use tokio::net::TcpListener;
use tower_http::cors::CorsLayer;

use crate::balance::RoundRobin;
use crate::compose::{self, ORDER_SERVICE, USER_SERVICE};
use crate::config::GatewayConfig;
use crate::dashboard;
use crate::errors;
use crate::forward::{self, UpstreamClient};
use crate::health::{self, GATEWAY_SERVICE};

/// Everything a request handler needs. Cheap to clone (one `Arc` inside).
#[derive(Debug, Clone)]
pub struct GatewayState {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: GatewayConfig,
    discovery: Discovery,
    client: UpstreamClient,
    balancer: RoundRobin,
    dashboard_page: String,
}

impl GatewayState {
    /// State for `config`, discovering through the registry at `config.registry_url`
    /// with the default cache policy.
    pub fn new(config: GatewayConfig) -> Self {
        let registry = RegistryClient::new(config.registry_url.clone());
        Self::with_discovery(config, Discovery::new(registry, CachePolicy::default()))
    }

    /// State using a discovery the caller built (another cache policy, a shared one).
    pub fn with_discovery(config: GatewayConfig, discovery: Discovery) -> Self {
        let client = forward::upstream_client(config.try_timeout);
        let dashboard_page = dashboard::render(&config);
        Self {
            inner: Arc::new(Shared {
                config,
                discovery,
                client,
                balancer: RoundRobin::new(),
                dashboard_page,
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

    /// The pooled upstream client every forwarded request uses.
    pub fn client(&self) -> &UpstreamClient {
        &self.inner.client
    }

    /// Round-robin cursors per service.
    pub fn balancer(&self) -> &RoundRobin {
        &self.inner.balancer
    }

    /// The rendered dashboard page.
    pub fn dashboard_page(&self) -> &str {
        &self.inner.dashboard_page
    }
}

/// The gateway's routes (see CONTRACTS.md "Gateway"): dashboard, health, the composed
/// endpoints, and everything else under `/users` and `/orders` proxied to the users and
/// orders services. Unknown paths get a JSON 404.
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
        .route(
            "/users",
            with_cors(get(compose::users)).fallback(proxy_to(USER_SERVICE)),
        )
        .route("/users/", proxy_to(USER_SERVICE))
        .route("/users/{*rest}", proxy_to(USER_SERVICE))
        .route(
            "/orders/user/{user_id}",
            with_cors(get(compose::user_orders)).fallback(proxy_to(ORDER_SERVICE)),
        )
        .route("/orders", proxy_to(ORDER_SERVICE))
        .route("/orders/", proxy_to(ORDER_SERVICE))
        .route("/orders/{*rest}", proxy_to(ORDER_SERVICE))
        .route(
            "/users-with-orders",
            with_cors(get(compose::users_with_orders)).fallback(errors::wrong_method),
        )
        .fallback(errors::no_route)
        .layer(middleware::from_fn(forward::tag_request_id))
        .with_state(state)
}

/// Permissive CORS on a gateway-answered route (as the seed had). Preflights are
/// answered here; proxied routes are left to the services so headers are not doubled.
fn with_cors(route: MethodRouter<GatewayState>) -> MethodRouter<GatewayState> {
    route
        .options(|| async { StatusCode::NO_CONTENT })
        .layer(CorsLayer::permissive())
}

/// A route that sends every method on to `service`, path and query unchanged.
fn proxy_to(service: &'static str) -> MethodRouter<GatewayState> {
    any(move |State(state): State<GatewayState>, req: Request| forward::proxy(state, service, req))
}

/// Serves the gateway on `listener` until `shutdown` fires, registered in the registry
/// as `api-gateway` the whole time: it registers once it is serving, deregisters when
/// shutdown starts, and returns after the drain and the deregistration.
///
/// The listener's real port wins over `config.port` (so port 0 works). A config that
/// fails [`GatewayConfig::validate`] is an `InvalidInput` error.
pub async fn run(
    listener: TcpListener,
    mut config: GatewayConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let port = listener.local_addr()?.port();
    config.adopt_port(port);
    config
        .validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;

    let state = GatewayState::new(config);
    let registration_req = RegisterRequest {
        name: GATEWAY_SERVICE.to_owned(),
        port,
        heartbeat_interval: Some(state.config().heartbeat_interval_secs),
        host: None,
        metadata: Some(serde_json::Map::from_iter([(
            "instance".to_owned(),
            state.config().instance.clone().into(),
        )])),
    };
    tracing::info!(
        port,
        instance = %state.config().instance,
        registry = %state.config().registry_url,
        "gateway listening"
    );

    let server = tokio::spawn(serve(
        listener,
        app(state.clone()),
        shutdown.clone(),
        DEFAULT_DRAIN,
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
    if let Err(e) = registration.await {
        tracing::error!(error = %e, "registration task failed");
    }
    if let Err(e) = &served {
        tracing::error!(error = %e, "gateway server failed");
    }
    served
}
