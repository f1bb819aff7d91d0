//! Running one users or orders instance as a process part: open storage, serve, stay
//! registered, and stop in order.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use breakwater_registry::client::{CachePolicy, Discovery, RegistryClient, spawn_registration};
use breakwater_registry::wire::RegisterRequest;
use breakwater_runtime::CancellationToken;
use breakwater_runtime::serve::{DEFAULT_DRAIN, serve};
use serde_json::{Map, Value};
use tokio::net::TcpListener;

use crate::orders::{self, OrdersState};
use crate::storage::{SqliteStore, StorageError};
use crate::users::{self, UsersState};

/// The database file inside [`ServiceConfig::data_dir`], shared by users and orders.
pub const DATABASE_FILE: &str = "breakwater.db";

/// How long connecting to a users instance may take; the whole call has its own limit.
const USERS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Which service an instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    /// "user-service".
    Users,
    /// "order-service".
    Orders,
}

impl ServiceKind {
    /// The name the instance registers under.
    pub fn service_name(self) -> &'static str {
        match self {
            Self::Users => users::SERVICE_NAME,
            Self::Orders => orders::SERVICE_NAME,
        }
    }
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.service_name())
    }
}

/// Accepts `users`/`user-service` and `orders`/`order-service`.
impl FromStr for ServiceKind {
    type Err = UnknownServiceKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "users" | "user-service" => Ok(Self::Users),
            "orders" | "order-service" => Ok(Self::Orders),
            other => Err(UnknownServiceKind(other.to_owned())),
        }
    }
}

/// A service name that is neither users nor orders.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown service {0:?} (expected users or orders)")]
pub struct UnknownServiceKind(pub String);

/// Where an instance is reachable and where it keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The port advertised to the registry (and used in the instance id).
    pub port: u16,
    /// The host advertised to the registry; `None` lets the registry use the caller's
    /// address.
    pub host: Option<String>,
    /// The registry's base URL, e.g. `http://127.0.0.1:3000`.
    pub registry_url: String,
    /// Directory holding [`DATABASE_FILE`]; created if missing.
    pub data_dir: PathBuf,
    /// Seconds between heartbeats (the registry expires the instance after 1.5x).
    pub heartbeat_interval_secs: u64,
}

/// Why an instance could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened or prepared.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The HTTP client for calls to other services could not be built.
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    /// Serving failed.
    #[error("server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// The server task panicked or was aborted.
    #[error("server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs one instance of `kind` on `listener` until `shutdown` fires: opens
