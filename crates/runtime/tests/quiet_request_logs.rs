//! The observe layer logs polled routes (`/health`, `/metrics`, heartbeats) at debug
//! and every other request at info. Its own test binary: tracing caches each log
//! statement's interest process-wide, so a capturing subscriber only sees every event
//! reliably when no other test emits the same statements concurrently.

#![expect(clippy::unwrap_used, reason = "a test: failing loudly is the point")]

use std::fmt;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::routing::{get, post};
use breakwater_runtime::observe::{self, HttpMetrics};
use tower::ServiceExt as _;
use tracing::Level;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt as _};

/// Every event's level and `route` field.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<(Level, String)>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Lines {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        struct Route(String);
        impl Visit for Route {
            fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
                if field.name() == "route" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut route = Route(String::new());
        event.record(&mut route);
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), route.0));
    }
}

#[tokio::test]
async fn polled_routes_are_logged_at_debug_and_the_rest_at_info() {
    let lines = Lines::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(lines.clone()))
        .unwrap();
    let metrics = Arc::new(HttpMetrics::new());
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/heartbeat", post(|| async { "ok" }))
        .route("/users/{id}", get(|| async { "user" }))
        .merge(observe::metrics_router(metrics.clone()))
        .layer(observe::layer(
            "test-service",
            "test-1".into(),
            metrics.clone(),
        ));
    for req in [
        Request::get("/health").body(Body::empty()),
        Request::get("/metrics").body(Body::empty()),
        Request::post("/heartbeat").body(Body::empty()),
        Request::get("/users/1").body(Body::empty()),
    ] {
        let res = app.clone().oneshot(req.unwrap()).await.unwrap();
        assert!(res.status().is_success());
    }

    let level_of = |route: &str| {
        let lines = lines.0.lock().unwrap();
        let levels: Vec<_> = lines
            .iter()
            .filter(|(_, r)| r == route)
            .map(|(l, _)| *l)
            .collect();
        assert_eq!(levels.len(), 1, "{route}: {lines:?}");
        levels[0]
    };
    assert_eq!(level_of("/health"), Level::DEBUG);
    assert_eq!(level_of("/metrics"), Level::DEBUG);
    assert_eq!(level_of("/heartbeat"), Level::DEBUG);
    assert_eq!(level_of("/users/{id}"), Level::INFO);
    // Quiet is about the log line only: they are still counted.
    assert_eq!(metrics.requests("GET", "/health", 200), 1);
    assert_eq!(metrics.requests("POST", "/heartbeat", 200), 1);
}
