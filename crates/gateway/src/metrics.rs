//! The gateway's Prometheus metrics, on prometheus-client with a registry owned by
//! [`Metrics`] (no global state), rendered by `GET /metrics`.
//!
//! Recording is on the hot path, so each family keeps a handle table keyed by the label
//! values as one string: after a label set's first use, recording is one uncontended
//! read lock, one hash and an atomic add, with no allocation (composite keys are built in
//! a per-thread buffer). The prometheus-client `Family` is only touched the first time a
//! label set is seen. The two per-request records ([`Metrics::request`] and
//! [`Metrics::attempt`]) go one step further: each thread keeps the handles it used last
//! ([`HotHandles`]), found by comparing label values, with no lock and no hashing.
//!
//! Series labelled by instance (`upstream_attempts_total`, `ejections_total`) would grow
//! without bound as instances come and go, so [`Metrics::instances_now`] tells it each
//! service's current instances ([`Departures`]): the series of an instance that left are
//! removed once it has been gone for [`DEPARTED_GRACE`] (so a scrape still sees its last
//! counts), checked on every endpoint-set change and every render.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use breakwater_resilience::breaker;
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderMap, Method};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::time::Instant;

/// Latency buckets for a proxy, in seconds: 0.5 ms to 10 s in 1-2.5-5 steps.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// `Content-Type` of [`Metrics::render`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of [`Metrics::render_prometheus_text`].
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long the series of an instance that left its service stay: several scrape
/// intervals, so that the counts of its last moments (often its failures) are scraped.
pub const DEPARTED_GRACE: Duration = Duration::from_secs(300);

/// How one upstream attempt ended, as the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A response that is not a 4xx or 5xx.
    Success,
    /// The upstream answered 5xx.
    Status5xx,
    /// No connection could be made.
    ConnectError,
    /// The per-try timeout fired.
    Timeout,
    /// The connection broke or the upstream spoke bad HTTP.
    ProtocolError,
    /// The upstream answered 4xx (the client's fault, not the upstream's).
    Status4xx,
}

impl AttemptOutcome {
    /// Every outcome, for removing all of an instance's series.
    const ALL: [Self; 6] = [
        Self::Success,
        Self::Status5xx,
        Self::ConnectError,
        Self::Timeout,
        Self::ProtocolError,
        Self::Status4xx,
    ];

    /// The label value: `success`, `5xx`, `connect_error`, `timeout`, `protocol_error`,
    /// `4xx`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Status5xx => "5xx",
            Self::ConnectError => "connect_error",
            Self::Timeout => "timeout",
            Self::ProtocolError => "protocol_error",
            Self::Status4xx => "4xx",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    service: String,
    instance: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    service: String,
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerStateLabels {
    service: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RedisLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    route: String,
    result: &'static str,
}

type HistogramFamily<L> = Family<L, ShardedHistogram, fn() -> ShardedHistogram>;

fn latency_histogram() -> ShardedHistogram {
    ShardedHistogram::new(LATENCY_BUCKETS)
}

/// Metric handles by label key, in front of a `Family` whose lookup would need an owned
/// label set (allocations) on every call.
struct Handles<M> {
    by_key: RwLock<HashMap<Box<str>, M>>,
}

impl<M> Default for Handles<M> {
    fn default() -> Self {
        Self {
            by_key: RwLock::new(HashMap::new()),
        }
    }
}

impl<M> std::fmt::Debug for Handles<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self
            .by_key
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("Handles").field("len", &len).finish()
    }
}

