//! The one place a gateway failure becomes an HTTP status.
//!
//! Every response the gateway makes up itself (rather than relaying an upstream's) carries
//! `x-breakwater-error: <cause>`, so a client, a log reader or a test can tell "the users
//! service said 503" from "the gateway found no users service".

use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use breakwater_runtime::http::{ApiError, method_not_allowed, not_found};

/// Header naming the cause of a gateway-made error.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-breakwater-error");

/// Seconds a client is told to wait before retrying a 503.
const RETRY_AFTER_SECS: &str = "1";

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
    /// Every try ran out of time before a response head arrived.
    #[error("Upstream timed out")]
    Timeout {
        /// The service asked for.
        service: String,
    },
    /// The client's body is over the cap the gateway buffers for replay.
    #[error("Request body too large (limit {limit} bytes)")]
    BodyTooLarge {
        /// The cap in bytes.
        limit: usize,
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
            Self::NoInstance { .. } | Self::RegistryUnreachable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Connect { .. }
            | Self::Protocol { .. }
            | Self::InvalidResponse { .. }
            | Self::UpstreamStatus { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyUnreadable { .. } | Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
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
            Self::BodyTooLarge { .. } => "body-too-large",
            Self::BodyUnreadable { .. } => "body-unreadable",
            Self::BadRequest { .. } => "bad-request",
        }
    }
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
        let mut res = ApiError::new(status, self.to_string()).into_response();
        let headers = res.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(cause));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
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
                GatewayError::BodyTooLarge { limit: 1 },
                413,
                "body-too-large",
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
