//! Per-service upstream state: the endpoints discovery found, with the load figures
//! the balancer reads and the outlier-ejection state, plus the service's breaker and
//! retry budget.
//!
//! - [`Upstreams`]: every service the gateway has reached, by name. It outlives route
//!   table reloads, so a reload keeps endpoint statistics, breakers and budgets (a
//!   breaker or budget is replaced only when its settings change).
//! - [`Upstream`]: one service. Its [`EndpointSet`] is swapped whole (arc-swap) when
//!   discovery returns a different list; endpoints that survive keep their figures.
//! - [`Endpoint`]: one instance, all atomics: outstanding requests, peak-EWMA latency
//!   (jumps up to a slower sample at once, decays with a 10 s time constant),
//!   consecutive failures, ejection state.
//!
//! Ejection follows Envoy: `consecutive_5xx` failed tries in a row (or
//! `consecutive_connect_failures` connect errors) eject an endpoint for
//! `base_ejection_time x times ejected` (capped), never more than
//! `max_ejection_percent` of the service at once. When the time is up the endpoint is
//! admitted for one probe: success returns it, failure ejects it again for longer.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use breakwater_registry::wire::Instance;
use breakwater_resilience::breaker::{Breaker, Transition};
use breakwater_resilience::retry::RetryBudget;
use http::HeaderValue;
use http::uri::Authority;
use serde::Serialize;
use tokio::time::Instant;

use crate::classify::{AttemptKind, Classified};
use crate::policy::{OutlierSettings, ServicePolicy};

/// Time constant of the peak-EWMA decay (linkerd's default).
const EWMA_DECAY_NS: f64 = 10e9;
/// The latency an endpoint is assumed to have before its first answer.
const DEFAULT_RTT_NS: f64 = 1e6;

/// Something that wants to hear about upstream events: breaker transitions, ejections
/// and returns. The server forwards them to metrics, the admin event stream and logs.
pub trait UpstreamObserver: Send + Sync + fmt::Debug {
    /// `service` got a new breaker (first use, or new settings), starting closed.
    fn breaker_created(&self, service: &str);
    /// `service`'s breaker changed state.
    fn breaker_transition(&self, service: &str, transition: &Transition);
    /// An endpoint was ejected, or came back.
    fn ejection(&self, service: &str, change: &EjectionChange);
    /// `service`'s endpoint set was rebuilt with other endpoints: `set` is what it has
    /// now (metrics drop the series of instances that left).
    fn endpoints_changed(&self, _service: &str, _set: &EndpointSet) {}
}

/// An observer that ignores everything (tests, tools).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl UpstreamObserver for NoObserver {
    fn breaker_created(&self, _: &str) {}
    fn breaker_transition(&self, _: &str, _: &Transition) {}
    fn ejection(&self, _: &str, _: &EjectionChange) {}
}

/// An ejection or a return, as reported to an [`UpstreamObserver`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EjectionChange {
    /// The endpoint's instance id.
    pub instance: String,
    /// `"ejection"` or `"return"`.
    pub kind: &'static str,
    /// Why, in words.
    pub reason: String,
    /// How long it is ejected for (ejections only).
    #[serde(rename = "ejected_for_ms", serialize_with = "millis")]
    pub ejected_for: Option<Duration>,
    /// How many times it has been ejected in a row.
    pub times_ejected: u32,
    /// Endpoints of the service ejected after this change.
    pub ejected_now: usize,
}

fn millis<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => s.serialize_none(),
    }
}

/// Every service the gateway has reached, by name.
#[derive(Debug)]
pub struct Upstreams {
    by_name: RwLock<HashMap<String, Arc<Upstream>>>,
    observer: Arc<dyn UpstreamObserver>,
    epoch: Instant,
}

impl Upstreams {
    /// No services yet; events go to `observer`.
    pub fn new(observer: Arc<dyn UpstreamObserver>) -> Self {
        Self {
            by_name: RwLock::new(HashMap::new()),
            observer,
            epoch: Instant::now(),
        }
    }

    /// The service named `name`, created on first use, reconfigured when `policy`
    /// differs from what it runs with.
    pub fn get_or_create(&self, name: &str, policy: &ServicePolicy) -> Arc<Upstream> {
        if let Some(up) = self.get(name) {
            up.reconfigure(policy, &self.observer);
            return up;
        }
        let mut map = self.by_name.write().unwrap_or_else(PoisonError::into_inner);
        let up = map.entry(name.to_owned()).or_insert_with(|| {
            Arc::new(Upstream::new(
                name,
                policy,
                self.epoch,
                Arc::clone(&self.observer),
            ))
        });
        let up = Arc::clone(up);
        drop(map);
        up.reconfigure(policy, &self.observer);
        up
    }

