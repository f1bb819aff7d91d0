//! The registry client: [`RegistryClient`] (one HTTP call per method),
//! [`spawn_registration`] (keeps one instance registered for its lifetime) and
//! [`Discovery`] (resolves service names through a fresh/stale cache).

mod discovery;
mod registration;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wire::{HeartbeatResponse, Instance, RegisterRequest, RegisterResponse, ServiceList};

pub use discovery::{CacheInfo, CachePolicy, Discovery, DiscoveryError};

/// The header of a watch answer carrying the version it shows.
pub const REGISTRY_INDEX_HEADER: &str = "x-registry-index";

/// What [`RegistryClient::watch`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Watched {
    /// The live instances.
    pub instances: Vec<Instance>,
    /// Their version: pass it to the next watch.
    pub index: u64,
}
pub use registration::spawn_registration;

/// How long one registry call may take unless [`RegistryClient::with_timeout`] says
/// otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Thin HTTP client for the registry API. Cheap to clone (shares one reqwest::Client
/// with a request timeout, default 2 s).
#[derive(Debug, Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    base_url: Arc<str>,
    timeout: Duration,
    /// Shared by every clone, so that discovery reports the outcome of registrations
    /// and heartbeats made through the same client too.
    last_call_ok: Arc<AtomicBool>,
}

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL and path do not form a valid URL.
    #[error("invalid registry URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL that was attempted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No answer: connection refused or reset, timeout, or the body broke off.
    #[error("registry at {url} unreachable: {source}")]
    Unreachable {
        /// The URL that was called.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with a non-success status.
    #[error("registry answered {status} for {url}: {body}")]
    Status {
        /// The URL that was called.
        url: String,
        /// The status it answered.
        status: StatusCode,
        /// The body it answered (usually `{"error": "..."}`), cut to 1 KiB.
        body: String,
    },
    /// The registry answered 2xx with a body that is not the expected JSON.
    #[error("registry response from {url} could not be decoded: {source}")]
    Decode {
        /// The URL that was called.
        url: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The HTTP status the registry answered, if it answered with an error status.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the registry answered 404 (unknown instance or service).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }
}

/// Longest error body kept in [`ClientError::Status`], so that a misbehaving server
/// cannot make log lines huge.
const MAX_ERROR_BODY: usize = 1024;

impl RegistryClient {
    /// A client for the registry at `base_url`, e.g. `"http://127.0.0.1:3000"`.
    pub fn new(base_url: impl Into<String>) -> Self {
        let base_url: String = base_url.into();
        let base_url = base_url.trim_end_matches('/').to_owned();
        // The registry is an internal service: a proxy from the environment would only
        // add a hop that may not reach it.
        let http = reqwest::Client::builder()
            .timeout(DEFAULT_TIMEOUT)
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_else(|err| {
                tracing::warn!(error = %err, "custom HTTP client unavailable; using defaults");
                reqwest::Client::default()
            });
        Self {
            http,
            base_url: base_url.into(),
            timeout: DEFAULT_TIMEOUT,
            last_call_ok: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The same client with another per-request timeout (applied to each call).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The registry's base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Whether the most recent call made through this client or any clone of it got an
    /// answer (any HTTP status). `false` before the first call.
    pub fn connected(&self) -> bool {
        self.last_call_ok.load(Ordering::Relaxed)
    }

    /// `POST /register`.
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        let url = self.url(&["register"])?;
        self.call(Method::POST, url, Some(req)).await
    }

    /// `POST /heartbeat`. An unknown instance is registered again by the registry.
    pub async fn heartbeat(&self, req: &RegisterRequest) -> Result<HeartbeatResponse, ClientError> {
        let url = self.url(&["heartbeat"])?;
        self.call(Method::POST, url, Some(req)).await
    }

    /// `DELETE /services/:name/:port[?host=]`. A 404 (already gone) is an error of kind
    /// [`ClientError::Status`]; see [`ClientError::is_not_found`].
    pub async fn deregister(
        &self,
        name: &str,
        port: u16,
        host: Option<&str>,
    ) -> Result<(), ClientError> {
        let mut url = self.url(&["services", name, &port.to_string()])?;
        if let Some(host) = host {
            url.query_pairs_mut().append_pair("host", host);
        }
        let _: serde_json::Value = self.call(Method::DELETE, url, None::<&()>).await?;
        Ok(())
    }

    /// `GET /services/:name`: the live instances of `name` (empty when none).
    pub async fn services(&self, name: &str) -> Result<Vec<Instance>, ClientError> {
        let url = self.url(&["services", name])?;
        let list: ServiceList = self.call(Method::GET, url, None::<&()>).await?;
        Ok(list.services)
    }

    /// `GET /services/{name}/watch`: waits up to `wait` (at most 60 s) for `name`'s
    /// instances to change from version `index` (answers at once without one, or when
    /// the version differs) and returns them with their version.
    pub async fn watch(
        &self,
        name: &str,
        index: Option<u64>,
        wait: Duration,
    ) -> Result<Watched, ClientError> {
        let mut url = self.url(&["services", name, "watch"])?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(index) = index {
                query.append_pair("index", &index.to_string());
            }
            query.append_pair("timeout", &format!("{}ms", wait.as_millis()));
        }
        let shown = url.to_string();
        // The registry holds the call for `wait`; only past that is it late.
        let (headers, list): (_, ServiceList) = self
            .exchange(Method::GET, url, None::<&()>, wait + self.timeout)
            .await?;
        let index = headers
            .get(REGISTRY_INDEX_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ClientError::Status {
                url: shown,
                status: StatusCode::BAD_GATEWAY,
                body: format!("answer without a valid {REGISTRY_INDEX_HEADER} header"),
            })?;
        Ok(Watched {
            instances: list.services,
            index,
        })
    }

