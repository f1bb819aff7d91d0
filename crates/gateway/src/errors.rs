//! The one place a gateway failure becomes an HTTP status.
//!
//! Every response the gateway makes up itself (rather than relaying an upstream's) carries
//! `x-breakwater-error: <cause>`, so a client, a log reader or a test can tell "the users
//! service said 503" from "the gateway found no users service". A rate-limit refusal
//! ([`GatewayError::RateLimited`]) also carries `Retry-After` and the `RateLimit-*`
//! headers.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use breakwater_runtime::http::{ApiError, method_not_allowed, not_found};

use crate::limit::{RATELIMIT_LIMIT, RATELIMIT_POLICY, RATELIMIT_REMAINING, RATELIMIT_RESET};

/// Header naming the cause of a gateway-made error.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-breakwater-error");

/// What a client is told to wait before retrying a 503 that has no better estimate.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why the gateway could not give a client the upstream's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The registry knows no live instance of the service.
    #[error("No instance of {service} available")]
    NoInstance {
        /// The service asked for.
        service: String,
    },
    /// The registry could not be asked and nothing about the service was ever cached.
    #[error("No instance of {service} available (service registry unreachable: {cause})")]
    RegistryUnreachable {
        /// The service asked for.
        service: String,
        /// What went wrong talking to the registry.
        cause: String,
    },
    /// No tried instance accepted a connection.
    #[error("Bad gateway: could not connect to {service} ({cause})")]
    Connect {
        /// The service asked for.
        service: String,
        /// The last connect error.
        cause: String,
    },
    /// A connection broke, or the upstream answered something that is not HTTP.
    #[error("Bad gateway: {service} failed before answering ({cause})")]
    Protocol {
        /// The service asked for.
        service: String,
        /// The last transport error.
        cause: String,
    },
    /// The upstream answered with a body the gateway could not use (composed routes).
    #[error("Bad gateway: {service} sent an unusable response ({cause})")]
    InvalidResponse {
        /// The service asked for.
        service: String,
        /// What was wrong with it.
        cause: String,
    },
    /// The upstream answered with a server error (composed routes).
    #[error("Bad gateway: {service} answered {status}")]
    UpstreamStatus {
        /// The service asked for.
        service: String,
        /// Its status.
        status: StatusCode,
    },
    /// The last try ran out of its per-try time before a response head arrived.
    #[error("Upstream timed out")]
    Timeout {
        /// The service asked for.
        service: String,
    },
    /// The request's total deadline passed before a response head arrived.
    #[error("Deadline exceeded waiting for {service}")]
    DeadlineExceeded {
        /// The service asked for.
        service: String,
    },
    /// The service's circuit breaker is open (or half-open with its probes taken).
    #[error("Service {service} is unavailable (circuit breaker open)")]
    BreakerOpen {
        /// The service asked for.
        service: String,
        /// When the breaker will admit a call again.
        retry_after: Duration,
    },
    /// The route's rate limit refused the request.
    #[error("Too many requests")]
    RateLimited {
        /// The quota (`RateLimit-Limit`).
        limit: u32,
        /// When the key's quota admits a request again (`Retry-After`, and
        /// `RateLimit-Reset`).
        retry_after: Duration,
        /// The route's `RateLimit-Policy` value.
        policy: HeaderValue,
    },
    /// The client's body could not be read (it disconnected or sent bad framing).
    #[error("Could not read request body: {cause}")]
    BodyUnreadable {
        /// The underlying error.
        cause: String,
    },
    /// The request itself is invalid; the message names the problem.
    #[error("{message}")]
    BadRequest {
        /// Shown to the client as is.
        message: String,
    },
}

impl GatewayError {
    /// A 400 with `message` as the error text.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
        }
    }

    /// The status a client gets for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoInstance { .. }
            | Self::RegistryUnreachable { .. }
            | Self::BreakerOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Connect { .. }
            | Self::Protocol { .. }
            | Self::InvalidResponse { .. }
            | Self::UpstreamStatus { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } | Self::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyUnreadable { .. } | Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// A short machine-readable name for the cause: the `x-breakwater-error` value, and
    /// what composed routes report as their fallback reason.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::NoInstance { .. } => "no-instance",
            Self::RegistryUnreachable { .. } => "registry-unreachable",
            Self::Connect { .. } => "connect",
            Self::Protocol { .. } => "protocol",
            Self::InvalidResponse { .. } => "invalid-response",
            Self::UpstreamStatus { .. } => "upstream-status",
            Self::Timeout { .. } => "timeout",
            Self::DeadlineExceeded { .. } => "deadline",
            Self::BreakerOpen { .. } => "breaker-open",
            Self::BodyUnreadable { .. } => "body-unreadable",
            Self::BadRequest { .. } => "bad-request",
            Self::RateLimited { .. } => "rate-limited",
        }
    }

    /// How long a client should wait before trying again, for the 503s and 429s.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::BreakerOpen { retry_after, .. } | Self::RateLimited { retry_after, .. } => {
                Some(*retry_after)
            }
            _ if self.status() == StatusCode::SERVICE_UNAVAILABLE => Some(DEFAULT_RETRY_AFTER),
            _ => None,
        }
    }

    /// Whether the failure is on the upstream side (so a route's fallback may stand in
    /// for it), rather than the client's request.
    pub fn is_upstream_failure(&self) -> bool {
        self.status().is_server_error()
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1 (a client must not be told
/// "retry now" by a gateway that is refusing it).
pub fn retry_after_value(wait: Duration) -> HeaderValue {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(cause = self.cause(), error = %self, "gateway error");
        } else {
            tracing::debug!(cause = self.cause(), error = %self, "request refused");
        }
        let cause = self.cause();
        let retry_after = self.retry_after().map(retry_after_value);
        let mut res = ApiError::new(status, self.to_string()).into_response();
        let headers = res.headers_mut();
        if let Self::RateLimited { limit, policy, .. } = self {
            headers.insert(RATELIMIT_LIMIT, HeaderValue::from(limit));
            headers.insert(RATELIMIT_REMAINING, HeaderValue::from(0_u32));
            // The whole quota is back when the next request is: the same whole seconds.
            if let Some(wait) = &retry_after {
                headers.insert(RATELIMIT_RESET, wait.clone());
            }
            headers.insert(RATELIMIT_POLICY, policy);
        }
        headers.insert(ERROR_HEADER, HeaderValue::from_static(cause));
        if let Some(wait) = retry_after {
            headers.insert(header::RETRY_AFTER, wait);
        }
        res
    }
}