    /// The service named `name`, if it was ever reached.
    pub fn get(&self, name: &str) -> Option<Arc<Upstream>> {
        self.by_name
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Every known service, by name.
    pub fn all(&self) -> Vec<Arc<Upstream>> {
        let mut all: Vec<_> = self
            .by_name
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

/// The service-wide resilience state, swapped whole when its settings change.
#[derive(Debug)]
pub struct ServiceState {
    /// The settings it was built from.
    pub policy: ServicePolicy,
    /// The breaker (`None`: off).
    pub breaker: Option<Arc<Breaker>>,
    /// The retry budget.
    pub budget: Arc<RetryBudget>,
}

/// One service: its endpoints and its service-wide resilience state.
#[derive(Debug)]
pub struct Upstream {
    name: Arc<str>,
    epoch: Instant,
    endpoints: ArcSwap<EndpointSet>,
    state: ArcSwap<ServiceState>,
    /// Serialises endpoint-set rebuilds, which are rare (discovery changes).
    rebuild: Mutex<()>,
    /// Serialises ejection decisions, so two endpoints failing at once cannot both
    /// pass the max-ejection-percent check.
    ejecting: Mutex<()>,
    /// Round-robin cursor.
    cursor: AtomicUsize,
    observer: Arc<dyn UpstreamObserver>,
}

impl Upstream {
    fn new(
        name: &str,
        policy: &ServicePolicy,
        epoch: Instant,
        observer: Arc<dyn UpstreamObserver>,
    ) -> Self {
        let state = build_state(name, policy, None, &observer);
        Self {
            name: Arc::from(name),
            epoch,
            endpoints: ArcSwap::from_pointee(EndpointSet::empty()),
            state: ArcSwap::from_pointee(state),
            rebuild: Mutex::new(()),
            ejecting: Mutex::new(()),
            cursor: AtomicUsize::new(0),
            observer,
        }
    }

    /// Builds an upstream outside any registry, for tests and tools.
    pub fn standalone(name: &str, policy: &ServicePolicy) -> Self {
        Self::new(name, policy, Instant::now(), Arc::new(NoObserver))
    }

    /// The service's registry name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The service-wide state (breaker, budget, settings) in force.
    pub fn state(&self) -> Arc<ServiceState> {
        self.state.load_full()
    }

    /// The round-robin cursor the balancer advances.
    pub fn cursor(&self) -> &AtomicUsize {
        &self.cursor
    }

    /// Replaces the breaker and/or the budget when their settings changed.
    fn reconfigure(&self, policy: &ServicePolicy, observer: &Arc<dyn UpstreamObserver>) {
        let current = self.state.load();
        if current.policy == *policy {
            return;
        }
        let next = build_state(&self.name, policy, Some(&current), observer);
        tracing::info!(service = %self.name, "service policy changed; applied");
        self.state.store(Arc::new(next));
    }

    /// Nanoseconds since this registry's epoch: the clock the endpoint atomics use.
    pub fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The endpoint set for the list discovery returned, rebuilt when the list differs
    /// from the last one (endpoints that stay keep their figures).
    pub fn endpoints_for(&self, instances: &Arc<[Instance]>) -> Arc<EndpointSet> {
        let current = self.endpoints.load();
        if current
            .source
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, instances))
        {
            return arc_swap::Guard::into_inner(current);
        }
        drop(current);
        let _rebuilding = lock(&self.rebuild);
        let current = self.endpoints.load_full();
        if current
            .source
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, instances))
        {
            return current;
        }
        let next = Arc::new(current.rebuilt(instances, &self.name));
        if next.endpoints.len() != current.endpoints.len()
            || next
                .endpoints
                .iter()
                .zip(&current.endpoints)
                .any(|(a, b)| !Arc::ptr_eq(a, b))
        {
            tracing::info!(
                service = %self.name,
                endpoints = next.endpoints.len(),
                "endpoint set changed"
            );
            self.endpoints.store(Arc::clone(&next));
            self.observer.endpoints_changed(&self.name, &next);
        } else {
            self.endpoints.store(Arc::clone(&next));
        }
        next
    }

    /// Feeds one classified try into the endpoint's figures and the ejection rules,
    /// reporting an ejection or return to the observer.
    pub fn observe(
        &self,
        set: &EndpointSet,
        endpoint: &Endpoint,
        outcome: &Classified,
        probe: bool,
        elapsed: Duration,
        now: Instant,
    ) {
        let now_ns = self.nanos(now);
        endpoint.observe_rtt(elapsed.as_nanos() as f64, outcome.failure, now_ns);
        let outlier = self.state.load().policy.outlier;
        if let Some(change) = self.judge(set, endpoint, outcome, probe, &outlier, now_ns) {
            self.observer.ejection(&self.name, &change);
        }
    }

    fn judge(
        &self,
        set: &EndpointSet,
        endpoint: &Endpoint,
        outcome: &Classified,
        probe: bool,
        outlier: &OutlierSettings,
        now_ns: u64,
    ) -> Option<EjectionChange> {
        if !outcome.failure {
            endpoint.consecutive_failures.store(0, Ordering::Relaxed);
            endpoint.consecutive_connect.store(0, Ordering::Relaxed);
            // Only the probe's answer decides a return: a request that started before
            // the ejection says nothing about the endpoint now.
            if probe
                && endpoint
                    .state
                    .compare_exchange(PROBING, HEALTHY, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                endpoint.returned_at.store(now_ns, Ordering::Relaxed);
                return Some(EjectionChange {
                    instance: endpoint.id.to_string(),
                    kind: "return",
                    reason: "probe succeeded".to_owned(),
                    ejected_for: None,
                    times_ejected: endpoint.times_ejected.load(Ordering::Relaxed),
                    ejected_now: set.ejected_count(),
                });
            }
            return None;
        }
        let failures = endpoint
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        let connects = if outcome.kind == AttemptKind::ConnectError {
            endpoint.consecutive_connect.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            endpoint.consecutive_connect.store(0, Ordering::Relaxed);
            0
        };
        if probe {
            let _ejecting = lock(&self.ejecting);
            if endpoint.state.load(Ordering::Acquire) != PROBING {
                return None;
            }
            let (until, times) = endpoint.eject_times(outlier, now_ns, true);
            return Some(self.eject(set, endpoint, until, times, "probe failed".to_owned()));
        }
        let reason = if connects >= outlier.consecutive_connect_failures {
            format!("{connects} connect failures in a row")
        } else if failures >= outlier.consecutive_5xx {
            format!("{failures} failed tries in a row")
        } else {
            return None;
        };
        let _ejecting = lock(&self.ejecting);
        if endpoint.state.load(Ordering::Acquire) != HEALTHY {
            return None;
        }
        let total = set.endpoints.len();
        let ejected = set.ejected_count();
        // Checked after the ejection, so 50% of 3 endpoints allows one, not two.
        if (ejected + 1) * 100 > usize::from(outlier.max_ejection_percent) * total {
            tracing::debug!(
                service = %self.name,
                instance = %endpoint.id,
                ejected,
                total,
                "would eject, but max_ejection_percent is reached"
            );
            return None;
        }
        let (until, times) = endpoint.eject_times(outlier, now_ns, false);
        Some(self.eject(set, endpoint, until, times, reason))
    }

    fn eject(
        &self,
        set: &EndpointSet,
        endpoint: &Endpoint,
        until: u64,
        times: u32,
        reason: String,
    ) -> EjectionChange {
        endpoint.until.store(until, Ordering::Relaxed);
        endpoint.times_ejected.store(times, Ordering::Relaxed);
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        endpoint.consecutive_connect.store(0, Ordering::Relaxed);
        endpoint.state.store(EJECTED, Ordering::Release);
        let ejected_for = Duration::from_nanos(until.saturating_sub(self.nanos(Instant::now())));
        EjectionChange {
            instance: endpoint.id.to_string(),
            kind: "ejection",
            reason,
            ejected_for: Some(ejected_for),
            times_ejected: times,
            ejected_now: set.ejected_count(),
        }
    }

    /// What the admin API shows of this service.
    pub fn snapshot(&self, now: Instant) -> UpstreamSnapshot {
        let now_ns = self.nanos(now);
        let wall_now = breakwater_runtime::clock::now_millis();
        let state = self.state.load();
        let set = self.endpoints.load();
        let instances = set
            .endpoints
            .iter()
            .map(|e| {
                let status = e.state.load(Ordering::Acquire);
                let until = e.until.load(Ordering::Relaxed);
                let ejected_until_unix_ms = (status != HEALTHY)
                    .then(|| wall_now + until.saturating_sub(now_ns) / 1_000_000);
                EndpointSnapshot {
                    id: e.id.to_string(),
                    address: e.authority.to_string(),
                    state: match status {
                        HEALTHY => "healthy",
                        PROBING => "probing",
                        _ => "ejected",
                    },
                    ejected_until_unix_ms,
                    times_ejected: e.times_ejected.load(Ordering::Relaxed),
                    outstanding: e.outstanding(),
                    ewma_ms: e.rtt_estimate_ns(now_ns) / 1e6,
                    consecutive_failures: e.consecutive_failures.load(Ordering::Relaxed),
                    consecutive_connect_failures: e.consecutive_connect.load(Ordering::Relaxed),
                }
            })
            .collect();
        UpstreamSnapshot {
            service: self.name.to_string(),
            instances,
            breaker: state.breaker.as_ref().map(|b| b.snapshot(now)),
            retry_budget_remaining: state.budget.remaining(now),
        }
    }
}

