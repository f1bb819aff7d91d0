//! The upstream connection pool: HTTP/1.1 connections on `hyper::client::conn::http1`,
//! one pool per thread, each connection driven by the request that uses it.
//!
//! - [`ThreadPool`]: this thread's idle connections by upstream address. The gateway
//!   serves with one single-threaded runtime per core, so checkout is a `RefCell` borrow
//!   and a scan of a short list, with no lock, channel or task hand-off of the pool's own.
//! - No connection has a task of its own: hyper's `Connection` (the HTTP/1 state machine
//!   that writes the request and reads the answer) is kept with its `SendRequest` as a
//!   [`Lease`] and polled by the request's own task, first until the response head
//!   arrives ([`send`]), then by the response body ([`UpstreamIncoming`]) until the body
//!   ends. So an upstream answer wakes only the task of the client's connection, instead
//!   of the connection's task which then wakes the request's.
//! - A connection goes back to its list when the body it carried ended and hyper says
//!   it is ready for the next request; one whose body was dropped half-read, that is
//!   still sending, or that hyper closed (`Connection: close`, an error) is dropped. An
//!   idle pooled connection is not polled, so one the upstream closed meanwhile is found
//!   when next used: hyper hands the request back unsent and [`send`] resends it on a new
//!   connection. One idle past [`IDLE_TIMEOUT`] is closed by the per-thread reaper.
//! - [`send`] makes one request: a ready pooled connection, else a new one (connect
//!   bounded by [`super::CONNECT_TIMEOUT`], `TCP_NODELAY`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future as _;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{CONNECT_TIMEOUT, TryError, UpstreamBody, error_chain};

/// Idle pooled connections are closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Pooled connections kept per upstream address and thread: enough for a busy
/// gateway's concurrency, bounded so a burst does not leave thousands of sockets open.
const MAX_PER_ADDRESS: usize = 256;

/// How often the reaper looks for idle connections.
const REAP_EVERY: Duration = Duration::from_secs(10);

type Sender = SendRequest<UpstreamBody>;
type Driver = Connection<TokioIo<TcpStream>, UpstreamBody>;

/// One upstream connection: the handle requests are sent through and the state machine
/// that does the sending, polled by whoever holds the lease.
struct Lease {
    sender: Sender,
    driver: Driver,
}

impl Lease {
    /// Lets the connection read and write what it can. `Ready` when it is finished
    /// (closed by either side or broken); it must not be polled again then.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match Pin::new(&mut self.driver).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "upstream connection ended with an error");
                Poll::Ready(())
            }
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").finish_non_exhaustive()
    }
}

struct Pooled {
    lease: Box<Lease>,
    /// When it was last put back.
    used_at: Instant,
}

/// One thread's idle connections, by upstream address.
#[derive(Default)]
struct ThreadPool {
    by_address: HashMap<Authority, Vec<Pooled>>,
    reaper: bool,
}

impl ThreadPool {
    /// A ready connection to `address`; closed ones met on the way are dropped.
    fn checkout(&mut self, address: &Authority, now: Instant) -> Option<Box<Lease>> {
        let list = self.by_address.get_mut(address)?;
        // Newest first: the most recently used connection is the likeliest to be warm.
        while let Some(entry) = list.pop() {
            if entry.lease.sender.is_ready()
                && now.saturating_duration_since(entry.used_at) < IDLE_TIMEOUT
            {
                return Some(entry.lease);
            }
        }
        None
    }

    /// Keeps `lease` for later requests to `address` (unless the list is full).
    /// Whether a reaper must be started for this thread.
    fn put(&mut self, address: &Authority, lease: Box<Lease>, now: Instant) -> bool {
        let list = match self.by_address.get_mut(address) {
            Some(list) => list,
            None => self.by_address.entry(address.clone()).or_default(),
        };
        if list.len() < MAX_PER_ADDRESS {
            list.push(Pooled {
                lease,
                used_at: now,
            });
        }
        !std::mem::replace(&mut self.reaper, true)
    }

