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
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Handoff = (std::net::TcpStream, std::net::SocketAddr);
    let mut senders = Vec::with_capacity(workers.get());
    let mut threads = Vec::with_capacity(workers.get());
    for i in 0..workers.get() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Handoff>();
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

async fn worker<M, S, B>(
    mut connections: tokio::sync::mpsc::UnboundedReceiver<(
        std::net::TcpStream,
        std::net::SocketAddr,
    )>,
    per_connection: M,
    shutdown: CancellationToken,
    drain: Duration,
) where
    M: Fn(std::net::SocketAddr) -> S,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
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
        let service = per_connection(peer);
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
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
