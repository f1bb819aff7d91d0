//! Sending one try of a request to one endpoint, and its answer back.
//!
//! - The client's body is kept in memory (for replay on another endpoint) when it is at
//!   most [`REPLAY_LIMIT`]; a larger one is streamed through, untouched and unbuffered,
//!   and such a request gets one try only. The upstream's body is always streamed.
//! - Hop-by-hop headers are stripped both ways; `Host` names the upstream;
//!   `X-Forwarded-For/-Proto/-Host` tell it who asked; `x-request-id` follows the request
//!   through every hop and comes back on the response.
//! - [`send_once`] makes one try with a timeout and says what went wrong, if anything;
//!   retries, balancing and classification are [`crate::stack`]'s. Connections come
//!   from [`pool`], one pool per thread.
//! - [`ClientBody`] carries the upstream's body back to the client unboxed; any other
//!   answer (errors, fallbacks, cached bodies, the router's) is boxed.

pub(crate) mod h1;
mod pool;

pub use h1::{Fields, RawFields};
pub use pool::{BodyError, Payload, TryHead, UpstreamIncoming};

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::BoxError;
use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{CONNECTION, CONTENT_LENGTH, HOST};
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, request};
use axum::middleware::Next;
use axum::response::Response;
use breakwater_runtime::observe::TraceContext;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};

use crate::classify::{AttemptKind, Replay};
use crate::errors::GatewayError;
use crate::upstream::Endpoint;

/// Largest request body kept in memory for replay; larger ones stream, one try only.
pub const REPLAY_LIMIT: usize = 64 << 10;

/// The header that carries a request's id through every hop.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The header that makes a POST or PATCH safe to retry.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

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

/// A connect that takes longer than this is treated as a dead instance, so that even a
/// non-idempotent request (which is only retried when nothing was sent) moves on
/// quickly from a black-holed address instead of spending its whole try there.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest client-supplied request id the gateway passes on; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// A request's body as the gateway holds it.
#[derive(Debug)]
pub enum OutboundBody {
    /// Kept whole: can be sent any number of times.
    Kept(Bytes),
    /// Streamed from the client: can be sent once (then `None`).
    Streamed(Option<Body>),
}

/// A request ready to go to any endpoint of a service.
#[derive(Debug)]
pub struct Outbound {
    /// The client's method.
    pub method: Method,
    /// The path and query the upstream gets (after the route's rewrite).
    pub path_and_query: PathAndQuery,
    /// The client's end-to-end headers (its `Host` stays here but is not sent: each
    /// try sends its endpoint's).
    pub headers: HeaderMap,
    /// The fields the gateway sets, sent after `headers`.
    pub added: Added,
    /// The body.
    pub body: OutboundBody,
    /// How the response's fields are kept: [`Fields::Raw`] only for a caller that
    /// writes the response to the client itself and reads none of its fields.
    pub fields: Fields,
    /// `headers` carries an `Idempotency-Key` (which makes a POST retryable).
    pub keyed: bool,
}

/// Fields the gateway sets on an outbound request, sent after the client's headers.
/// They are kept out of the client's `HeaderMap` (from which any client value of the
/// same name is removed): inserting them there costs a hash, and often a grow of the
/// map, per field per request.
#[derive(Debug, Clone, Default)]
pub struct Added {
    /// `X-Forwarded-For`: the client's chain, if any, then the peer.
    pub forwarded_for: Option<HeaderValue>,
    /// `X-Forwarded-Proto`.
    pub forwarded_proto: Option<HeaderValue>,
    /// `X-Forwarded-Host`: the client's `Host`.
    pub forwarded_host: Option<HeaderValue>,
    /// `X-Request-Id`, when the client's headers do not carry it.
    pub request_id: Option<HeaderValue>,
    /// `traceparent`: the gateway's span, written as text only into the request head
    /// (never a `HeaderValue`, whose check of its 55 bytes would cost more than
    /// writing them).
    pub traceparent: Option<TraceContext>,
}

