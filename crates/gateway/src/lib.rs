//! The Breakwater API gateway (walking-skeleton version).
//!
//! - [`config`]: [`GatewayConfig`], the gateway's settings and their validation.
//! - [`server`]: [`GatewayState`], the router ([`app`]) and [`run`], which serves it and
//!   keeps the gateway registered as `api-gateway`.
//! - [`forward`]: the proxy data path: one pooled hyper client, header hygiene
//!   (hop-by-hop, `X-Forwarded-*`, `x-request-id`), body cap, failover across instances.
//! - [`balance`]: which instance a request tries first and which next (round-robin).
//! - [`compose`]: `/users`, `/orders/user/:userId`, `/users-with-orders`, and the seed's
//!   fallback data.
//! - [`health`]: `GET /health`.
//! - [`dashboard`]: `GET /`, the self-contained HTML dashboard.
//! - [`errors`]: [`GatewayError`], the one place a gateway failure becomes a status.

pub mod balance;
pub mod compose;
pub mod config;
pub mod dashboard;
pub mod errors;
pub mod forward;
pub mod health;
pub mod server;

pub use config::GatewayConfig;
pub use errors::GatewayError;
pub use server::{GatewayState, app, run};
