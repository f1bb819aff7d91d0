//! Client connections as `run` serves them: the gateway's own HTTP/1.1 loop answers
//! plain GETs on proxied routes, and hands the connection to hyper at the first
//! request it does not serve. Spoken to over raw TCP, so that what is on the wire
//! (framing, keep-alive, pipelining, closing) is what is checked.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failure should fail the test loudly"
)]

mod fixture;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use breakwater_gateway::{GatewayConfig, run};
use breakwater_runtime::CancellationToken;
use fixture::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const USERS: &str = "user-service";

struct Gateway {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), breakwater_gateway::RunError>>,
    _registry: FakeRegistry,
    _upstream: Spawned,
}

impl Gateway {
    /// The gateway (embedded config) with `upstream` as the one user-service instance.
    async fn start(upstream: Spawned) -> Self {
        let registry = FakeRegistry::start().await;
        registry.set(USERS, vec![instance(USERS, upstream.addr)]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            listener,
            GatewayConfig::new(0, &registry.url),
            shutdown.clone(),
        ));
        wait_until_up(addr).await;
        Self {
            addr,
            shutdown,
            task,
            _registry: registry,
            _upstream: upstream,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap();
        assert!(result.is_ok(), "{result:?}");
    }
}

async fn wait_until_up(addr: SocketAddr) {
    for _ in 0..200 {
        if let Ok(res) = reqwest::get(format!("http://{addr}/health")).await
            && res.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the gateway did not come up");
}

/// One response read off a raw connection.
struct Wire {
    status: u16,
    /// Field lines, names lower-cased, in order.
    fields: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = String::from_utf8_lossy(&self.body);
        let cut: String = body.chars().take(300).collect();
        f.debug_struct("Wire")
            .field("status", &self.status)
            .field("fields", &self.fields)
            .field("body", &cut)
            .finish()
    }
}

impl Wire {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Reads one response (Content-Length or chunked) from `stream`, keeping what follows
/// it in `pending`.
async fn read_response(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Wire {
    let head_end = loop {
        if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        fill(stream, pending).await;
    };
    let head = String::from_utf8(pending.drain(..head_end).collect()).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status = status_line[9..12].parse().unwrap();
    let fields: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let body = if let Some(len) = field("content-length") {
        let len: usize = len.parse().unwrap();
        while pending.len() < len {
            fill(stream, pending).await;
        }
        pending.drain(..len).collect()
    } else if field("transfer-encoding").as_deref() == Some("chunked") {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(at) = pending.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                fill(stream, pending).await;
            };
            let size_line = String::from_utf8(pending.drain(..line_end + 2).collect()).unwrap();
            let size = usize::from_str_radix(size_line.trim(), 16).unwrap();
            while pending.len() < size + 2 {
                fill(stream, pending).await;
            }
            body.extend(pending.drain(..size));
            assert_eq!(pending.drain(..2).collect::<Vec<_>>(), b"\r\n");
            if size == 0 {
                break body;
            }
        }
    } else {
        Vec::new()
    };
    Wire {
        status,
        fields,
        body,
    }
}

