//! The Breakwater API gateway: a resilient reverse proxy with composed endpoints.
//!
//! The request path, in order (see DESIGN.md "The request path"):
//! - [`config`]: [`GatewayConfig`] (process settings) and `breakwater.toml`
//!   ([`config::FileConfig`]: routes and policies, validated with key paths).
//! - [`policy`]: the typed per-route and per-service policy.
//! - [`route`]: the immutable [`route::RouteTable`] (longest prefix on segment
//!   boundaries), swapped whole on reload.
//! - [`stack`]: a route's request path: rate limit, cache, deadline, budgeted retries,
//!   breaker, balancing, one try, one classification.
//! - [`upstream`]: per-service state: endpoints with atomics (outstanding, peak EWMA,
//!   failures in a row, ejection), breaker, retry budget.
//! - [`balance`]: P2C over peak-EWMA x outstanding, round-robin, random; skips ejected
//!   endpoints and ones this request tried.
//! - [`classify`]: the one verdict on a try that feeds retry, breaker, ejection, EWMA and
//!   metrics.
//! - [`forward`]: one try at one endpoint: the pooled connections and their own
//!   HTTP/1.1 codec, header hygiene
//!   (hop-by-hop, `X-Forwarded-*`, `x-request-id`), bodies kept for replay up to 64 KiB.
//! - [`errors`]: [`GatewayError`], the one place a gateway failure becomes a status.
//! - [`trace`]: the `x-breakwater-trace` decision trace.
//!
//! Around it:
//! - [`server`]: [`GatewayState`], the router ([`app`]), the [`Front`] that answers
//!   proxied routes without it, reload, and [`run`], which serves it, reloads on SIGHUP and keeps the gateway registered as `api-gateway`.
//! - [`admin`]: `/admin` (routes, services, events, reload), token-guarded off loopback.
//! - [`compose`]: `/users`, `/orders/user/:userId`, `/users-with-orders`, and the seed's
//!   fallback data.
//! - [`limit`], [`cache`], [`metrics`], [`events`]: route rate limits, the response cache,
//!   Prometheus metrics, the admin event stream.
//! - [`health`]: `GET /health`; [`dashboard`]: `GET /`, the self-contained HTML page.

pub mod admin;
pub mod balance;
pub mod cache;
pub mod classify;
pub mod compose;
pub mod config;
pub mod dashboard;
pub mod errors;
pub mod events;
pub mod forward;
pub mod health;
pub mod limit;
pub mod metrics;
pub mod policy;
pub mod route;
pub mod server;
pub mod stack;
pub mod trace;
pub mod upstream;

pub use config::GatewayConfig;
pub use errors::GatewayError;
pub use server::{Front, GatewayState, RunError, app, run};
