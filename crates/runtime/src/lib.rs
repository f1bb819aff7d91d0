//! What every Breakwater process shares.
//!
//! - [`telemetry`]: tracing subscriber set-up (pretty or JSON lines).
//! - [`shutdown`]: SIGINT/SIGTERM turned into one root [`CancellationToken`].
//! - [`serve`]: serve an axum `Router` on a listener until the token fires, then drain;
//!   `serve_per_core` does it with one single-threaded runtime per core, and
//!   `serve_per_core_with` the same for any hyper service made per connection.
//! - [`clock`]: wall-clock timestamps in the formats the contracts use.
//! - [`hash`]: a quick hasher for small hot-path maps keyed by configuration.
//! - [`http`]: JSON errors, a JSON extractor whose rejections are JSON, and the 404/405
//!   fallbacks every component shares.
//! - [`observe`]: per-request request ids, W3C trace context, Prometheus HTTP metrics
//!   and one log line per request, plus the `GET /metrics` route; the context passed on
//!   by service-to-service calls.
//! - [`otlp`]: OpenTelemetry trace export over OTLP/HTTP JSON when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

pub mod clock;
pub mod hash;
pub mod http;
pub mod observe;
pub mod otlp;
pub mod serve;
pub mod shutdown;
pub mod telemetry;

pub use tokio_util::sync::CancellationToken;