/// `data_dir/breakwater.db`, serves, registers once serving (heartbeating meanwhile), and
/// on shutdown drains requests and deregisters before returning.
pub async fn run(
    kind: ServiceKind,
    listener: TcpListener,
    config: ServiceConfig,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    let service = kind.service_name();
    let instance = format!("{service}-{}", config.port);
    let port = config.port;

    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .map_err(|source| ServiceError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
    let store = SqliteStore::open(&config.data_dir.join(DATABASE_FILE)).await?;
    let registry = RegistryClient::new(config.registry_url.clone());

    let router = match kind {
        ServiceKind::Users => users::app(UsersState {
            store: store.clone(),
            instance: instance.clone(),
            port,
        }),
        ServiceKind::Orders => {
            let http = reqwest::Client::builder()
                // Calls between services stay inside the system; a proxy taken from the
                // environment would only add a hop that may not reach them.
                .no_proxy()
                .connect_timeout(USERS_CONNECT_TIMEOUT)
                .build()?;
            orders::app(OrdersState {
                store: store.clone(),
                instance: instance.clone(),
                port,
                users: Discovery::new(registry.clone(), CachePolicy::default()),
                http,
            })
        }
    };

    let local = listener.local_addr().ok();
    tracing::info!(service, %instance, port, ?local, registry = %config.registry_url, "service starting");
    let server = tokio::spawn(serve(listener, router, shutdown.clone(), DEFAULT_DRAIN));

    // A child token so the registration also ends when the server stops on its own.
    let registration_stop = shutdown.child_token();
    let registration = spawn_registration(
        registry,
        register_request(kind, &instance, &config),
        registration_stop.clone(),
    );

    let served = server.await;
    registration_stop.cancel();
    if let Err(error) = registration.await {
        tracing::warn!(service, %instance, %error, "registration task failed");
    }
    store.close().await;
    tracing::info!(service, %instance, port, "service stopped");
    served?.map_err(ServiceError::Serve)
}

fn register_request(kind: ServiceKind, instance: &str, config: &ServiceConfig) -> RegisterRequest {
    let mut metadata = Map::new();
    metadata.insert("instance".into(), Value::from(instance));
    metadata.insert("version".into(), Value::from(env!("CARGO_PKG_VERSION")));
    RegisterRequest {
        name: kind.service_name().to_owned(),
        port: config.port,
        heartbeat_interval: Some(config.heartbeat_interval_secs),
        host: config.host.clone(),
        metadata: Some(metadata),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fixtures::{FakeRegistry, RegistryEvent, TempDir};
    use tokio::sync::mpsc::UnboundedReceiver;

    const WAIT: Duration = Duration::from_secs(10);

    async fn next_event(events: &mut UnboundedReceiver<RegistryEvent>) -> RegistryEvent {
        tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap()
    }

    async fn start(
        kind: ServiceKind,
        registry_url: &str,
        data_dir: &std::path::Path,
        shutdown: &CancellationToken,
    ) -> (u16, tokio::task::JoinHandle<Result<(), ServiceError>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = ServiceConfig {
            port,
            host: Some("127.0.0.1".into()),
            registry_url: registry_url.to_owned(),
            data_dir: data_dir.to_path_buf(),
            heartbeat_interval_secs: 30,
        };
        (
            port,
            tokio::spawn(run(kind, listener, config, shutdown.clone())),
        )
    }

    #[tokio::test]
    async fn instances_register_serve_each_other_and_deregister() {
        let dir = TempDir::new("run");
        // A data dir that does not exist yet: run creates it.
        let data_dir = dir.path().join("data");
        let (registry_url, mut events) = FakeRegistry::start(vec![]).await;
        let shutdown = CancellationToken::new();

        let (users_port, users) =
            start(ServiceKind::Users, &registry_url, &data_dir, &shutdown).await;
        assert_eq!(
            next_event(&mut events).await,
            RegistryEvent::Registered {
                name: "user-service".into(),
                port: users_port
            }
        );
        let (orders_port, orders) =
            start(ServiceKind::Orders, &registry_url, &data_dir, &shutdown).await;
        assert_eq!(
            next_event(&mut events).await,
            RegistryEvent::Registered {
                name: "order-service".into(),
                port: orders_port
            }
        );
        assert!(data_dir.join(DATABASE_FILE).exists());

        let http = reqwest::Client::new();
        let health: Value = http
            .get(format!("http://127.0.0.1:{users_port}/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(health["instance"], format!("user-service-{users_port}"));

        // The orders instance finds the users instance through the registry.
        let created = http
            .post(format!("http://127.0.0.1:{orders_port}/orders"))
            .json(&serde_json::json!({"userId": 2, "products": ["Lamp"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), reqwest::StatusCode::CREATED);
        let order: Value = created.json().await.unwrap();
        assert_eq!(order["userId"], 2);

        shutdown.cancel();
        users.await.unwrap().unwrap();
        orders.await.unwrap().unwrap();
        let mut gone = vec![next_event(&mut events).await, next_event(&mut events).await];
        gone.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            gone,
            vec![
                RegistryEvent::Deregistered {
                    name: "order-service".into(),
                    port: orders_port
                },
                RegistryEvent::Deregistered {
                    name: "user-service".into(),
                    port: users_port
                },
            ]
        );
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", users_port))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn an_unusable_data_dir_is_reported() {
        let dir = TempDir::new("bad-data-dir");
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = ServiceConfig {
            port: 1,
            host: None,
            registry_url: "http://127.0.0.1:1".into(),
            data_dir: file.join("sub"),
            heartbeat_interval_secs: 30,
        };
        let err = run(
            ServiceKind::Users,
            listener,
            config,
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ServiceError::DataDir { .. }), "{err}");
    }

    #[test]
    fn kinds_parse_and_name_themselves() {
        assert_eq!("users".parse::<ServiceKind>(), Ok(ServiceKind::Users));
        assert_eq!(
            "order-service".parse::<ServiceKind>(),
            Ok(ServiceKind::Orders)
        );
        assert!("data".parse::<ServiceKind>().is_err());
        assert_eq!(ServiceKind::Users.to_string(), "user-service");
        assert_eq!(ServiceKind::Orders.service_name(), "order-service");
    }
}
