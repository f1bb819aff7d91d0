//! `Discovery` against a small fake registry on loopback that counts its calls and
//! answers whatever list the test sets. Cache windows are either very long or zero, so
//! the outcomes do not depend on how fast the machine is.

#![expect(clippy::unwrap_used, reason = "helpers of a test fail it by panicking")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use breakwater_registry::client::{CachePolicy, Discovery, DiscoveryError, RegistryClient};
use breakwater_registry::wire::{Instance, ServiceList};
use breakwater_runtime::CancellationToken;
use breakwater_runtime::serve::serve;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

#[derive(Clone, Default)]
struct Fake {
    calls: Arc<AtomicUsize>,
    answer: Arc<Mutex<Vec<Instance>>>,
    /// When set, each answer waits for a permit, so a refresh can be held in flight.
    gate: Option<Arc<Semaphore>>,
}

impl Fake {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn answer(&self, ports: &[u16]) {
        *self.answer.lock().unwrap() = ports.iter().map(|p| instance(*p)).collect();
    }
}

async fn list(State(fake): State<Fake>, Path(_name): Path<String>) -> axum::Json<ServiceList> {
    fake.calls.fetch_add(1, Ordering::SeqCst);
    if let Some(gate) = &fake.gate {
        gate.acquire().await.unwrap().forget();
    }
    let services = fake.answer.lock().unwrap().clone();
    axum::Json(ServiceList { services })
}

struct Running {
    client: RegistryClient,
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn start(fake: &Fake) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/services/{name}", get(list))
        .with_state(fake.clone());
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(listener, app, stop.clone(), Duration::from_secs(1)));
    Running {
        client: RegistryClient::new(format!("http://{addr}")),
        stop,
        task,
    }
}

fn instance(port: u16) -> Instance {
    Instance {
        id: format!("svc-127.0.0.1-{port}"),
        name: "svc".into(),
        host: "127.0.0.1".into(),
        port,
        heartbeat_interval: 30,
        registered_at: 1,
        last_heartbeat: 1,
        status: "healthy".into(),
        metadata: serde_json::Map::new(),
    }
}

fn ports(list: &[Instance]) -> Vec<u16> {
    list.iter().map(|i| i.port).collect()
}

const HOUR: Duration = Duration::from_secs(3600);

/// Every resolve goes to the registry.
const ALWAYS_FETCH: CachePolicy = CachePolicy {
    fresh_for: Duration::ZERO,
    stale_for: Duration::ZERO,
};

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn fresh_entries_are_served_without_calling_the_registry() {
    let fake = Fake::default();
    fake.answer(&[4000, 4001]);
    let reg = start(&fake).await;
    let d = Discovery::new(
        reg.client.clone(),
        CachePolicy {
            fresh_for: HOUR,
            stale_for: HOUR,
        },
    );
    assert_eq!(ports(&d.resolve("svc").await.unwrap()), [4000, 4001]);
    fake.answer(&[4002]);
    for _ in 0..5 {
        assert_eq!(ports(&d.resolve("svc").await.unwrap()), [4000, 4001]);
    }
    assert_eq!(fake.calls(), 1);
    assert!(d.connected());
    let info = d.cache_info();
    let svc = &info["svc"];
    assert!(svc.cached);
    assert_eq!(svc.services, 2);
    assert!(svc.ttl > 3500 && svc.ttl <= 3600, "{}", svc.ttl);
    reg.stop().await;
}

#[tokio::test]
async fn stale_entries_are_served_and_refreshed_once_in_the_background() {
    let gate = Arc::new(Semaphore::new(1)); // the first fetch goes straight through
    let fake = Fake {
        gate: Some(Arc::clone(&gate)),
        ..Fake::default()
    };
    fake.answer(&[4000]);
    let reg = start(&fake).await;
    let d = Discovery::new(
        reg.client.clone(),
        CachePolicy {
            fresh_for: Duration::ZERO,
            stale_for: HOUR,
        },
    );
    assert_eq!(ports(&d.resolve("svc").await.unwrap()), [4000]);
    fake.answer(&[4001]);
    // Guarantees a non-zero age on any clock, so the entry is stale, not fresh.
    tokio::time::sleep(Duration::from_millis(2)).await;

    // While the refresh is held at the fake, every call is served the stale list and
    // no second refresh starts.
    for _ in 0..10 {
        assert_eq!(ports(&d.resolve("svc").await.unwrap()), [4000]);
    }
    wait_until("the refresh reached the registry", || fake.calls() == 2).await;
    assert_eq!(fake.calls(), 2, "one refresh at a time per name");
    assert_eq!(d.cache_info()["svc"].ttl, 0);

    gate.add_permits(100);
    let d2 = d.clone();
    let refreshed = || {
        let d2 = d2.clone();
        async move { ports(&d2.resolve("svc").await.unwrap()) == [4001] }
    };
    for _ in 0..200 {
        if refreshed().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        refreshed().await,
        "the background refresh replaced the list"
    );
    reg.stop().await;
}

