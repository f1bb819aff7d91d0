//! Serving an axum router (or any hyper service) with a graceful drain.

use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long in-flight requests get to finish after shutdown starts.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting and
/// waits up to `drain` for in-flight requests.
///
/// The peer address is made available to handlers through
/// `ConnectInfo<std::net::SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    drain: Duration,
) -> std::io::Result<()> {
    let app = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let stop = shutdown.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        stop.cancelled().await;
    });
    let server = server.into_future();
    tokio::pin!(server);
    tokio::select! {
        res = &mut server => res,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(drain).await;
        } => {
            tracing::warn!(?drain, "drain deadline passed; closing remaining connections");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    #[tokio::test]
    async fn stops_when_token_fires() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            Router::new().route("/", get(|| async { "ok" })),
            token.clone(),
            DEFAULT_DRAIN,
        ));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = String::new();
        stream.read_to_string(&mut buf).await.unwrap();
        assert!(buf.starts_with("HTTP/1.1 200"), "{buf}");
        token.cancel();
        task.await.unwrap().unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}

/// Serves `router` with one single-threaded runtime per worker thread (thread per core,
/// as nginx and Envoy do): this runtime accepts, and each accepted connection is handed
/// to one worker, round-robin, where it lives until it closes. A request, its upstream
/// calls and their connection tasks then all run on one thread, with no cross-thread
/// wake-ups on the hot path.
///
/// Handlers get `ConnectInfo<SocketAddr>` as with [`serve`]. When `shutdown` fires,
/// accepting stops, every worker stops its connections gracefully (idle ones close at
/// once, in-flight requests finish) and gives up after `drain`.
pub async fn serve_per_core(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    drain: Duration,
    workers: std::num::NonZeroUsize,
) -> std::io::Result<()> {
    use axum::extract::ConnectInfo;
    use tower::ServiceExt as _;

    let per_connection = move |peer: std::net::SocketAddr| {
        let router = router.clone();
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let mut req = req.map(axum::body::Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(req)
        })
    };
    serve_per_core_with(listener, per_connection, shutdown, drain, workers).await
}

/// [`serve_per_core`] with any hyper service instead of an axum router: `per_connection`
/// makes the service of one accepted connection from its peer address (called on the
/// worker thread that serves it; each worker has its own clone of `per_connection`, so
/// state it clones per worker stays with that worker). For a front that answers its
/// hottest requests itself and passes the rest to a router, without the router's cost
/// on the hot path.
pub async fn serve_per_core_with<M, S, B>(
    listener: TcpListener,
    per_connection: M,
    shutdown: CancellationToken,
    drain: Duration,
    workers: std::num::NonZeroUsize,
) -> std::io::Result<()>
where
    M: Fn(std::net::SocketAddr) -> S + Clone + Send + 'static,
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let per_connection = move |accepted: Accepted| {
        let service = per_connection(accepted.peer);
        let io = hyper_util::rt::TokioIo::new(accepted.stream);
        accepted.handoff.serve(io, service)
    };
    serve_per_core_conns(listener, per_connection, shutdown, drain, workers).await
}

/// A response body hyper can write on a worker thread.
pub trait ResponseBody:
    hyper::body::Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + 'static
{
}

impl<T> ResponseBody for T where
    T: hyper::body::Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static
{
}

/// A hyper service that can serve a connection on a worker thread, answering with
/// bodies `B`.
pub trait ConnectionService<B: ResponseBody>:
    hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = hyper::Response<B>,
        Future: Send + 'static,
        Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    > + Send
    + 'static
{
}

impl<S, B: ResponseBody> ConnectionService<B> for S where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
            Future: Send + 'static,
            Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        > + Send
        + 'static
{
}

/// One accepted connection of [`serve_per_core_conns`], on the worker thread that
/// serves it.
#[derive(Debug)]
pub struct Accepted {
    /// The connection (`TCP_NODELAY` set).
    pub stream: tokio::net::TcpStream,
    /// Its peer's address.
    pub peer: std::net::SocketAddr,
    /// Fires when the server starts stopping: a connection's own loop then finishes the
    /// request in flight and closes instead of reading another.
    pub stopping: CancellationToken,
    /// Where the connection goes to be served by hyper instead, for the rest of its
    /// life. Held until the connection ends, so that a stopping server waits for it.
    pub handoff: Handoff,
}

/// Serving the rest of a connection with hyper (HTTP/1.1 with upgrades, or HTTP/2),
/// stopped gracefully with the server. Until it is used or dropped, the server's drain
/// waits for the connection holding it.
#[derive(Debug)]
pub struct Handoff {
    watcher: hyper_util::server::graceful::Watcher,
}