impl Added {
    /// Each field that is set, as name and value (but `traceparent`, which the head
    /// writer spells out from [`Added::traceparent`]).
    pub fn fields(&self) -> impl Iterator<Item = (&'static str, &HeaderValue)> {
        [
            ("x-forwarded-for", &self.forwarded_for),
            ("x-forwarded-proto", &self.forwarded_proto),
            ("x-forwarded-host", &self.forwarded_host),
            ("x-request-id", &self.request_id),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| (name, v)))
    }
}

impl Outbound {
    /// A bodiless GET the gateway makes itself (composed routes), carrying `request_id`
    /// and the gateway's span as `traceparent`.
    pub fn get(
        path_and_query: PathAndQuery,
        request_id: HeaderValue,
        traceparent: TraceContext,
    ) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        );
        Self {
            method: Method::GET,
            path_and_query,
            headers,
            added: Added {
                request_id: Some(request_id),
                traceparent: Some(traceparent),
                ..Added::default()
            },
            body: OutboundBody::Kept(Bytes::new()),
            fields: Fields::Map,
            keyed: false,
        }
    }

    /// Turns a client's request from `peer` (when known) into an outbound one for
    /// `path_and_query` (the route's rewrite of the client's): keeps a body of at most
    /// [`REPLAY_LIMIT`] bytes, streams a larger one, strips hop-by-hop headers, adds
    /// `X-Forwarded-*`. `seen`: [`Seen::of`] the client's headers. `fresh_id`: the id
    /// the gateway made for a request that came without a usable one (not on its
    /// headers).
    pub async fn from_client<B>(
        parts: request::Parts,
        body: B,
        path_and_query: PathAndQuery,
        peer: Option<SocketAddr>,
        seen: Seen,
        fresh_id: Option<HeaderValue>,
    ) -> Result<Self, GatewayError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let body = read_body(&parts.headers, body).await?;
        let mut headers = parts.headers;
        let request_id = if seen.has(Seen::REQUEST_ID) {
            headers.get(REQUEST_ID).cloned()
        } else {
            None
        };
        if seen.has(Seen::HOP_BY_HOP) {
            strip_hop_by_hop(&mut headers);
        }
        // The codec frames the body itself (length for kept bodies, the client's length
        // or chunks for streamed ones); a stale length must not travel on.
        if seen.has(Seen::CONTENT_LENGTH) {
            headers.remove(CONTENT_LENGTH);
        }
        if seen.has(Seen::REPLACED) {
            headers.remove(X_FORWARDED_PROTO);
            headers.remove(X_FORWARDED_HOST);
        }
        if seen.has(Seen::TRACEPARENT) {
            headers.remove(TRACEPARENT);
        }
        let forwarded_host = headers.get(HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let forwarded_for = match peer {
            Some(peer) => forwarded_for(&mut headers, seen.has(Seen::FORWARDED_FOR), peer),
            None => None,
        };
        // Even if the client named it in `Connection`, the id must reach the upstream.
        let request_id =
            fresh_id.or_else(|| request_id.filter(|_| !headers.contains_key(REQUEST_ID)));
        // Unless `Connection` named it, and it went with the hop-by-hop fields.
        let keyed = seen.has(Seen::IDEMPOTENCY_KEY)
            && (!seen.has(Seen::HOP_BY_HOP) || headers.contains_key(IDEMPOTENCY_KEY));
        Ok(Self {
            method: parts.method,
            path_and_query,
            headers,
            added: Added {
                forwarded_for,
                forwarded_proto: Some(HeaderValue::from_static("http")),
                forwarded_host,
                request_id,
                traceparent: None,
            },
            body,
            fields: Fields::Map,
            keyed,
        })
    }

    /// How much of this request may be sent again.
    pub fn replay(&self) -> Replay {
        Replay::for_request(
            &self.method,
            self.keyed,
            matches!(self.body, OutboundBody::Kept(_)),
        )
    }

    /// The body for one try: the kept bytes (shared, not copied), or the client's
    /// stream, which only one try can send (`None` once it was sent).
    fn payload(&mut self) -> Option<Payload> {
        match &mut self.body {
            OutboundBody::Kept(bytes) => Some(Payload::Kept(bytes.clone())),
            OutboundBody::Streamed(stream) => stream.take().map(Payload::Streamed),
        }
    }
}

