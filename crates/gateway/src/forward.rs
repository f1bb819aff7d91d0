//! Sending a request on to an upstream instance and its answer back.
//!
//! - The client's body is read once into [`Bytes`] (capped at [`MAX_REQUEST_BODY`]) so
//!   that a failed try can be replayed on the next instance; the upstream's body is
//!   streamed back untouched.
//! - Hop-by-hop headers are stripped both ways; `Host` names the upstream;
//!   `X-Forwarded-For/-Proto/-Host` tell it who asked; `x-request-id` follows the request
//!   through every hop and comes back on the response.
//! - [`send`] resolves the service, walks the instances [`crate::balance`] orders, and
//!   fails over: on a connect error for any method (nothing was sent), and for idempotent
//!   methods also on a broken connection or a per-try timeout before the response head.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::header::{CONNECTION, CONTENT_LENGTH, HOST};
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use breakwater_registry::client::DiscoveryError;
use breakwater_registry::wire::Instance;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::balance::MAX_TRIES;
use crate::errors::GatewayError;
use crate::server::GatewayState;

/// Largest request body the gateway buffers (it must hold it to replay it on failover).
pub const MAX_REQUEST_BODY: usize = 1 << 20;

/// The header that carries a request's id through every hop.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The pooled upstream client: one per gateway, shared by every request.
pub type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection rather than the message (RFC 9110 7.6.1), plus
/// the legacy `Proxy-Connection` and `Keep-Alive`.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("proxy-authenticate"),
    HeaderName::from_static("proxy-authorization"),
    HeaderName::from_static("te"),
    HeaderName::from_static("trailer"),
    HeaderName::from_static("transfer-encoding"),
    HeaderName::from_static("upgrade"),
];

/// Idle pooled connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connect that takes longer than this is treated as a dead instance, so that even a
/// non-idempotent request (which is only failed over when nothing was sent) moves on
/// quickly from a black-holed address instead of spending its whole try there.
const CONNECT_TIMEOUT_CAP: Duration = Duration::from_secs(2);

/// Longest client-supplied request id the gateway passes on; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Builds the gateway's one upstream client: HTTP/1.1, `TCP_NODELAY`, idle connections
/// kept for 30 s, connects bounded by the smaller of `try_timeout` and 2 s.
pub fn upstream_client(try_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(try_timeout.min(CONNECT_TIMEOUT_CAP)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// A request ready to go to any instance of a service; cheap to clone and replay.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The client's method.
    pub method: Method,
    /// The client's path and query, unchanged.
    pub path_and_query: PathAndQuery,
    /// End-to-end headers only; `Host` is set per instance.
    pub headers: HeaderMap,
    /// The whole request body.
    pub body: Bytes,
}

impl Outbound {
    /// A bodiless GET the gateway makes itself (composed routes), carrying `request_id`.
    pub fn get(path_and_query: PathAndQuery, request_id: HeaderValue) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, request_id);
        headers.insert(
            axum::http::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        );
        Self {
            method: Method::GET,
            path_and_query,
            headers,
            body: Bytes::new(),
        }
    }

    /// Turns a client's request into an outbound one: reads the body (413 past
    /// [`MAX_REQUEST_BODY`]), strips hop-by-hop headers, adds `X-Forwarded-*`.
    pub async fn from_client(req: Request) -> Result<Self, GatewayError> {
        let (parts, body) = req.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        if has_dot_segment(path_and_query.path()) {
            // The upstream might normalise what the gateway routed by prefix, so a
            // `/users/../admin` could land outside the service's routes.
            return Err(GatewayError::bad_request(
                "Invalid path: dot segments are not allowed",
            ));
        }
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > MAX_REQUEST_BODY as u64) {
            return Err(GatewayError::BodyTooLarge {
                limit: MAX_REQUEST_BODY,
            });
        }
        let body = Limited::new(body, MAX_REQUEST_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<LengthLimitError>() {
                    GatewayError::BodyTooLarge {
                        limit: MAX_REQUEST_BODY,
                    }
                } else {
                    GatewayError::BodyUnreadable {
                        cause: error_chain(&*e),
                    }
                }
            })?
            .to_bytes();

        let request_id = parts.headers.get(REQUEST_ID).cloned();
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        // hyper frames the replayed body itself; a stale length must not travel on.
        headers.remove(CONTENT_LENGTH);
        let original_host = headers.remove(HOST).or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        if let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
            append_forwarded_for(&mut headers, *peer);
        }
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        if let Some(host) = original_host {
            headers.insert(X_FORWARDED_HOST, host);
        }
        // Even if the client named it in `Connection`, the id must reach the upstream.
        if let Some(id) = request_id {
            headers.insert(REQUEST_ID, id);
        }
        Ok(Self {
            method: parts.method,
            path_and_query,
            headers,
            body,
        })
    }

    /// Whether a failed try may be repeated on another instance even after the request
    /// may have reached the first one.
    pub fn is_idempotent(&self) -> bool {
        self.method.is_idempotent()
    }
}

