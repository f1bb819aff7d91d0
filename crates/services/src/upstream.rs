//! The unstable service as its callers (analytics, data) see it: one `GET /data` call
//! to an instance found through discovery, or to a fixed base URL. Timeouts, retries
//! and breakers belong to the callers, which know their own budgets.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use breakwater_registry::client::Discovery;
use serde_json::Value;

use crate::unstable;

/// Largest body accepted from the dependency; anything bigger is a failed call, not a
/// reason to buffer without bound.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// One call of the dependency's `GET /data`.
pub trait Upstream: Send + Sync {
    /// Calls once and returns the JSON body of a 2xx answer. No timeout of its own:
    /// the caller wraps it in its per-try deadline.
    fn fetch(&self) -> impl Future<Output = Result<Value, UpstreamError>> + Send;
}

/// Why one call of the dependency failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Discovery offered no instance to call.
    #[error("no instance of {service} to call: {reason}")]
    NoInstance {
        /// The service looked up.
        service: String,
        /// What discovery said.
        reason: String,
    },
    /// No answer: refused, reset, or a broken response.
    #[error("call to {url} failed: {reason}")]
    Transport {
        /// The URL called.
        url: String,
        /// What the client said.
        reason: String,
    },
    /// The dependency answered with a non-2xx status.
    #[error("{url} answered {status}")]
    Status {
        /// The URL called.
        url: String,
        /// The status it answered.
        status: u16,
    },
    /// A 2xx answer whose body is not JSON or is too big.
    #[error("{url} answered a body that cannot be used: {reason}")]
    Body {
        /// The URL called.
        url: String,
        /// What is wrong with the body.
        reason: String,
    },
}

impl UpstreamError {
    /// A short label for metrics: `no_instance`, `transport`, `status` or `body`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoInstance { .. } => "no_instance",
            Self::Transport { .. } => "transport",
            Self::Status { .. } => "status",
            Self::Body { .. } => "body",
        }
    }
}

/// Where the dependency is.
#[derive(Debug, Clone)]
pub enum UpstreamTarget {
    /// A fixed base URL (the `external` setting), e.g. `http://127.0.0.1:9000`.
    Url(String),
    /// Instances of "unstable-service" found through the registry.
    Discovered(Discovery),
}

/// [`Upstream`] over HTTP. Calls through discovery rotate over the live instances, so
/// a retry goes to the next instance when there are several.
#[derive(Debug)]
pub struct HttpUpstream {
    target: UpstreamTarget,
    http: reqwest::Client,
    next: AtomicUsize,
}

impl HttpUpstream {
    /// Calls `target` through `http` (a shared, pooled client).
    pub fn new(target: UpstreamTarget, http: reqwest::Client) -> Self {
        Self {
            target,
            http,
            next: AtomicUsize::new(0),
        }
    }

    async fn base_url(&self) -> Result<String, UpstreamError> {
        let discovery = match &self.target {
            UpstreamTarget::Url(url) => return Ok(url.clone()),
            UpstreamTarget::Discovered(discovery) => discovery,
        };
        let no_instance = |reason: String| UpstreamError::NoInstance {
            service: unstable::SERVICE_NAME.to_owned(),
            reason,
        };
        let instances = discovery
            .resolve(unstable::SERVICE_NAME)
            .await
            .map_err(|e| no_instance(e.to_string()))?;
        if instances.is_empty() {
            return Err(no_instance("none registered".to_owned()));
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed) % instances.len();
        Ok(instances[index].base_url())
    }
}

impl Upstream for HttpUpstream {
    async fn fetch(&self) -> Result<Value, UpstreamError> {
        let url = format!("{}/data", self.base_url().await?);
        let transport = |e: reqwest::Error| UpstreamError::Transport {
            url: url.clone(),
            reason: e.to_string(),
        };
        let mut response = self.http.get(&url).send().await.map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            return Err(UpstreamError::Status {
                url,
                status: status.as_u16(),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(UpstreamError::Body {
                    url,
                    reason: format!("longer than {MAX_BODY_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| UpstreamError::Body {
            url,
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{FakeRegistry, dead_port, instance, spawn_server};
    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::get;
    use breakwater_registry::client::{CachePolicy, RegistryClient};
    use serde_json::json;

    fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    async fn answering(status: StatusCode, body: &'static str) -> String {
        let router = Router::new().route("/data", get(move || async move { (status, body) }));
        format!("http://{}", spawn_server(router).await)
    }

    #[tokio::test]
    async fn a_2xx_json_answer_is_returned() {
        let url = answering(StatusCode::OK, r#"{"message":"External service OK"}"#).await;
        let up = HttpUpstream::new(UpstreamTarget::Url(url), client());
        assert_eq!(
            up.fetch().await.unwrap(),
            json!({"message": "External service OK"})
        );
    }

    #[tokio::test]
    async fn failures_are_typed() {
        let url = answering(StatusCode::INTERNAL_SERVER_ERROR, "{}").await;
        let err = HttpUpstream::new(UpstreamTarget::Url(url), client())
            .fetch()
            .await
            .unwrap_err();
        assert!(
            matches!(err, UpstreamError::Status { status: 500, .. }),
            "{err}"
        );
        assert_eq!(err.kind(), "status");

        let url = answering(StatusCode::OK, "not json").await;
        let err = HttpUpstream::new(UpstreamTarget::Url(url), client())
            .fetch()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "body", "{err}");

        let url = format!("http://127.0.0.1:{}", dead_port().await);
        let err = HttpUpstream::new(UpstreamTarget::Url(url), client())
            .fetch()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "transport", "{err}");
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused() {
        let big: &'static str = Box::leak(format!("\"{}\"", "x".repeat(70_000)).into_boxed_str());
        let url = answering(StatusCode::OK, big).await;
        let err = HttpUpstream::new(UpstreamTarget::Url(url), client())
            .fetch()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "body", "{err}");
    }

    #[tokio::test]
    async fn discovery_rotates_over_instances_and_reports_none() {
        let a = answering(StatusCode::OK, r#"{"from":"a"}"#).await;
        let b = answering(StatusCode::OK, r#"{"from":"b"}"#).await;
        let port = |url: &str| url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        let (registry, _events) = FakeRegistry::start(vec![
            instance(unstable::SERVICE_NAME, "127.0.0.1", port(&a)),
            instance(unstable::SERVICE_NAME, "127.0.0.1", port(&b)),
        ])
        .await;
        let discovery = Discovery::new(RegistryClient::new(registry), CachePolicy::default());
        let up = HttpUpstream::new(UpstreamTarget::Discovered(discovery), client());
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(
                up.fetch().await.unwrap()["from"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        assert_ne!(seen[0], seen[1], "{seen:?}");
        assert_eq!(seen[0], seen[2], "{seen:?}");
        assert_eq!(seen[1], seen[3], "{seen:?}");

        let (empty, _events) = FakeRegistry::start(vec![]).await;
        let discovery = Discovery::new(RegistryClient::new(empty), CachePolicy::default());
        let err = HttpUpstream::new(UpstreamTarget::Discovered(discovery), client())
            .fetch()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "no_instance", "{err}");
    }
}