/// Fallback for paths no route matches: the shared JSON 404, tagged as gateway-made.
pub async fn no_route(method: Method, uri: Uri) -> Response {
    tagged(not_found(method, uri).await, "no-route")
}

/// Fallback for a known path with a method it does not serve: the shared JSON 405,
/// tagged as gateway-made.
pub async fn wrong_method(method: Method, uri: Uri) -> Response {
    tagged(method_not_allowed(method, uri).await, "method-not-allowed")
}

fn tagged(err: ApiError, cause: &'static str) -> Response {
    let mut res = err.into_response();
    res.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(cause));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(res: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn no_instance_is_a_503_with_retry_after() {
        let res = GatewayError::NoInstance {
            service: "user-service".into(),
        }
        .into_response();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        assert_eq!(res.headers()[ERROR_HEADER], "no-instance");
        assert_eq!(
            body_of(res).await,
            serde_json::json!({"error": "No instance of user-service available"})
        );
    }

    #[tokio::test]
    async fn each_failure_has_its_status_and_cause() {
        let cases = [
            (
                GatewayError::Timeout {
                    service: "s".into(),
                },
                504,
                "timeout",
            ),
            (
                GatewayError::Connect {
                    service: "s".into(),
                    cause: "refused".into(),
                },
                502,
                "connect",
            ),
            (
                GatewayError::Protocol {
                    service: "s".into(),
                    cause: "reset".into(),
                },
                502,
                "protocol",
            ),
            (
                GatewayError::DeadlineExceeded {
                    service: "s".into(),
                },
                504,
                "deadline",
            ),
            (
                GatewayError::bad_request("Invalid user ID"),
                400,
                "bad-request",
            ),
        ];
        for (err, status, cause) in cases {
            let text = err.to_string();
            let res = err.into_response();
            assert_eq!(res.status().as_u16(), status);
            assert_eq!(res.headers()[ERROR_HEADER], cause);
            assert!(res.headers().get(header::RETRY_AFTER).is_none());
            assert_eq!(body_of(res).await["error"], text.as_str());
        }
        assert_eq!(
            GatewayError::Timeout {
                service: "s".into()
            }
            .to_string(),
            "Upstream timed out"
        );
        assert!(
            GatewayError::Connect {
                service: "s".into(),
                cause: "x".into()
            }
            .to_string()
            .starts_with("Bad gateway: ")
        );
    }

    #[tokio::test]
    async fn an_open_breaker_is_a_503_with_its_wait_rounded_up() {
        let res = GatewayError::BreakerOpen {
            service: "user-service".into(),
            retry_after: Duration::from_millis(2500),
        }
        .into_response();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[header::RETRY_AFTER], "3");
        assert_eq!(res.headers()[ERROR_HEADER], "breaker-open");
        assert_eq!(retry_after_value(Duration::from_millis(1)), "1");
        assert_eq!(retry_after_value(Duration::ZERO), "1");
        assert_eq!(retry_after_value(Duration::from_secs(30)), "30");
    }

    #[tokio::test]
    async fn a_rate_limit_refusal_is_a_429_with_its_quota_headers() {
        let res = GatewayError::RateLimited {
            limit: 5,
            retry_after: Duration::from_millis(11_200),
            policy: HeaderValue::from_static("5;w=60"),
        }
        .into_response();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = res.headers();
        assert_eq!(h[header::RETRY_AFTER], "12");
        assert_eq!(h[RATELIMIT_RESET], "12");
        assert_eq!(h[RATELIMIT_LIMIT], "5");
        assert_eq!(h[RATELIMIT_REMAINING], "0");
        assert_eq!(h[RATELIMIT_POLICY], "5;w=60");
        assert_eq!(h[ERROR_HEADER], "rate-limited");
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        assert_eq!(bytes, r#"{"error":"Too many requests"}"#);
    }

    #[tokio::test]
    async fn unknown_paths_get_a_tagged_json_404() {
        let res = no_route(Method::GET, Uri::from_static("/nope")).await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert_eq!(res.headers()[ERROR_HEADER], "no-route");
        assert!(
            body_of(res).await["error"]
                .as_str()
                .unwrap()
                .contains("/nope")
        );
    }
}
