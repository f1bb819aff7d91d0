//! The upstream connection pool: HTTP/1.1 connections on `hyper::client::conn::http1`,
//! one pool per thread.
//!
//! - [`ThreadPool`]: this thread's connections by upstream address. The gateway serves
//!   with one single-threaded runtime per core, so a connection, the requests sent on it
//!   and its connection task all stay on one thread: checkout is a `RefCell` borrow and
//!   a scan of a short list, with no lock, channel or task hand-off of the pool's own.
//! - A connection goes back into its list as soon as a request is handed to it (the
//!   request is already queued on the connection), and is picked again once hyper says
//!   it is ready (the previous response was read to its end). A closed one is dropped
//!   when met; one idle past [`IDLE_TIMEOUT`] is closed by the per-thread reaper.
//! - [`send`] makes one request: a ready pooled connection, else a new one (connect
//!   bounded by [`super::CONNECT_TIMEOUT`], `TCP_NODELAY`). A request that a pooled
//!   connection refused before sending anything (the upstream had closed it) is sent
//!   again on a new connection, as hyper-util's client did.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use http::uri::Authority;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
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

struct Pooled {
    sender: Sender,
    /// When a request was last handed to it.
    used_at: Instant,
}

impl Pooled {
    /// Idle (ready for a request) and unused for [`IDLE_TIMEOUT`].
    fn idle_past_timeout(&self, now: Instant) -> bool {
        self.sender.is_ready() && now.saturating_duration_since(self.used_at) >= IDLE_TIMEOUT
    }
}

/// One thread's connections, by upstream address.
#[derive(Default)]
struct ThreadPool {
    by_address: HashMap<Authority, Vec<Pooled>>,
    reaper: bool,
}

impl ThreadPool {
    /// A ready connection to `address`; closed ones met on the way are dropped.
    fn checkout(&mut self, address: &Authority, now: Instant) -> Option<Sender> {
        let list = self.by_address.get_mut(address)?;
        // Newest first: the most recently used connection is the likeliest to be warm.
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let Some(entry) = list.get(i) else { break };
            if entry.sender.is_closed() {
                list.swap_remove(i);
            } else if entry.sender.is_ready() {
                let entry = list.swap_remove(i);
                if now.saturating_duration_since(entry.used_at) < IDLE_TIMEOUT {
                    return Some(entry.sender);
                }
            }
        }
        None
    }

    /// Keeps `sender` for later requests to `address` (unless the list is full).
    /// Whether a reaper must be started for this thread.
    fn put(&mut self, address: &Authority, sender: Sender, now: Instant) -> bool {
        let list = match self.by_address.get_mut(address) {
            Some(list) => list,
            None => self.by_address.entry(address.clone()).or_default(),
        };
        if list.len() < MAX_PER_ADDRESS {
            list.push(Pooled {
                sender,
                used_at: now,
            });
        }
        !std::mem::replace(&mut self.reaper, true)
    }

    /// Drops closed connections and those idle past [`IDLE_TIMEOUT`]. Whether any
    /// connection is left.
    fn reap(&mut self, now: Instant) -> bool {
        self.by_address.retain(|_, list| {
            list.retain(|p| !p.sender.is_closed() && !p.idle_past_timeout(now));
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

/// Sends `req` to `address` on a pooled connection or a new one, and waits for the
/// response head (the caller bounds the wait).
pub async fn send(
    address: &Authority,
    mut req: hyper::Request<UpstreamBody>,
) -> Result<hyper::Response<Incoming>, TryError> {
    loop {
        let now = Instant::now();
        let (mut sender, reused) = match with_pool(|pool| pool.checkout(address, now)).flatten() {
            Some(sender) => (sender, true),
            None => (connect(address).await?, false),
        };
        // The request is queued on the connection when this returns; the future only
        // waits for the answer. So the connection can go back to the pool at once, to
        // be picked again when hyper says it is ready for the next request.
        let answer = sender.try_send_request(req);
        if let Some(true) = with_pool(|pool| pool.put(address, sender, now)) {
            spawn_reaper();
        }
        match answer.await {
            Ok(res) => return Ok(res),
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

async fn connect(address: &Authority) -> Result<Sender, TryError> {
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
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| TryError::Connect(format!("connecting to {address}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
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

    async fn body(res: hyper::Response<Incoming>) -> Bytes {
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
