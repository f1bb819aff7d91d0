//! The instance table, behind the [`InstanceStore`] trait with two implementations:
//!
//! - [`MemoryStore`], one process's table. Every method takes the current time as
//!   arguments (a `tokio::time::Instant` for deadlines, wall-clock milliseconds for the
//!   wire fields), so the expiry logic is tested without a runtime.
//! - [`redis::RedisStore`], a table in Redis shared by several registry replicas, where
//!   Redis's clock decides expiry (leases with `PX = 1.5 x heartbeatInterval`).
//!
//! [`Store`] is the one the server holds: either of them, chosen at start
//! ([`StoreChoice`]).
//!
//! [`changes`]: each store versions every service's set of instances and wakes watchers
//! when it changes (`GET /services/{name}/watch`).
//!
//! An instance is alive while `now - lastHeartbeat <= 1.5 x heartbeatInterval`, that is
//! while `now <= deadline`. Reads skip instances past their deadline even before the
//! reaper has removed them.

pub mod changes;
pub mod redis;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use changes::Changes;

use crate::name::ServiceName;
use crate::wire::Instance;

/// Heartbeat interval used when a registration does not give one, in seconds.
pub const DEFAULT_HEARTBEAT_INTERVAL: u64 = 30;
/// Longest accepted heartbeat interval, in seconds.
pub const MAX_HEARTBEAT_INTERVAL: u64 = 3600;
/// The one status the registry reports: it never lists an instance that is not alive.
pub const HEALTHY: &str = "healthy";

/// A validated registration or heartbeat, as the server hands it to the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// The service.
    pub name: ServiceName,
    /// Normalised host (no `::ffff:` prefix, no brackets).
    pub host: String,
    /// 1..=65535.
    pub port: u16,
    /// Seconds, 1..=3600; `None` keeps the current one on a heartbeat and means
    /// [`DEFAULT_HEARTBEAT_INTERVAL`] for a new instance.
    pub heartbeat_interval: Option<u64>,
    /// `None` keeps the current metadata on a heartbeat (empty for a new instance).
    pub metadata: Option<Map<String, Value>>,
}

impl Registration {
    /// `"<name>-<host>-<port>"`, the instance's identity everywhere.
    pub fn id(&self) -> String {
        instance_id(self.name.as_str(), &self.host, self.port)
    }
}

/// `"<name>-<host>-<port>"`.
pub fn instance_id(name: &str, host: &str, port: u16) -> String {
    format!("{name}-{host}-{port}")
}

/// What [`MemoryStore::register`] and [`MemoryStore::heartbeat`] recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The instance as now stored.
    pub instance: Instance,
    /// The instance was already alive (a heartbeat that renewed it); `false` when this
    /// call registered it anew.
    pub renewed: bool,
    /// Its deadline is now the earliest in the store, so a reaper sleeping until a
    /// later one must wake up and sleep again.
    pub earliest_deadline: bool,
}

/// Why [`MemoryStore::remove`] removed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoveError {
    /// No live instance of the service.
    #[error("Service not found")]
    ServiceNotFound,
    /// The service has live instances, none on that port (and host).
    #[error("Service instance not found")]
    InstanceNotFound,
    /// The shared store could not be asked; nothing was removed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a shared store could not answer. The memory store never fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store's address or settings are unusable.
    #[error("registry store misconfigured: {0}")]
    Config(String),
    /// The store could not be reached or refused the command; nothing was changed.
    #[error("registry store unavailable: {0}")]
    Unavailable(String),
    /// The store holds data this registry cannot read.
    #[error("registry store holds unreadable data: {0}")]
    Corrupt(String),
}

impl From<::redis::RedisError> for StoreError {
    fn from(err: ::redis::RedisError) -> Self {
        Self::Unavailable(err.to_string())
    }
}

/// What the registry server needs from an instance table. `now` is the caller's clock
/// for stores that keep their own deadlines; a shared store uses its server's clock.
pub trait InstanceStore: Send + Sync {
    /// Records a new registration, replacing any instance with the same id.
    fn register(
        &self,
        reg: Registration,
        now: Instant,
        wall_ms: u64,
    ) -> impl Future<Output = Result<Recorded, StoreError>> + Send;

    /// Renews a live instance (keeping `registeredAt`) or registers it anew.
    fn heartbeat(
        &self,
        reg: Registration,
        now: Instant,
        wall_ms: u64,
    ) -> impl Future<Output = Result<Recorded, StoreError>> + Send;

