//! `/admin/control` and `/admin/control/{*rest}`: `breakwater up`'s control API
//! (processes and unstable's chaos), reached through the gateway so that the dashboard
//! stays same-origin and behind the admin access rules.
//!
//! [`forward`] sends the method, the path after `/admin/control`, the query and the
//! JSON body to [`crate::GatewayConfig::control_url`] and passes the answer back. With
//! no control URL (a gateway not started by `up`) it answers 404.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use breakwater_runtime::http::ApiError;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::errors::ERROR_HEADER;
use crate::server::GatewayState;

/// The error a gateway without a control API answers with.
pub const NO_CONTROL_API: &str = "no control API: this gateway was not started by breakwater up";

/// Largest request body passed on (control requests are small JSON objects).
const BODY_LIMIT: usize = 64 << 10;

/// A stop waits for its process to exit, up to `up`'s 15 s grace period and a SIGKILL.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Any method on `/admin/control[/...]`.
pub async fn forward(State(state): State<GatewayState>, req: Request) -> Response {
    let Some(base) = state.config().control_url.clone() else {
        return ApiError::not_found(NO_CONTROL_API).into_response();
    };
    let (parts, body) = req.into_parts();
    // Nested under `/admin`, the router sees `/control/...`.
    let rest = parts
        .uri
        .path()
        .strip_prefix("/control")
        .unwrap_or_default();
    let mut target = format!("{base}{}", if rest.is_empty() { "/" } else { rest });
    if let Some(query) = parts.uri.query() {
        target.push('?');
        target.push_str(query);
    }
    let uri: Uri = match target.parse() {
        Ok(uri) => uri,
        Err(e) => {
            return ApiError::bad_request(format!("Invalid control path: {e}")).into_response();
        }
    };
    let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Control request bodies are at most {BODY_LIMIT} bytes"),
        )
        .into_response();
    };
    let mut outbound = hyper::Request::builder().method(parts.method).uri(uri);
    for name in [header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(value) = parts.headers.get(&name) {
            outbound = outbound.header(name, value);
        }
    }
    let outbound = match outbound.body(Full::new(bytes)) {
        Ok(req) => req,
        Err(e) => {
            return ApiError::bad_request(format!("Invalid control request: {e}")).into_response();
        }
    };
    // A client per request: control calls are rare, and its connection closes with it
    // rather than lingering in a pool of one per-core runtime.
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let answer = tokio::time::timeout(CONTROL_TIMEOUT, client.request(outbound)).await;
    let res = match answer {
        Ok(Ok(res)) => res,
        Ok(Err(e)) => {
            return failed(
                StatusCode::BAD_GATEWAY,
                format!("control API at {base} unreachable: {e}"),
                "control-unreachable",
            );
        }
        Err(_) => {
            return failed(
                StatusCode::GATEWAY_TIMEOUT,
                format!("control API at {base} did not answer within {CONTROL_TIMEOUT:?}"),
                "control-timeout",
            );
        }
    };
    let (parts, body) = res.into_parts();
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = parts.status;
    if let Some(value) = parts.headers.get(header::CONTENT_TYPE) {
        out.headers_mut()
            .insert(header::CONTENT_TYPE, value.clone());
    }
    out
}

fn failed(status: StatusCode, message: String, cause: &'static str) -> Response {
    let mut res = ApiError::new(status, message).into_response();
    res.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(cause));
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use serde_json::{Value, json};
    use tower::ServiceExt as _;

    async fn call(
        app: axum::Router,
        method: &str,
        uri: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        let res = app.oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    fn gateway(control_url: Option<String>) -> axum::Router {
        let mut config = crate::GatewayConfig::new(8000, "http://127.0.0.1:9");
        config.listener_loopback = true;
        config.control_url = control_url;
        crate::app(GatewayState::new(config).unwrap())
    }

    #[tokio::test]
    async fn without_up_there_is_no_control_api() {
        let (status, body) = call(gateway(None), "GET", "/admin/control/processes", None).await;
        assert_eq!(
            (status, body),
            (StatusCode::NOT_FOUND, json!({"error": NO_CONTROL_API}))
        );
    }

    #[tokio::test]
    async fn method_path_query_and_body_reach_the_control_api() {
        // A stand-in control API that echoes what it got.
        let echo = axum::Router::new()
            .route(
                "/processes",
                get(|uri: Uri| async move { axum::Json(json!({"query": uri.query()})) }),
            )
            .route(
                "/chaos",
                post(|body: String| async move {
                    (StatusCode::CONFLICT, axum::Json(json!({"got": body})))
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, echo).await });
        let app = gateway(Some(format!("http://{addr}")));

        let (status, body) = call(app.clone(), "GET", "/admin/control/processes?a=1", None).await;
        assert_eq!((status, body), (StatusCode::OK, json!({"query": "a=1"})));
        let (status, body) = call(
            app.clone(),
            "POST",
            "/admin/control/chaos",
            Some(r#"{"failureRate":1}"#),
        )
        .await;
        assert_eq!(
            (status, body),
            (StatusCode::CONFLICT, json!({"got": r#"{"failureRate":1}"#}))
        );
        server.abort();

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let app = gateway(Some(format!("http://{gone}")));
        let (status, body) = call(app, "GET", "/admin/control/processes", None).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("unreachable"),
            "{body}"
        );
    }
}