/// Sends `outbound` to an instance of `service`, failing over to the next instance as
/// described in the module docs. The response head has arrived; its body streams.
pub async fn send(
    state: &GatewayState,
    service: &str,
    outbound: &Outbound,
) -> Result<hyper::Response<Incoming>, GatewayError> {
    let instances = resolve(state, service).await?;
    let idempotent = outbound.is_idempotent();
    let tries = instances.len().min(MAX_TRIES);
    let mut last_failure = None;
    for (attempt, index) in state
        .balancer()
        .order(service, instances.len(), MAX_TRIES)
        .enumerate()
    {
        let Some(instance) = instances.get(index) else {
            break;
        };
        match try_instance(state, instance, outbound).await {
            Ok(res) => return Ok(res),
            Err(failure) => {
                let failover = failure.allows_failover(idempotent) && attempt + 1 < tries;
                if failover {
                    tracing::warn!(
                        service,
                        instance = %instance.id,
                        method = %outbound.method,
                        error = %failure,
                        "instance failed; failing over to the next one"
                    );
                } else {
                    tracing::debug!(
                        service,
                        instance = %instance.id,
                        method = %outbound.method,
                        error = %failure,
                        "instance failed; no further try"
                    );
                }
                last_failure = Some(failure);
                if !failover {
                    break;
                }
            }
        }
    }
    Err(match last_failure {
        Some(failure) => failure.into_error(service),
        None => GatewayError::NoInstance {
            service: service.to_owned(),
        },
    })
}

/// The live instances of `service` as discovery knows them.
async fn resolve(state: &GatewayState, service: &str) -> Result<Arc<[Instance]>, GatewayError> {
    match state.discovery().resolve(service).await {
        Ok(list) if list.is_empty() => Err(GatewayError::NoInstance {
            service: service.to_owned(),
        }),
        Ok(list) => Ok(list),
        Err(DiscoveryError::NoInstances { .. }) => Err(GatewayError::NoInstance {
            service: service.to_owned(),
        }),
        Err(DiscoveryError::Unavailable { source, .. }) => Err(GatewayError::RegistryUnreachable {
            service: service.to_owned(),
            cause: error_chain(&source),
        }),
    }
}

/// Why one try at one instance failed.
#[derive(Debug)]
enum TryFailure {
    /// No connection was made, so the request was not sent.
    Connect(String),
    /// The connection broke or spoke nonsense before a response head arrived; the
    /// upstream may have seen the request.
    Transport(String),
    /// No response head within the per-try timeout.
    Timeout,
}

impl TryFailure {
    fn allows_failover(&self, idempotent: bool) -> bool {
        matches!(self, Self::Connect(_)) || idempotent
    }

    fn into_error(self, service: &str) -> GatewayError {
        let service = service.to_owned();
        match self {
            Self::Connect(cause) => GatewayError::Connect { service, cause },
            Self::Transport(cause) => GatewayError::Protocol { service, cause },
            Self::Timeout => GatewayError::Timeout { service },
        }
    }
}

impl std::fmt::Display for TryFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(cause) => write!(f, "connect: {cause}"),
            Self::Transport(cause) => write!(f, "transport: {cause}"),
            Self::Timeout => f.write_str("timed out"),
        }
    }
}

