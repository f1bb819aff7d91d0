//! Service discovery through a per-name cache that is fresh for a while (served as is),
//! then stale for a while (served while one background refresh runs), then expired
//! (fetched before answering). The last non-empty list outlives registry outages and
//! empty answers, so callers keep trying known instances and fail over themselves.
//!
//! A [`Discovery::watching`] cache also keeps one long poll per resolved name on the
//! registry (`GET /services/{name}/watch`): each answer replaces the entry at once, so
//! a new or removed instance is seen without waiting for the entry to go stale, and
//! while the watch holds, the entry counts as fresh (no polling). When the watch
//! fails, the entry falls back to the fresh/stale/expired rules above (retrying the
//! watch with a backoff); a registry without the endpoint (404/405) is not watched.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use breakwater_runtime::hash::{QuickBuild, QuickMap};
use reqwest::StatusCode;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ClientError, RegistryClient};
use crate::wire::Instance;

/// How long a fetched list is served without asking the registry.
#[derive(Debug, Clone, Copy)]
pub struct CachePolicy {
    /// Served from cache, no registry call.
    pub fresh_for: Duration,
    /// After `fresh_for`, served from cache for this much longer while a background
    /// refresh runs.
    pub stale_for: Duration,
}

impl Default for CachePolicy {
    /// Fresh 2 s, stale 30 s.
    fn default() -> Self {
        Self {
            fresh_for: Duration::from_secs(2),
            stale_for: Duration::from_secs(30),
        }
    }
}

/// What [`Discovery::cache_info`] reports per cached name.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CacheInfo {
    /// Whether the entry is still within its fresh or stale window.
    pub cached: bool,
    /// Whole seconds of freshness left (rounded up; 0 once stale).
    pub ttl: u64,
    /// Number of instances cached.
    pub services: usize,
}

/// Why [`Discovery::resolve`] has no instance to offer.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The registry could not be asked and nothing was ever fetched for the name.
    #[error("registry unavailable and no instance of {name} known: {source}")]
    Unavailable {
        /// The service asked for.
        name: String,
        /// Why the registry call failed.
        #[source]
        source: ClientError,
    },
    /// The registry knows no live instance of the service, and never did.
    #[error("no instance of {name} is registered")]
    NoInstances {
        /// The service asked for.
        name: String,
    },
}

#[derive(Debug)]
struct Entry {
    instances: Arc<[Instance]>,
    fetched_at: Instant,
    refreshing: bool,
    /// A watch answered last and has not failed since: the entry is current.
    watched: bool,
}

