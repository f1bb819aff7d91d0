//! The upstream connection pool: HTTP/1.1 connections spoken with the gateway's own
//! codec ([`super::h1`]), one pool per thread.
//!
//! - [`ThreadPool`]: this thread's idle connections by upstream address. The gateway
//!   serves with one single-threaded runtime per core, so a connection and the
//!   requests sent on it stay on one thread: checkout is a `RefCell` borrow and a pop
//!   from a short list, with no lock, channel or task of the pool's own.
//! - A connection belongs to one request at a time: [`send`] writes the request and
//!   reads the response head on it, then hands it to the response's body
//!   ([`UpstreamIncoming`]), which reads the body from it and, once the body ended
//!   cleanly on a connection that stays open, puts it back. A body dropped before its
//!   end (a retried 5xx, a try that timed out, a client gone mid-body) closes its
//!   connection, as does anything the codec does not trust.
//! - An idle connection the upstream closed is noticed at checkout from the reactor's
//!   readiness (no system call unless the socket turned readable) and dropped; one
//!   idle past [`IDLE_TIMEOUT`] is closed by the per-thread reaper.
//! - [`send`] makes one request: an idle pooled connection, else a new one (connect
//!   bounded by [`super::CONNECT_TIMEOUT`], `TCP_NODELAY`). A request whose write
//!   failed on a pooled connection is written again on a new one when its body is
//!   kept (the upstream had closed the connection; nothing of it was answered).

use std::cell::RefCell;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use breakwater_runtime::hash::QuickMap;
use bytes::{Bytes, BytesMut};
use http::Method;
use http::uri::Authority;
use http_body_util::BodyExt as _;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::h1::{self, Chunked, Decoded, Framing, RequestFraming};
use super::{CONNECT_TIMEOUT, TryError, error_chain};

/// Idle pooled connections are closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle connections kept per upstream address and thread: enough for a busy gateway's
/// concurrency, bounded so a burst does not leave thousands of sockets open.
const MAX_PER_ADDRESS: usize = 256;

/// How often the reaper looks for idle connections.
const REAP_EVERY: Duration = Duration::from_secs(10);

/// Room made in a connection's read buffer before each read.
const READ_CHUNK: usize = 8 << 10;

/// A kept body up to this size is copied behind the head and sent with it in one
/// write; a larger one is written on its own.
const COALESCE_BODY: usize = 16 << 10;

/// A request body on its way upstream.
#[derive(Debug)]
pub enum Payload {
    /// Kept whole: can be written again on another connection.
    Kept(Bytes),
    /// The client's stream: written once.
    Streamed(Body),
}

/// The head of one try, borrowed from the request it tries.
#[derive(Debug, Clone, Copy)]
pub struct TryHead<'a> {
    /// The method.
    pub method: &'a Method,
    /// The origin-form target (`/path?query`).
    pub target: &'a str,
    /// The endpoint's `Host`, sent instead of any in `headers`.
    pub host: Option<&'a http::HeaderValue>,
    /// The client's headers to send (no framing headers).
    pub headers: &'a http::HeaderMap,
    /// The gateway's own fields, sent after `headers`.
    pub added: &'a super::Added,
    /// How the response's fields are to be kept.
    pub fields: h1::Fields,
}

/// One upstream connection and what was read from it but not yet used. Boxed wherever
/// it goes (the pool, a request, the response body): it moves with every response,
/// and its box, made once per connection, is cheaper to move than its fields.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    address: Authority,
    buf: BytesMut,
    out: BytesMut,
    /// Scratch for the response head parser.
    spans: Vec<(usize, usize, usize, usize)>,
}

