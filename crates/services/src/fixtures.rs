//! Test fixtures: throwaway data directories, a one-call HTTP driver for routers, and
//! a small in-process registry that records what instances tell it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::{get, post};
use breakwater_registry::wire::{
    HeartbeatResponse, Instance, RegisterRequest, RegisterResponse, ServiceList,
};
use breakwater_runtime::clock::now_millis;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::ServiceExt;

use crate::storage::SqliteStore;

/// A fresh directory under the system temp dir, removed (with its contents) on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "breakwater-services-{tag}-{}-{n}-{}",
            std::process::id(),
            now_millis()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    pub(crate) fn db(&self) -> PathBuf {
        self.0.join("breakwater.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A store in its own temp dir; keep the dir alive as long as the store.
pub(crate) async fn temp_store(tag: &str) -> (TempDir, SqliteStore) {
    let dir = TempDir::new(tag);
    let store = SqliteStore::open(&dir.db()).await.unwrap();
    (dir, store)
}

/// Sends one request through `app` and returns the status and the JSON body
/// (`Value::Null` when the body is empty or not JSON).
pub(crate) async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Serves `router` on a fresh 127.0.0.1 port until the test's runtime ends.
pub(crate) async fn spawn_server(router: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// A port on 127.0.0.1 where nothing listens (bound, then released).
pub(crate) async fn dead_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// An instance record as the registry would return it.
pub(crate) fn instance(name: &str, host: &str, port: u16) -> Instance {
    let now = now_millis();
    Instance {
        id: format!("{name}-{host}-{port}"),
        name: name.to_owned(),
        host: host.to_owned(),
        port,
        heartbeat_interval: 30,
        registered_at: now,
        last_heartbeat: now,
        status: "healthy".to_owned(),
        metadata: serde_json::Map::new(),
    }
}

/// What a [`FakeRegistry`] was told, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RegistryEvent {
    Registered { name: String, port: u16 },
    Deregistered { name: String, port: u16 },
}

/// The registry's HTTP API over a map, with every register (first heartbeat included)
/// and deregister reported on a channel, so tests wait for events instead of sleeping.
#[derive(Debug, Clone)]
pub(crate) struct FakeRegistry {
    instances: Arc<Mutex<BTreeMap<String, Vec<Instance>>>>,
    events: mpsc::UnboundedSender<RegistryEvent>,
}

impl FakeRegistry {
    /// Starts a registry holding `instances`; returns its base URL and the event stream.
    pub(crate) async fn start(
        instances: Vec<Instance>,
    ) -> (String, mpsc::UnboundedReceiver<RegistryEvent>) {
        let mut map: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for inst in instances {
            map.entry(inst.name.clone()).or_default().push(inst);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let registry = Self {
            instances: Arc::new(Mutex::new(map)),
            events: tx,
        };
        let router = Router::new()
            .route("/register", post(Self::register))
            .route("/heartbeat", post(Self::heartbeat))
            .route("/services/{name}", get(Self::services))
            .route(
                "/services/{name}/{port}",
                axum::routing::delete(Self::deregister),
            )
            .with_state(registry);
        let addr = spawn_server(router).await;
        (format!("http://{addr}"), rx)
    }

    /// Adds or refreshes an instance; true when it was not there before.
    fn upsert(&self, req: &RegisterRequest) -> bool {
        let host = req.host.clone().unwrap_or_else(|| "127.0.0.1".to_owned());
        let mut inst = instance(&req.name, &host, req.port);
        if let Some(interval) = req.heartbeat_interval {
            inst.heartbeat_interval = interval;
        }
        let mut map = self.instances.lock().unwrap();
        let list = map.entry(req.name.clone()).or_default();
        let known = list
            .iter()
            .position(|i| i.port == req.port && i.host == host);
        match known {
            Some(i) => {
                list[i] = inst;
                false
            }
            None => {
                list.push(inst);
                true
            }
        }
    }

    fn announce(&self, req: &RegisterRequest) {
        let _ = self.events.send(RegistryEvent::Registered {
            name: req.name.clone(),
            port: req.port,
        });
    }

    async fn register(
        State(registry): State<Self>,
        axum::Json(req): axum::Json<RegisterRequest>,
    ) -> axum::Json<RegisterResponse> {
        registry.upsert(&req);
        registry.announce(&req);
        axum::Json(RegisterResponse {
            id: format!("{}-{}", req.name, req.port),
            heartbeat_interval: req.heartbeat_interval.unwrap_or(30),
            registered_at: now_millis(),
        })
    }

    async fn heartbeat(
        State(registry): State<Self>,
        axum::Json(req): axum::Json<RegisterRequest>,
    ) -> axum::Json<HeartbeatResponse> {
        if registry.upsert(&req) {
            registry.announce(&req);
        }
        let interval = req.heartbeat_interval.unwrap_or(30);
        axum::Json(HeartbeatResponse {
            ok: true,
            last_heartbeat: now_millis(),
            next_heartbeat_in: interval * 1000,
        })
    }

    async fn services(
        State(registry): State<Self>,
        axum::extract::Path(name): axum::extract::Path<String>,
    ) -> axum::Json<ServiceList> {
        let services = registry
            .instances
            .lock()
            .unwrap()
            .get(&name)
            .cloned()
            .unwrap_or_default();
        axum::Json(ServiceList { services })
    }

    async fn deregister(
        State(registry): State<Self>,
        axum::extract::Path((name, port)): axum::extract::Path<(String, u16)>,
    ) -> (StatusCode, axum::Json<Value>) {
        let removed = {
            let mut map = registry.instances.lock().unwrap();
            let list = map.entry(name.clone()).or_default();
            let before = list.len();
            list.retain(|i| i.port != port);
            before != list.len()
        };
        if removed {
            let _ = registry
                .events
                .send(RegistryEvent::Deregistered { name, port });
            (
                StatusCode::OK,
                axum::Json(json!({"message": "Service removed successfully"})),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": "Service not found"})),
            )
        }
    }
}

/// What one call of a [`ScriptedUpstream`] does.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    /// Answer like the unstable service's 500.
    Fail,
    /// Answer `{"message":"External service OK"}`.
    Answer,
    /// Never answer (only the caller's deadline ends the call).
    Stall,
    /// Wait until the notify fires, then answer.
    AnswerWhenReleased(Arc<tokio::sync::Notify>),
}

#[derive(Debug)]
struct Script {
    steps: std::collections::VecDeque<Step>,
    then: Step,
    calls: Vec<tokio::time::Instant>,
}

/// An in-process dependency that follows a script and records when it was called.
/// Cheap to clone: clones share the script and the record.
#[derive(Debug, Clone)]
pub(crate) struct ScriptedUpstream(Arc<Mutex<Script>>);

impl ScriptedUpstream {
    /// Does `steps` in order, then `then` forever.
    pub(crate) fn scripted(steps: Vec<Step>, then: Step) -> Self {
        Self(Arc::new(Mutex::new(Script {
            steps: steps.into(),
            then,
            calls: Vec::new(),
        })))
    }

    pub(crate) fn answering() -> Self {
        Self::scripted(vec![], Step::Answer)
    }

    pub(crate) fn failing() -> Self {
        Self::scripted(vec![], Step::Fail)
    }

    pub(crate) fn stalling() -> Self {
        Self::scripted(vec![], Step::Stall)
    }

    pub(crate) fn succeeding_after(failures: usize) -> Self {
        Self::scripted(vec![Step::Fail; failures], Step::Answer)
    }

    /// Calls made so far.
    pub(crate) fn calls(&self) -> usize {
        self.0.lock().unwrap().calls.len()
    }

    /// When each call was made.
    pub(crate) fn call_times(&self) -> Vec<tokio::time::Instant> {
        self.0.lock().unwrap().calls.clone()
    }

    /// Appends steps to the script (after the ones not yet taken).
    pub(crate) fn push(&self, step: Step) {
        self.0.lock().unwrap().steps.push_back(step);
    }
}

impl crate::upstream::Upstream for ScriptedUpstream {
    async fn fetch(
        &self,
        _caller: &breakwater_runtime::observe::Caller,
    ) -> Result<Value, crate::upstream::UpstreamError> {
        let step = {
            let mut script = self.0.lock().unwrap();
            script.calls.push(tokio::time::Instant::now());
            let then = script.then.clone();
            script.steps.pop_front().unwrap_or(then)
        };
        match step {
            Step::Fail => Err(crate::upstream::UpstreamError::Status {
                url: "scripted://data".into(),
                status: 500,
            }),
            Step::Answer => Ok(json!({"message": "External service OK"})),
            Step::Stall => std::future::pending().await,
            Step::AnswerWhenReleased(release) => {
                release.notified().await;
                Ok(json!({"message": "External service OK"}))
            }
        }
    }
}