impl<M> Handles<M> {
    /// The label keys of every handle.
    fn keys(&self) -> Vec<Box<str>> {
        self.by_key
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Runs `record` on the handle for `key`, creating it with `create` the first time.
    fn with<R>(&self, key: &str, create: impl FnOnce() -> M, record: impl FnOnce(&M) -> R) -> R {
        // A poisoned table is still a valid map: every write is a single insert.
        {
            let read = self.by_key.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(handle) = read.get(key) {
                return record(handle);
            }
        }
        let mut write = self.by_key.write().unwrap_or_else(PoisonError::into_inner);
        record(write.entry(key.into()).or_insert_with(create))
    }
}

thread_local! {
    static KEY_BUFFER: RefCell<String> = const { RefCell::new(String::new()) };
    static HOT: RefCell<HotHandles> = const { RefCell::new(HotHandles::new()) };
}

/// Label sets a thread keeps the handles of, per kind; past this the list starts over
/// (a gateway sees a few dozen routes x statuses, not thousands).
const HOT_MAX: usize = 64;

/// Gives each [`Metrics`] an id, so that a thread's [`HotHandles`] never hand one
/// registry's series to another (tests build many).
static NEXT_METRICS_ID: AtomicU64 = AtomicU64::new(1);

/// One thread's most used request and attempt handles: found by comparing the label
/// values, without the shared table's lock and hash.
struct HotHandles {
    requests: Vec<HotRequest>,
    attempts: Vec<HotAttempt>,
}

struct HotRequest {
    metrics: u64,
    status: u16,
    method: &'static str,
    route: Box<str>,
    count: ShardedCounter,
    duration: ShardedHistogram,
}

struct HotAttempt {
    metrics: u64,
    /// [`Metrics::generation`] when it was taken: series removed since may include it.
    generation: u64,
    outcome: &'static str,
    service: Box<str>,
    instance: Box<str>,
    count: ShardedCounter,
    duration: ShardedHistogram,
}

impl HotHandles {
    const fn new() -> Self {
        Self {
            requests: Vec::new(),
            attempts: Vec::new(),
        }
    }
}

/// Runs `f` on this thread's hot handles; `None` if they are in use (re-entered).
fn with_hot<R>(f: impl FnOnce(&mut HotHandles) -> R) -> Option<R> {
    HOT.with(|hot| hot.try_borrow_mut().ok().map(|mut hot| f(&mut hot)))
}

/// Calls `f` with one string that stands for `parts` and no other list: each part is
/// length-prefixed, so `("a:b", "c")` and `("a", "b:c")` differ. Built in a per-thread
/// buffer, so no allocation once the buffer has grown.
fn with_key<R>(parts: &[&str], f: impl FnOnce(&str) -> R) -> R {
    fn encode(buf: &mut String, parts: &[&str]) {
        buf.clear();
        for part in parts {
            // Writing to a String cannot fail.
            let _ = write!(buf, "{}:", part.len());
            buf.push_str(part);
        }
    }
    KEY_BUFFER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            encode(&mut buf, parts);
            f(&buf)
        }
        // Only reachable if `f` itself recorded a metric; fall back to a fresh buffer.
        Err(_) => {
            let mut buf = String::new();
            encode(&mut buf, parts);
            f(&buf)
        }
    })
}

/// The parts [`with_key`] joined, or `None` for a string it did not make.
fn key_parts(key: &str) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let mut rest = key;
    while !rest.is_empty() {
        let (len, tail) = rest.split_once(':')?;
        let len: usize = len.parse().ok()?;
        parts.push(tail.get(..len)?);
        rest = tail.get(len..)?;
    }
    Some(parts)
}

/// Each service's instances as of its last endpoint-set change, and since when each
/// instance that still has series has been gone from it.
#[derive(Debug)]
struct Departures {
    live: HashMap<Box<str>, HashSet<Box<str>>>,
    gone_since: HashMap<(Box<str>, Box<str>), Instant>,
    grace: Duration,
}

/// The method as a bounded label value: extension methods are `OTHER`, so a client
/// cannot create unbounded series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

fn seconds(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64()
}