    /// Removes the live instances of `name` on `port` (only the one on `host` when
    /// given) and returns them.
    fn remove(
        &self,
        name: &str,
        port: u16,
        host: Option<&str>,
        now: Instant,
    ) -> impl Future<Output = Result<Vec<Instance>, RemoveError>> + Send;

    /// The live instances of `name`, ordered by id.
    fn list(
        &self,
        name: &str,
        now: Instant,
    ) -> impl Future<Output = Result<Vec<Instance>, StoreError>> + Send;

    /// Every service with at least one live instance.
    fn list_all(
        &self,
        now: Instant,
    ) -> impl Future<Output = Result<BTreeMap<String, Vec<Instance>>, StoreError>> + Send;

    /// Removes and returns the instances that have expired by `now`.
    fn reap_expired(
        &self,
        now: Instant,
    ) -> impl Future<Output = Result<Vec<Instance>, StoreError>> + Send;

    /// When the reaper should next call [`InstanceStore::reap_expired`]; `None` while
    /// nothing can expire.
    fn next_reap(&self, now: Instant) -> Option<Instant>;

    /// The version of `name`'s set of instances: it grows on every registration,
    /// removal and expiry of one of them (renewals leave it). 0 for a name never seen.
    fn version(&self, name: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// A receiver woken after any version may have changed; subscribe before reading
    /// the version to compare against.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

#[derive(Debug)]
struct Record {
    instance: Instance,
    deadline: Instant,
}

#[derive(Debug, Default)]
struct Table {
    /// name -> id -> record; ordered so listings are stable.
    services: BTreeMap<String, BTreeMap<String, Record>>,
    /// (deadline, name, id) of every record, so the earliest deadline and the expired
    /// records are found without scanning the table.
    deadlines: BTreeSet<(Instant, String, String)>,
}

impl Table {
    fn earliest(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _, _)| *at)
    }

    fn alive(&self, name: &str, id: &str, now: Instant) -> Option<&Record> {
        self.services
            .get(name)?
            .get(id)
            .filter(|r| now <= r.deadline)
    }

    fn insert(&mut self, record: Record) {
        let name = record.instance.name.clone();
        let id = record.instance.id.clone();
        self.deadlines
            .insert((record.deadline, name.clone(), id.clone()));
        if let Some(old) = self
            .services
            .entry(name.clone())
            .or_default()
            .insert(id.clone(), record)
        {
            self.deadlines.remove(&(old.deadline, name, id));
        }
    }

    fn take(&mut self, name: &str, id: &str) -> Option<Record> {
        let instances = self.services.get_mut(name)?;
        let record = instances.remove(id)?;
        if instances.is_empty() {
            self.services.remove(name);
        }
        self.deadlines
            .remove(&(record.deadline, name.to_owned(), id.to_owned()));
        Some(record)
    }
}

/// The in-memory instance table. Its lock is held only for the duration of one
/// method call, never across an await.
#[derive(Debug, Default)]
pub struct MemoryStore {
    table: Mutex<Table>,
    changes: Changes,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Each method leaves the table consistent before it can panic, so a poisoned
        // lock still guards valid data.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a new registration: `registeredAt` and `lastHeartbeat` are `wall_ms`,
    /// replacing any instance with the same id.
    pub fn register(&self, reg: Registration, now: Instant, wall_ms: u64) -> Recorded {
        let mut table = self.table();
        let before = table.earliest();
        let interval = clamp_interval(reg.heartbeat_interval.unwrap_or(DEFAULT_HEARTBEAT_INTERVAL));
        let instance = Instance {
            id: reg.id(),
            name: reg.name.into(),
            host: reg.host,
            port: reg.port,
            heartbeat_interval: interval,
            registered_at: wall_ms,
            last_heartbeat: wall_ms,
            status: HEALTHY.to_owned(),
            metadata: reg.metadata.unwrap_or_default(),
        };
        let deadline = deadline(now, interval);
        table.insert(Record {
            instance: instance.clone(),
            deadline,
        });
        drop(table);
        self.changes.bump(&instance.name);
        Recorded {
            instance,
            renewed: false,
            earliest_deadline: before.is_none_or(|b| deadline < b),
        }
    }

