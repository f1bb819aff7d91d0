//! Serving an axum router with a graceful drain.

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
