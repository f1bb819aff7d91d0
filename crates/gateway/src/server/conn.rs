//! A client connection: the gateway's own HTTP/1.1 loop for the requests of the hot
//! path, hyper for everything else.
//!
//! The loop serves what a proxy sees most: plain HTTP/1.1 GETs without a body on a
//! proxied route ([`Front::fast_route`]). It parses their heads with `httparse`,
//! serves them with [`Front::serve_route`] and writes the response itself (its head
//! and the first of its body in one write). A head larger than [`MAX_HEAD`] gets a 431
//! and the connection closes. The first request it does not serve (any other method, a
//! body, `Expect`, `Upgrade`, HTTP/1.0, HTTP/2's preface, a head it cannot parse, a
//! path the router answers) hands the connection, with the bytes read so far, to hyper
//! for the rest of its life, so everything hyper does (its 400s, bodies, upgrades,
//! HTTP/2) stays hyper's.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version, header};
use breakwater_runtime::serve::{Accepted, Prefixed};
use bytes::{Bytes, BytesMut};
use http_body_util::Empty;
use hyper::body::Body as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::Front;
use crate::forward::h1::{self, LAST_CHUNK, MAX_HEAD, MAX_HEADERS};
use crate::forward::{ClientBody, Fields, REQUEST_ID, RawFields};

/// The answer to a head larger than [`MAX_HEAD`] (the connection then closes).
const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
/// How much a read asks for at a time.
const READ_CHUNK: usize = 8 << 10;
/// Response bytes gathered before a write.
const WRITE_BATCH: usize = 64 << 10;