impl Handoff {
    /// Serves `io` with `service` until the connection ends or the server stops (idle
    /// at once, in flight once the response is out). Bytes already read from the
    /// connection go in front of `io` (see [`Prefixed`]).
    pub async fn serve<I, S, B>(self, io: I, service: S)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: ConnectionService<B>,
        B: ResponseBody,
    {
        let builder =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        let conn = builder
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        if let Err(e) = self.watcher.watch(conn).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// A connection with bytes already read from it put back in front: a connection's own
/// loop that read a request it does not serve hands the connection on as this.
#[derive(Debug)]
pub struct Prefixed<T> {
    pre: bytes::Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    /// `inner`, whose reads give `pre` first.
    pub fn new(pre: bytes::Bytes, inner: T) -> Self {
        Self { pre, inner }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            let taken = self.pre.split_to(n);
            buf.put_slice(&taken);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The thread-per-core server underneath [`serve_per_core`] and
/// [`serve_per_core_with`], for a server that reads its connections itself:
/// `per_connection` gets each accepted connection (on the worker thread that serves
/// it, as [`Accepted`]) and returns the future that serves it, which may hand the
/// connection to hyper ([`Handoff`]). When `shutdown` fires, accepting stops, hyper's
/// connections stop gracefully, and each worker waits up to `drain` for all of its
/// connections (every [`Handoff`] dropped) before dropping the rest.
pub async fn serve_per_core_conns<M, F>(
    listener: TcpListener,
    per_connection: M,
    shutdown: CancellationToken,
    drain: Duration,
    workers: std::num::NonZeroUsize,
) -> std::io::Result<()>
where
    M: Fn(Accepted) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    // A connection on its way from the acceptor to a worker.
    type Passed = (std::net::TcpStream, std::net::SocketAddr);
    let mut senders = Vec::with_capacity(workers.get());
    let mut threads = Vec::with_capacity(workers.get());
    for i in 0..workers.get() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Passed>();
        let per_connection = per_connection.clone();
        let shutdown = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(format!("http-worker-{i}"))
            .spawn(move || -> std::io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(worker(rx, per_connection, shutdown, drain));
                Ok(())
            })?;
        senders.push(tx);
        threads.push(thread);
    }

    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot hand a connection over");
                        continue;
                    }
                };
                if let Some(tx) = senders.get(next) {
                    // A worker only goes away at shutdown; a send error then drops the
                    // connection, which is what shutdown does anyway.
                    let _ = tx.send((stream, peer));
                }
                next = (next + 1) % senders.len();
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    drop(listener);
    drop(senders);
    tokio::task::spawn_blocking(move || {
        for t in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "worker runtime failed"),
                Err(_) => tracing::error!("worker thread panicked"),
            }
        }
    })
    .await
    .map_err(std::io::Error::other)
}

async fn worker<M, F>(
    mut connections: tokio::sync::mpsc::UnboundedReceiver<(
        std::net::TcpStream,
        std::net::SocketAddr,
    )>,
    per_connection: M,
    shutdown: CancellationToken,
    drain: Duration,
) where
    M: Fn(Accepted) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            next = connections.recv() => match next {
                Some(c) => c,
                None => break,
            },
            () = shutdown.cancelled() => break,
        };
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot adopt a connection");
                continue;
            }
        };
        tokio::spawn(per_connection(Accepted {
            stream,
            peer,
            stopping: shutdown.clone(),
            handoff: Handoff {
                watcher: graceful.watcher(),
            },
        }));
    }
    // Signals hyper's connections, then waits for every watcher: hyper's connections
    // and the connections still in their own loops (which hold their `Handoff`).
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(drain) => {
            tracing::warn!(?drain, "drain deadline passed; closing remaining connections");
        }
    }
}

#[cfg(test)]
mod per_core_tests {
    use super::*;
    use axum::extract::ConnectInfo;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get_once(addr: std::net::SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = String::new();
        stream.read_to_string(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn serves_with_peer_info_then_stops() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let router = Router::new().route(
            "/",
            get(
                |ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>| async move {
                    format!("peer={}", peer.ip())
                },
            ),
        );
        let task = tokio::spawn(serve_per_core(
            listener,
            router,
            token.clone(),
            DEFAULT_DRAIN,
            std::num::NonZeroUsize::new(2).unwrap(),
        ));
        for _ in 0..4 {
            let reply = get_once(addr).await;
            assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
            assert!(reply.ends_with("peer=127.0.0.1"), "{reply}");
        }
        token.cancel();
        task.await.unwrap().unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