    /// Drops connections idle past [`IDLE_TIMEOUT`]. Whether any connection is left.
    fn reap(&mut self, now: Instant) -> bool {
        self.by_address.retain(|_, list| {
            list.retain(|p| {
                !p.lease.sender.is_closed()
                    && now.saturating_duration_since(p.used_at) < IDLE_TIMEOUT
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

/// Puts `lease` back for `address` if the exchange on it is over and hyper takes
/// another request on it; else drops (closes) it.
fn release(address: &Authority, mut lease: Box<Lease>, cx: &mut Context<'_>) {
    // One more turn lets hyper finish the exchange (it asks for the next request only
    // once the answer was read to its end and the request was written whole).
    if lease.drive(cx).is_ready() || !lease.sender.is_ready() {
        return;
    }
    let now = Instant::now();
    if let Some(true) = with_pool(|pool| pool.put(address, lease, now)) {
        spawn_reaper();
    }
}

/// Sends `req` to `address` on a pooled connection or a new one, and waits for the
/// response head (the caller bounds the wait), driving the connection meanwhile.
pub async fn send(
    address: &Authority,
    mut req: hyper::Request<UpstreamBody>,
) -> Result<hyper::Response<UpstreamIncoming>, TryError> {
    loop {
        let now = Instant::now();
        let (mut lease, reused) = match with_pool(|pool| pool.checkout(address, now)).flatten() {
            Some(lease) => (lease, true),
            None => (connect(address).await?, false),
        };
        let mut answer = pin!(lease.sender.try_send_request(req));
        let mut lease = Some(lease);
        let result = std::future::poll_fn(|cx| {
            if let Some(l) = lease.as_mut() {
                if l.drive(cx).is_pending() {
                    // Only the connection, just polled with this task's waker, can
                    // complete the answer: a waker of its own would only wake this
                    // task a second time.
                    return answer
                        .as_mut()
                        .poll(&mut Context::from_waker(Waker::noop()));
                }
                // Finished: dropping it fails (or hands back) whatever it still held.
                lease = None;
            }
            answer.as_mut().poll(cx)
        })
        .await;
        match result {
            Ok(res) => {
                // Without a lease, the connection ended with the head: the body has
                // all it will get.
                let lease = lease.map(|l| (address.clone(), l));
                return Ok(res.map(|body| UpstreamIncoming { body, lease }));
            }
            Err(mut e) => match e.take_message() {
                // Nothing was sent: the upstream had closed a pooled connection.
                Some(back) if reused => req = back,
                // Nothing was sent on a new connection either: as good as no connection,
                // so even a request that is not idempotent may go elsewhere.
                Some(_) => return Err(TryError::Connect(error_chain(e.error()))),
                None => return Err(TryError::Protocol(error_chain(e.error()))),
            },
        }
    }
}

/// An upstream's response body together with the connection it arrives on: polling the
/// body drives the connection; when the body ends the connection goes back to the pool.
#[derive(Debug)]
pub struct UpstreamIncoming {
    body: Incoming,
    /// The connection and its address while the body may still need it.
    lease: Option<(Authority, Box<Lease>)>,
}

impl UpstreamIncoming {
    fn finish(&mut self, cx: &mut Context<'_>) {
        if let Some((address, lease)) = self.lease.take() {
            release(&address, lease, cx);
        }
    }
}

impl hyper::body::Body for UpstreamIncoming {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some((_, lease)) = this.lease.as_mut()
            && lease.drive(cx).is_ready()
        {
            this.lease = None;
        }
        let polled = if this.lease.is_some() {
            // As in `send`: only the connection, just polled, feeds the body.
            let mut quiet = Context::from_waker(Waker::noop());
            Pin::new(&mut this.body).poll_frame(&mut quiet)
        } else {
            Pin::new(&mut this.body).poll_frame(cx)
        };
        match &polled {
            Poll::Ready(None) => this.finish(cx),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.finish(cx),
            // A broken body leaves the connection in no state to reuse.
            Poll::Ready(Some(Err(_))) => this.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamIncoming {
    fn drop(&mut self) {
        // A body known to be complete (empty, or all its declared length read) may not
        // be polled to its end by the server; its connection is still good. One dropped
        // half-read is not (the rest of the body would still arrive on it): it closes.
        if self.body.is_end_stream() {
            self.finish(&mut Context::from_waker(Waker::noop()));
        }
    }
}

async fn connect(address: &Authority) -> Result<Box<Lease>, TryError> {
    // An IPv6 literal comes bracketed in an authority, and must not be for a lookup.
    let host = address.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let target = (host, address.port_u16().unwrap_or(80));
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Err(_elapsed) => {
            return Err(TryError::Connect(format!(
                "connecting to {address} timed out after {CONNECT_TIMEOUT:?}"
            )));
        }
        Ok(Err(e)) => return Err(TryError::Connect(format!("connecting to {address}: {e}"))),
        Ok(Ok(stream)) => stream,
    };
    // Requests and answers are small writes; Nagle would hold each for an ACK.
    stream
        .set_nodelay(true)
        .map_err(|e| TryError::Connect(format!("connecting to {address}: {e}")))?;
    let (sender, driver) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| TryError::Connect(format!("connecting to {address}: {e}")))?;
    // Boxed: hyper's connection state is most of a kilobyte, and the lease moves
    // between the pool, the request and the response body on every request.
    Ok(Box::new(Lease { sender, driver }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Either, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn get(address: &Authority) -> hyper::Request<UpstreamBody> {
        let mut req = hyper::Request::new(Either::Left(Full::new(Bytes::new())));
        *req.uri_mut() = http::Uri::from_static("/x");
        req.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_str(address.as_str()).unwrap(),
        );
        req
    }

    /// Counts connections; answers every request on them with `hi`, closing each
    /// connection after `per_connection` answers.
    async fn server(
        per_connection: usize,
    ) -> (Authority, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let _ = tx.send(());
                tokio::spawn(async move {
                    let mut buf = vec![0_u8; 4096];
                    for _ in 0..per_connection {
                        let mut seen = Vec::new();
                        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            let n = s.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            seen.extend_from_slice(&buf[..n]);
                        }
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
                            .await
                            .unwrap();
                    }
                });
            }
        });
        (address, rx)
    }

    async fn body(res: hyper::Response<UpstreamIncoming>) -> Bytes {
        res.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_answer_was_read() {
        let (address, mut connections) = server(usize::MAX).await;
        for _ in 0..5 {
            let res = send(&address, get(&address)).await.unwrap();
            assert_eq!(body(res).await, "hi");
            // Let the connection task see the end of the answer.
            tokio::task::yield_now().await;
        }
        assert!(connections.recv().await.is_some());
        assert!(
            connections.try_recv().is_err(),
            "one connection for 5 requests"
        );

        // Two at once need two connections; afterwards both are pooled.
        let (a, b) = tokio::join!(send(&address, get(&address)), send(&address, get(&address)));
        assert_eq!(body(a.unwrap()).await, "hi");
        assert_eq!(body(b.unwrap()).await, "hi");
        assert!(connections.recv().await.is_some());
        let pooled = with_pool(|p| p.by_address.get(&address).map_or(0, Vec::len)).unwrap();
        assert_eq!(pooled, 2);
    }

    /// Answers each request on a connection with `answer`, counting connections.
    async fn raw_server(
        answer: &'static [u8],
    ) -> (Authority, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let _ = tx.send(());
                tokio::spawn(async move {
                    let mut buf = vec![0_u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {
                                if s.write_all(answer).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        (address, rx)
    }

    fn pooled(address: &Authority) -> usize {
        with_pool(|p| p.by_address.get(address).map_or(0, Vec::len)).unwrap()
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_closes_its_connection() {
        // Ten bytes promised, two sent: the rest could still arrive on the connection.
        let (address, mut connections) =
            raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhi").await;
        let res = send(&address, get(&address)).await.unwrap();
        assert_eq!(res.status(), 200);
        drop(res);
        assert_eq!(pooled(&address), 0);
        let res = send(&address, get(&address)).await.unwrap();
        drop(res);
        assert!(connections.recv().await.is_some());
        assert!(connections.recv().await.is_some(), "a second connection");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_says_it_closes_is_not_pooled() {
        let (address, _connections) =
            raw_server(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi")
                .await;
        let res = send(&address, get(&address)).await.unwrap();
        assert_eq!(body(res).await, "hi");
        assert_eq!(pooled(&address), 0);
    }

    #[tokio::test]
    async fn bodiless_answers_return_their_connection_without_being_read() {
        let (address, mut connections) = raw_server(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        for _ in 0..3 {
            let res = send(&address, get(&address)).await.unwrap();
            assert_eq!(res.status(), 204);
            // Dropped unread, as the server does with a body it knows is empty.
            drop(res);
            assert_eq!(pooled(&address), 1);
        }
        assert!(connections.recv().await.is_some());
        assert!(
            connections.try_recv().is_err(),
            "one connection for 3 requests"
        );
    }

    #[tokio::test]
    async fn large_chunked_bodies_stream_through_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0_u8; 4096];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            let chunk = vec![b'z'; 16 << 10];
            for _ in 0..64 {
                s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await
                    .unwrap();
                s.write_all(&chunk).await.unwrap();
                s.write_all(b"\r\n").await.unwrap();
            }
            s.write_all(b"0\r\n\r\n").await.unwrap();
            // Keep the connection open: the client decides whether to reuse it.
            let _ = s.read(&mut buf).await;
        });
        let res = send(&address, get(&address)).await.unwrap();
        let all = body(res).await;
        assert_eq!(all.len(), 64 << 14);
        assert!(all.iter().all(|&b| b == b'z'));
        assert_eq!(pooled(&address), 1, "read to its end, so reusable");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_replaced_without_failing() {
        let (address, mut connections) = server(1).await;
        for _ in 0..3 {
            let res = send(&address, get(&address)).await.unwrap();
            assert_eq!(body(res).await, "hi");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for _ in 0..3 {
            assert!(connections.recv().await.is_some());
        }
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
            let mut buf = vec![0_u8; 4096];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nv6")
                .await
                .unwrap();
        });
        let res = send(&address, get(&address)).await.unwrap();
        assert_eq!(body(res).await, "v6");
    }

    #[tokio::test]
    async fn refused_connections_are_connect_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let err = send(&address, get(&address)).await.unwrap_err();
        assert!(matches!(err, TryError::Connect(_)), "{err:?}");
    }

    #[tokio::test]
    async fn idle_connections_are_reaped() {
        let (address, _connections) = server(usize::MAX).await;
        let res = send(&address, get(&address)).await.unwrap();
        assert_eq!(body(res).await, "hi");
        tokio::task::yield_now().await;
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