/// Serves one accepted connection until it closes, the server stops, or it goes to
/// hyper.
pub(crate) async fn serve(front: Arc<Front>, accepted: Accepted) {
    let Accepted {
        mut stream,
        peer,
        stopping,
        handoff,
    } = accepted;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = BytesMut::with_capacity(READ_CHUNK);
    // Where each field of the current head sits, kept across requests so that no
    // request pays for its own.
    let mut fields = Vec::new();
    // One wait for the server's stop for the connection's life: made per request, it
    // would queue and unqueue a waiter on the token each time.
    let stop = stopping.cancelled();
    tokio::pin!(stop);
    loop {
        if stopping.is_cancelled() {
            return;
        }
        // A complete head this loop serves, else the connection goes to hyper.
        let request = loop {
            if !buf.is_empty() {
                match parse(&buf, &front, &mut fields) {
                    Parsed::Serve(request) => break request,
                    Parsed::Partial if buf.len() <= MAX_HEAD => {}
                    Parsed::Partial | Parsed::TooLarge => {
                        let _ = stream.write_all(TOO_LARGE).await;
                        let _ = stream.shutdown().await;
                        return;
                    }
                    // Hyper answers (or serves) it, malformed ones with its 400.
                    Parsed::Other => {
                        let io = Prefixed::new(buf.freeze(), stream);
                        let front = Arc::clone(&front);
                        let service = hyper::service::service_fn(move |req| {
                            Arc::clone(&front).handle(req, peer)
                        });
                        handoff
                            .serve(hyper_util::rt::TokioIo::new(io), service)
                            .await;
                        return;
                    }
                }
            }
            buf.reserve(READ_CHUNK);
            // A stopping server closes connections waiting for a request, idle or
            // half-way through a head (a request in flight is finished first). The
            // read first: the stop is looked at only while the read waits (a stop
            // that came is seen at the top of the loop anyway).
            let read = tokio::select! {
                biased;
                read = stream.read_buf(&mut buf) => read,
                () = &mut stop => return,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let Request {
            head_len,
            route,
            close,
            target,
        } = request;
        let head = buf.split_to(head_len).freeze();
        let Some(parts) = build(&head, target, &fields) else {
            // A field `http` refuses (httparse let it through): the answer hyper gives.
            let _ = stream
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            return;
        };
        // Pinned where it is made: awaited by value, the request's future (several
        // KiB) would be copied into this one's state first.
        let serving = std::pin::pin!(front.serve_route(
            route,
            parts,
            Empty::<Bytes>::new(),
            peer,
            Fields::Raw
        ));
        let (res, id) = serving.await;
        if write_response(&mut stream, &mut out, res, &id, close)
            .await
            .is_err()
            || close
        {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// What the loop made of the bytes read so far.
enum Parsed {
    /// A request it serves.
    Serve(Request),
    /// The head is not complete.
    Partial,
    /// The head is larger than [`MAX_HEAD`].
    TooLarge,
    /// Anything else: hyper's.
    Other,
}

/// A head the loop serves.
struct Request {
    /// Its length in bytes.
    head_len: usize,
    /// The route it goes to.
    route: Arc<crate::route::Route>,
    /// The client asked to close after the response.
    close: bool,
    /// Where the request target sits in the head.
    target: (usize, usize),
}

/// Where a field's name and value sit in a head (start and length of each).
type FieldSpan = (usize, usize, usize, usize);

/// The parts of a request the loop serves (GET, HTTP/1.1), cut from its head's bytes
/// without copying. `None`: a target or field `http` refuses.
fn build(
    head: &Bytes,
    (at, len): (usize, usize),
    fields: &[FieldSpan],
) -> Option<axum::http::request::Parts> {
    let uri = Uri::from_maybe_shared(head.slice(at..at + len)).ok()?;
    let mut headers = HeaderMap::with_capacity(fields.len());
    for &(name_at, name_len, value_at, value_len) in fields {
        let name = h1::field_name(head.get(name_at..name_at + name_len)?)?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len)).ok()?;
        headers.append(name, value);
    }
    let mut parts = axum::http::Request::new(()).into_parts().0;
    parts.method = Method::GET;
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Some(parts)
}

/// Parses the head at the start of `buf` and decides who serves it, noting where its
/// fields are in `fields`.
fn parse(buf: &[u8], front: &Front, fields: &mut Vec<FieldSpan>) -> Parsed {
    // Left uninitialised for the parser to fill, as for upstream responses.
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Complete(_)) => return Parsed::TooLarge,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        _ => return Parsed::Other,
    };
    if req.method != Some("GET") || req.version != Some(1) {
        return Parsed::Other;
    }
    let Some(target) = req.path else {
        return Parsed::Other;
    };
    let base = buf.as_ptr() as usize;
    let mut close = false;
    fields.clear();
    for field in req.headers.iter() {
        let name = field.name.as_bytes();
        let value = field.value;
        match name.len() {
            // A body, or a request that wants more than one response: hyper's.
            14 if name.eq_ignore_ascii_case(b"content-length") => return Parsed::Other,
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => return Parsed::Other,
            6 if name.eq_ignore_ascii_case(b"expect") => return Parsed::Other,
            7 if name.eq_ignore_ascii_case(b"upgrade") => return Parsed::Other,
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for token in value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return Parsed::Other;
                    }
                }
            }
            _ => {}
        }
        fields.push((
            field.name.as_ptr() as usize - base,
            name.len(),
            value.as_ptr() as usize - base,
            value.len(),
        ));
    }
    // Only the path decides the route; a target `Uri` refuses goes to hyper too.
    let path = target.split(['?', '#']).next().unwrap_or(target);
    if !path.starts_with('/') {
        return Parsed::Other;
    }
    let Some(route) = front.fast_route(&Method::GET, path) else {
        return Parsed::Other;
    };
    Parsed::Serve(Request {
        head_len: len,
        route,
        close,
        target: (target.as_ptr() as usize - base, target.len()),
    })
}

/// How the response's body is delimited.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body may follow (1xx, 204, 304).
    None,
    /// `Content-Length`.
    Length(u64),
    /// Chunked.
    Chunked,
}

