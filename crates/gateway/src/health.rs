//! `GET /health`: the gateway's own state, its link to the registry, and what its
//! discovery cache holds.

use axum::extract::State;
use breakwater_runtime::clock::iso8601_now;
use breakwater_runtime::http::Json;
use serde_json::{Value, json};

use crate::server::GatewayState;

/// Name the gateway reports and registers under.
pub const GATEWAY_SERVICE: &str = "api-gateway";

/// `GET /health`: `{service, instance, status, port, timestamp, serviceDiscovery, cache}`.
pub async fn health(State(state): State<GatewayState>) -> Json<Value> {
    let config = state.config();
    let discovery = state.discovery();
    Json(json!({
        "service": GATEWAY_SERVICE,
        "instance": config.instance,
        "status": "healthy",
        "port": config.port,
        "timestamp": iso8601_now(),
        "serviceDiscovery": {
            "status": if discovery.connected() { "connected" } else { "disconnected" },
            "server": config.registry_url,
        },
        "cache": discovery.cache_info(),
    }))
}
