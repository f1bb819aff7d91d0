//! `spawn_registration` against real registry servers on loopback: it registers, it
//! fills a restarted registry back up within about one heartbeat interval, and its
//! shutdown deregisters. Real time, bounded to a few seconds.

#![expect(clippy::unwrap_used, reason = "helpers of a test fail it by panicking")]

use std::net::SocketAddr;
use std::time::Duration;

use breakwater_registry::client::{RegistryClient, spawn_registration};
use breakwater_registry::server;
use breakwater_registry::wire::RegisterRequest;
use breakwater_runtime::CancellationToken;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

/// A registry on `addr`, reusing the address so a restart can take the same port.
fn start_registry(addr: SocketAddr) -> (CancellationToken, JoinHandle<std::io::Result<()>>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    let listener: TcpListener = socket.listen(128).unwrap();
    let token = CancellationToken::new();
    let task = tokio::spawn(server::run(listener, token.clone()));
    (token, task)
}

/// Polls until the registry lists `n` instances of `name`, for at most `within`.
async fn wait_for(client: &RegistryClient, name: &str, n: usize, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if client
            .services(name)
            .await
            .is_ok_and(|list| list.len() == n)
        {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn request(port: u16) -> RegisterRequest {
    let mut req = RegisterRequest::new("user-service", port);
    req.heartbeat_interval = Some(1);
    req.host = Some("127.0.0.1".into());
    req
}

#[tokio::test]
async fn reregisters_after_restart_and_deregisters_on_shutdown() {
    let addr: SocketAddr = {
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        probe.local_addr().unwrap()
    };
    let (stop_first, first) = start_registry(addr);
    let client = RegistryClient::new(format!("http://{addr}"));
    let shutdown = CancellationToken::new();
    let task = spawn_registration(client.clone(), request(4100), shutdown.clone());

    assert!(
        wait_for(&client, "user-service", 1, Duration::from_secs(2)).await,
        "registered"
    );

    // Restart: the new registry starts empty and must be filled by the heartbeat.
    stop_first.cancel();
    first.await.unwrap().unwrap();
    let restarted_at = breakwater_runtime::clock::now_millis();
    let (stop_second, second) = start_registry(addr);
    assert!(
        wait_for(&client, "user-service", 1, Duration::from_millis(2500)).await,
        "re-registered within about one interval"
    );
    let list = client.services("user-service").await.unwrap();
    assert_eq!(list[0].id, "user-service-127.0.0.1-4100");
    assert_eq!(list[0].heartbeat_interval, 1);
    assert!(
        list[0].registered_at >= restarted_at,
        "registered in the new registry"
    );

    // Shutdown deregisters before the task ends.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        client.services("user-service").await.unwrap().is_empty(),
        "deregistered"
    );

    stop_second.cancel();
    second.await.unwrap().unwrap();
}

#[tokio::test]
async fn registers_once_the_registry_comes_up() {
    let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let client = RegistryClient::new(format!("http://{addr}"));
    let shutdown = CancellationToken::new();
    let task = spawn_registration(client.clone(), request(4101), shutdown.clone());

    // Let a few tries fail first, so the backoff path is what registers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!client.connected());
    let (stop, registry) = start_registry(addr);
    assert!(
        wait_for(&client, "user-service", 1, Duration::from_secs(3)).await,
        "registered"
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .unwrap()
        .unwrap();
    stop.cancel();
    registry.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_ends_the_task_promptly_when_the_registry_is_down() {
    let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let shutdown = CancellationToken::new();
    let task = spawn_registration(
        RegistryClient::new(format!("http://{addr}")),
        request(4102),
        shutdown.clone(),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    shutdown.cancel();
    // The deregistration is bounded by 1 s; a refused connection ends it sooner.
    tokio::time::timeout(Duration::from_millis(1500), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_deregisters_only_its_own_instance() {
    let addr: SocketAddr = {
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        probe.local_addr().unwrap()
    };
    let (stop, registry) = start_registry(addr);
    let client = RegistryClient::new(format!("http://{addr}"));
    // Another instance of the service on the same port, on another host.
    let mut other = RegisterRequest::new("user-service", 4103);
    other.host = Some("10.0.0.9".into());
    client.register(&other).await.unwrap();

    // The host is left to the registry (the caller's address).
    let mut own = request(4103);
    own.host = None;
    let shutdown = CancellationToken::new();
    let task = spawn_registration(client.clone(), own, shutdown.clone());
    assert!(wait_for(&client, "user-service", 2, Duration::from_secs(2)).await);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .unwrap()
        .unwrap();
    let left = client.services("user-service").await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].host, "10.0.0.9");

    stop.cancel();
    registry.await.unwrap().unwrap();
}
