//! `run`: the gateway serves on its listener, registers as `api-gateway` with its real
//! port, and deregisters when shutdown starts.

mod fixture;

use std::time::Duration;

use breakwater_gateway::{GatewayConfig, run};
use breakwater_runtime::CancellationToken;
use fixture::*;
use tokio::net::TcpListener;

#[tokio::test]
async fn registers_serves_and_deregisters() {
    let mut registry = FakeRegistry::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = CancellationToken::new();
    let gateway = tokio::spawn(run(
        listener,
        GatewayConfig::new(0, &registry.url),
        shutdown.clone(),
    ));

    assert_eq!(
        registry.next_event().await,
        format!("register api-gateway {port}")
    );

    let health: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{port}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["port"], port);
    assert_eq!(health["instance"], format!("api-gateway-{port}"));
    assert_eq!(health["serviceDiscovery"]["status"], "connected");

    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), gateway)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        registry.next_event().await,
        format!("deregister api-gateway {port}")
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_bad_config_is_refused_before_serving() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = run(
        listener,
        GatewayConfig::new(0, "not a url"),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, breakwater_gateway::RunError::Config(_)),
        "{err:?}"
    );
    assert!(err.to_string().contains("registry_url"), "{err}");
}

#[tokio::test]
async fn works_end_to_end_with_the_real_registry() {
    use breakwater_registry::client::RegistryClient;
    use breakwater_registry::wire::RegisterRequest;

    let stop = CancellationToken::new();
    let registry_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry_url = format!("http://{}", registry_listener.local_addr().unwrap());
    let registry = tokio::spawn(breakwater_registry::server::run(
        registry_listener,
        stop.clone(),
    ));
    let client = RegistryClient::new(&registry_url);

    let users = echo_service("users-real").await;
    let users_reg = RegisterRequest {
        name: "user-service".into(),
        port: users.addr.port(),
        heartbeat_interval: Some(30),
        host: Some("127.0.0.1".into()),
        metadata: None,
    };
    client.register(&users_reg).await.unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = GatewayConfig::new(0, &registry_url);
    config.advertise_host = Some("gateway.internal".into());
    let gateway = tokio::spawn(run(listener, config, stop.child_token()));

    let reply = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/users?via=gateway"))
        .body("{\"name\":\"Ann\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 201);
    let echoed: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(echoed["instance"], "users-real");
    assert_eq!(echoed["query"], "via=gateway");
    assert_eq!(echoed["headers"]["x-forwarded-for"], "127.0.0.1");

    // The gateway registers itself in the background, under its advertised host; ask
    // until it shows up.
    let registered = async {
        loop {
            let listed = client.services("api-gateway").await.unwrap();
            if let Some(me) = listed.iter().find(|i| i.port == port) {
                assert_eq!(me.host, "gateway.internal");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), registered)
        .await
        .unwrap();

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), gateway)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), registry)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