fn build_state(
    name: &str,
    policy: &ServicePolicy,
    previous: Option<&ServiceState>,
    observer: &Arc<dyn UpstreamObserver>,
) -> ServiceState {
    let breaker = match (&policy.breaker, previous) {
        (None, _) => None,
        (Some(config), Some(prev)) if prev.policy.breaker.as_ref() == Some(config) => {
            prev.breaker.clone()
        }
        (Some(config), _) => {
            let breaker = Arc::new(Breaker::named(name, config.clone()));
            observer.breaker_created(name);
            forward_transitions(name, &breaker, observer);
            Some(breaker)
        }
    };
    let budget = match previous {
        Some(prev) if prev.policy.budget == policy.budget => Arc::clone(&prev.budget),
        _ => Arc::new(RetryBudget::new(
            policy.budget.ttl,
            policy.budget.min_per_sec,
            policy.budget.ratio,
        )),
    };
    ServiceState {
        policy: policy.clone(),
        breaker,
        budget,
    }
}

/// Relays a breaker's transitions to the observer until the breaker is dropped (its
/// sender closes). Outside a runtime (plain unit tests) nothing is relayed.
fn forward_transitions(name: &str, breaker: &Breaker, observer: &Arc<dyn UpstreamObserver>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let mut events = breaker.subscribe();
    let observer = Arc::clone(observer);
    let name = name.to_owned();
    runtime.spawn(async move {
        loop {
            match events.recv().await {
                Ok(transition) => observer.breaker_transition(&name, &transition),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(lost)) => {
                    tracing::warn!(service = %name, lost, "breaker events lost (observer too slow)");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
}

fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    // The guarded data is `()`: a panic elsewhere cannot leave it inconsistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the admin API shows of a service.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamSnapshot {
    /// Registry name.
    pub service: String,
    /// Its endpoints.
    pub instances: Vec<EndpointSnapshot>,
    /// Its breaker (`None`: off).
    pub breaker: Option<breakwater_resilience::breaker::BreakerSnapshot>,
    /// Retries the budget would allow now.
    pub retry_budget_remaining: u32,
}

/// What the admin API shows of an endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointSnapshot {
    /// Instance id.
    pub id: String,
    /// `host:port`.
    pub address: String,
    /// `healthy`, `ejected` or `probing` (half-ejected, one probe in flight or due).
    pub state: &'static str,
    /// While ejected: when it is due for its probe (ms since the Unix epoch).
    pub ejected_until_unix_ms: Option<u64>,
    /// Ejections in a row.
    pub times_ejected: u32,
    /// Requests in flight to it.
    pub outstanding: u32,
    /// Its peak-EWMA latency now.
    pub ewma_ms: f64,
    /// Failed tries in a row.
    pub consecutive_failures: u32,
    /// Connect failures in a row.
    pub consecutive_connect_failures: u32,
}

/// A service's endpoints at one moment. Swapped whole; a request keeps the set it
/// started with, so indices into it stay valid across its retries.
#[derive(Debug)]
pub struct EndpointSet {
    /// The endpoints, in discovery's order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// The discovery answer it was built from.
    source: Option<Arc<[Instance]>>,
}

impl EndpointSet {
    fn empty() -> Self {
        Self {
            endpoints: Vec::new(),
            source: None,
        }
    }

    fn rebuilt(&self, instances: &Arc<[Instance]>, service: &str) -> Self {
        let endpoints = instances
            .iter()
            .filter_map(|instance| {
                let authority = authority_of(instance);
                let Some(authority) = authority else {
                    tracing::warn!(
                        service,
                        instance = %instance.id,
                        host = %instance.host,
                        "instance address is not usable; skipped"
                    );
                    return None;
                };
                let kept = self
                    .endpoints
                    .iter()
                    .find(|e| *e.id == *instance.id && e.authority == authority);
                Some(match kept {
                    Some(e) => Arc::clone(e),
                    None => Arc::new(Endpoint::new(&instance.id, authority)),
                })
            })
            .collect();
        Self {
            endpoints,
            source: Some(Arc::clone(instances)),
        }
    }

    /// How many endpoints are ejected or probing.
    pub fn ejected_count(&self) -> usize {
        self.endpoints
            .iter()
            .filter(|e| e.state.load(Ordering::Acquire) != HEALTHY)
            .count()
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether there is no endpoint.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

fn authority_of(instance: &Instance) -> Option<Authority> {
    let host = instance.host.trim_start_matches('[').trim_end_matches(']');
    let text = if host.contains(':') {
        format!("[{host}]:{}", instance.port)
    } else {
        format!("{host}:{}", instance.port)
    };
    text.parse().ok()
}

const HEALTHY: u8 = 0;
const EJECTED: u8 = 1;
const PROBING: u8 = 2;

/// One instance of a service, with the figures balancing and ejection use.
pub struct Endpoint {
    /// Instance id (`<name>-<host>-<port>`), the same everywhere.
    pub id: Arc<str>,
    /// `host:port`, reused for every request's URI.
    pub authority: Authority,
    /// `Host` header value for requests to it.
    pub host_header: HeaderValue,
    outstanding: AtomicU32,
    rtt_ns: AtomicU64,
    rtt_at: AtomicU64,
    consecutive_failures: AtomicU32,
    consecutive_connect: AtomicU32,
    state: AtomicU8,
    until: AtomicU64,
    times_ejected: AtomicU32,
    returned_at: AtomicU64,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.id)
            .field("authority", &self.authority)
            .field("outstanding", &self.outstanding())
            .field("state", &self.state.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// A fresh endpoint: healthy, nothing in flight, the default latency estimate.
    pub fn new(id: &str, authority: Authority) -> Self {
        let host_header = HeaderValue::from_str(authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            id: Arc::from(id),
            authority,
            host_header,
            outstanding: AtomicU32::new(0),
            rtt_ns: AtomicU64::new(DEFAULT_RTT_NS.to_bits()),
            rtt_at: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            consecutive_connect: AtomicU32::new(0),
            state: AtomicU8::new(HEALTHY),
            until: AtomicU64::new(0),
            times_ejected: AtomicU32::new(0),
            returned_at: AtomicU64::new(0),
        }
    }

    /// Requests in flight to it.
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// The peak-EWMA latency estimate at `now_ns`, decayed since its last sample.
    pub fn rtt_estimate_ns(&self, now_ns: u64) -> f64 {
        let est = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let at = self.rtt_at.load(Ordering::Relaxed);
        est * decay(now_ns.saturating_sub(at))
    }

    /// The balancer's cost: latency estimate x (outstanding + 1).
    pub fn load(&self, now_ns: u64) -> f64 {
        self.rtt_estimate_ns(now_ns) * f64::from(self.outstanding() + 1)
    }

    /// Feeds a latency sample: a slower one than the estimate replaces it at once
    /// (peak); a faster one pulls it down with weight growing with the time since the
    /// last sample. A fast failure (a refused connect, an instant 5xx) never lowers the
    /// estimate, so a broken endpoint does not look like the fastest one; nor does it
    /// raise it, so the endpoint keeps its share of picks and the ejection rules, not
    /// the balancer, decide its fate. Concurrent samples may overwrite each other: the
    /// estimate is a heuristic, and a lost sample changes nothing that matters.
    fn observe_rtt(&self, sample_ns: f64, failure: bool, now_ns: u64) {
        let at = self.rtt_at.load(Ordering::Relaxed);
        let elapsed = now_ns.saturating_sub(at);
        let current = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed)) * decay(elapsed);
        if failure && sample_ns <= current {
            return;
        }
        let next = if sample_ns > current {
            sample_ns
        } else {
            let keep = decay(elapsed);
            current * keep + sample_ns * (1.0 - keep)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.rtt_at.store(now_ns, Ordering::Relaxed);
    }

    /// Whether a request may pick it: healthy.
    pub fn is_healthy(&self) -> bool {
        self.state.load(Ordering::Acquire) == HEALTHY
    }

    /// Whether it is ejected and its time is up (a probe is due).
    pub fn probe_due(&self, now_ns: u64) -> bool {
        self.state.load(Ordering::Acquire) == EJECTED
            && now_ns >= self.until.load(Ordering::Relaxed)
    }

    /// Claims the one probe of an ejected endpoint whose time is up. The guard puts the
    /// endpoint back to "probe due" if the probe ends without an answer (cancelled).
    pub fn claim_probe(self: &Arc<Self>, now_ns: u64) -> Option<ProbeClaim> {
        if !self.probe_due(now_ns) {
            return None;
        }
        self.state
            .compare_exchange(EJECTED, PROBING, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| ProbeClaim(Arc::clone(self)))
    }

    /// Ejection time and count for a new ejection: base x n, capped; the count starts
    /// over once the endpoint has stayed back for longer than the longest ejection.
    fn eject_times(
        &self,
        outlier: &OutlierSettings,
        now_ns: u64,
        probe_failed: bool,
    ) -> (u64, u32) {
        let previous = self.times_ejected.load(Ordering::Relaxed);
        let returned = self.returned_at.load(Ordering::Relaxed);
        let long_ago = u64::try_from(outlier.max_ejection_time.as_nanos()).unwrap_or(u64::MAX);
        let times = if probe_failed || (previous > 0 && now_ns.saturating_sub(returned) <= long_ago)
        {
            previous.saturating_add(1)
        } else {
            1
        };
        let span = outlier
            .base_ejection_time
            .saturating_mul(times)
            .min(outlier.max_ejection_time);
        let until = now_ns.saturating_add(u64::try_from(span.as_nanos()).unwrap_or(u64::MAX));
        (until, times)
    }
}

fn decay(elapsed_ns: u64) -> f64 {
    (-(elapsed_ns as f64) / EWMA_DECAY_NS).exp()
}

/// A request in flight to an endpoint; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The probe of a half-ejected endpoint. If it is dropped while the endpoint is still
/// probing (the request was cancelled before an answer), the probe is due again.
#[derive(Debug)]
pub struct ProbeClaim(Arc<Endpoint>);

impl Drop for ProbeClaim {
    fn drop(&mut self) {
        let _ =
            self.0
                .state
                .compare_exchange(PROBING, EJECTED, Ordering::AcqRel, Ordering::Acquire);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{Tried, pick};
    use crate::classify::{self, Replay};
    use crate::policy::{BalanceKind, BudgetSettings};
    use http::StatusCode;

    fn instance(port: u16) -> Instance {
        Instance {
            id: format!("svc-127.0.0.1-{port}"),
            name: "svc".into(),
            host: "127.0.0.1".into(),
            port,
            heartbeat_interval: 30,
            registered_at: 0,
            last_heartbeat: 0,
            status: "healthy".into(),
            metadata: serde_json::Map::new(),
        }
    }

    fn instances(ports: &[u16]) -> Arc<[Instance]> {
        ports.iter().map(|&p| instance(p)).collect()
    }

    fn policy(max_ejection_percent: u8) -> ServicePolicy {
        ServicePolicy {
            breaker: None,
            budget: BudgetSettings {
                ratio: 0.2,
                min_per_sec: 10,
                ttl: Duration::from_secs(10),
            },
            outlier: OutlierSettings {
                consecutive_5xx: 5,
                consecutive_connect_failures: 3,
                base_ejection_time: Duration::from_secs(10),
                max_ejection_time: Duration::from_secs(300),
                max_ejection_percent,
            },
        }
    }

    fn status(code: u16) -> Classified {
        classify::response(StatusCode::from_u16(code).unwrap(), Replay::Any)
    }

    fn connect_error() -> Classified {
        classify::failure(AttemptKind::ConnectError, Replay::Any)
    }

    const MS: Duration = Duration::from_millis(1);

    /// Which endpoint indices `n` fresh requests pick (first try each).
    fn picks(up: &Upstream, set: &EndpointSet, n: usize) -> Vec<usize> {
        let now = up.nanos(Instant::now());
        (0..n)
            .map(|_| {
                pick(
                    up,
                    set,
                    BalanceKind::RoundRobin,
                    Tried::default(),
                    now,
                    &mut rand::rng(),
                )
                .unwrap()
                .index
            })
            .collect()
    }

    fn state_of(up: &Upstream, index: usize) -> &'static str {
        up.snapshot(Instant::now()).instances[index].state
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_5xx_eject_and_a_successful_probe_returns_the_endpoint() {
        let up = Upstream::standalone("svc", &policy(50));
        let set = up.endpoints_for(&instances(&[1, 2, 3]));
        let bad = Arc::clone(&set.endpoints[0]);
        for _ in 0..4 {
            up.observe(&set, &bad, &status(503), false, MS, Instant::now());
        }
        assert_eq!(state_of(&up, 0), "healthy", "four failures are not five");
        up.observe(&set, &bad, &status(200), false, MS, Instant::now());
        for _ in 0..4 {
            up.observe(&set, &bad, &status(500), false, MS, Instant::now());
        }
        assert_eq!(state_of(&up, 0), "healthy", "a success resets the streak");
        up.observe(&set, &bad, &status(502), false, MS, Instant::now());
        assert_eq!(state_of(&up, 0), "ejected");
        assert!(
            !picks(&up, &set, 30).contains(&0),
            "ejected endpoints are skipped"
        );

        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(
            !picks(&up, &set, 30).contains(&0),
            "not before its time is up"
        );
        tokio::time::advance(MS).await;
        let now = up.nanos(Instant::now());
        let probe = pick(
            &up,
            &set,
            BalanceKind::PeakEwma,
            Tried::default(),
            now,
            &mut rand::rng(),
        )
        .unwrap();
        assert_eq!(
            (probe.index, probe.probe.is_some()),
            (0, true),
            "the due endpoint is probed first"
        );
        assert_eq!(state_of(&up, 0), "probing");
        assert!(
            !picks(&up, &set, 30).contains(&0),
            "one probe at a time: others keep away while it runs"
        );
        up.observe(&set, &bad, &status(200), true, MS, Instant::now());
        drop(probe);
        assert_eq!(state_of(&up, 0), "healthy");
        assert!(
            picks(&up, &set, 3).contains(&0),
            "returned endpoints get traffic again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_ejects_again_for_longer_and_a_cancelled_one_is_retried() {
        let up = Upstream::standalone("svc", &policy(50));
        let set = up.endpoints_for(&instances(&[1, 2, 3]));
        let bad = Arc::clone(&set.endpoints[1]);
        for _ in 0..5 {
            up.observe(&set, &bad, &status(503), false, MS, Instant::now());
        }
        assert_eq!(up.snapshot(Instant::now()).instances[1].times_ejected, 1);
        tokio::time::advance(Duration::from_secs(10)).await;

        // A probe that ends without an answer (cancelled) leaves the probe due.
        let claim = bad.claim_probe(up.nanos(Instant::now())).unwrap();
        assert!(
            bad.claim_probe(up.nanos(Instant::now())).is_none(),
            "only one probe"
        );
        drop(claim);
        assert!(bad.probe_due(up.nanos(Instant::now())));

        let claim = bad.claim_probe(up.nanos(Instant::now())).unwrap();
        up.observe(&set, &bad, &status(503), true, MS, Instant::now());
        drop(claim);
        let snap = up.snapshot(Instant::now());
        assert_eq!(
            (snap.instances[1].state, snap.instances[1].times_ejected),
            ("ejected", 2)
        );

        tokio::time::advance(Duration::from_millis(19_999)).await;
        assert!(
            !bad.probe_due(up.nanos(Instant::now())),
            "the second ejection is twice as long"
        );
        tokio::time::advance(MS).await;
        assert!(bad.probe_due(up.nanos(Instant::now())));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_grows_up_to_the_cap() {
        let mut p = policy(50);
        p.outlier.max_ejection_time = Duration::from_secs(25);
        let up = Upstream::standalone("svc", &p);
        let set = up.endpoints_for(&instances(&[1, 2]));
        let bad = Arc::clone(&set.endpoints[0]);
        for _ in 0..5 {
            up.observe(&set, &bad, &status(500), false, MS, Instant::now());
        }
        for (wait, times) in [(10, 2), (20, 3), (25, 4)] {
            tokio::time::advance(Duration::from_secs(wait)).await;
            let claim = bad
                .claim_probe(up.nanos(Instant::now()))
                .expect("probe due");
            up.observe(&set, &bad, &connect_error(), true, MS, Instant::now());
            drop(claim);
            assert_eq!(bad.times_ejected.load(Ordering::Relaxed), times);
        }
        tokio::time::advance(Duration::from_millis(24_999)).await;
        assert!(!bad.probe_due(up.nanos(Instant::now())));
        tokio::time::advance(MS).await;
        assert!(
            bad.probe_due(up.nanos(Instant::now())),
            "capped at max_ejection_time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn connect_failures_eject_after_three() {
        let up = Upstream::standalone("svc", &policy(50));
        let set = up.endpoints_for(&instances(&[1, 2]));
        let dead = Arc::clone(&set.endpoints[0]);
        up.observe(&set, &dead, &connect_error(), false, MS, Instant::now());
        up.observe(&set, &dead, &connect_error(), false, MS, Instant::now());
        assert_eq!(state_of(&up, 0), "healthy");
        up.observe(&set, &dead, &connect_error(), false, MS, Instant::now());
        assert_eq!(state_of(&up, 0), "ejected");
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_max_ejection_percent_at_once() {
        let up = Upstream::standalone("svc", &policy(50));
        let set = up.endpoints_for(&instances(&[1, 2, 3, 4, 5]));
        for e in &set.endpoints {
            for _ in 0..3 {
                up.observe(&set, e, &connect_error(), false, MS, Instant::now());
            }
        }
        assert_eq!(set.ejected_count(), 2, "50% of 5 is 2 whole endpoints");
        let states: Vec<_> = up
            .snapshot(Instant::now())
            .instances
            .iter()
            .map(|i| i.state)
            .collect();
        assert_eq!(
            states,
            ["ejected", "ejected", "healthy", "healthy", "healthy"]
        );

        // A lone endpoint is never ejected at 50%: there would be nothing left.
        let single = Upstream::standalone("one", &policy(50));
        let set = single.endpoints_for(&instances(&[9]));
        for _ in 0..10 {
            single.observe(
                &set,
                &set.endpoints[0],
                &connect_error(),
                false,
                MS,
                Instant::now(),
            );
        }
        assert_eq!(set.ejected_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn rebuilds_keep_the_figures_of_surviving_endpoints() {
        let up = Upstream::standalone("svc", &policy(50));
        let first = up.endpoints_for(&instances(&[1, 2]));
        assert!(Arc::ptr_eq(
            &first,
            &up.endpoints_for(&Arc::clone(first.source.as_ref().unwrap()))
        ));
        let kept = Arc::clone(&first.endpoints[1]);
        let _busy = kept.start();
        let second = up.endpoints_for(&instances(&[2, 3]));
        assert_eq!(second.len(), 2);
        assert!(
            Arc::ptr_eq(&second.endpoints[0], &kept),
            "instance 2 survives with its figures"
        );
        assert_eq!(second.endpoints[0].outstanding(), 1);
        assert_eq!(&*second.endpoints[1].id, "svc-127.0.0.1-3");
    }

    #[derive(Debug, Default)]
    struct SetChanges(Mutex<Vec<Vec<String>>>);

    impl UpstreamObserver for SetChanges {
        fn breaker_created(&self, _: &str) {}
        fn breaker_transition(&self, _: &str, _: &Transition) {}
        fn ejection(&self, _: &str, _: &EjectionChange) {}
        fn endpoints_changed(&self, _: &str, set: &EndpointSet) {
            let ids = set.endpoints.iter().map(|e| e.id.to_string()).collect();
            self.0.lock().unwrap().push(ids);
        }
    }

    #[tokio::test]
    async fn the_observer_hears_of_each_changed_endpoint_set_only() {
        let changes = Arc::new(SetChanges::default());
        let ups = Upstreams::new(Arc::clone(&changes) as Arc<dyn UpstreamObserver>);
        let up = ups.get_or_create("svc", &policy(50));
        up.endpoints_for(&instances(&[1, 2]));
        // A new discovery answer with the same instances changes no endpoint.
        up.endpoints_for(&instances(&[1, 2]));
        up.endpoints_for(&instances(&[2]));
        assert_eq!(
            *changes.0.lock().unwrap(),
            [
                vec!["svc-127.0.0.1-1".to_owned(), "svc-127.0.0.1-2".to_owned()],
                vec!["svc-127.0.0.1-2".to_owned()],
            ]
        );
    }

    #[test]
    fn peak_ewma_jumps_up_at_once_and_decays_slowly() {
        let e = Endpoint::new("e", Authority::from_static("127.0.0.1:1"));
        let s = 1_000_000_000_u64;
        e.observe_rtt(50e6, false, s);
        assert!(
            (e.rtt_estimate_ns(s) - 50e6).abs() < 1.0,
            "a slower sample is taken whole"
        );
        e.observe_rtt(1e3, true, s + 1);
        assert!(
            (e.rtt_estimate_ns(s + 1) - 50e6).abs() < 1.0,
            "a fast failure changes nothing"
        );
        e.observe_rtt(1e6, false, s + 1_000_000);
        assert!(
            e.rtt_estimate_ns(s + 1_000_000) > 49e6,
            "one fast sample barely moves it"
        );
        let later = s + 10 * s;
        assert!(e.rtt_estimate_ns(later) < 50e6 * 0.5, "it decays with time");
        let before = e.load(later);
        let _a = Arc::new(e);
        let guard = _a.start();
        assert!(
            (_a.load(later) - 2.0 * before).abs() < 1.0,
            "cost scales with outstanding + 1"
        );
        drop(guard);
        assert_eq!(_a.outstanding(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_breaker_config_replaces_the_breaker_and_an_equal_one_keeps_it() {
        let mut p = policy(50);
        p.breaker = Some(breakwater_resilience::breaker::BreakerConfig::default());
        let ups = Upstreams::new(Arc::new(NoObserver));
        let up = ups.get_or_create("svc", &p);
        let before = up.state().breaker.clone().unwrap();
        let same = ups.get_or_create("svc", &p);
        assert!(Arc::ptr_eq(&up, &same));
        assert!(Arc::ptr_eq(&before, same.state().breaker.as_ref().unwrap()));
        let budget = Arc::clone(&up.state().budget);
        p.breaker.as_mut().unwrap().open_for = Duration::from_secs(5);
        let changed = ups.get_or_create("svc", &p);
        assert!(!Arc::ptr_eq(
            &before,
            changed.state().breaker.as_ref().unwrap()
        ));
        assert!(
            Arc::ptr_eq(&budget, &changed.state().budget),
            "the budget did not change"
        );
        assert_eq!(ups.all().len(), 1);
    }
}