/// Reads the client's body: empty and small bodies are kept, a body declared (or found)
/// larger than [`REPLAY_LIMIT`] is streamed on, with what was read so far in front.
async fn read_body<B>(headers: &HeaderMap, body: B) -> Result<OutboundBody, GatewayError>
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return Ok(OutboundBody::Kept(Bytes::new()));
    }
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > REPLAY_LIMIT as u64) {
        return Ok(OutboundBody::Streamed(Some(Body::new(body))));
    }
    let mut body = body;
    let mut kept = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(OutboundBody::Kept(kept.freeze())),
            Some(Err(e)) => {
                return Err(GatewayError::BodyUnreadable {
                    cause: error_chain(&*e.into()),
                });
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    // Trailers: rare on requests; the kept body is complete without them.
                    continue;
                };
                kept.extend_from_slice(&data);
                if kept.len() > REPLAY_LIMIT {
                    let prefix = kept.freeze();
                    return Ok(OutboundBody::Streamed(Some(Body::new(Prefixed {
                        prefix: Some(prefix),
                        rest: Body::new(body),
                    }))));
                }
            }
        }
    }
}

/// A body whose first bytes were already read: those, then the rest of the stream.
struct Prefixed {
    prefix: Option<Bytes>,
    rest: Body,
}

impl hyper::body::Body for Prefixed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        hint.set_lower(hint.lower().saturating_add(extra));
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(extra));
        }
        hint
    }
}

/// Why one try at one endpoint ended without a response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryError {
    /// No connection was made, so the request was not sent.
    Connect(String),
    /// The connection broke or spoke nonsense before a response head arrived; the
    /// upstream may have seen the request.
    Protocol(String),
    /// No response head within the try's time.
    Timeout,
    /// A streamed body was already sent by an earlier try (never happens when the
    /// caller follows [`Outbound::replay`]).
    BodyGone,
}

impl TryError {
    /// The classification kind of this failure.
    pub fn kind(&self) -> AttemptKind {
        match self {
            Self::Connect(_) | Self::BodyGone => AttemptKind::ConnectError,
            Self::Protocol(_) => AttemptKind::ProtocolError,
            Self::Timeout => AttemptKind::Timeout,
        }
    }

    /// The client-facing error when this was the last try at `service`.
    pub fn into_error(self, service: &str) -> GatewayError {
        let service = service.to_owned();
        match self {
            Self::Connect(cause) => GatewayError::Connect { service, cause },
            Self::BodyGone => GatewayError::Connect {
                service,
                cause: "the streamed request body was already sent".to_owned(),
            },
            Self::Protocol(cause) => GatewayError::Protocol { service, cause },
            Self::Timeout => GatewayError::Timeout { service },
        }
    }
}

impl std::fmt::Display for TryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(cause) => write!(f, "connect: {cause}"),
            Self::Protocol(cause) => write!(f, "transport: {cause}"),
            Self::Timeout => f.write_str("timed out"),
            Self::BodyGone => f.write_str("body already sent"),
        }
    }
}

/// One try of `outbound` at `endpoint` on this thread's pool, started at `sent`, waiting
/// at most `timeout` from then for the response head (connecting included). The try
/// borrows the outbound's
/// method, target and headers, so no try copies them.
pub async fn send_once(
    endpoint: &Endpoint,
    outbound: &mut Outbound,
    sent: tokio::time::Instant,
    timeout: Duration,
) -> Result<hyper::Response<UpstreamIncoming>, TryError> {
    let Some(payload) = outbound.payload() else {
        return Err(TryError::BodyGone);
    };
    let head = TryHead {
        method: &outbound.method,
        target: outbound.path_and_query.as_str(),
        host: Some(&endpoint.host_header),
        headers: &outbound.headers,
        added: &outbound.added,
        fields: outbound.fields,
    };
    // `timeout_at` from the try's start, which the caller read: `timeout` would read
    // the clock again. The send is pinned where it is made, so that the timeout holds
    // a pointer to it rather than a copy.
    let sending = std::pin::pin!(pool::send(&endpoint.authority, head, payload));
    match tokio::time::timeout_at(sent + timeout, sending).await {
        Err(_elapsed) => Err(TryError::Timeout),
        Ok(result) => result,
    }
}