/// How long one watch waits on the registry before it asks again.
const WATCH_WAIT: Duration = Duration::from_secs(30);
/// Pause after the first failed watch, doubling up to [`WATCH_RETRY_MAX`].
const WATCH_RETRY: Duration = Duration::from_millis(200);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Shared {
    client: RegistryClient,
    policy: CachePolicy,
    /// Looked up on every proxied request, hence the quick hasher (names come from
    /// the gateway's routes, not from clients).
    cache: Mutex<QuickMap<String, Entry>>,
    /// Whether resolved names are watched.
    watch: bool,
    /// Names with a running watch.
    watched: Mutex<HashSet<String, QuickBuild>>,
    /// Stops the watches when the last clone of the [`Discovery`] goes.
    stop: CancellationToken,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Shared {
    fn cache(&self) -> MutexGuard<'_, QuickMap<String, Entry>> {
        // Every critical section leaves the map consistent, so a poisoned lock (a
        // panic elsewhere while holding it) still guards valid data.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a registry answer. An empty answer never replaces a non-empty list:
    /// that list keeps being served (and counts as fresh) so callers still try it.
    fn store(&self, name: &str, fetched: Vec<Instance>, now: Instant) -> Arc<[Instance]> {
        let mut cache = self.cache();
        match cache.get_mut(name) {
            Some(entry) => {
                if !fetched.is_empty() || entry.instances.is_empty() {
                    entry.instances = fetched.into();
                } else {
                    tracing::debug!(
                        service = name,
                        "registry lists no instance; keeping last known"
                    );
                }
                entry.fetched_at = now;
                entry.refreshing = false;
                Arc::clone(&entry.instances)
            }
            None => {
                let instances: Arc<[Instance]> = fetched.into();
                cache.insert(
                    name.to_owned(),
                    Entry {
                        instances: Arc::clone(&instances),
                        fetched_at: now,
                        refreshing: false,
                        watched: false,
                    },
                );
                instances
            }
        }
    }

    /// Records a watch answer: like [`Shared::store`], and the entry is current until
    /// the watch fails.
    fn store_watched(&self, name: &str, fetched: Vec<Instance>, now: Instant) {
        self.store(name, fetched, now);
        if let Some(entry) = self.cache().get_mut(name) {
            entry.watched = true;
        }
    }

    fn watch_failed(&self, name: &str) {
        if let Some(entry) = self.cache().get_mut(name) {
            entry.watched = false;
        }
    }

    fn refresh_failed(&self, name: &str) {
        if let Some(entry) = self.cache().get_mut(name) {
            entry.refreshing = false;
        }
    }
}

/// Discovery with a fresh/stale cache per service name. Cheap to clone (Arc inside).
#[derive(Debug, Clone)]
pub struct Discovery {
    shared: Arc<Shared>,
}

/// What the cache can answer without waiting for the registry.
enum Cached {
    /// A watch keeps the entry current (so one runs already).
    Watched(Arc<[Instance]>),
    Serve(Arc<[Instance]>),
    ServeAndRefresh(Arc<[Instance]>),
    Fetch,
}

impl Discovery {
    /// Discovery through `client` with `policy`.
    pub fn new(client: RegistryClient, policy: CachePolicy) -> Self {
        Self::build(client, policy, false)
    }

    /// Discovery through `client` with `policy` that also watches every name it
    /// resolves (see the module docs).
    pub fn watching(client: RegistryClient, policy: CachePolicy) -> Self {
        Self::build(client, policy, true)
    }

    fn build(client: RegistryClient, policy: CachePolicy, watch: bool) -> Self {
        Self {
            shared: Arc::new(Shared {
                client,
                policy,
                cache: Mutex::new(QuickMap::default()),
                watch,
                watched: Mutex::new(HashSet::default()),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// The registry client it asks.
    pub fn client(&self) -> &RegistryClient {
        &self.shared.client
    }

    /// Fresh: served from cache. Stale: served from cache, refreshed in the
    /// background (one refresh at a time per name). Older/absent: fetched now; if
    /// the registry is unreachable, the last good list is served however old it is;
    /// never an empty list when the last good one was non-empty (an empty answer
    /// from the registry keeps serving the last non-empty list, so callers still
    /// try those instances and fail over / fall back themselves). Err only when
    /// nothing was ever fetched and the registry is unreachable, or the service has
    /// no instance at all (DiscoveryError::NoInstances).
    pub async fn resolve(&self, name: &str) -> Result<Arc<[Instance]>, DiscoveryError> {
        self.resolve_at(name, Instant::now()).await
    }

    /// [`Self::resolve`] with the clock already read (`now`) by the caller, which
    /// saves the request path a read.
    pub async fn resolve_at(
        &self,
        name: &str,
        now: Instant,
    ) -> Result<Arc<[Instance]>, DiscoveryError> {
        let cached = self.lookup(name, now);
        // An entry a watch keeps current has its watch: no look at the watched set
        // (a second lock) on every request.
        if self.shared.watch && !matches!(cached, Cached::Watched(_)) {
            self.ensure_watch(name);
        }
        match cached {
            Cached::Watched(instances) | Cached::Serve(instances) => non_empty(name, instances),
            Cached::ServeAndRefresh(instances) => {
                self.spawn_refresh(name);
                non_empty(name, instances)
            }
            // Boxed: the registry call is a large future, and held inline it would
            // make every cached resolve (the gateway's hot path) as large.
            Cached::Fetch => match Box::pin(self.shared.client.services(name)).await {
                Ok(fetched) => non_empty(name, self.shared.store(name, fetched, Instant::now())),
                Err(source) => {
                    let last = self
                        .shared
                        .cache()
                        .get(name)
                        .map(|e| Arc::clone(&e.instances));
                    match last {
                        Some(instances) if !instances.is_empty() => {
                            tracing::debug!(
                                service = name, error = %source,
                                "registry unavailable; serving last known instances"
                            );
                            Ok(instances)
                        }
                        _ => Err(DiscoveryError::Unavailable {
                            name: name.to_owned(),
                            source,
                        }),
                    }
                }
            },
        }
    }

    fn lookup(&self, name: &str, now: Instant) -> Cached {
        let policy = self.shared.policy;
        let mut cache = self.shared.cache();
        let Some(entry) = cache.get_mut(name) else {
            return Cached::Fetch;
        };
        if entry.watched {
            return Cached::Watched(Arc::clone(&entry.instances));
        }
        let age = now.saturating_duration_since(entry.fetched_at);
        if age <= policy.fresh_for {
            Cached::Serve(Arc::clone(&entry.instances))
        } else if age <= policy.fresh_for + policy.stale_for {
            if entry.refreshing {
                Cached::Serve(Arc::clone(&entry.instances))
            } else {
                entry.refreshing = true;
                Cached::ServeAndRefresh(Arc::clone(&entry.instances))
            }
        } else {
            Cached::Fetch
        }
    }

    /// Starts the watch of `name` unless one runs.
    fn ensure_watch(&self, name: &str) {
        let started = {
            let mut watched = self
                .shared
                .watched
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Checked first: resolve is on the request path, and this allocates.
            !watched.contains(name) && watched.insert(name.to_owned())
        };
        if started {
            tokio::spawn(watch_loop(
                Arc::downgrade(&self.shared),
                self.shared.client.clone(),
                name.to_owned(),
                self.shared.stop.clone(),
            ));
        }
    }

    fn spawn_refresh(&self, name: &str) {
        let shared = Arc::clone(&self.shared);
        let name = name.to_owned();
        tokio::spawn(async move {
            match shared.client.services(&name).await {
                Ok(fetched) => {
                    shared.store(&name, fetched, Instant::now());
                }
                Err(err) => {
                    tracing::debug!(service = %name, error = %err, "background refresh failed");
                    shared.refresh_failed(&name);
                }
            }
        });
    }

    /// Per cached name: whether cached, seconds of freshness left (ttl), instance count.
    pub fn cache_info(&self) -> BTreeMap<String, CacheInfo> {
        let now = Instant::now();
        let policy = self.shared.policy;
        self.shared
            .cache()
            .iter()
            .map(|(name, entry)| {
                let age = now.saturating_duration_since(entry.fetched_at);
                let left = policy.fresh_for.saturating_sub(age);
                let ttl = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                let info = CacheInfo {
                    cached: entry.watched || age <= policy.fresh_for + policy.stale_for,
                    ttl,
                    services: entry.instances.len(),
                };
                (name.clone(), info)
            })
            .collect()
    }

    /// Whether the last call to the registry succeeded ("connected"/"disconnected").
    /// Counts every call made through the client or its clones, registrations and
    /// heartbeats included; `false` before the first call.
    pub fn connected(&self) -> bool {
        self.shared.client.connected()
    }
}

/// Long-polls `name` until `stop` fires or the cache is gone, storing each answer.
/// Holds the cache only between polls, so dropping the [`Discovery`] ends it.
async fn watch_loop(
    shared: Weak<Shared>,
    client: RegistryClient,
    name: String,
    stop: CancellationToken,
) {
    let mut index = None;
    let mut pause = WATCH_RETRY;
    loop {
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            answer = client.watch(&name, index, WATCH_WAIT) => answer,
        };
        let Some(cache) = shared.upgrade() else {
            return;
        };
        match answer {
            Ok(watched) => {
                if index != Some(watched.index) {
                    tracing::debug!(service = %name, index = watched.index, "registry reported a change");
                }
                cache.store_watched(&name, watched.instances, Instant::now());
                index = Some(watched.index);
                pause = WATCH_RETRY;
                continue;
            }
            Err(error)
                if matches!(
                    error.status(),
                    Some(StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED)
                ) =>
            {
                tracing::debug!(service = %name, %error, "registry cannot be watched; polling instead");
                cache.watch_failed(&name);
                return;
            }
            Err(error) => {
                tracing::debug!(service = %name, %error, retry_in = ?pause, "registry watch failed");
                cache.watch_failed(&name);
                index = None;
            }
        }
        drop(cache);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(WATCH_RETRY_MAX);
    }
}

fn non_empty(name: &str, instances: Arc<[Instance]>) -> Result<Arc<[Instance]>, DiscoveryError> {
    if instances.is_empty() {
        Err(DiscoveryError::NoInstances {
            name: name.to_owned(),
        })
    } else {
        Ok(instances)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(port: u16) -> Instance {
        Instance {
            id: format!("svc-h-{port}"),
            name: "svc".into(),
            host: "h".into(),
            port,
            heartbeat_interval: 30,
            registered_at: 0,
            last_heartbeat: 0,
            status: "healthy".into(),
            metadata: serde_json::Map::new(),
        }
    }

    fn discovery() -> Discovery {
        // Never called: these tests drive the cache directly.
        let policy = CachePolicy {
            fresh_for: Duration::from_secs(2),
            stale_for: Duration::from_secs(30),
        };
        Discovery::new(RegistryClient::new("http://127.0.0.1:9"), policy)
    }

    fn kind(c: &Cached) -> &'static str {
        match c {
            Cached::Watched(_) => "watched",
            Cached::Serve(_) => "serve",
            Cached::ServeAndRefresh(_) => "refresh",
            Cached::Fetch => "fetch",
        }
    }

    #[test]
    fn windows_have_exact_boundaries_and_one_refresh_at_a_time() {
        let d = discovery();
        let t0 = Instant::now();
        assert_eq!(kind(&d.lookup("svc", t0)), "fetch");
        d.shared.store("svc", vec![instance(1)], t0);
        let ns = Duration::from_nanos(1);
        assert_eq!(kind(&d.lookup("svc", t0 + Duration::from_secs(2))), "serve");
        assert_eq!(
            kind(&d.lookup("svc", t0 + Duration::from_secs(2) + ns)),
            "refresh"
        );
        assert_eq!(
            kind(&d.lookup("svc", t0 + Duration::from_secs(3))),
            "serve",
            "refresh running"
        );
        d.shared.refresh_failed("svc");
        assert_eq!(
            kind(&d.lookup("svc", t0 + Duration::from_secs(32))),
            "refresh"
        );
        assert_eq!(
            kind(&d.lookup("svc", t0 + Duration::from_secs(32) + ns)),
            "fetch"
        );

        // A watched entry is current at any age, until its watch fails.
        d.shared.store_watched("svc", vec![instance(1)], t0);
        let late = t0 + Duration::from_secs(3600);
        assert_eq!(kind(&d.lookup("svc", late)), "watched");
        d.shared.watch_failed("svc");
        assert_eq!(kind(&d.lookup("svc", late)), "fetch");
    }

    #[test]
    fn empty_answers_keep_the_last_non_empty_list() {
        let d = discovery();
        let t0 = Instant::now();
        assert!(
            d.shared.store("svc", vec![], t0).is_empty(),
            "nothing better to keep"
        );
        assert_eq!(
            d.shared
                .store("svc", vec![instance(1), instance(2)], t0)
                .len(),
            2
        );
        let kept = d.shared.store("svc", vec![], t0 + Duration::from_secs(1));
        assert_eq!(kept.len(), 2);
        // Kept lists count as freshly confirmed, and the refresh flag is cleared.
        assert_eq!(kind(&d.lookup("svc", t0 + Duration::from_secs(3))), "serve");
        assert_eq!(d.shared.store("svc", vec![instance(3)], t0).len(), 1);
    }

    #[test]
    fn no_instances_is_an_error_naming_the_service() {
        let err = non_empty("svc", Arc::from(Vec::new())).unwrap_err();
        assert!(matches!(err, DiscoveryError::NoInstances { ref name } if name == "svc"));
        assert_eq!(
            non_empty("svc", Arc::from(vec![instance(1)]))
                .unwrap()
                .len(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cache_info_rounds_ttl_up_and_ends_with_the_stale_window() {
        let d = discovery();
        d.shared
            .store("svc", vec![instance(1), instance(2)], Instant::now());
        let info = |d: &Discovery| d.cache_info()["svc"].clone();
        assert_eq!(
            info(&d),
            CacheInfo {
                cached: true,
                ttl: 2,
                services: 2
            }
        );
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(info(&d).ttl, 1);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(
            info(&d),
            CacheInfo {
                cached: true,
                ttl: 0,
                services: 2
            }
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(info(&d).cached);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!info(&d).cached);
        assert_eq!(info(&d).services, 2);
    }
}