async fn fill(stream: &mut TcpStream, pending: &mut Vec<u8>) {
    let mut chunk = [0_u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
        .await
        .expect("no response within 10 s")
        .unwrap();
    assert!(n > 0, "the connection closed mid-response");
    pending.extend_from_slice(&chunk[..n]);
}

/// Whether the server closed `stream` (within 5 s), with nothing more sent.
async fn closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0_u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn pipelined_gets_are_answered_in_order_on_one_connection() {
    let gateway = Gateway::start(echo_service("users-a").await).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let mut requests = Vec::new();
    for i in 0..3 {
        requests.extend_from_slice(
            format!(
                "GET /users/{i}?n={i} HTTP/1.1\r\nHost: gw.test\r\nX-Request-Id: req-{i}\r\n\
                 Connection: keep-alive, x-private\r\nX-Private: secret\r\n\r\n"
            )
            .as_bytes(),
        );
    }
    // All three in one write: the loop must keep what follows each head.
    stream.write_all(&requests).await.unwrap();
    let mut pending = Vec::new();
    for i in 0..3 {
        let res = read_response(&mut stream, &mut pending).await;
        assert_eq!(res.status, 200, "{res:?}");
        let json = res.json();
        assert_eq!(json["path"], format!("/users/{i}"));
        assert_eq!(json["query"], format!("n={i}"));
        assert_eq!(json["headers"]["x-request-id"], format!("req-{i}"));
        assert_eq!(json["headers"]["x-forwarded-host"], "gw.test");
        assert!(json["headers"].get("x-private").is_none(), "{json}");
        assert_eq!(res.field("x-request-id"), Some(format!("req-{i}").as_str()));
        assert_eq!(res.field("x-end-to-end"), Some("kept"));
        assert!(res.field("date").is_some(), "{res:?}");
        for gone in ECHO_HOP_BY_HOP {
            assert!(
                res.field(gone).is_none(),
                "{gone} reached the client: {res:?}"
            );
        }
    }
    assert!(pending.is_empty());
    gateway.stop().await;
}

#[tokio::test]
async fn the_first_request_it_does_not_serve_hands_the_connection_to_hyper() {
    let gateway = Gateway::start(echo_service("users-a").await).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let mut pending = Vec::new();

    stream
        .write_all(b"GET /users/1 HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut stream, &mut pending).await;
    assert_eq!(first.status, 200);

    // A body: hyper's from here on, on the same connection.
    stream
        .write_all(
            b"POST /users HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n\
              Content-Length: 13\r\n\r\n{\"name\":\"A\"}\n",
        )
        .await
        .unwrap();
    let created = read_response(&mut stream, &mut pending).await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.json()["body"], "{\"name\":\"A\"}\n");

    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let health = read_response(&mut stream, &mut pending).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "healthy");

    stream
        .write_all(b"GET /users/2 HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let again = read_response(&mut stream, &mut pending).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["path"], "/users/2");
    gateway.stop().await;
}

#[tokio::test]
async fn connection_close_is_honoured_and_bad_heads_get_400_or_431() {
    let gateway = Gateway::start(echo_service("users-a").await).await;

    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(b"GET /users/1 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut pending = Vec::new();
    let res = read_response(&mut stream, &mut pending).await;
    assert_eq!(res.status, 200);
    assert_eq!(res.field("connection"), Some("close"));
    assert!(closed(&mut stream).await);

    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(b"GET /users/1 HTTP/1.1\r\nHost gw\r\n\r\n")
        .await
        .unwrap();
    let res = read_response(&mut stream, &mut Vec::new()).await;
    assert_eq!(res.status, 400, "{res:?}");

    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let huge = format!(
        "GET /users/1 HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 << 10)
    );
    // The server may answer and close before it has read all of it.
    let _ = stream.write_all(huge.as_bytes()).await;
    let res = read_response(&mut stream, &mut Vec::new()).await;
    assert_eq!(res.status, 431, "{res:?}");
    gateway.stop().await;
}

#[tokio::test]
async fn a_streamed_upstream_body_goes_out_chunked() {
    let parts = ["first part, ", "second part, ", "last part"];
    let router = Router::new().fallback(move || async move {
        let stream = async_stream(parts);
        axum::response::Response::new(Body::from_stream(stream))
    });
    let gateway = Gateway::start(spawn(router).await).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let mut pending = Vec::new();
    for _ in 0..2 {
        stream
            .write_all(b"GET /users/stream HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .unwrap();
        let res = read_response(&mut stream, &mut pending).await;
        assert_eq!(res.status, 200);
        assert_eq!(res.field("transfer-encoding"), Some("chunked"));
        assert_eq!(res.body, parts.concat().as_bytes());
    }
    gateway.stop().await;
}

/// `parts` as a body stream, one part every 20 ms.
fn async_stream(
    parts: [&'static str; 3],
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    futures_util::stream::unfold(0, move |i| async move {
        let part = parts.get(i)?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        Some((Ok(bytes::Bytes::from_static(part.as_bytes())), i + 1))
    })
}

#[tokio::test]
async fn stopping_closes_waiting_connections_and_finishes_the_one_in_flight() {
    let router = Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        "slow answer"
    });
    let gateway = Gateway::start(spawn(router).await).await;
    let mut idle = TcpStream::connect(gateway.addr).await.unwrap();
    let mut pending = Vec::new();
    idle.write_all(b"GET /users/1 HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut idle, &mut pending).await.status, 200);

    // Half a head: closed at the stop too, not held until the drain's deadline.
    let mut partial = TcpStream::connect(gateway.addr).await.unwrap();
    partial
        .write_all(b"GET /users/3 HTTP/1.1\r\nHost: gw\r\n")
        .await
        .unwrap();

    let mut busy = TcpStream::connect(gateway.addr).await.unwrap();
    busy.write_all(b"GET /users/2 HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = gateway.addr;
    let stopping = tokio::spawn(gateway.stop());

    assert!(closed(&mut idle).await, "the idle connection stayed open");
    assert!(
        closed(&mut partial).await,
        "the half-read connection stayed open"
    );
    let res = read_response(&mut busy, &mut Vec::new()).await;
    assert_eq!(res.status, 200);
    assert_eq!(res.body, b"slow answer");
    assert!(
        closed(&mut busy).await,
        "the drained connection stayed open"
    );
    stopping.await.unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn upstream_fields_pass_as_sent_and_the_gateways_replace_theirs() {
    let router = Router::new().fallback(|| async {
        axum::response::Response::builder()
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .header("x-request-id", "the-upstream-id")
            .header("x-upstream", "kept")
            .body(Body::from("hello"))
            .unwrap()
    });
    let gateway = Gateway::start(spawn(router).await).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(b"GET /users/1 HTTP/1.1\r\nHost: gw\r\nX-Request-Id: client-id\r\n\r\n")
        .await
        .unwrap();
    let res = read_response(&mut stream, &mut Vec::new()).await;
    assert_eq!(res.status, 200);
    assert_eq!(res.body, b"hello");
    let all = |name: &str| -> Vec<&str> {
        res.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(all("set-cookie"), ["a=1", "b=2"]);
    assert_eq!(all("x-request-id"), ["client-id"]);
    assert_eq!(all("x-upstream"), ["kept"]);
    assert_eq!(all("content-length"), ["5"]);
    assert_eq!(all("date").len(), 1, "{res:?}");
    gateway.stop().await;
}