#[tokio::test]
async fn registry_down_serves_the_last_good_list() {
    let fake = Fake::default();
    fake.answer(&[4000, 4001]);
    let reg = start(&fake).await;
    let client = reg.client.clone();
    let d = Discovery::new(client, ALWAYS_FETCH);
    assert_eq!(ports(&d.resolve("svc").await.unwrap()), [4000, 4001]);
    assert!(d.connected());
    reg.stop().await;

    assert_eq!(ports(&d.resolve("svc").await.unwrap()), [4000, 4001]);
    assert!(!d.connected());
    // A name never fetched has nothing to fall back on.
    let err = d.resolve("other").await.unwrap_err();
    assert!(
        matches!(err, DiscoveryError::Unavailable { ref name, .. } if name == "other"),
        "{err}"
    );
}

#[tokio::test]
async fn stale_entry_with_registry_down_keeps_serving() {
    let fake = Fake::default();
    fake.answer(&[4000]);
    let reg = start(&fake).await;
    let d = Discovery::new(
        reg.client.clone(),
        CachePolicy {
            fresh_for: Duration::ZERO,
            stale_for: HOUR,
        },
    );
    assert_eq!(ports(&d.resolve("svc").await.unwrap()), [4000]);
    reg.stop().await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    for _ in 0..3 {
        assert_eq!(ports(&d.resolve("svc").await.unwrap()), [4000]);
    }
    // The failed background refresh clears its flag, so later calls try again.
    wait_until("a refresh failed", || !d.connected()).await;
    assert_eq!(ports(&d.resolve("svc").await.unwrap()), [4000]);
}

#[tokio::test]
async fn an_empty_answer_never_replaces_a_non_empty_list() {
    let fake = Fake::default();
    fake.answer(&[4000]);
    let reg = start(&fake).await;
    let d = Discovery::new(reg.client.clone(), ALWAYS_FETCH);
    assert_eq!(ports(&d.resolve("svc").await.unwrap()), [4000]);
    fake.answer(&[]);
    assert_eq!(ports(&d.resolve("svc").await.unwrap()), [4000]);
    assert_eq!(fake.calls(), 2, "the registry was asked");
    assert_eq!(d.cache_info()["svc"].services, 1);
    // A non-empty answer replaces it.
    fake.answer(&[4005]);
    assert_eq!(ports(&d.resolve("svc").await.unwrap()), [4005]);
    reg.stop().await;
}

#[tokio::test]
async fn a_service_that_never_had_instances_is_an_error() {
    let fake = Fake::default();
    let reg = start(&fake).await;
    let d = Discovery::new(reg.client.clone(), ALWAYS_FETCH);
    let err = d.resolve("svc").await.unwrap_err();
    assert!(
        matches!(err, DiscoveryError::NoInstances { ref name } if name == "svc"),
        "{err}"
    );
    assert!(d.connected());
    // Once instances appear they are served.
    fake.answer(&[4000]);
    assert_eq!(ports(&d.resolve("svc").await.unwrap()), [4000]);
    reg.stop().await;
}

#[tokio::test]
async fn nothing_fetched_and_registry_down_is_an_error() {
    let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let d = Discovery::new(
        RegistryClient::new(format!("http://{addr}")),
        CachePolicy::default(),
    );
    let err = d.resolve("user-service").await.unwrap_err();
    assert!(matches!(err, DiscoveryError::Unavailable { .. }), "{err}");
    assert!(!d.connected());
    assert!(d.cache_info().is_empty());
}