/// Every metric the gateway exports, all named `breakwater_gateway_*`. Share it as an
/// `Arc<Metrics>`; every method takes `&self` and is callable from any thread.
#[derive(Debug)]
pub struct Metrics {
    id: u64,
    registry: Registry,
    requests: Family<RequestLabels, ShardedCounter>,
    requests_by_key: Handles<ShardedCounter>,
    request_duration: HistogramFamily<RouteLabels>,
    request_duration_by_route: Handles<ShardedHistogram>,
    attempts: Family<AttemptLabels, ShardedCounter>,
    attempts_by_key: Handles<ShardedCounter>,
    upstream_duration: HistogramFamily<ServiceLabels>,
    upstream_duration_by_service: Handles<ShardedHistogram>,
    retries: Family<ServiceLabels, Counter>,
    retries_by_service: Handles<Counter>,
    budget_exhausted: Family<ServiceLabels, Counter>,
    budget_exhausted_by_service: Handles<Counter>,
    breaker_state: Family<BreakerStateLabels, Gauge>,
    breaker_state_by_service: Handles<[Gauge; 3]>,
    breaker_rejected: Family<ServiceLabels, Counter>,
    breaker_rejected_by_service: Handles<Counter>,
    ejections: Family<EndpointLabels, Counter>,
    ejections_by_key: Handles<Counter>,
    ejected: Family<ServiceLabels, Gauge>,
    ejected_by_service: Handles<Gauge>,
    rate_limited: Family<RouteLabels, Counter>,
    rate_limited_by_route: Handles<Counter>,
    cache: Family<CacheLabels, Counter>,
    cache_by_route: Handles<[Counter; 2]>,
    redis_fallbacks: Family<RedisLabels, Counter>,
    departures: Mutex<Departures>,
    /// Bumped whenever series are removed, so that no thread keeps recording into a
    /// removed series through its [`HotHandles`].
    generation: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The breaker states in the order of [`Metrics::breaker_state`]'s gauges.
const BREAKER_STATES: [breaker::State; 3] = [
    breaker::State::Closed,
    breaker::State::Open,
    breaker::State::HalfOpen,
];

impl Metrics {
    /// A registry with every family registered and no series yet.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("breakwater_gateway");
        // OTLP export's own figures (spans exported, dropped), when it is on.
        if let Some(tracer) = breakwater_runtime::otlp::Tracer::global() {
            tracer.register(&mut registry);
        }
        let requests = Family::<RequestLabels, ShardedCounter>::default();
        registry.register(
            "requests",
            "Requests answered by the gateway, by route, method and status",
            requests.clone(),
        );
        let request_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time from request to response head, by route",
            Unit::Seconds,
            request_duration.clone(),
        );
        let attempts = Family::<AttemptLabels, ShardedCounter>::default();
        registry.register(
            "upstream_attempts",
            "Upstream attempts (first tries and retries), by service, instance and outcome",
            attempts.clone(),
        );
        let upstream_duration: HistogramFamily<ServiceLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "upstream_duration",
            "Duration of one upstream attempt, by service",
            Unit::Seconds,
            upstream_duration.clone(),
        );
        let retries = Family::<ServiceLabels, Counter>::default();
        registry.register("retries", "Retries sent, by service", retries.clone());
        let budget_exhausted = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "retry_budget_exhausted",
            "Retries not sent because the service's retry budget was spent",
            budget_exhausted.clone(),
        );
        let breaker_state = Family::<BreakerStateLabels, Gauge>::default();
        registry.register(
            "breaker_state",
            "Circuit breaker state by service: 1 for the current state, 0 for the others",
            breaker_state.clone(),
        );
        let breaker_rejected = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "breaker_rejected",
            "Requests refused by an open (or saturated half-open) breaker, by service",
            breaker_rejected.clone(),
        );
        let ejections = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "ejections",
            "Outlier ejections of an instance, by service and instance",
            ejections.clone(),
        );
        let ejected = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "ejected_endpoints",
            "Instances currently ejected, by service",
            ejected.clone(),
        );
        let rate_limited = Family::<RouteLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429 by the route's rate limit",
            rate_limited.clone(),
        );
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Response cache lookups, by route and result (hit or miss)",
            cache.clone(),
        );
        let redis_fallbacks = Family::<RedisLabels, Counter>::default();
        registry.register(
            "redis_fallbacks",
            "Rate-limit decisions and cache lookups made without Redis because it failed or \
             was too slow, by kind (rate_limit, cache)",
            redis_fallbacks.clone(),
        );
        Self {
            id: NEXT_METRICS_ID.fetch_add(1, Ordering::Relaxed),
            registry,
            requests,
            requests_by_key: Handles::default(),
            request_duration,
            request_duration_by_route: Handles::default(),
            attempts,
            attempts_by_key: Handles::default(),
            upstream_duration,
            upstream_duration_by_service: Handles::default(),
            retries,
            retries_by_service: Handles::default(),
            budget_exhausted,
            budget_exhausted_by_service: Handles::default(),
            breaker_state,
            breaker_state_by_service: Handles::default(),
            breaker_rejected,
            breaker_rejected_by_service: Handles::default(),
            ejections,
            ejections_by_key: Handles::default(),
            ejected,
            ejected_by_service: Handles::default(),
            rate_limited,
            rate_limited_by_route: Handles::default(),
            cache,
            cache_by_route: Handles::default(),
            redis_fallbacks,
            departures: Mutex::new(Departures {
                live: HashMap::new(),
                gone_since: HashMap::new(),
                grace: DEPARTED_GRACE,
            }),
            generation: AtomicU64::new(0),
        }
    }

    /// `service`'s instances now (its endpoint set changed). Series of its other
    /// instances are removed once those have been gone for the grace period
    /// ([`DEPARTED_GRACE`] unless [`Metrics::set_departed_grace`] says otherwise); an
    /// instance that comes back before that keeps its series. Services never named here
    /// keep all their series.
    pub fn instances_now<'a>(&self, service: &str, instances: impl IntoIterator<Item = &'a str>) {
        let live: HashSet<Box<str>> = instances.into_iter().map(Box::from).collect();
        {
            let mut departures = lock(&self.departures);
            departures
                .gone_since
                .retain(|(s, i), _| **s != *service || !live.contains(i));
            departures.live.insert(service.into(), live);
        }
        self.sweep_departed(Instant::now());
    }

    /// How long the series of an instance that left stay.
    pub fn set_departed_grace(&self, grace: Duration) {
        lock(&self.departures).grace = grace;
    }

    /// Removes the series of instances gone from their service for the grace period.
    /// An attempt that ends after its instance left may create a series again; the next
    /// sweep (at the latest the next render) starts its grace period.
    fn sweep_departed(&self, now: Instant) {
        let mut departures = lock(&self.departures);
        if departures.live.is_empty() {
            return;
        }
        let present: HashSet<(Box<str>, Box<str>)> = self
            .attempts_by_key
            .keys()
            .into_iter()
            .chain(self.ejections_by_key.keys())
            .filter_map(|key| match key_parts(&key)?.as_slice() {
                [service, instance, ..] => Some((Box::from(*service), Box::from(*instance))),
                _ => None,
            })
            .collect();
        // Departures whose series are gone need no clock any more.
        departures.gone_since.retain(|key, _| present.contains(key));
        let grace = departures.grace;
        let mut expired = Vec::new();
        for key in present {
            let Some(live) = departures.live.get(&key.0) else {
                continue;
            };
            if live.contains(&key.1) {
                continue;
            }
            let since = *departures.gone_since.entry(key.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= grace {
                departures.gone_since.remove(&key);
                expired.push(key);
            }
        }
        if expired.is_empty() {
            return;
        }
        for (service, instance) in &expired {
            self.remove_instance_series(service, instance);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(
            removed = expired.len(),
            "metric series of departed instances removed"
        );
    }

    fn remove_instance_series(&self, service: &str, instance: &str) {
        {
            let mut handles = self
                .attempts_by_key
                .by_key
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for outcome in AttemptOutcome::ALL.map(AttemptOutcome::as_str) {
                with_key(&[service, instance, outcome], |key| handles.remove(key));
                self.attempts.remove(&AttemptLabels {
                    service: service.to_owned(),
                    instance: instance.to_owned(),
                    outcome,
                });
            }
        }
        let mut handles = self
            .ejections_by_key
            .by_key
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        with_key(&[service, instance], |key| handles.remove(key));
        self.ejections.remove(&EndpointLabels {
            service: service.to_owned(),
            instance: instance.to_owned(),
        });
    }

    /// The counter of `redis_fallbacks_total{kind}`, for the part that meets Redis
    /// (`rate_limit` or `cache`) to count on without a lookup per event.
    pub fn redis_fallbacks(&self, kind: &'static str) -> Counter {
        self.redis_fallbacks
            .get_or_create_owned(&RedisLabels { kind })
    }

    /// One answered request: `requests_total{route,method,status}` and
    /// `request_duration_seconds{route}`.
    pub fn request(&self, route: &str, method: &Method, status: u16, elapsed: Duration) {
        let method = method_label(method);
        let recorded = with_hot(|hot| {
            let found = hot.requests.iter().find(|h| {
                h.metrics == self.id
                    && h.status == status
                    && h.method == method
                    && *h.route == *route
            })?;
            found.count.inc();
            found.duration.observe(seconds(elapsed));
            Some(())
        })
        .flatten();
        if recorded.is_some() {
            return;
        }
        let digits = itoa_u16(status);
        let count = with_key(&[route, method, digits.as_str()], |key| {
            self.requests_by_key.with(
                key,
                || {
                    self.requests.get_or_create_owned(&RequestLabels {
                        route: route.to_owned(),
                        method,
                        status,
                    })
                },
                ShardedCounter::clone,
            )
        });
        let duration = self.request_duration_by_route.with(
            route,
            || {
                self.request_duration.get_or_create_owned(&RouteLabels {
                    route: route.to_owned(),
                })
            },
            ShardedHistogram::clone,
        );
        count.inc();
        duration.observe(seconds(elapsed));
        with_hot(|hot| {
            if hot.requests.len() >= HOT_MAX {
                hot.requests.clear();
            }
            hot.requests.push(HotRequest {
                metrics: self.id,
                status,
                method,
                route: route.into(),
                count,
                duration,
            });
        });
    }

    /// One upstream attempt: `upstream_attempts_total{service,instance,outcome}` and
    /// `upstream_duration_seconds{service}`.
    pub fn attempt(
        &self,
        service: &str,
        instance: &str,
        outcome: AttemptOutcome,
        elapsed: Duration,
    ) {
        let outcome = outcome.as_str();
        let generation = self.generation.load(Ordering::Acquire);
        let recorded = with_hot(|hot| {
            let found = hot.attempts.iter().find(|h| {
                h.metrics == self.id
                    && h.generation == generation
                    && h.outcome == outcome
                    && *h.instance == *instance
                    && *h.service == *service
            })?;
            found.count.inc();
            found.duration.observe(seconds(elapsed));
            Some(())
        })
        .flatten();
        if recorded.is_some() {
            return;
        }
        let count = with_key(&[service, instance, outcome], |key| {
            self.attempts_by_key.with(
                key,
                || {
                    self.attempts.get_or_create_owned(&AttemptLabels {
                        service: service.to_owned(),
                        instance: instance.to_owned(),
                        outcome,
                    })
                },
                ShardedCounter::clone,
            )
        });
        let duration = self.upstream_duration_by_service.with(
            service,
            || {
                self.upstream_duration.get_or_create_owned(&ServiceLabels {
                    service: service.to_owned(),
                })
            },
            ShardedHistogram::clone,
        );
        count.inc();
        duration.observe(seconds(elapsed));
        with_hot(|hot| {
            hot.attempts
                .retain(|h| h.metrics != self.id || h.generation == generation);
            if hot.attempts.len() >= HOT_MAX {
                hot.attempts.clear();
            }
            hot.attempts.push(HotAttempt {
                metrics: self.id,
                generation,
                outcome,
                service: service.into(),
                instance: instance.into(),
                count,
                duration,
            });
        });
    }

    /// One retry sent: `retries_total{service}`.
    pub fn retry(&self, service: &str) {
        Self::count_service(&self.retries, &self.retries_by_service, service);
    }

    /// One retry refused by the budget: `retry_budget_exhausted_total{service}`.
    pub fn retry_budget_exhausted(&self, service: &str) {
        Self::count_service(
            &self.budget_exhausted,
            &self.budget_exhausted_by_service,
            service,
        );
    }

    /// The breaker's current state: `breaker_state{service,state}` is 1 for `state` and
    /// 0 for the two others.
    pub fn breaker_state(&self, service: &str, state: breaker::State) {
        self.breaker_state_by_service.with(
            service,
            || {
                BREAKER_STATES.map(|s| {
                    self.breaker_state.get_or_create_owned(&BreakerStateLabels {
                        service: service.to_owned(),
                        state: s.as_str(),
                    })
                })
            },
            |gauges| {
                for (s, gauge) in BREAKER_STATES.iter().zip(gauges) {
                    gauge.set(i64::from(*s == state));
                }
            },
        );
    }

    /// One request refused by the breaker: `breaker_rejected_total{service}`.
    pub fn breaker_rejected(&self, service: &str) {
        Self::count_service(
            &self.breaker_rejected,
            &self.breaker_rejected_by_service,
            service,
        );
    }

    /// One outlier ejection: `ejections_total{service,instance}`.
    pub fn ejection(&self, service: &str, instance: &str) {
        with_key(&[service, instance], |key| {
            self.ejections_by_key.with(
                key,
                || {
                    self.ejections.get_or_create_owned(&EndpointLabels {
                        service: service.to_owned(),
                        instance: instance.to_owned(),
                    })
                },
                |c| {
                    c.inc();
                },
            );
        });
    }

    /// How many of the service's instances are ejected now: `ejected_endpoints{service}`.
    pub fn ejected(&self, service: &str, count: usize) {
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        self.ejected_by_service.with(
            service,
            || {
                self.ejected.get_or_create_owned(&ServiceLabels {
                    service: service.to_owned(),
                })
            },
            |g| {
                g.set(count);
            },
        );
    }

    /// One request refused by the route's rate limit: `rate_limited_total{route}`.
    pub fn rate_limited(&self, route: &str) {
        self.rate_limited_by_route.with(
            route,
            || {
                self.rate_limited.get_or_create_owned(&RouteLabels {
                    route: route.to_owned(),
                })
            },
            |c| {
                c.inc();
            },
        );
    }

    /// One cache lookup: `cache_requests_total{route,result="hit"|"miss"}`.
    pub fn cache(&self, route: &str, hit: bool) {
        self.cache_by_route.with(
            route,
            || {
                ["hit", "miss"].map(|result| {
                    self.cache.get_or_create_owned(&CacheLabels {
                        route: route.to_owned(),
                        result,
                    })
                })
            },
            |[hits, misses]| {
                let counter = if hit { hits } else { misses };
                counter.inc();
            },
        );
    }

    /// Every series in the OpenMetrics text format ([`OPENMETRICS_CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        self.sweep_departed(Instant::now());
        let mut out = String::new();
        // Encoding into a String cannot fail; an error would only truncate the output.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Every series in the Prometheus text format 0.0.4
    /// ([`PROMETHEUS_TEXT_CONTENT_TYPE`]), for scrapers that do not ask for OpenMetrics.
    pub fn render_prometheus_text(&self) -> String {
        self.sweep_departed(Instant::now());
        let mut out = String::new();
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    fn count_service(
        family: &Family<ServiceLabels, Counter>,
        handles: &Handles<Counter>,
        service: &str,
    ) {
        handles.with(
            service,
            || {
                family.get_or_create_owned(&ServiceLabels {
                    service: service.to_owned(),
                })
            },
            |c| {
                c.inc();
            },
        );
    }

    /// The exposition the client asked for: OpenMetrics when `Accept` names it, else the
    /// Prometheus text format (what curl and older scrapers read).
    pub fn response(&self, request_headers: &HeaderMap) -> Response {
        let wants_openmetrics = request_headers
            .get_all(ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
        if wants_openmetrics {
            ([(CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], self.render()).into_response()
        } else {
            (
                [(CONTENT_TYPE, PROMETHEUS_TEXT_CONTENT_TYPE)],
                self.render_prometheus_text(),
            )
                .into_response()
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update of the guarded maps is a single insert or removal.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A status code's decimal digits without allocating.
fn itoa_u16(n: u16) -> Digits {
    let mut digits = Digits::default();
    let _ = write!(digits, "{n}");
    digits
}

/// Up to five decimal digits on the stack.
#[derive(Default)]
struct Digits {
    buf: [u8; 5],
    len: usize,
}

impl Digits {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl std::fmt::Write for Digits {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let slot = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// `GET /metrics`: the gateway's metrics, OpenMetrics or Prometheus text by `Accept`.
pub async fn handler(State(metrics): State<Arc<Metrics>>, headers: HeaderMap) -> Response {
    metrics.response(&headers)
}

mod sharded;

pub use sharded::{ShardedCounter, ShardedHistogram};

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    const MS: Duration = Duration::from_millis(3);

    #[test]
    fn render_contains_every_family_with_its_labels() {
        let m = Metrics::new();
        m.request("users", &Method::GET, 200, MS);
        m.request("users", &Method::GET, 200, MS);
        m.request("users", &Method::from_bytes(b"PURGE").unwrap(), 503, MS);
        m.attempt(
            "users",
            "users-127.0.0.1-4000",
            AttemptOutcome::ConnectError,
            MS,
        );
        m.retry("users");
        m.retry_budget_exhausted("users");
        m.breaker_state("users", breaker::State::Open);
        m.breaker_rejected("users");
        m.ejection("users", "users-127.0.0.1-4000");
        m.ejected("users", 1);
        m.rate_limited("analytics");
        m.cache("summary", true);
        m.cache("summary", false);
        m.cache("summary", true);
        let text = m.render();
        for line in [
            r#"breakwater_gateway_requests_total{route="users",method="GET",status="200"} 2"#,
            r#"breakwater_gateway_requests_total{route="users",method="OTHER",status="503"} 1"#,
            r#"breakwater_gateway_request_duration_seconds_count{route="users"} 3"#,
            r#"breakwater_gateway_request_duration_seconds_bucket{le="0.005",route="users"} 3"#,
            r#"breakwater_gateway_upstream_attempts_total{service="users",instance="users-127.0.0.1-4000",outcome="connect_error"} 1"#,
            r#"breakwater_gateway_upstream_duration_seconds_count{service="users"} 1"#,
            r#"breakwater_gateway_retries_total{service="users"} 1"#,
            r#"breakwater_gateway_retry_budget_exhausted_total{service="users"} 1"#,
            r#"breakwater_gateway_breaker_state{service="users",state="OPEN"} 1"#,
            r#"breakwater_gateway_breaker_state{service="users",state="CLOSED"} 0"#,
            r#"breakwater_gateway_breaker_state{service="users",state="HALF_OPEN"} 0"#,
            r#"breakwater_gateway_breaker_rejected_total{service="users"} 1"#,
            r#"breakwater_gateway_ejections_total{service="users",instance="users-127.0.0.1-4000"} 1"#,
            r#"breakwater_gateway_ejected_endpoints{service="users"} 1"#,
            r#"breakwater_gateway_rate_limited_total{route="analytics"} 1"#,
            r#"breakwater_gateway_cache_requests_total{route="summary",result="hit"} 2"#,
            r#"breakwater_gateway_cache_requests_total{route="summary",result="miss"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn breaker_state_moves_the_one() {
        let m = Metrics::new();
        m.breaker_state("orders", breaker::State::Open);
        m.breaker_state("orders", breaker::State::HalfOpen);
        let text = m.render();
        assert!(text.contains(r#"breaker_state{service="orders",state="HALF_OPEN"} 1"#));
        assert!(text.contains(r#"breaker_state{service="orders",state="OPEN"} 0"#));
    }

    #[test]
    fn label_keys_cannot_collide() {
        let m = Metrics::new();
        m.ejection("a:b", "c");
        m.ejection("a", "b:c");
        let text = m.render();
        assert!(
            text.contains(r#"ejections_total{service="a:b",instance="c"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"ejections_total{service="a",instance="b:c"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.rate_limited("a\"b\\c\nd");
        assert!(
            m.render()
                .contains(r#"rate_limited_total{route="a\"b\\c\nd"} 1"#)
        );
    }

    #[test]
    fn recording_from_many_threads_adds_up() {
        let m = Arc::new(Metrics::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.request("users", &Method::GET, 200, MS);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            m.render()
                .contains(r#"requests_total{route="users",method="GET",status="200"} 4000"#)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn series_of_departed_instances_go_after_the_grace_and_live_ones_stay() {
        let m = Metrics::new();
        for instance in ["users-1", "users-2"] {
            m.attempt("users", instance, AttemptOutcome::Success, MS);
            m.attempt("users", instance, AttemptOutcome::Timeout, MS);
            m.ejection("users", instance);
        }
        m.attempt("orders", "orders-1", AttemptOutcome::Success, MS);
        m.instances_now("users", ["users-1", "users-2"]);
        m.instances_now("users", ["users-1"]);
        let gone = r#"instance="users-2""#;
        assert!(m.render().contains(gone), "kept during the grace period");

        tokio::time::advance(DEPARTED_GRACE - MS).await;
        assert!(m.render().contains(gone));
        tokio::time::advance(MS).await;
        let text = m.render();
        assert!(!text.contains(gone), "{text}");
        for kept in [
            r#"upstream_attempts_total{service="users",instance="users-1",outcome="success"} 1"#,
            r#"upstream_attempts_total{service="users",instance="users-1",outcome="timeout"} 1"#,
            r#"ejections_total{service="users",instance="users-1"} 1"#,
            // A service whose instances were never reported keeps every series.
            r#"upstream_attempts_total{service="orders",instance="orders-1",outcome="success"} 1"#,
        ] {
            assert!(text.contains(kept), "missing {kept} in\n{text}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_back_within_the_grace_keeps_its_series_and_one_back_later_starts_anew() {
        let m = Metrics::new();
        m.set_departed_grace(Duration::from_secs(10));
        m.attempt("users", "users-2", AttemptOutcome::Success, MS);
        m.instances_now("users", []);
        tokio::time::advance(Duration::from_secs(5)).await;
        m.instances_now("users", ["users-2"]);
        tokio::time::advance(Duration::from_secs(60)).await;
        let series =
            r#"upstream_attempts_total{service="users",instance="users-2",outcome="success"}"#;
        assert!(m.render().contains(&format!("{series} 1")));

        m.instances_now("users", []);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!m.render().contains(series));
        // Back on the same id: recorded again through a fresh handle, not one this
        // thread kept for the removed series.
        m.instances_now("users", ["users-2"]);
        m.attempt("users", "users-2", AttemptOutcome::Success, MS);
        m.attempt("users", "users-2", AttemptOutcome::Success, MS);
        assert!(
            m.render().contains(&format!("{series} 2")),
            "{}",
            m.render()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_ending_after_its_instance_left_is_swept_again() {
        let m = Metrics::new();
        m.set_departed_grace(Duration::ZERO);
        m.instances_now("users", ["users-1"]);
        m.attempt("users", "users-9", AttemptOutcome::ConnectError, MS);
        assert!(!m.render().contains("users-9"));
        assert!(m.departures.lock().unwrap().gone_since.is_empty());
    }

    #[test]
    fn keys_split_back_into_their_parts() {
        with_key(&["a:b", "", "c"], |key| {
            assert_eq!(key_parts(key), Some(vec!["a:b", "", "c"]));
        });
        assert_eq!(key_parts("3:ab"), None);
        assert_eq!(key_parts("x:ab"), None);
    }

    #[test]
    fn status_digits_need_no_allocation() {
        assert_eq!(itoa_u16(200).as_str(), "200");
        assert_eq!(itoa_u16(0).as_str(), "0");
        assert_eq!(itoa_u16(u16::MAX).as_str(), "65535");
    }

    #[tokio::test]
    async fn handler_negotiates_the_format() {
        let m = Arc::new(Metrics::new());
        m.retry("users");
        let app = Router::new().route("/metrics", get(handler)).with_state(m);

        let res = app
            .clone()
            .oneshot(http::Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.headers()[CONTENT_TYPE], PROMETHEUS_TEXT_CONTENT_TYPE);
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.contains(r#"breakwater_gateway_retries_total{service="users"} 1"#));
        assert!(!text.contains("# EOF"));

        let res = app
            .oneshot(
                http::Request::get("/metrics")
                    .header(ACCEPT, "application/openmetrics-text;version=1.0.0")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.headers()[CONTENT_TYPE], OPENMETRICS_CONTENT_TYPE);
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        assert!(std::str::from_utf8(&body).unwrap().ends_with("# EOF\n"));
    }
}