async fn try_instance(
    state: &GatewayState,
    instance: &Instance,
    outbound: &Outbound,
) -> Result<hyper::Response<Incoming>, TryFailure> {
    let uri: Uri = format!("{}{}", instance.base_url(), outbound.path_and_query)
        .parse()
        .map_err(|e| TryFailure::Connect(format!("instance address is not a URL: {e}")))?;
    let mut req = hyper::Request::new(Full::new(outbound.body.clone()));
    *req.method_mut() = outbound.method.clone();
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = outbound.headers.clone();
    if let Some(host) = uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(HOST, host);
    }
    *req.uri_mut() = uri;
    match tokio::time::timeout(state.config().try_timeout, state.client().request(req)).await {
        Err(_elapsed) => Err(TryFailure::Timeout),
        Ok(Err(e)) if e.is_connect() => Err(TryFailure::Connect(error_chain(&e))),
        Ok(Err(e)) => Err(TryFailure::Transport(error_chain(&e))),
        Ok(Ok(res)) => Ok(res),
    }
}

/// The proxy route: sends the client's request to `service` and streams its answer back.
pub async fn proxy(state: GatewayState, service: &'static str, req: Request) -> Response {
    let relayed = async {
        let outbound = Outbound::from_client(req).await?;
        let res = send(&state, service, &outbound).await?;
        Ok::<_, GatewayError>(client_response(res))
    };
    relayed.await.unwrap_or_else(IntoResponse::into_response)
}

/// The upstream's response as the client gets it: hop-by-hop headers gone, body streamed.
pub fn client_response(res: hyper::Response<Incoming>) -> Response {
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Body::new(body))
}

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_canonical().to_string();
    let prior: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let chain = if prior.is_empty() {
        ip
    } else {
        format!("{}, {ip}", prior.join(", "))
    };
    // Both parts came from valid header text, so this only fails on exotic bytes; then
    // the peer alone is still the truth.
    let value = HeaderValue::from_str(&chain)
        .or_else(|_| HeaderValue::from_str(&peer.ip().to_canonical().to_string()));
    if let Ok(value) = value {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

/// Middleware giving every request an `x-request-id` (the client's, if usable, else a
/// fresh one) and returning the same id on the response.
pub async fn tag_request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .filter(|v| usable_request_id(v))
        .cloned()
        .unwrap_or_else(new_request_id);
    req.headers_mut().insert(REQUEST_ID, id.clone());
    let mut res = next.run(req).await;
    res.headers_mut().insert(REQUEST_ID, id);
    res
}

/// A fresh request id: 32 lowercase hex digits.
pub fn new_request_id() -> HeaderValue {
    let id = format!("{:032x}", rand::random::<u128>());
    HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// A client's id is passed on only if it is short, printable ASCII without spaces, so it
/// is safe in every log line and header it lands in.
fn usable_request_id(v: &HeaderValue) -> bool {
    let bytes = v.as_bytes();
    !bytes.is_empty() && bytes.len() <= MAX_REQUEST_ID_LEN && bytes.iter().all(u8::is_ascii_graphic)
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

/// An error and its sources as one line; the outermost hyper text ("client error
/// (Connect)") says less than what it wraps, so the sources are what matters.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_standard_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("trailer", HeaderValue::from_static("x-sum"));
        h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.9:5555".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.9");
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        append_forwarded_for(&mut h, "[::ffff:10.0.0.9]:5555".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "1.2.3.4, 10.0.0.9");
    }

    #[test]
    fn request_ids_are_32_hex_and_client_ids_are_checked() {
        let id = new_request_id();
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 32);
        assert!(s.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(new_request_id(), id);
        assert!(usable_request_id(&HeaderValue::from_static("abc-123")));
        assert!(!usable_request_id(&HeaderValue::from_static("")));
        assert!(!usable_request_id(&HeaderValue::from_static("a b")));
        assert!(!usable_request_id(
            &HeaderValue::from_str(&"x".repeat(129)).unwrap()
        ));
    }

    #[test]
    fn dot_segments_are_found_even_encoded() {
        assert!(has_dot_segment("/users/../admin"));
        assert!(has_dot_segment("/users/%2E%2e/admin"));
        assert!(has_dot_segment("/users/./1"));
        assert!(!has_dot_segment("/users/1.5"));
        assert!(!has_dot_segment("/users/..."));
        assert!(!has_dot_segment("/users"));
    }

    #[test]
    fn only_connect_failures_fail_over_a_post() {
        assert!(TryFailure::Connect("refused".into()).allows_failover(false));
        assert!(!TryFailure::Transport("reset".into()).allows_failover(false));
        assert!(!TryFailure::Timeout.allows_failover(false));
        assert!(TryFailure::Transport("reset".into()).allows_failover(true));
        assert!(TryFailure::Timeout.allows_failover(true));
    }
}