    /// Renews a live instance (keeping `registeredAt`), or registers it anew when it is
    /// unknown or already expired, so a restarted registry fills back up.
    pub fn heartbeat(&self, reg: Registration, now: Instant, wall_ms: u64) -> Recorded {
        let id = reg.id();
        let mut table = self.table();
        let Some(current) = table.alive(reg.name.as_str(), &id, now) else {
            drop(table);
            return self.register(reg, now, wall_ms);
        };
        let before = table.earliest();
        let mut instance = current.instance.clone();
        if let Some(interval) = reg.heartbeat_interval {
            instance.heartbeat_interval = clamp_interval(interval);
        }
        if let Some(metadata) = reg.metadata {
            instance.metadata = metadata;
        }
        instance.last_heartbeat = wall_ms;
        let deadline = deadline(now, instance.heartbeat_interval);
        table.insert(Record {
            instance: instance.clone(),
            deadline,
        });
        Recorded {
            instance,
            renewed: true,
            earliest_deadline: before.is_none_or(|b| deadline < b),
        }
    }

    /// Removes the live instances of `name` on `port` (only the one on `host` when
    /// given) and returns them.
    pub fn remove(
        &self,
        name: &str,
        port: u16,
        host: Option<&str>,
        now: Instant,
    ) -> Result<Vec<Instance>, RemoveError> {
        let mut table = self.table();
        let ids: Vec<String> = {
            let live: Vec<&Record> = table
                .services
                .get(name)
                .map(|m| m.values().filter(|r| now <= r.deadline).collect())
                .unwrap_or_default();
            if live.is_empty() {
                return Err(RemoveError::ServiceNotFound);
            }
            live.iter()
                .filter(|r| r.instance.port == port && host.is_none_or(|h| r.instance.host == h))
                .map(|r| r.instance.id.clone())
                .collect()
        };
        if ids.is_empty() {
            return Err(RemoveError::InstanceNotFound);
        }
        let removed: Vec<Instance> = ids
            .iter()
            .filter_map(|id| table.take(name, id))
            .map(|r| r.instance)
            .collect();
        drop(table);
        self.changes.bump(name);
        Ok(removed)
    }

    /// The live instances of `name`, ordered by id; empty for an unknown name.
    pub fn list(&self, name: &str, now: Instant) -> Vec<Instance> {
        self.table()
            .services
            .get(name)
            .map(|m| live_instances(m, now))
            .unwrap_or_default()
    }

    /// Every service with at least one live instance.
    pub fn list_all(&self, now: Instant) -> BTreeMap<String, Vec<Instance>> {
        self.table()
            .services
            .iter()
            .map(|(name, m)| (name.clone(), live_instances(m, now)))
            .filter(|(_, v)| !v.is_empty())
            .collect()
    }