/// The upstream's response as the client gets it, body streamed. Its hop-by-hop
/// headers never made it into the map: the codec (`forward::h1`) leaves them out.
pub fn client_response(res: hyper::Response<UpstreamIncoming>) -> Response {
    res.map(Body::new)
}

/// [`client_response`] without boxing the body, for the proxied path.
pub fn proxied_response(res: hyper::Response<UpstreamIncoming>) -> hyper::Response<ClientBody> {
    res.map(ClientBody::Upstream)
}

/// A response body on its way to the client: an upstream's stream as hyper gave it, or
/// any other body boxed.
#[derive(Debug)]
pub enum ClientBody {
    /// The upstream's body, streamed.
    Upstream(UpstreamIncoming),
    /// Anything the gateway answered itself.
    Other(Body),
}

impl ClientBody {
    /// As an axum body (boxing an upstream stream).
    pub fn into_axum(self) -> Body {
        match self {
            Self::Upstream(body) => Body::new(body),
            Self::Other(body) => body,
        }
    }
}

impl From<Body> for ClientBody {
    fn from(body: Body) -> Self {
        Self::Other(body)
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Other(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream(body) => body.is_end_stream(),
            Self::Other(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream(body) => body.size_hint(),
            Self::Other(body) => body.size_hint(),
        }
    }
}

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are present (most messages carry none, or
    // only `Connection: keep-alive`), so only those are removed.
    let mut present = 0_u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // The usual options name no header beyond the fixed list.
        .filter(|name| {
            !name.eq_ignore_ascii_case("keep-alive") && !name.eq_ignore_ascii_case("close")
        })
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Which of the names the gateway reads, strips or replaces a client's request
/// carries: one pass over its names (usually only `Host` and a few end-to-end ones)
/// instead of a hashed lookup per name.
#[derive(Debug, Clone, Copy)]
pub struct Seen(u8);

impl Seen {
    /// Any hop-by-hop field.
    pub const HOP_BY_HOP: u8 = 1;
    /// `Content-Length`.
    pub const CONTENT_LENGTH: u8 = 1 << 1;
    /// `X-Forwarded-For`.
    pub const FORWARDED_FOR: u8 = 1 << 2;
    /// `X-Forwarded-Proto` or `X-Forwarded-Host`: the gateway's own value replaces
    /// the client's.
    pub const REPLACED: u8 = 1 << 3;
    /// `X-Request-Id`.
    pub const REQUEST_ID: u8 = 1 << 4;
    /// `traceparent`.
    pub const TRACEPARENT: u8 = 1 << 5;
    /// `x-breakwater-trace`.
    pub const TRACE: u8 = 1 << 6;
    /// `Idempotency-Key`.
    pub const IDEMPOTENCY_KEY: u8 = 1 << 7;

    /// The names `headers` carries.
    pub fn of(headers: &HeaderMap) -> Self {
        let mut seen = 0;
        for name in headers.keys() {
            seen |= if name == HOST {
                0
            } else if name == CONTENT_LENGTH {
                Self::CONTENT_LENGTH
            } else if name == X_FORWARDED_FOR {
                Self::FORWARDED_FOR
            } else if name == REQUEST_ID {
                Self::REQUEST_ID
            } else if name == X_FORWARDED_PROTO || name == X_FORWARDED_HOST {
                Self::REPLACED
            } else if name == TRACEPARENT {
                Self::TRACEPARENT
            } else if name == crate::trace::TRACE_HEADER {
                Self::TRACE
            } else if name == IDEMPOTENCY_KEY {
                Self::IDEMPOTENCY_KEY
            } else if HOP_BY_HOP.contains(name) {
                Self::HOP_BY_HOP
            } else {
                0
            };
        }
        Self(seen)
    }

    /// Whether any name of `flag` was seen.
    pub fn has(self, flag: u8) -> bool {
        self.0 & flag != 0
    }
}

/// `X-Forwarded-For` for a request from `peer`: the client's chain (taken out of
/// `headers`; `prior`: the client sent one) with the peer's address appended.
fn forwarded_for(headers: &mut HeaderMap, prior: bool, peer: SocketAddr) -> Option<HeaderValue> {
    let mut ip = [0_u8; 39];
    let ip = write_ip(&mut ip, peer.ip().to_canonical());
    if !prior {
        return carved_value(ip);
    }
    let mut chain = Vec::with_capacity(64);
    for part in headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        chain.extend_from_slice(part.as_bytes());
        chain.extend_from_slice(b", ");
    }
    headers.remove(X_FORWARDED_FOR);
    chain.extend_from_slice(ip);
    // Both parts are valid header text, so this only fails on exotic bytes; then the
    // peer alone is still the truth.
    HeaderValue::from_maybe_shared(Bytes::from(chain))
        .ok()
        .or_else(|| carved_value(ip))
}

/// Writes `ip` as text into `out` (39 bytes fit any address) and returns that text;
/// IPv4 (every request's peer on most setups) without `fmt`.
fn write_ip(out: &mut [u8; 39], ip: std::net::IpAddr) -> &[u8] {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut len = 0;
            let mut push = |b: u8| {
                if let Some(slot) = out.get_mut(len) {
                    *slot = b;
                    len += 1;
                }
            };
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    push(b'.');
                }
                if octet >= 100 {
                    push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    push(b'0' + octet / 10 % 10);
                }
                push(b'0' + octet % 10);
            }
            out.get(..len).unwrap_or_default()
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write as _;
            let mut cursor = std::io::Cursor::new(&mut out[..]);
            // 39 bytes hold the longest IPv6 text.
            let _ = write!(cursor, "{v6}");
            let len = usize::try_from(cursor.position()).unwrap_or(0);
            out.get(..len).unwrap_or_default()
        }
    }
}