    /// `GET /services`: every service with live instances.
    pub async fn all_services(&self) -> Result<BTreeMap<String, Vec<Instance>>, ClientError> {
        let url = self.url(&["services"])?;
        self.call(Method::GET, url, None::<&()>).await
    }

    /// The base URL with `segments` appended, each percent-encoded, so that a name
    /// cannot escape its path segment.
    fn url(&self, segments: &[&str]) -> Result<Url, ClientError> {
        let invalid = |reason: String| ClientError::InvalidUrl {
            url: self.base_url.to_string(),
            reason,
        };
        let mut url = Url::parse(&self.base_url).map_err(|e| invalid(e.to_string()))?;
        url.path_segments_mut()
            .map_err(|()| invalid("cannot be a base URL".into()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let (_, value) = self.exchange(method, url, body, self.timeout).await?;
        Ok(value)
    }

    /// One call bounded by `timeout`: the answer's headers and decoded body.
    async fn exchange<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<(reqwest::header::HeaderMap, T), ClientError> {
        let shown = url.to_string();
        let mut request = self.http.request(method, url).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let result = async {
            let response = request.send().await?;
            let status = response.status();
            let headers = response.headers().clone();
            let bytes = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, bytes))
        }
        .await;
        let (status, headers, bytes) = match result {
            Ok(answer) => {
                self.last_call_ok.store(true, Ordering::Relaxed);
                answer
            }
            Err(source) => {
                self.last_call_ok.store(false, Ordering::Relaxed);
                return Err(ClientError::Unreachable { url: shown, source });
            }
        };
        if !status.is_success() {
            let mut body = String::from_utf8_lossy(&bytes).into_owned();
            if body.len() > MAX_ERROR_BODY {
                let mut cut = MAX_ERROR_BODY;
                while !body.is_char_boundary(cut) {
                    cut -= 1;
                }
                body.truncate(cut);
            }
            return Err(ClientError::Status {
                url: shown,
                status,
                body,
            });
        }
        let value = serde_json::from_slice(&bytes)
            .map_err(|source| ClientError::Decode { url: shown, source })?;
        Ok((headers, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_each_segment() {
        let c = RegistryClient::new("http://127.0.0.1:3000/");
        assert_eq!(c.base_url(), "http://127.0.0.1:3000");
        assert_eq!(
            c.url(&["services", "a/b c"]).unwrap().as_str(),
            "http://127.0.0.1:3000/services/a%2Fb%20c"
        );
        let prefixed = RegistryClient::new("http://h:1/registry");
        assert_eq!(
            prefixed.url(&["register"]).unwrap().as_str(),
            "http://h:1/registry/register"
        );
    }

    #[test]
    fn bad_base_url_is_a_typed_error() {
        let c = RegistryClient::new("not a url");
        assert!(matches!(
            c.url(&["register"]),
            Err(ClientError::InvalidUrl { .. })
        ));
    }

    #[tokio::test]
    async fn unreachable_registry_is_a_typed_error() {
        // Bind then drop, so that the port is (very likely) closed.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let c = RegistryClient::new(format!("http://{addr}"));
        let err = c.services("user-service").await.unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
        assert!(!c.connected());
    }
}