/// Writes `res` with request id `id` (head, then body as it comes) to the client.
/// `Err`: the connection cannot carry another response (the client went away, or the
/// body failed or did not match its length).
async fn write_response(
    stream: &mut TcpStream,
    out: &mut BytesMut,
    res: hyper::Response<ClientBody>,
    id: &HeaderValue,
    close: bool,
) -> Result<(), ()> {
    let (parts, mut body) = res.into_parts();
    let framing = match parts.status.as_u16() {
        100..=199 | 204 | 304 => Framing::None,
        _ => match body.size_hint().exact() {
            Some(n) => Framing::Length(n),
            None => Framing::Chunked,
        },
    };
    out.clear();
    let raw = match &body {
        ClientBody::Upstream(upstream) => upstream.raw_fields(),
        ClientBody::Other(_) => None,
    };
    encode_head(out, parts.status, &parts.headers, raw, id, framing, close);
    if framing == Framing::None {
        return stream.write_all(out).await.map_err(drop);
    }
    let mut written = 0_u64;
    loop {
        // A frame already there goes out with what is gathered; only when the body
        // has to wait is the gathered part written first.
        let frame = match std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
        {
            Some(frame) => frame,
            None => {
                if !out.is_empty() {
                    stream.write_all(out).await.map_err(drop)?;
                    out.clear();
                }
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        match frame {
            None => break,
            Some(Err(_)) => return Err(()),
            Some(Ok(frame)) => {
                // Trailers are not passed on (the client did not ask for them).
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                written += data.len() as u64;
                match framing {
                    Framing::Chunked => h1::encode_chunk(out, &data),
                    Framing::Length(n) if written > n => return Err(()),
                    _ => out.extend_from_slice(&data),
                }
                if out.len() >= WRITE_BATCH {
                    stream.write_all(out).await.map_err(drop)?;
                    out.clear();
                }
            }
        }
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(LAST_CHUNK),
        Framing::Length(n) if written != n => return Err(()),
        _ => {}
    }
    if !out.is_empty() {
        stream.write_all(out).await.map_err(drop)?;
        out.clear();
    }
    Ok(())
}

/// The response head: status line, the request id, the response's fields (its own
/// framing and connection fields left out: the loop writes those), then an upstream's
/// `raw` lines as it sent them (less any field `headers` sets: the gateway's value
/// replaces the upstream's), a `Date` if it has none.
fn encode_head(
    out: &mut BytesMut,
    status: StatusCode,
    headers: &HeaderMap,
    raw: Option<&RawFields>,
    id: &HeaderValue,
    framing: Framing,
    close: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\nx-request-id: ");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    for (name, value) in headers {
        if skipped(name) || name == REQUEST_ID {
            continue;
        }
        dated |= name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, line) in raw.into_iter().flat_map(RawFields::lines) {
        let set = name.eq_ignore_ascii_case(REQUEST_ID.as_str().as_bytes())
            || headers
                .keys()
                .any(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()));
        if set {
            continue;
        }
        dated |= name.eq_ignore_ascii_case(b"date");
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&http_date());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(h1::itoa_u64(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Fields of a response the loop writes itself rather than from the response.
fn skipped(name: &HeaderName) -> bool {
    name == header::CONTENT_LENGTH
        || name == header::TRANSFER_ENCODING
        || name == header::CONNECTION
        || name == "keep-alive"
}

/// The current time as an HTTP date, formatted once a second per thread.
fn http_date() -> [u8; 29] {
    thread_local! {
        static CACHED: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    CACHED.with(|cached| {
        let (at, text) = cached.get();
        if at == second {
            return text;
        }
        let mut text = [0_u8; 29];
        let formatted = httpdate::fmt_http_date(now);
        if let Some(slot) = text.get_mut(..formatted.len()) {
            slot.copy_from_slice(formatted.as_bytes());
        }
        cached.set((second, text));
        text
    })
}
