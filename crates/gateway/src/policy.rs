//! The typed, validated resilience policy of a route, as `breakwater.toml` describes it
//! after [`crate::config`] has checked it and merged it over `[defaults]`.
//!
//! A policy has two halves. The route half (timeouts, retry attempts and backoff, rate
//! limit, cache, fallback, balancing) belongs to each route. The service half (breaker,
//! retry budget, outlier ejection) describes state that one service shares across every
//! route that reaches it, so the config refuses routes that disagree about it.

use std::num::NonZeroU32;
use std::time::Duration;

use breakwater_resilience::breaker::BreakerConfig;
use breakwater_resilience::redis_limit::FailMode;
use breakwater_resilience::retry::Backoff;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

/// Everything the request path needs to know about one route.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// How an endpoint is chosen.
    pub balance: BalanceKind,
    /// Per-try and total time limits.
    pub timeout: TimeoutPolicy,
    /// How often and how patiently a failed try is repeated.
    pub retries: RetrySettings,
    /// The service's breaker, shared by every route to the service.
    pub service: ServicePolicy,
    /// Requests per client per period, if limited.
    pub rate_limit: Option<RateLimitSettings>,
    /// GET response caching, if on.
    pub cache: Option<CacheSettings>,
    /// What to answer instead of a gateway-made 5xx, if anything.
    pub fallback: Option<Fallback>,
}

/// The part of a policy that belongs to a service, not a route: one breaker, one retry
/// budget and one set of ejection rules per service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePolicy {
    /// `None`: the breaker is off for this service.
    pub breaker: Option<BreakerConfig>,
    /// The service's retry budget.
    pub budget: BudgetSettings,
    /// When an endpoint is ejected and for how long.
    pub outlier: OutlierSettings,
}

/// How the balancer picks among a service's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceKind {
    /// Power of two choices over peak-EWMA latency x (outstanding + 1) (linkerd, finagle).
    PeakEwma,
    /// Each request starts one endpoint further along.
    RoundRobin,
    /// Uniformly random.
    Random,
}

impl BalanceKind {
    /// The name used in the config file and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeakEwma => "p2c",
            Self::RoundRobin => "round-robin",
            Self::Random => "random",
        }
    }
}

/// Time limits of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeoutPolicy {
    /// One try, until the response head arrives.
    pub per_try: Duration,
    /// All tries and the backoff between them; past it the client gets a 504.
    pub total: Duration,
}

/// Retry attempts and backoff of a route.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySettings {
    /// Tries in all, the first included (1: no retry).
    pub max_attempts: NonZeroU32,
    /// Full-jitter exponential backoff between tries.
    pub backoff: Backoff,
}

/// A service's retry budget (linkerd/tower `TpsBudget`): retries may add `ratio` of the
/// requests seen over the last `ttl`, plus `min_per_sec` each second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetSettings {
    /// Retries allowed per original request.
    pub ratio: f32,
    /// Retries allowed per second whatever the traffic.
    pub min_per_sec: u32,
    /// The window deposits count over.
    pub ttl: Duration,
}

/// Outlier ejection (Envoy's semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Failed tries in a row (5xx, timeouts, broken connections, connect errors) that
    /// eject an endpoint.
    pub consecutive_5xx: u32,
    /// Connect failures in a row that eject an endpoint (a strong signal: nothing there).
    pub consecutive_connect_failures: u32,
    /// First ejection time; the n-th ejection lasts n times this.
    pub base_ejection_time: Duration,
    /// Longest ejection.
    pub max_ejection_time: Duration,
    /// Most endpoints of a service (in percent) ejected at once.
    pub max_ejection_percent: u8,
}

/// A route's rate limit: `requests` per `per` for each key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSettings {
    /// Requests allowed per period (also the burst).
    pub requests: NonZeroU32,
    /// The period.
    pub per: Duration,
    /// What a client is told apart by.
    pub key: RateKey,
    /// What decides while the gateway's Redis (when it has one) fails or is too slow:
    /// this gateway's local limit ([`FailMode::Open`]) or a refusal ([`FailMode::Closed`]).
    pub on_redis_error: FailMode,
}

/// What a rate limit counts per.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    /// The client's IP address.
    ClientIp,
    /// The value of a request header (requests without it share one bucket).
    Header(HeaderName),
    /// The `x-api-key` header, falling back to the client's IP.
    ApiKey,
}

/// GET response caching of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// How long a stored response is served.
    pub ttl: Duration,
}

/// A fixed response served instead of a gateway-made 5xx (breaker open, no instance,
/// every try failed, deadline passed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// Its status.
    pub status: StatusCode,
    /// Its body, as written in the config.
    pub body: Bytes,
    /// Its `Content-Type`.
    pub content_type: HeaderValue,
}