impl Conn {
    /// Whether an idle connection can no longer carry a request: the upstream closed
    /// it, or sent bytes nobody asked for. Only a socket the reactor saw turn readable
    /// costs a system call.
    fn is_unusable(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            // Readiness can be stale (a read that filled the buffer exactly leaves it
            // set); a read that would block says the connection is fine after all.
            Poll::Ready(Ok(())) => {
                let mut probe = [0_u8; 1];
                !matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Writes the request head and body.
    async fn write_request(
        &mut self,
        head: TryHead<'_>,
        payload: &mut Option<Payload>,
    ) -> std::io::Result<()> {
        self.out.clear();
        match payload {
            None => Err(std::io::Error::other(
                "the streamed request body was already sent",
            )),
            Some(Payload::Kept(bytes)) => {
                let framing = RequestFraming::for_body(head.method, Some(bytes.len() as u64));
                h1::encode_request_head(&mut self.out, &head, framing);
                if bytes.len() <= COALESCE_BODY {
                    self.out.extend_from_slice(bytes);
                    self.io.write_all(&self.out).await
                } else {
                    self.io.write_all(&self.out).await?;
                    self.io.write_all(bytes).await
                }
            }
            // `send` gives streamed bodies to `exchange_streamed`.
            Some(Payload::Streamed(_)) => Err(std::io::Error::other(
                "a streamed body is sent while its answer is read",
            )),
        }
    }

    /// Sends the head and a streamed body while reading the response head, so that an
    /// upstream answering before it has read the whole body (a 413, say) is heard
    /// instead of leaving the write stuck once the socket buffers fill. A head that
    /// comes before the body was all written ends the write, and the connection is
    /// not used again.
    async fn exchange_streamed(
        &mut self,
        head: TryHead<'_>,
        body: Body,
    ) -> Result<h1::ResponseHead, TryError> {
        let Self {
            io,
            address,
            buf,
            out,
            spans,
        } = self;
        let (mut reading, mut writing) = io.split();
        let write = write_streamed(&mut writing, out, head, body);
        let read = read_head_from(&mut reading, buf, spans, address, &head);
        let mut write = std::pin::pin!(write);
        let mut read = std::pin::pin!(read);
        let mut written: Option<std::io::Result<()>> = None;
        loop {
            tokio::select! {
                done = &mut write, if written.is_none() => written = Some(done),
                answer = &mut read => {
                    return match (answer, written) {
                        (Ok(head), Some(Ok(()))) => Ok(head),
                        (Ok(mut head), _) => {
                            head.keep_alive = false;
                            Ok(head)
                        }
                        (Err(_), Some(Err(e))) => Err(TryError::Protocol(format!(
                            "writing to {address}: {}",
                            error_chain(&e)
                        ))),
                        (Err(e), _) => Err(e),
                    };
                }
            }
        }
    }

    /// Reads until a whole response head is in.
    async fn read_head(&mut self, head: &TryHead<'_>) -> Result<h1::ResponseHead, TryError> {
        read_head_from(
            &mut self.io,
            &mut self.buf,
            &mut self.spans,
            &self.address,
            head,
        )
        .await
    }
}

/// Writes the head and a streamed body (chunked unless its length is known) to `io`,
/// with `out` as scratch.
async fn write_streamed<W: tokio::io::AsyncWrite + Unpin>(
    io: &mut W,
    out: &mut BytesMut,
    head: TryHead<'_>,
    mut body: Body,
) -> std::io::Result<()> {
    let exact = hyper::body::Body::size_hint(&body).exact();
    let framing = RequestFraming::for_body(head.method, exact);
    out.clear();
    h1::encode_request_head(out, &head, framing);
    io.write_all(out).await?;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| std::io::Error::other(format!("reading the client's body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers are not passed on
        };
        if data.is_empty() {
            continue;
        }
        if framing == RequestFraming::Chunked {
            out.clear();
            h1::encode_chunk(out, &data);
            io.write_all(out).await?;
        } else {
            io.write_all(&data).await?;
        }
    }
    if framing == RequestFraming::Chunked {
        io.write_all(h1::LAST_CHUNK).await?;
    }
    Ok(())
}

/// Reads from `io` into `buf` until a whole response head is in.
async fn read_head_from<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    spans: &mut Vec<(usize, usize, usize, usize)>,
    address: &Authority,
    request: &TryHead<'_>,
) -> Result<h1::ResponseHead, TryError> {
    loop {
        if !buf.is_empty()
            && let Some(head) = h1::parse_response_with(buf, request.method, spans, request.fields)
                .map_err(|e| TryError::Protocol(format!("from {address}: {e}")))?
        {
            return Ok(head);
        }
        buf.reserve(READ_CHUNK);
        match io.read_buf(buf).await {
            Ok(0) => {
                return Err(TryError::Protocol(format!(
                    "{address} closed the connection before a response head"
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(TryError::Protocol(format!("reading from {address}: {e}"))),
        }
    }
}

struct Pooled {
    conn: Box<Conn>,
    /// When it last went idle.
    idle_since: Instant,
}

/// One thread's idle connections, by upstream address.
#[derive(Default)]
struct ThreadPool {
    /// Keyed by the address's text, hashed a word at a time: `Authority` itself hashes
    /// and compares byte by byte, case-folded, twice per request. (Addresses come from
    /// the registry; two spellings of one host only make two lists.)
    by_address: QuickMap<Box<str>, Vec<Pooled>>,
    reaper: bool,
}

impl ThreadPool {
    /// An idle connection to `address`; unusable or stale ones met on the way are
    /// dropped.
    fn checkout(&mut self, address: &Authority, now: Instant) -> Option<Box<Conn>> {
        let list = self.by_address.get_mut(address.as_str())?;
        // Newest first: the most recently used connection is the likeliest to be warm.
        while let Some(entry) = list.pop() {
            if now.saturating_duration_since(entry.idle_since) < IDLE_TIMEOUT
                && !entry.conn.is_unusable()
            {
                return Some(entry.conn);
            }
        }
        None
    }

    /// Keeps `conn` for later requests to its address (unless the list is full).
    /// Whether a reaper must be started for this thread.
    fn put(&mut self, conn: Box<Conn>, now: Instant) -> bool {
        let list = match self.by_address.get_mut(conn.address.as_str()) {
            Some(list) => list,
            None => self
                .by_address
                .entry(conn.address.as_str().into())
                .or_default(),
        };
        if list.len() < MAX_PER_ADDRESS {
            list.push(Pooled {
                conn,
                idle_since: now,
            });
        }
        !std::mem::replace(&mut self.reaper, true)
    }

    /// Drops unusable connections and those idle past [`IDLE_TIMEOUT`]. Whether any
    /// connection is left.
    fn reap(&mut self, now: Instant) -> bool {
        self.by_address.retain(|_, list| {
            list.retain(|p| {
                now.saturating_duration_since(p.idle_since) < IDLE_TIMEOUT && !p.conn.is_unusable()
            });
            !list.is_empty()
        });
        if self.by_address.is_empty() {
            self.reaper = false;
        }
        self.reaper
    }
}

thread_local! {
    static POOL: RefCell<ThreadPool> = RefCell::new(ThreadPool::default());
}

fn with_pool<R>(f: impl FnOnce(&mut ThreadPool) -> R) -> Option<R> {
    POOL.with(|pool| pool.try_borrow_mut().ok().map(|mut pool| f(&mut pool)))
}

/// Puts a connection whose last response ended cleanly back into this thread's pool.
fn release(conn: Box<Conn>) {
    if let Some(true) = with_pool(|pool| pool.put(conn, Instant::now())) {
        spawn_reaper();
    }
}

/// Sends `req` to `address` on a pooled connection or a new one, and waits for the
/// response head (the caller bounds the wait). The body streams from the connection.
pub async fn send(
    address: &Authority,
    head: TryHead<'_>,
    payload: Payload,
) -> Result<hyper::Response<UpstreamIncoming>, TryError> {
    let mut payload = Some(payload);
    loop {
        let (mut conn, reused) =
            match with_pool(|pool| pool.checkout(address, Instant::now())).flatten() {
                Some(conn) => (conn, true),
                // Boxed: connecting is rare and its future large; inline it would
                // enlarge every request's future.
                None => (Box::pin(connect(address)).await?, false),
            };
        let response = if let Some(Payload::Streamed(_)) = payload {
            let Some(Payload::Streamed(body)) = payload.take() else {
                return Err(TryError::BodyGone);
            };
            // Boxed: rare, and large enough to enlarge every request's future.
            Box::pin(conn.exchange_streamed(head, body)).await?
        } else {
            if let Err(e) = conn.write_request(head, &mut payload).await {
                // A pooled connection the upstream had closed: a kept body goes again
                // on a new one (`reused` is false then, so this happens at most once).
                if reused && matches!(payload, Some(Payload::Kept(_))) {
                    continue;
                }
                return Err(TryError::Protocol(format!(
                    "writing to {address}: {}",
                    error_chain(&e)
                )));
            }
            conn.read_head(&head).await?
        };
        let body = UpstreamIncoming::new(conn, response.framing, response.keep_alive, response.raw);
        return Ok(hyper::Response::from_parts(response.parts, body));
    }
}

async fn connect(address: &Authority) -> Result<Box<Conn>, TryError> {
    // An IPv6 literal comes bracketed in an authority, and must not be for a lookup.
    let host = address.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let target = (host, address.port_u16().unwrap_or(80));
    let io = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Err(_elapsed) => {
            return Err(TryError::Connect(format!(
                "connecting to {address} timed out after {CONNECT_TIMEOUT:?}"
            )));
        }
        Ok(Err(e)) => return Err(TryError::Connect(format!("connecting to {address}: {e}"))),
        Ok(Ok(io)) => io,
    };
    // Requests and answers are small writes; Nagle would hold each for an ACK.
    io.set_nodelay(true)
        .map_err(|e| TryError::Connect(format!("connecting to {address}: {e}")))?;
    Ok(Box::new(Conn {
        io,
        address: address.clone(),
        buf: BytesMut::with_capacity(READ_CHUNK),
        out: BytesMut::with_capacity(1024),
        spans: Vec::with_capacity(16),
    }))
}

/// Closes this thread's idle connections every [`REAP_EVERY`] while it has any; a new
/// one starts when a connection is pooled again. Stops with the thread's runtime.
fn spawn_reaper() {
    tokio::spawn(async {
        loop {
            tokio::time::sleep(REAP_EVERY).await;
            let now = Instant::now();
            if with_pool(|pool| pool.reap(now)) == Some(false) {
                break;
            }
        }
    });
}

/// Why an upstream body could not be read to its end.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(String);

#[derive(Debug)]
enum BodyState {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

/// An upstream response's body, read from its connection as the client takes it. At
/// its clean end the connection goes back to the pool (when it stays open); dropped
/// earlier, the connection closes.
#[derive(Debug)]
pub struct UpstreamIncoming {
    conn: Option<Box<Conn>>,
    state: BodyState,
    keep_alive: bool,
    raw: Option<Box<h1::RawFields>>,
}

impl UpstreamIncoming {
    fn new(
        conn: Box<Conn>,
        framing: Framing,
        keep_alive: bool,
        raw: Option<Box<h1::RawFields>>,
    ) -> Self {
        let mut body = Self {
            conn: Some(conn),
            state: match framing {
                Framing::Empty | Framing::Length(0) => BodyState::Done,
                Framing::Length(n) => BodyState::Length(n),
                Framing::Chunked => BodyState::Chunked(Chunked::new()),
                Framing::UntilClose => BodyState::UntilClose,
            },
            keep_alive,
            raw,
        };
        if matches!(body.state, BodyState::Done) {
            body.finish();
        }
        body
    }

    /// The response's end-to-end fields as its head's lines, when the request asked
    /// for them so ([`h1::Fields::Raw`]); its `HeaderMap` is then empty.
    pub fn raw_fields(&self) -> Option<&h1::RawFields> {
        self.raw.as_deref()
    }

    /// The body ended: its connection goes back to the pool if it may carry another
    /// request and nothing unasked-for follows the body.
    fn finish(&mut self) {
        self.state = BodyState::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            release(conn);
        }
    }

    fn fail(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.state = BodyState::Done;
        self.conn = None;
        Poll::Ready(Some(Err(BodyError(why))))
    }
}

impl hyper::body::Body for UpstreamIncoming {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // What the buffer already holds.
            match &mut this.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(left) if !conn.buf.is_empty() => {
                    let take = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(conn.buf.len());
                    let data = conn.buf.split_to(take).freeze();
                    *left -= take as u64;
                    if *left == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::Chunked(decoder) if !conn.buf.is_empty() => {
                    match decoder.decode(&mut conn.buf) {
                        Ok(Some(Decoded::Data(data))) => {
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Ok(Some(Decoded::End)) => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let why = format!("bad chunked body from {}: {e}", conn.address);
                            return this.fail(why);
                        }
                    }
                }
                BodyState::UntilClose if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                _ => {}
            }
            // More is needed from the connection.
            conn.buf.reserve(READ_CHUNK);
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf);
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if matches!(this.state, BodyState::UntilClose) {
                        this.state = BodyState::Done;
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    let why = format!("{} closed the connection mid-body", conn.address);
                    return this.fail(why);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    let why = format!("reading the body from {}: {e}", conn.address);
                    return this.fail(why);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Chunked(_) | BodyState::UntilClose => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Sends `method /x` with `payload` to `address`.
    async fn request(
        address: &Authority,
        method: Method,
        payload: Payload,
    ) -> Result<hyper::Response<UpstreamIncoming>, TryError> {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::HOST,
            http::HeaderValue::from_str(address.as_str()).unwrap(),
        );
        let added = super::super::Added::default();
        let head = TryHead {
            method: &method,
            target: "/x",
            host: None,
            headers: &headers,
            added: &added,
            fields: h1::Fields::Map,
        };
        send(address, head, payload).await
    }

    async fn get(address: &Authority) -> Result<hyper::Response<UpstreamIncoming>, TryError> {
        request(address, Method::GET, Payload::Kept(Bytes::new())).await
    }

    /// Reads one request head (and a body of `content-length` bytes) from `s`; the
    /// head's text, or `None` at the connection's end.
    async fn read_request(s: &mut TcpStream) -> Option<String> {
        let mut seen = Vec::new();
        let mut buf = vec![0_u8; 4096];
        let head_end = loop {
            if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
            seen.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&seen[..head_end]).to_string();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        let mut have = seen.len() - head_end;
        while have < len {
            let n = s.read(&mut buf).await.unwrap_or(0);
            assert!(n > 0, "body cut short");
            have += n;
        }
        Some(head)
    }

    /// Counts connections; answers every request on them with `answer`, closing each
    /// connection after `per_connection` answers.
    async fn server_answering(
        per_connection: usize,
        answer: &'static [u8],
    ) -> (Authority, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    for _ in 0..per_connection {
                        let Some(head) = read_request(&mut s).await else {
                            return;
                        };
                        let _ = tx.send(head);
                        s.write_all(answer).await.unwrap();
                    }
                });
            }
        });
        (address, rx)
    }

    async fn server(
        per_connection: usize,
    ) -> (Authority, tokio::sync::mpsc::UnboundedReceiver<String>) {
        server_answering(
            per_connection,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
        )
        .await
    }

    async fn body(res: hyper::Response<UpstreamIncoming>) -> Bytes {
        res.into_body().collect().await.unwrap().to_bytes()
    }

    fn pooled(address: &Authority) -> usize {
        with_pool(|p| p.by_address.get(address.as_str()).map_or(0, Vec::len)).unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_answer_was_read() {
        let (address, mut requests) = server(usize::MAX).await;
        for _ in 0..5 {
            let res = get(&address).await.unwrap();
            assert_eq!(body(res).await, "hi");
            assert_eq!(pooled(&address), 1);
        }
        let head = requests.recv().await.unwrap();
        assert!(
            head.starts_with("GET /x HTTP/1.1\r\nhost: 127.0.0.1:"),
            "{head}"
        );
        assert!(!head.contains("content-length"), "{head}");

        // Two at once need two connections; afterwards both are pooled.
        let (a, b) = tokio::join!(get(&address), get(&address));
        assert_eq!(body(a.unwrap()).await, "hi");
        assert_eq!(body(b.unwrap()).await, "hi");
        assert_eq!(pooled(&address), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_closes_its_connection() {
        let (address, _requests) = server_answering(
            usize::MAX,
            b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial",
        )
        .await;
        let res = get(&address).await.unwrap();
        let mut incoming = res.into_body();
        let first = incoming
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap();
        assert_eq!(first, "partial");
        drop(incoming);
        assert_eq!(pooled(&address), 0);
    }

    #[tokio::test]
    async fn chunked_and_close_delimited_bodies_are_read_whole() {
        let (address, _r) = server_answering(
            usize::MAX,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .await;
        for _ in 0..3 {
            let res = get(&address).await.unwrap();
            assert!(
                !res.headers().contains_key("transfer-encoding"),
                "hop-by-hop: decoded here, the client's framing is its own"
            );
            assert_eq!(body(res).await, "abcde");
        }
        assert_eq!(pooled(&address), 1, "chunked bodies keep the connection");

        let (address, _r) =
            server_answering(1, b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nto the end").await;
        let res = get(&address).await.unwrap();
        assert_eq!(body(res).await, "to the end");
        assert_eq!(pooled(&address), 0);
    }

    #[tokio::test]
    async fn bodies_go_up_with_their_length_or_chunked() {
        let (address, mut requests) = server(usize::MAX).await;
        let posted = request(
            &address,
            Method::POST,
            Payload::Kept(Bytes::from_static(b"{\"a\":1}")),
        );
        assert_eq!(body(posted.await.unwrap()).await, "hi");
        let head = requests.recv().await.unwrap();
        assert!(head.starts_with("POST /x HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("content-length: 7\r\n"), "{head}");

        // A stream of unknown length goes chunked; the server sees the whole body.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = vec![0_u8; 4096];
            while !seen.ends_with(b"0\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0);
                seen.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(seen).unwrap()
        });
        let stream = futures_stream(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cde")]);
        let res = request(&address, Method::PUT, Payload::Streamed(stream))
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        let seen = server.await.unwrap();
        assert!(
            seen.contains("transfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"),
            "{seen}"
        );
        // A bodiless answer returns its connection at once.
        assert_eq!(pooled(&address), 1);
    }

    /// An upstream that refuses a large upload at its head, without reading the rest,
    /// is heard at once: the write does not wait for buffers that will never drain.
    #[tokio::test]
    async fn an_early_answer_to_a_large_upload_is_heard() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = vec![0_u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            // Holds the connection open without reading, until the test ends.
            let _ = done_rx.await;
        });
        let piece = Bytes::from(vec![b'u'; 64 << 10]);
        let upload = futures_stream(vec![piece; 512]); // 32 MiB
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            request(&address, Method::POST, Payload::Streamed(upload)),
        )
        .await
        .expect("the early answer must not wait for the whole upload")
        .unwrap();
        assert_eq!(answer.status(), 413);
        assert!(body(answer).await.is_empty());
        assert_eq!(
            pooled(&address),
            0,
            "a half-sent request's connection is not reused"
        );
        let _ = done_tx.send(());
    }

    /// A body of `pieces` whose length is not known in advance.
    fn futures_stream(pieces: Vec<Bytes>) -> Body {
        Body::new(super::super::tests::Pieces(pieces.into()))
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_replaced_without_failing() {
        let (address, mut requests) = server(1).await;
        for _ in 0..3 {
            let res = get(&address).await.unwrap();
            assert_eq!(body(res).await, "hi");
            // Let the reactor see the upstream's close.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for _ in 0..3 {
            assert!(requests.recv().await.is_some());
        }
    }

    #[tokio::test]
    async fn a_response_cut_before_its_head_is_a_protocol_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = read_request(&mut s).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-le").await.unwrap();
        });
        let err = get(&address).await.unwrap_err();
        assert!(matches!(err, TryError::Protocol(_)), "{err:?}");
    }

    #[tokio::test]
    async fn ipv6_upstreams_are_reached() {
        let Ok(listener) = TcpListener::bind("[::1]:0").await else {
            return; // no IPv6 loopback here
        };
        let address: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        assert!(address.host().starts_with('['), "{address}");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = read_request(&mut s).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nv6")
                .await
                .unwrap();
        });
        let res = get(&address).await.unwrap();
        assert_eq!(body(res).await, "v6");
    }

    #[tokio::test]
    async fn refused_connections_are_connect_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let err = get(&address).await.unwrap_err();
        assert!(matches!(err, TryError::Connect(_)), "{err:?}");
    }

    #[tokio::test]
    async fn idle_connections_are_reaped() {
        let (address, _requests) = server(usize::MAX).await;
        let res = get(&address).await.unwrap();
        assert_eq!(body(res).await, "hi");
        let now = Instant::now();
        assert_eq!(
            with_pool(|p| p.reap(now)),
            Some(true),
            "not idle for long yet"
        );
        let later = now + IDLE_TIMEOUT;
        assert_eq!(with_pool(|p| p.reap(later)), Some(false));
        assert_eq!(with_pool(|p| p.by_address.len()), Some(0));
    }
}