/// Two lowercase hex digits for every byte value.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0_u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    pairs
};

/// Writes `bytes` as lowercase hex into `out` (two digits per byte, as many as fit).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (digits, &b) in out.chunks_exact_mut(2).zip(bytes) {
        digits.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
    }
}

/// The `traceparent` text naming `context`'s span as the parent, written without
/// `fmt`: `00-<trace id>-<span id>-<flags>`.
pub fn traceparent_text(context: &TraceContext) -> [u8; 55] {
    let mut out = [b'-'; 55];
    let (version, rest) = out.split_at_mut(2);
    version.copy_from_slice(b"00");
    if let Some(trace) = rest.get_mut(1..33) {
        hex_into(trace, &context.trace_id.to_be_bytes());
    }
    if let Some(span) = rest.get_mut(34..50) {
        hex_into(span, &context.span_id.to_be_bytes());
    }
    if let Some(flags) = rest.get_mut(51..53) {
        hex_into(flags, &[context.flags]);
    }
    out
}

/// Middleware giving every request an `x-request-id` (the client's, if usable, else a
/// fresh one) and returning the same id on the response.
pub async fn tag_request_id(mut req: Request, next: Next) -> Response {
    let id = request_id_of(req.headers_mut());
    let mut res = next.run(req).await;
    res.headers_mut().insert(REQUEST_ID, id);
    res
}

/// The request's id, made sure of on `headers`: the client's if usable (left in place),
/// else a fresh one written there.
pub fn request_id_of(headers: &mut HeaderMap) -> HeaderValue {
    client_request_id(headers).unwrap_or_else(|| {
        let id = new_request_id();
        headers.insert(REQUEST_ID, id.clone());
        id
    })
}

/// The client's request id if it sent a usable one (then it is the only one left on
/// `headers`); `None` if not (then none is left there, and the caller makes one).
pub fn client_request_id(headers: &mut HeaderMap) -> Option<HeaderValue> {
    let mut ids = headers.get_all(REQUEST_ID).iter();
    let first = ids.next()?;
    let first = usable_request_id(first).then(|| first.clone());
    let alone = ids.next().is_none();
    match first {
        // Already where it must be: no rewrite of the map.
        Some(id) if alone => Some(id),
        Some(id) => {
            headers.insert(REQUEST_ID, id.clone());
            Some(id)
        }
        None => {
            headers.remove(REQUEST_ID);
            None
        }
    }
}