    /// The earliest deadline of any stored instance: when the next one may expire.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.table().earliest()
    }

    /// Removes and returns every instance whose deadline is before `now`.
    pub fn reap_expired(&self, now: Instant) -> Vec<Instance> {
        let mut table = self.table();
        let expired: Vec<(String, String)> = table
            .deadlines
            .iter()
            .take_while(|(at, _, _)| *at < now)
            .map(|(_, name, id)| (name.clone(), id.clone()))
            .collect();
        let expired: Vec<Instance> = expired
            .iter()
            .filter_map(|(name, id)| table.take(name, id))
            .map(|r| r.instance)
            .collect();
        drop(table);
        let names: BTreeSet<&str> = expired.iter().map(|i| i.name.as_str()).collect();
        for name in names {
            self.changes.bump(name);
        }
        expired
    }

    /// The version of `name`'s instances (see [`InstanceStore::version`]).
    pub fn version(&self, name: &str) -> u64 {
        self.changes.version(name)
    }

    /// Number of stored instances, expired ones not yet reaped included.
    pub fn len(&self) -> usize {
        self.table().deadlines.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl InstanceStore for MemoryStore {
    async fn register(
        &self,
        reg: Registration,
        now: Instant,
        wall_ms: u64,
    ) -> Result<Recorded, StoreError> {
        Ok(MemoryStore::register(self, reg, now, wall_ms))
    }

    async fn heartbeat(
        &self,
        reg: Registration,
        now: Instant,
        wall_ms: u64,
    ) -> Result<Recorded, StoreError> {
        Ok(MemoryStore::heartbeat(self, reg, now, wall_ms))
    }

    async fn remove(
        &self,
        name: &str,
        port: u16,
        host: Option<&str>,
        now: Instant,
    ) -> Result<Vec<Instance>, RemoveError> {
        MemoryStore::remove(self, name, port, host, now)
    }

    async fn list(&self, name: &str, now: Instant) -> Result<Vec<Instance>, StoreError> {
        Ok(MemoryStore::list(self, name, now))
    }

    async fn list_all(&self, now: Instant) -> Result<BTreeMap<String, Vec<Instance>>, StoreError> {
        Ok(MemoryStore::list_all(self, now))
    }

    async fn reap_expired(&self, now: Instant) -> Result<Vec<Instance>, StoreError> {
        Ok(MemoryStore::reap_expired(self, now))
    }

    fn next_reap(&self, _now: Instant) -> Option<Instant> {
        self.next_deadline()
    }

    async fn version(&self, name: &str) -> Result<u64, StoreError> {
        Ok(MemoryStore::version(self, name))
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// How often the reaper sweeps a shared store's indexes. Reads already skip expired
/// instances, so this only bounds how long an expiry goes unlogged and its keys linger.
pub const SHARED_SWEEP_EVERY: Duration = Duration::from_secs(1);

impl InstanceStore for redis::RedisStore {
    async fn register(
        &self,
        reg: Registration,
        _now: Instant,
        wall_ms: u64,
    ) -> Result<Recorded, StoreError> {
        redis::RedisStore::register(self, reg, wall_ms).await
    }

    async fn heartbeat(
        &self,
        reg: Registration,
        _now: Instant,
        wall_ms: u64,
    ) -> Result<Recorded, StoreError> {
        redis::RedisStore::heartbeat(self, reg, wall_ms).await
    }

    async fn remove(
        &self,
        name: &str,
        port: u16,
        host: Option<&str>,
        _now: Instant,
    ) -> Result<Vec<Instance>, RemoveError> {
        redis::RedisStore::remove(self, name, port, host).await
    }

    async fn list(&self, name: &str, _now: Instant) -> Result<Vec<Instance>, StoreError> {
        redis::RedisStore::list(self, name).await
    }

    async fn list_all(&self, _now: Instant) -> Result<BTreeMap<String, Vec<Instance>>, StoreError> {
        redis::RedisStore::list_all(self).await
    }

    async fn reap_expired(&self, _now: Instant) -> Result<Vec<Instance>, StoreError> {
        redis::RedisStore::reap_expired(self).await
    }

    fn next_reap(&self, now: Instant) -> Option<Instant> {
        Some(now + SHARED_SWEEP_EVERY)
    }

    async fn version(&self, name: &str) -> Result<u64, StoreError> {
        redis::RedisStore::version(self, name).await
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        redis::RedisStore::subscribe(self)
    }
}

/// Which instance table a registry server uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreChoice {
    /// This process's memory (the default; replicas do not share it).
    #[default]
    Memory,
    /// A Redis table shared by every replica given the same URL and prefix.
    Redis {
        /// `redis://host:port[/db]`.
        url: String,
        /// Key prefix; replicas that should agree use the same one.
        prefix: String,
    },
}

/// The instance table a registry server holds: one of the [`InstanceStore`]s. Cheap to
/// clone (clones share the table).
#[derive(Debug, Clone)]
pub enum Store {
    /// In this process.
    Memory(Arc<MemoryStore>),
    /// In Redis.
    Redis(redis::RedisStore),
}

impl Default for Store {
    fn default() -> Self {
        Self::Memory(Arc::new(MemoryStore::new()))
    }
}

impl Store {
    /// Opens the chosen store; a Redis store must be reachable now.
    pub async fn open(choice: &StoreChoice) -> Result<Self, StoreError> {
        match choice {
            StoreChoice::Memory => Ok(Self::default()),
            StoreChoice::Redis { url, prefix } => {
                Ok(Self::Redis(redis::RedisStore::connect(url, prefix).await?))
            }
        }
    }

    /// Relays changes made through other replicas to this process's watchers until
    /// `shutdown` fires (a shared store only; the memory store has no one else).
    pub async fn listen_for_changes(&self, shutdown: tokio_util::sync::CancellationToken) {
        if let Self::Redis(r) = self {
            r.listen(shutdown).await;
        }
    }

    /// The memory table, when this is one (tests inspect it directly).
    pub fn as_memory(&self) -> Option<&MemoryStore> {
        match self {
            Self::Memory(m) => Some(m),
            Self::Redis(_) => None,
        }
    }
}

impl InstanceStore for Store {
    async fn register(
        &self,
        reg: Registration,
        now: Instant,
        wall_ms: u64,
    ) -> Result<Recorded, StoreError> {
        match self {
            Self::Memory(m) => InstanceStore::register(m.as_ref(), reg, now, wall_ms).await,
            Self::Redis(r) => InstanceStore::register(r, reg, now, wall_ms).await,
        }
    }

    async fn heartbeat(
        &self,
        reg: Registration,
        now: Instant,
        wall_ms: u64,
    ) -> Result<Recorded, StoreError> {
        match self {
            Self::Memory(m) => InstanceStore::heartbeat(m.as_ref(), reg, now, wall_ms).await,
            Self::Redis(r) => InstanceStore::heartbeat(r, reg, now, wall_ms).await,
        }
    }

    async fn remove(
        &self,
        name: &str,
        port: u16,
        host: Option<&str>,
        now: Instant,
    ) -> Result<Vec<Instance>, RemoveError> {
        match self {
            Self::Memory(m) => InstanceStore::remove(m.as_ref(), name, port, host, now).await,
            Self::Redis(r) => InstanceStore::remove(r, name, port, host, now).await,
        }
    }

    async fn list(&self, name: &str, now: Instant) -> Result<Vec<Instance>, StoreError> {
        match self {
            Self::Memory(m) => InstanceStore::list(m.as_ref(), name, now).await,
            Self::Redis(r) => InstanceStore::list(r, name, now).await,
        }
    }

    async fn list_all(&self, now: Instant) -> Result<BTreeMap<String, Vec<Instance>>, StoreError> {
        match self {
            Self::Memory(m) => InstanceStore::list_all(m.as_ref(), now).await,
            Self::Redis(r) => InstanceStore::list_all(r, now).await,
        }
    }

    async fn reap_expired(&self, now: Instant) -> Result<Vec<Instance>, StoreError> {
        match self {
            Self::Memory(m) => InstanceStore::reap_expired(m.as_ref(), now).await,
            Self::Redis(r) => InstanceStore::reap_expired(r, now).await,
        }
    }

    fn next_reap(&self, now: Instant) -> Option<Instant> {
        match self {
            Self::Memory(m) => InstanceStore::next_reap(m.as_ref(), now),
            Self::Redis(r) => InstanceStore::next_reap(r, now),
        }
    }

    async fn version(&self, name: &str) -> Result<u64, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.version(name)),
            Self::Redis(r) => r.version(name).await,
        }
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        match self {
            Self::Memory(m) => InstanceStore::subscribe(m.as_ref()),
            Self::Redis(r) => r.subscribe(),
        }
    }
}

fn clamp_interval(secs: u64) -> u64 {
    secs.clamp(1, MAX_HEARTBEAT_INTERVAL)
}

/// `now + 1.5 x interval`: the last instant at which the instance is still alive.
fn deadline(now: Instant, interval_secs: u64) -> Instant {
    let grace = Duration::from_millis(clamp_interval(interval_secs) * 1500);
    now.checked_add(grace).unwrap_or(now)
}

fn live_instances(m: &BTreeMap<String, Record>, now: Instant) -> Vec<Instance> {
    m.values()
        .filter(|r| now <= r.deadline)
        .map(|r| r.instance.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, port: u16, interval: Option<u64>) -> Registration {
        Registration {
            name: ServiceName::parse(name).unwrap(),
            host: "127.0.0.1".into(),
            port,
            heartbeat_interval: interval,
            metadata: None,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn expires_exactly_at_one_and_a_half_intervals() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        store.register(reg("svc", 4000, Some(2)), t0, 1_000);
        assert_eq!(store.next_deadline(), Some(t0 + ms(3000)));
        assert_eq!(store.list("svc", t0 + ms(2999)).len(), 1);
        assert_eq!(
            store.list("svc", t0 + ms(3000)).len(),
            1,
            "alive at exactly 1.5 x"
        );
        assert!(store.list("svc", t0 + ms(3001)).is_empty());
        assert!(store.list_all(t0 + ms(3001)).is_empty());
        // Reads filter, they do not remove.
        assert_eq!(store.len(), 1);
        assert!(store.reap_expired(t0 + ms(3000)).is_empty());
        let reaped = store.reap_expired(t0 + ms(3001));
        assert_eq!(reaped.len(), 1);
        assert_eq!(reaped[0].id, "svc-127.0.0.1-4000");
        assert!(store.is_empty());
        assert_eq!(store.next_deadline(), None);
    }

    #[test]
    fn heartbeat_extends_life_and_keeps_registered_at() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        store.register(reg("svc", 4000, Some(2)), t0, 1_000);
        let hb = store.heartbeat(reg("svc", 4000, None), t0 + ms(2000), 3_000);
        assert!(hb.renewed);
        assert_eq!(hb.instance.registered_at, 1_000);
        assert_eq!(hb.instance.last_heartbeat, 3_000);
        assert_eq!(
            hb.instance.heartbeat_interval, 2,
            "kept when the heartbeat omits it"
        );
        assert_eq!(store.list("svc", t0 + ms(4999)).len(), 1);
        assert!(store.list("svc", t0 + ms(5001)).is_empty());
        assert_eq!(store.len(), 1, "the old deadline was replaced, not added");
        assert_eq!(store.next_deadline(), Some(t0 + ms(5000)));
    }

    #[test]
    fn heartbeat_for_unknown_or_expired_registers_anew() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        let hb = store.heartbeat(reg("svc", 4000, Some(5)), t0, 7);
        assert!(!hb.renewed);
        assert_eq!(
            (hb.instance.registered_at, hb.instance.heartbeat_interval),
            (7, 5)
        );
        let late = store.heartbeat(reg("svc", 4000, None), t0 + ms(7501), 9);
        assert!(!late.renewed);
        assert_eq!(late.instance.registered_at, 9);
        assert_eq!(late.instance.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn register_resets_registered_at_and_defaults_interval() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        let first = store.register(reg("svc", 4000, None), t0, 1);
        assert_eq!(first.instance.heartbeat_interval, 30);
        let again = store.register(reg("svc", 4000, Some(10)), t0 + ms(5), 2);
        assert_eq!(again.instance.registered_at, 2);
        assert_eq!(store.len(), 1);
        assert_eq!(store.next_deadline(), Some(t0 + ms(5 + 15_000)));
    }

    #[test]
    fn earliest_deadline_is_reported() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        assert!(
            store
                .register(reg("a", 1, Some(10)), t0, 0)
                .earliest_deadline
        );
        assert!(
            !store
                .register(reg("b", 1, Some(20)), t0, 0)
                .earliest_deadline
        );
        assert!(
            store
                .register(reg("c", 1, Some(1)), t0, 0)
                .earliest_deadline
        );
        // Shortening the interval on a heartbeat can bring the deadline forward too.
        assert!(
            !store
                .heartbeat(reg("b", 1, None), t0 + ms(1), 0)
                .earliest_deadline
        );
        assert!(store.heartbeat(reg("b", 1, Some(1)), t0 + ms(1), 0).renewed);
        assert_eq!(store.next_deadline(), Some(t0 + ms(1500)));
    }

    #[test]
    fn remove_distinguishes_service_and_instance() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        store.register(reg("svc", 4000, Some(2)), t0, 0);
        let mut other = reg("svc", 4000, Some(2));
        other.host = "10.0.0.2".into();
        store.register(other, t0, 0);
        assert_eq!(
            store.remove("nope", 4000, None, t0),
            Err(RemoveError::ServiceNotFound)
        );
        assert_eq!(
            store.remove("svc", 4001, None, t0),
            Err(RemoveError::InstanceNotFound)
        );
        assert_eq!(
            store.remove("svc", 4000, Some("10.9.9.9"), t0),
            Err(RemoveError::InstanceNotFound)
        );
        let removed = store.remove("svc", 4000, Some("10.0.0.2"), t0).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].id, "svc-10.0.0.2-4000");
        assert_eq!(store.remove("svc", 4000, None, t0).unwrap().len(), 1);
        assert!(store.is_empty());
        assert!(store.list_all(t0).is_empty());
        // An expired instance counts as gone.
        store.register(reg("svc", 4000, Some(2)), t0, 0);
        assert_eq!(
            store.remove("svc", 4000, None, t0 + ms(3001)),
            Err(RemoveError::ServiceNotFound)
        );
    }

    #[test]
    fn list_all_groups_by_name() {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        store.register(reg("a", 1, Some(1)), t0, 0);
        store.register(reg("a", 2, Some(10)), t0, 0);
        store.register(reg("b", 1, Some(10)), t0, 0);
        let all = store.list_all(t0 + ms(2000));
        assert_eq!(all.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(all["a"].len(), 1);
        assert_eq!(all["a"][0].port, 2);
    }
}