/// A fresh request id: 32 lowercase hex digits.
pub fn new_request_id() -> HeaderValue {
    let mut id = [0_u8; 32];
    hex_into(&mut id, &rand::random::<u128>().to_be_bytes());
    carved_value(&id).unwrap_or_else(|| HeaderValue::from_static("0"))
}

thread_local! {
    /// Where this thread writes the header values it makes (request ids, trace context,
    /// `X-Forwarded-For`).
    static VALUES: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// Room [`carved_value`] makes at a time, for a few dozen requests' values.
const VALUES_CHUNK: usize = 4096;

/// A header value holding `bytes`, carved from a per-thread buffer: a value made with
/// `HeaderValue::from_bytes` is a plain vector, whose first clone (a request kept for a
/// retry clones its headers) allocates again; one carved from a shared buffer is only
/// counted. `None` if `bytes` is not valid header text.
fn carved_value(bytes: &[u8]) -> Option<HeaderValue> {
    let carved = VALUES.with(|cell| {
        let mut buf = cell.try_borrow_mut().ok()?;
        if buf.capacity() - buf.len() < bytes.len() {
            *buf = BytesMut::with_capacity(VALUES_CHUNK.max(bytes.len()));
        }
        buf.extend_from_slice(bytes);
        Some(buf.split().freeze())
    });
    let bytes = carved.unwrap_or_else(|| Bytes::copy_from_slice(bytes));
    HeaderValue::from_maybe_shared(bytes).ok()
}

/// A client's id is passed on only if it is short, printable ASCII without spaces, so it
/// is safe in every log line and header it lands in.
fn usable_request_id(v: &HeaderValue) -> bool {
    let bytes = v.as_bytes();
    !bytes.is_empty() && bytes.len() <= MAX_REQUEST_ID_LEN && bytes.iter().all(u8::is_ascii_graphic)
}

/// Whether `path` has a `.` or `..` segment (also percent-encoded): the upstream might
/// normalise what the gateway routed by prefix, so `/users/../admin` could land outside
/// the service's routes.
pub fn has_dot_segment(path: &str) -> bool {
    // Most paths have neither a dot nor a percent sign: one scan settles those.
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return false;
    }
    path.split('/').any(|segment| {
        // Counts the segment's dots (`.` or `%2e`, any case) and fails on anything else,
        // without decoding into a new string.
        let mut rest = segment.as_bytes();
        let mut dots = 0;
        while !rest.is_empty() {
            rest = match rest {
                [b'.', tail @ ..] => tail,
                [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => tail,
                _ => return false,
            };
            dots += 1;
        }
        dots == 1 || dots == 2
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
    fn stripping_leaves_clean_maps_and_keep_alive_alone_untouched() {
        let mut h = HeaderMap::new();
        h.insert("accept", HeaderValue::from_static("*/*"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        h.insert(CONNECTION, HeaderValue::from_static("Keep-Alive"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(!h.contains_key(CONNECTION));
    }

    #[test]
    fn request_id_of_keeps_a_lone_usable_id_and_collapses_or_replaces_others() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc"));
        assert_eq!(request_id_of(&mut h), "abc");
        assert_eq!(h[REQUEST_ID], "abc");
        h.append(REQUEST_ID, HeaderValue::from_static("def"));
        assert_eq!(request_id_of(&mut h), "abc");
        assert_eq!(h.get_all(REQUEST_ID).iter().count(), 1);
        h.insert(REQUEST_ID, HeaderValue::from_static("a b"));
        let made = request_id_of(&mut h);
        assert_eq!(made.len(), 32);
        assert_eq!(h[REQUEST_ID], made);
        let mut empty = HeaderMap::new();
        let made = request_id_of(&mut empty);
        assert_eq!(empty[REQUEST_ID], made);
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let mut h = HeaderMap::new();
        let value = forwarded_for(&mut h, false, "10.0.0.9:5555".parse().unwrap());
        assert_eq!(value.unwrap(), "10.0.0.9");
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        let value = forwarded_for(&mut h, true, "[::ffff:10.0.0.9]:5555".parse().unwrap());
        assert_eq!(value.unwrap(), "1.2.3.4, 10.0.0.9");
        assert!(
            !h.contains_key(X_FORWARDED_FOR),
            "the chain moved out of the map"
        );
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("1.2.3.4, 10.0.0.9"),
        );
        h.append(X_FORWARDED_FOR, HeaderValue::from_static(" 5.6.7.8 "));
        let value = forwarded_for(&mut h, true, "[2001:db8::1]:5555".parse().unwrap());
        assert_eq!(value.unwrap(), "1.2.3.4, 10.0.0.9, 5.6.7.8, 2001:db8::1");
        let value = forwarded_for(&mut h, false, "255.0.100.7:1".parse().unwrap());
        assert_eq!(value.unwrap(), "255.0.100.7");
    }

    #[test]
    fn seen_finds_the_names_the_gateway_strips_or_replaces() {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("a"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        let seen = Seen::of(&h);
        assert_eq!(seen.0, 0, "nothing to do for a plain request");
        for (name, flag) in [
            ("connection", Seen::HOP_BY_HOP),
            ("upgrade", Seen::HOP_BY_HOP),
            ("content-length", Seen::CONTENT_LENGTH),
            ("x-forwarded-for", Seen::FORWARDED_FOR),
            ("x-forwarded-proto", Seen::REPLACED),
            ("x-forwarded-host", Seen::REPLACED),
            ("traceparent", Seen::TRACEPARENT),
            ("x-breakwater-trace", Seen::TRACE),
            ("x-request-id", Seen::REQUEST_ID),
            ("idempotency-key", Seen::IDEMPOTENCY_KEY),
        ] {
            let mut h = h.clone();
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
            assert_eq!(Seen::of(&h).0, flag, "{name}");
        }
    }

    #[test]
    fn traceparent_texts_match_the_w3c_text() {
        let context = TraceContext {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
            flags: 1,
        };
        let text = traceparent_text(&context);
        let value = std::str::from_utf8(&text).unwrap();
        assert_eq!(value, context.header_value().as_str());
        assert_eq!(
            value,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let tiny = TraceContext {
            trace_id: 1,
            span_id: 2,
            flags: 0,
        };
        assert_eq!(
            std::str::from_utf8(&traceparent_text(&tiny)).unwrap(),
            tiny.header_value()
        );
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
        assert!(has_dot_segment("/users/.%2E"));
        assert!(!has_dot_segment("/users/%2e%2e%2e"));
        assert!(!has_dot_segment("/users/%2"));
        assert!(!has_dot_segment("/a.b/c"));
        assert!(!has_dot_segment("/"));
    }

    #[tokio::test]
    async fn small_bodies_are_kept_and_large_ones_streamed_whole() {
        let kept = read_body(&HeaderMap::new(), Body::from(vec![b'a'; REPLAY_LIMIT]))
            .await
            .unwrap();
        assert!(matches!(kept, OutboundBody::Kept(ref b) if b.len() == REPLAY_LIMIT));

        let mut declared = HeaderMap::new();
        declared.insert(CONTENT_LENGTH, HeaderValue::from(REPLAY_LIMIT + 1));
        let streamed = read_body(&declared, Body::from(vec![b'b'; REPLAY_LIMIT + 1]))
            .await
            .unwrap();
        assert!(matches!(streamed, OutboundBody::Streamed(Some(_))));

        // Without a declared length, the part read to find out is sent first.
        let body = Body::new(Pieces(
            (0..3)
                .map(|i| Bytes::from(vec![b'0' + i; 40 << 10]))
                .collect(),
        ));
        let OutboundBody::Streamed(Some(stream)) =
            read_body(&HeaderMap::new(), body).await.unwrap()
        else {
            panic!("a 120 KiB body must stream");
        };
        let all = stream.collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 120 << 10);
        assert!(all[..40 << 10].iter().all(|&b| b == b'0'));
        assert!(all[80 << 10..].iter().all(|&b| b == b'2'));
    }

    /// A body of pieces with no length known in advance, as a chunked upload is (the
    /// pool's tests use it too).
    pub(super) struct Pieces(pub(super) std::collections::VecDeque<Bytes>);

    impl hyper::body::Body for Pieces {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }
}
