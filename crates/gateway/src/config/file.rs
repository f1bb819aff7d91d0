//! `breakwater.toml`: the raw serde shape (every field optional, unknown keys refused)
//! and its validation into [`FileConfig`], with each error naming its key path.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

use breakwater_resilience::breaker::{BreakerConfig, Window};
use breakwater_resilience::redis_limit::FailMode;
use breakwater_resilience::retry::Backoff;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use serde::Deserialize;

use super::ConfigError;
use crate::policy::{
    BalanceKind, BudgetSettings, CacheSettings, Fallback, OutlierSettings, Policy, RateKey,
    RateLimitSettings, RetrySettings, ServicePolicy, TimeoutPolicy,
};

/// Built-in per-try timeout (before `[defaults]` and the routes say otherwise).
pub const DEFAULT_PER_TRY: Duration = Duration::from_secs(10);
/// Built-in total deadline.
pub const DEFAULT_TOTAL: Duration = Duration::from_secs(15);
/// Built-in tries per request, the first included.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
const DEFAULT_BUDGET_RATIO: f32 = 0.2;
const DEFAULT_BUDGET_MIN_PER_SEC: u32 = 10;
/// The window a retry budget's deposits count over (linkerd's default).
const BUDGET_TTL: Duration = Duration::from_secs(10);
const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
const DEFAULT_CONSECUTIVE_CONNECT: u32 = 3;
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(10);
const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
const DEFAULT_MAX_EJECTION_PERCENT: u8 = 50;
/// A seed-style breaker without `timeWindowInMilliseconds` counts failures over this.
const DEFAULT_SEED_WINDOW: Duration = Duration::from_secs(60);
/// Most tries per request the config accepts; more only multiplies load on a sick
/// service.
const MAX_ATTEMPTS_LIMIT: u32 = 10;

/// A validated `breakwater.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct FileConfig {
    /// The admin token the file sets, if any.
    pub admin_token: Option<String>,
    /// The `[defaults]` policy with the built-in defaults under it; composed endpoints
    /// use it for services no route names.
    pub defaults: Policy,
    /// The routes, in file order.
    pub routes: Vec<RouteSpec>,
}

/// One validated route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    /// Path prefix, matched on segment boundaries (`/users` matches `/users` and
    /// `/users/1`, not `/usersx`; a prefix ending in `/` matches what starts with it).
    pub prefix: String,
    /// Methods the route serves; `None`: all.
    pub methods: Option<Vec<Method>>,
    /// Registry name of the service it reaches.
    pub service: String,
    /// What the matched prefix becomes upstream; `None`: the path goes on unchanged.
    pub rewrite: Option<String>,
    /// Its policy, `[defaults]` merged in.
    pub policy: Policy,
}

/// Parses and validates a whole file; `origin` names it in syntax errors. A
/// `per_try_override` replaces `[defaults.timeout] per_try` (routes that set their own
/// keep theirs).
pub fn parse(
    text: &str,
    origin: &str,
    per_try_override: Option<Duration>,
) -> Result<FileConfig, ConfigError> {
    let mut raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
        origin: origin.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    if let Some(per_try) = per_try_override {
        let defaults = raw.defaults.get_or_insert_with(RawPolicy::default);
        defaults
            .timeout
            .get_or_insert_with(RawTimeout::default)
            .per_try = Some(format!("{}ns", per_try.as_nanos()));
    }
    raw.validate()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    admin: Option<RawAdmin>,
    redis: Option<RawRedis>,
    defaults: Option<RawPolicy>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    token: Option<String>,
}

/// `[redis]`: how the gateway uses Redis when it has one (`--redis`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    /// The default of every rate limit's `on_redis_error`.
    rate_limit_on_error: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    prefix: String,
    methods: Option<Vec<String>>,
    service: String,
    strip_prefix: Option<bool>,
    rewrite: Option<String>,
    policy: Option<RawPolicy>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    balance: Option<String>,
    timeout: Option<RawTimeout>,
    retries: Option<RawRetries>,
    breaker: Option<RawBreaker>,
    outlier: Option<RawOutlier>,
    rate_limit: Option<RawRateLimit>,
    cache: Option<RawCache>,
    fallback: Option<RawFallback>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeout {
    per_try: Option<String>,
    total: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetries {
    max_attempts: Option<i64>,
    backoff_base: Option<String>,
    backoff_max: Option<String>,
    budget_ratio: Option<f64>,
    budget_min_per_sec: Option<i64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    enabled: Option<bool>,
    window_calls: Option<i64>,
    window_seconds: Option<i64>,
    failure_rate_threshold: Option<f64>,
    slow_call_rate_threshold: Option<f64>,
    slow_call_duration: Option<String>,
    minimum_calls: Option<i64>,
    consecutive_failures: Option<i64>,
    #[serde(alias = "reset_timeout")]
    open_for: Option<String>,
    half_open_probes: Option<i64>,
    probe_deadline: Option<String>,
    /// Seed 003: failures within the time window that open the breaker.
    #[serde(rename = "maximumFailuresAllowed")]
    seed_maximum_failures: Option<i64>,
    /// Seed 003: the time window, in milliseconds.
    #[serde(rename = "timeWindowInMilliseconds")]
    seed_time_window_ms: Option<i64>,
    /// Seed 003: the reset timeout, in milliseconds.
    #[serde(rename = "resetTimeoutInMilliseconds")]
    seed_reset_timeout_ms: Option<i64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    consecutive_5xx: Option<i64>,
    consecutive_connect_failures: Option<i64>,
    base_ejection_time: Option<String>,
    max_ejection_time: Option<String>,
    max_ejection_percent: Option<i64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    requests: Option<i64>,
    per: Option<String>,
    key: Option<String>,
    on_redis_error: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    ttl: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFallback {
    status: Option<i64>,
    body: Option<String>,
    content_type: Option<String>,
}

/// Field-by-field merge: the route's value where it has one, else the default's.
trait Merge: Sized {
    fn merge(over: Option<Self>, under: Option<Self>) -> Option<Self>;
}

macro_rules! merge_fields {
    ($t:ident { $($f:ident),* $(,)? }) => {
        impl Merge for $t {
            fn merge(over: Option<Self>, under: Option<Self>) -> Option<Self> {
                match (over, under) {
                    (Some(o), Some(u)) => Some($t { $($f: o.$f.or(u.$f)),* }),
                    (o, u) => o.or(u),
                }
            }
        }
    };
}

merge_fields!(RawTimeout { per_try, total });
merge_fields!(RawRetries {
    max_attempts,
    backoff_base,
    backoff_max,
    budget_ratio,
    budget_min_per_sec
});
merge_fields!(RawOutlier {
    consecutive_5xx,
    consecutive_connect_failures,
    base_ejection_time,
    max_ejection_time,
    max_ejection_percent,
});
merge_fields!(RawRateLimit {
    requests,
    per,
    key,
    on_redis_error
});
merge_fields!(RawCache { ttl });
merge_fields!(RawFallback {
    status,
    body,
    content_type
});

impl Merge for RawBreaker {
    fn merge(over: Option<Self>, under: Option<Self>) -> Option<Self> {
        let (o, u) = match (over, under) {
            (Some(o), Some(u)) => (o, u),
            (o, u) => return o.or(u),
        };
        // The window kind is one choice: a route naming either kind replaces both.
        let (window_calls, window_seconds) =
            if o.window_calls.is_some() || o.window_seconds.is_some() {
                (o.window_calls, o.window_seconds)
            } else {
                (u.window_calls, u.window_seconds)
            };
        // Likewise the reset timeout, whichever spelling each layer used.
        let (open_for, seed_reset_timeout_ms) =
            if o.open_for.is_some() || o.seed_reset_timeout_ms.is_some() {
                (o.open_for, o.seed_reset_timeout_ms)
            } else {
                (u.open_for, u.seed_reset_timeout_ms)
            };
        Some(Self {
            enabled: o.enabled.or(u.enabled),
            window_calls,
            window_seconds,
            failure_rate_threshold: o.failure_rate_threshold.or(u.failure_rate_threshold),
            slow_call_rate_threshold: o.slow_call_rate_threshold.or(u.slow_call_rate_threshold),
            slow_call_duration: o.slow_call_duration.or(u.slow_call_duration),
            minimum_calls: o.minimum_calls.or(u.minimum_calls),
            consecutive_failures: o.consecutive_failures.or(u.consecutive_failures),
            open_for,
            half_open_probes: o.half_open_probes.or(u.half_open_probes),
            probe_deadline: o.probe_deadline.or(u.probe_deadline),
            seed_maximum_failures: o.seed_maximum_failures.or(u.seed_maximum_failures),
            seed_time_window_ms: o.seed_time_window_ms.or(u.seed_time_window_ms),
            seed_reset_timeout_ms,
        })
    }
}

impl RawPolicy {
    fn merged_over(self, under: &Self) -> Self {
        let under = under.clone();
        Self {
            balance: self.balance.or(under.balance),
            timeout: Merge::merge(self.timeout, under.timeout),
            retries: Merge::merge(self.retries, under.retries),
            breaker: Merge::merge(self.breaker, under.breaker),
            outlier: Merge::merge(self.outlier, under.outlier),
            rate_limit: Merge::merge(self.rate_limit, under.rate_limit),
            cache: Merge::merge(self.cache, under.cache),
            fallback: Merge::merge(self.fallback, under.fallback),
        }
    }
}

impl RawFile {
    fn validate(self) -> Result<FileConfig, ConfigError> {
        let admin_token = match self.admin.and_then(|a| a.token) {
            Some(t) if t.trim().is_empty() => {
                return Err(invalid(
                    "admin.token",
                    "must not be empty (leave it out instead)",
                ));
            }
            Some(t) if !t.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(invalid(
                    "admin.token",
                    "must be printable ASCII without spaces",
                ));
            }
            other => other,
        };
        let on_redis_error = match self.redis.and_then(|r| r.rate_limit_on_error) {
            None => FailMode::Open,
            Some(text) => fail_mode("redis.rate_limit_on_error", &text)?,
        };
        let raw_defaults = self.defaults.unwrap_or_default();
        let defaults = raw_defaults.clone().validate("defaults", on_redis_error)?;

        let mut routes: Vec<RouteSpec> = Vec::with_capacity(self.routes.len());
        // The first route naming each service, by index: its service policy is the one
        // every other route to the service must agree with.
        let mut service_owner: BTreeMap<String, usize> = BTreeMap::new();
        for (i, raw) in self.routes.into_iter().enumerate() {
            let key = format!("routes[{i}]");
            let route = raw.validate(&key, &raw_defaults, on_redis_error)?;
            for (j, earlier) in routes.iter().enumerate() {
                if earlier.prefix == route.prefix
                    && methods_overlap(&earlier.methods, &route.methods)
                {
                    return Err(invalid(
                        &format!("{key}.prefix"),
                        format!(
                            "{:?} is also routes[{j}]'s prefix for some of the same methods",
                            route.prefix
                        ),
                    ));
                }
            }
            match service_owner.get(&route.service) {
                None => {
                    service_owner.insert(route.service.clone(), i);
                }
                Some(&owner) => {
                    let first = &routes[owner].policy.service;
                    check_same_service_policy(&key, owner, &route, first)?;
                }
            }
            routes.push(route);
        }
        Ok(FileConfig {
            admin_token,
            defaults,
            routes,
        })
    }
}

fn check_same_service_policy(
    key: &str,
    owner: usize,
    route: &RouteSpec,
    first: &ServicePolicy,
) -> Result<(), ConfigError> {
    let mine = &route.policy.service;
    let clash = if mine.breaker != first.breaker {
        Some(("breaker", "breaker"))
    } else if mine.budget != first.budget {
        Some(("retries", "retry budget (budget_ratio, budget_min_per_sec)"))
    } else if mine.outlier != first.outlier {
        Some(("outlier", "outlier ejection settings"))
    } else {
        None
    };
    match clash {
        None => Ok(()),
        Some((field, what)) => Err(invalid(
            &format!("{key}.policy.{field}"),
            format!(
                "{} shares one {what} across its routes, and this differs from routes[{owner}]'s; \
                 give them the same settings",
                route.service
            ),
        )),
    }
}

fn methods_overlap(a: &Option<Vec<Method>>, b: &Option<Vec<Method>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.iter().any(|m| b.contains(m)),
        _ => true,
    }
}

impl RawRoute {
    fn validate(
        self,
        key: &str,
        defaults: &RawPolicy,
        on_redis_error: FailMode,
    ) -> Result<RouteSpec, ConfigError> {
        let prefix = check_path(&format!("{key}.prefix"), self.prefix)?;
        let service = self.service.trim().to_owned();
        if service.is_empty()
            || service.len() > 63
            || !service
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid(
                &format!("{key}.service"),
                format!("{service:?} is not a service name (lowercase a-z, 0-9 and -, at most 63)"),
            ));
        }
        let methods = match self.methods {
            None => None,
            Some(list) if list.is_empty() => {
                return Err(invalid(
                    &format!("{key}.methods"),
                    "must name at least one method (leave it out for all)",
                ));
            }
            Some(list) => {
                let mut methods = Vec::with_capacity(list.len());
                for (i, name) in list.iter().enumerate() {
                    let upper = name.trim().to_ascii_uppercase();
                    let method = Method::from_bytes(upper.as_bytes())
                        .ok()
                        .filter(|_| !upper.is_empty())
                        .ok_or_else(|| {
                            invalid(
                                &format!("{key}.methods[{i}]"),
                                format!("{name:?} is not a method"),
                            )
                        })?;
                    if !methods.contains(&method) {
                        methods.push(method);
                    }
                }
                Some(methods)
            }
        };
        let rewrite = match (self.strip_prefix, self.rewrite) {
            (Some(true), Some(_)) => {
                return Err(invalid(
                    &format!("{key}.rewrite"),
                    "give either strip_prefix or rewrite, not both",
                ));
            }
            (Some(true), None) => Some("/".to_owned()),
            (_, Some(to)) => Some(check_path(&format!("{key}.rewrite"), to)?),
            (_, None) => None,
        };
        let policy = self
            .policy
            .unwrap_or_default()
            .merged_over(defaults)
            .validate(&format!("{key}.policy"), on_redis_error)?;
        Ok(RouteSpec {
            prefix,
            methods,
            service,
            rewrite,
            policy,
        })
    }
}

/// A route prefix or rewrite target: absolute, no query, no empty or dot segments (so
/// what the gateway matched is what the upstream sees).
fn check_path(key: &str, path: String) -> Result<String, ConfigError> {
    if !path.starts_with('/') {
        return Err(invalid(key, format!("{path:?} must start with /")));
    }
    if path.contains(['?', '#']) || path.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(invalid(
            key,
            format!("{path:?} must be a plain path (no query, fragment, spaces or non-ASCII)"),
        ));
    }
    let inner = path.trim_start_matches('/');
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if path.len() > 1
        && inner
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(invalid(
            key,
            format!("{path:?} has an empty or dot segment"),
        ));
    }
    Ok(path)
}

impl RawPolicy {
    /// `on_redis_error`: the file's default for rate limits that do not set theirs.
    fn validate(self, key: &str, on_redis_error: FailMode) -> Result<Policy, ConfigError> {
        let balance = match self.balance.as_deref() {
            None | Some("p2c" | "peak-ewma") => BalanceKind::PeakEwma,
            Some("round-robin") => BalanceKind::RoundRobin,
            Some("random") => BalanceKind::Random,
            Some(other) => {
                return Err(invalid(
                    &format!("{key}.balance"),
                    format!("{other:?} is not one of p2c, round-robin, random"),
                ));
            }
        };
        let t = self.timeout.unwrap_or_default();
        let timeout = TimeoutPolicy {
            per_try: positive_duration(
                &format!("{key}.timeout.per_try"),
                t.per_try,
                DEFAULT_PER_TRY,
            )?,
            total: positive_duration(&format!("{key}.timeout.total"), t.total, DEFAULT_TOTAL)?,
        };
        let (retries, budget) =
            validate_retries(&format!("{key}.retries"), self.retries.unwrap_or_default())?;
        let breaker =
            validate_breaker(&format!("{key}.breaker"), self.breaker.unwrap_or_default())?;
        let outlier =
            validate_outlier(&format!("{key}.outlier"), self.outlier.unwrap_or_default())?;
        let rate_limit = self
            .rate_limit
            .map(|r| validate_rate_limit(&format!("{key}.rate_limit"), r, on_redis_error))
            .transpose()?;
        let cache = self
            .cache
            .map(|c| {
                let key = format!("{key}.cache.ttl");
                let ttl = c.ttl.ok_or_else(|| invalid(&key, "is required"))?;
                Ok::<_, ConfigError>(CacheSettings {
                    ttl: positive_duration(&key, Some(ttl), Duration::ZERO)?,
                })
            })
            .transpose()?;
        let fallback = self
            .fallback
            .map(|f| validate_fallback(&format!("{key}.fallback"), f))
            .transpose()?;
        Ok(Policy {
            balance,
            timeout,
            retries,
            service: ServicePolicy {
                breaker,
                budget,
                outlier,
            },
            rate_limit,
            cache,
            fallback,
        })
    }
}

fn validate_retries(
    key: &str,
    r: RawRetries,
) -> Result<(RetrySettings, BudgetSettings), ConfigError> {
    let attempts = r.max_attempts.unwrap_or(i64::from(DEFAULT_MAX_ATTEMPTS));
    let max_attempts = u32::try_from(attempts)
        .ok()
        .filter(|n| *n <= MAX_ATTEMPTS_LIMIT)
        .and_then(NonZeroU32::new)
        .ok_or_else(|| {
            invalid(
                &format!("{key}.max_attempts"),
                format!("must be >= 1 and <= {MAX_ATTEMPTS_LIMIT} (got {attempts})"),
            )
        })?;
    let base = positive_duration(
        &format!("{key}.backoff_base"),
        r.backoff_base,
        DEFAULT_BACKOFF_BASE,
    )?;
    let max = positive_duration(
        &format!("{key}.backoff_max"),
        r.backoff_max,
        DEFAULT_BACKOFF_MAX,
    )?;
    if max < base {
        return Err(invalid(
            &format!("{key}.backoff_max"),
            format!(
                "must be >= backoff_base ({})",
                humantime::format_duration(base)
            ),
        ));
    }
    let ratio = r.budget_ratio.unwrap_or(f64::from(DEFAULT_BUDGET_RATIO));
    if !(0.0..=1000.0).contains(&ratio) {
        return Err(invalid(
            &format!("{key}.budget_ratio"),
            format!("must be between 0 and 1000 (got {ratio})"),
        ));
    }
    let min_per_sec = r
        .budget_min_per_sec
        .unwrap_or(i64::from(DEFAULT_BUDGET_MIN_PER_SEC));
    let min_per_sec = u32::try_from(min_per_sec).map_err(|_| {
        invalid(
            &format!("{key}.budget_min_per_sec"),
            format!("must be a whole number >= 0 (got {min_per_sec})"),
        )
    })?;
    // Within 0..=1000 (checked above), where f32 is precise enough.
    let ratio = ratio as f32;
    Ok((
        RetrySettings {
            max_attempts,
            backoff: Backoff { base, max },
        },
        BudgetSettings {
            ratio,
            min_per_sec,
            ttl: BUDGET_TTL,
        },
    ))
}

fn validate_breaker(key: &str, b: RawBreaker) -> Result<Option<BreakerConfig>, ConfigError> {
    if b.enabled == Some(false) {
        return Ok(None);
    }
    let k = |field: &str| format!("{key}.{field}");
    if b.open_for.is_some() && b.seed_reset_timeout_ms.is_some() {
        return Err(invalid(
            &k("resetTimeoutInMilliseconds"),
            "give either open_for or resetTimeoutInMilliseconds, not both",
        ));
    }
    let open_for = match (b.open_for, b.seed_reset_timeout_ms) {
        (Some(text), _) => Some(positive_duration(
            &k("open_for"),
            Some(text),
            Duration::ZERO,
        )?),
        (None, Some(ms)) => Some(positive_millis(&k("resetTimeoutInMilliseconds"), ms)?),
        (None, None) => None,
    };
    let mut config = match b.seed_maximum_failures {
        Some(max) => {
            let max = non_zero(&k("maximumFailuresAllowed"), max)?;
            let window = b
                .seed_time_window_ms
                .map(|ms| positive_millis(&k("timeWindowInMilliseconds"), ms))
                .transpose()?
                .unwrap_or(DEFAULT_SEED_WINDOW);
            let reset = open_for.unwrap_or(BreakerConfig::default().open_for);
            BreakerConfig::from_seed(max, window, reset)
        }
        None if b.seed_time_window_ms.is_some() => {
            return Err(invalid(
                &k("timeWindowInMilliseconds"),
                "needs maximumFailuresAllowed beside it",
            ));
        }
        None => BreakerConfig::default(),
    };
    match (b.window_calls, b.window_seconds) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                &k("window_seconds"),
                "give either window_calls or window_seconds, not both",
            ));
        }
        (Some(n), None) => config.window = Window::Count(non_zero(&k("window_calls"), n)?),
        (None, Some(n)) => config.window = Window::Time(non_zero(&k("window_seconds"), n)?),
        (None, None) => {}
    }
    if let Some(rate) = b.failure_rate_threshold {
        config.failure_rate_threshold = rate;
    }
    if let Some(rate) = b.slow_call_rate_threshold {
        config.slow_call_rate_threshold = rate;
    }
    if let Some(text) = b.slow_call_duration {
        config.slow_call_duration =
            positive_duration(&k("slow_call_duration"), Some(text), Duration::ZERO)?;
    }
    if let Some(n) = b.minimum_calls {
        config.minimum_calls = u32::try_from(n)
            .map_err(|_| invalid(&k("minimum_calls"), format!("must be >= 0 (got {n})")))?;
    }
    if let Some(n) = b.consecutive_failures {
        config.consecutive_failures = Some(non_zero(&k("consecutive_failures"), n)?);
    }
    if let Some(open_for) = open_for {
        config.open_for = open_for;
    }
    if let Some(n) = b.half_open_probes {
        config.half_open_probes = non_zero(&k("half_open_probes"), n)?;
    }
    if let Some(text) = b.probe_deadline {
        config.probe_deadline =
            positive_duration(&k("probe_deadline"), Some(text), Duration::ZERO)?;
    }
    config
        .validate()
        .map_err(|e| invalid(&k(e.field), e.problem))?;
    Ok(Some(config))
}

fn validate_outlier(key: &str, o: RawOutlier) -> Result<OutlierSettings, ConfigError> {
    let k = |field: &str| format!("{key}.{field}");
    let count = |field: &str, v: Option<i64>, default: u32| -> Result<u32, ConfigError> {
        let v = v.unwrap_or(i64::from(default));
        u32::try_from(v)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| invalid(&k(field), format!("must be >= 1 (got {v})")))
    };
    let base = positive_duration(
        &k("base_ejection_time"),
        o.base_ejection_time,
        DEFAULT_BASE_EJECTION,
    )?;
    let max = positive_duration(
        &k("max_ejection_time"),
        o.max_ejection_time,
        DEFAULT_MAX_EJECTION,
    )?;
    if max < base {
        return Err(invalid(
            &k("max_ejection_time"),
            format!(
                "must be >= base_ejection_time ({})",
                humantime::format_duration(base)
            ),
        ));
    }
    let percent = o
        .max_ejection_percent
        .unwrap_or(i64::from(DEFAULT_MAX_EJECTION_PERCENT));
    let percent = u8::try_from(percent)
        .ok()
        .filter(|p| *p <= 100)
        .ok_or_else(|| {
            invalid(
                &k("max_ejection_percent"),
                format!("must be 0..=100 (got {percent})"),
            )
        })?;
    Ok(OutlierSettings {
        consecutive_5xx: count(
            "consecutive_5xx",
            o.consecutive_5xx,
            DEFAULT_CONSECUTIVE_5XX,
        )?,
        consecutive_connect_failures: count(
            "consecutive_connect_failures",
            o.consecutive_connect_failures,
            DEFAULT_CONSECUTIVE_CONNECT,
        )?,
        base_ejection_time: base,
        max_ejection_time: max,
        max_ejection_percent: percent,
    })
}

fn validate_rate_limit(
    key: &str,
    r: RawRateLimit,
    on_redis_error: FailMode,
) -> Result<RateLimitSettings, ConfigError> {
    let k = |field: &str| format!("{key}.{field}");
    let requests = r
        .requests
        .ok_or_else(|| invalid(&k("requests"), "is required"))?;
    let requests = non_zero(&k("requests"), requests)?;
    let per = positive_duration(&k("per"), r.per, Duration::from_secs(1))?;
    // The shared (Redis) limiter counts whole microseconds per request.
    if per / requests.get() < Duration::from_micros(1) {
        return Err(invalid(
            &k("per"),
            format!("is too short for {requests} requests (at least 1µs per request)"),
        ));
    }
    let on_redis_error = match r.on_redis_error {
        None => on_redis_error,
        Some(text) => fail_mode(&k("on_redis_error"), &text)?,
    };
    let key_text = r.key.unwrap_or_else(|| "ip".to_owned());
    let limit_key = match key_text.as_str() {
        "ip" => RateKey::ClientIp,
        "api-key" => RateKey::ApiKey,
        other => match other.strip_prefix("header:") {
            Some(name) => RateKey::Header(
                HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| invalid(&k("key"), format!("{name:?} is not a header name")))?,
            ),
            None => {
                return Err(invalid(
                    &k("key"),
                    format!("{other:?} is not one of ip, api-key, header:NAME"),
                ));
            }
        },
    };
    Ok(RateLimitSettings {
        requests,
        per,
        key: limit_key,
        on_redis_error,
    })
}

/// `fail_open` (decide with the local limit) or `fail_closed` (refuse).
fn fail_mode(key: &str, text: &str) -> Result<FailMode, ConfigError> {
    match text {
        "fail_open" => Ok(FailMode::Open),
        "fail_closed" => Ok(FailMode::Closed),
        other => Err(invalid(
            key,
            format!("{other:?} is not one of fail_open, fail_closed"),
        )),
    }
}

fn validate_fallback(key: &str, f: RawFallback) -> Result<Fallback, ConfigError> {
    let k = |field: &str| format!("{key}.{field}");
    let status = f.status.unwrap_or(503);
    let status = u16::try_from(status)
        .ok()
        .filter(|s| (200..=599).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| {
            invalid(
                &k("status"),
                format!("must be an HTTP status 200..=599 (got {status})"),
            )
        })?;
    let content_type = f
        .content_type
        .unwrap_or_else(|| "application/json".to_owned());
    let content_type = HeaderValue::from_str(&content_type).map_err(|_| {
        invalid(
            &k("content_type"),
            format!("{content_type:?} is not a header value"),
        )
    })?;
    let body = f.body.unwrap_or_default();
    if content_type
        .to_str()
        .is_ok_and(|t| t.starts_with("application/json"))
        && serde_json::from_str::<serde_json::Value>(&body).is_err()
    {
        return Err(invalid(
            &k("body"),
            "is not JSON, but content_type says it is",
        ));
    }
    Ok(Fallback {
        status,
        body: Bytes::from(body),
        content_type,
    })
}

fn non_zero(key: &str, n: i64) -> Result<NonZeroU32, ConfigError> {
    u32::try_from(n)
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(|| invalid(key, format!("must be >= 1 (got {n})")))
}

fn positive_millis(key: &str, ms: i64) -> Result<Duration, ConfigError> {
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .ok_or_else(|| {
            invalid(
                key,
                format!("must be a number of milliseconds > 0 (got {ms})"),
            )
        })
}

/// A humantime duration (`"250ms"`, `"10s"`) that is longer than zero; `default` when
/// the key is absent.
fn positive_duration(
    key: &str,
    text: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(text) = text else {
        return Ok(default);
    };
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        invalid(
            key,
            format!("{text:?} is not a duration like \"10s\" ({e})"),
        )
    })?;
    if d.is_zero() {
        return Err(invalid(key, "must be longer than zero"));
    }
    Ok(d)
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::invalid(key, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EMBEDDED_CONFIG;

    fn err(text: &str) -> String {
        parse(text, "test", None).unwrap_err().to_string()
    }

    const USERS: &str = "[[routes]]\nprefix = \"/users\"\nservice = \"user-service\"\n";

    #[test]
    fn the_embedded_default_routes_the_contract_table() {
        let file = parse(EMBEDDED_CONFIG, "embedded", None).unwrap();
        let routed: Vec<(&str, &str, Option<&str>)> = file
            .routes
            .iter()
            .map(|r| (r.prefix.as_str(), r.service.as_str(), r.rewrite.as_deref()))
            .collect();
        assert_eq!(
            routed,
            [
                ("/users", "user-service", None),
                ("/orders", "order-service", None),
                ("/api/metrics", "analytics-service", None),
                ("/api/external-data", "analytics-service", None),
                ("/data", "data-service", Some("/")),
                ("/data/", "data-service", None),
                ("/stress-test", "unstable-service", None),
            ]
        );
        let p = &file.routes[0].policy;
        assert_eq!(p.balance, BalanceKind::PeakEwma);
        assert_eq!(p.timeout.per_try, Duration::from_secs(10));
        assert_eq!(p.retries.max_attempts.get(), 3);
        assert!(p.service.breaker.is_some());
        assert_eq!(p.service.outlier.max_ejection_percent, 50);
        assert_eq!(file.admin_token, None);
    }

    #[test]
    fn errors_name_the_key_path() {
        let bad = format!(
            "{USERS}[[routes]]\nprefix = \"/orders\"\nservice = \"order-service\"\n[[routes]]\nprefix = \"/x\"\nservice = \"x\"\n[routes.policy.retries]\nmax_attempts = 0\n"
        );
        assert_eq!(
            err(&bad),
            "routes[2].policy.retries.max_attempts: must be >= 1 and <= 10 (got 0)"
        );
        let cases = [
            (
                "[defaults.timeout]\nper_try = \"soon\"",
                "defaults.timeout.per_try",
            ),
            (
                "[defaults.timeout]\ntotal = \"0s\"",
                "defaults.timeout.total",
            ),
            ("[defaults]\nbalance = \"fastest\"", "defaults.balance"),
            (
                "[defaults.breaker]\nfailure_rate_threshold = 1.5",
                "defaults.breaker.failure_rate_threshold",
            ),
            (
                "[defaults.breaker]\nwindow_calls = 10\nwindow_seconds = 10",
                "defaults.breaker.window_seconds",
            ),
            (
                "[defaults.outlier]\nmax_ejection_percent = 101",
                "defaults.outlier.max_ejection_percent",
            ),
            (
                "[defaults.outlier]\nbase_ejection_time = \"1m\"\nmax_ejection_time = \"1s\"",
                "defaults.outlier.max_ejection_time",
            ),
            (
                "[defaults.retries]\nbudget_ratio = -1.0",
                "defaults.retries.budget_ratio",
            ),
            (
                "[defaults.rate_limit]\nrequests = 5\nkey = \"cookie\"",
                "defaults.rate_limit.key",
            ),
            (
                "[defaults.rate_limit]\nper = \"1s\"",
                "defaults.rate_limit.requests",
            ),
            (
                "[defaults.rate_limit]\nrequests = 5\non_redis_error = \"open\"",
                "defaults.rate_limit.on_redis_error",
            ),
            (
                "[defaults.rate_limit]\nrequests = 2000000\nper = \"1s\"",
                "defaults.rate_limit.per",
            ),
            (
                "[redis]\nrate_limit_on_error = \"maybe\"",
                "redis.rate_limit_on_error",
            ),
            ("[defaults.cache]", "defaults.cache.ttl"),
            (
                "[defaults.fallback]\nstatus = 42",
                "defaults.fallback.status",
            ),
            (
                "[defaults.fallback]\nbody = \"not json\"",
                "defaults.fallback.body",
            ),
            ("[admin]\ntoken = \"\"", "admin.token"),
            (
                "[[routes]]\nprefix = \"users\"\nservice = \"s\"",
                "routes[0].prefix",
            ),
            (
                "[[routes]]\nprefix = \"/a/../b\"\nservice = \"s\"",
                "routes[0].prefix",
            ),
            (
                "[[routes]]\nprefix = \"/a\"\nservice = \"Bad Name\"",
                "routes[0].service",
            ),
            (
                "[[routes]]\nprefix = \"/a\"\nservice = \"s\"\nmethods = [\"G E T\"]",
                "routes[0].methods[0]",
            ),
            (
                "[[routes]]\nprefix = \"/a\"\nservice = \"s\"\nstrip_prefix = true\nrewrite = \"/b\"",
                "routes[0].rewrite",
            ),
            (
                "[[routes]]\nprefix = \"/a\"\nservice = \"s\"\n[[routes]]\nprefix = \"/a\"\nservice = \"t\"",
                "routes[1].prefix",
            ),
        ];
        for (text, key) in cases {
            let e = err(text);
            assert!(
                e.starts_with(&format!("{key}: ")),
                "{text:?} gave {e:?}, expected {key}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_bad_toml_are_refused_with_the_key_named() {
        let e = err("[defaults.retries]\nmax_attempt = 2\n");
        assert!(e.starts_with("test: ") && e.contains("max_attempt"), "{e}");
        let e = err("[[routes]]\nprefix = \"/a\"\n");
        assert!(e.contains("service"), "{e}");
        assert!(err("[[routes]\n").starts_with("test: "));
    }

    #[test]
    fn routes_merge_over_defaults_field_by_field() {
        let text = format!(
            "[defaults.retries]\nmax_attempts = 4\nbackoff_base = \"10ms\"\n\
             [defaults.timeout]\nper_try = \"2s\"\n{USERS}\
             [routes.policy.retries]\nmax_attempts = 2\n\
             [routes.policy.cache]\nttl = \"5s\"\n"
        );
        let file = parse(&text, "test", None).unwrap();
        let p = &file.routes[0].policy;
        assert_eq!(p.retries.max_attempts.get(), 2, "the route's own value");
        assert_eq!(
            p.retries.backoff.base,
            Duration::from_millis(10),
            "the default's"
        );
        assert_eq!(
            p.retries.backoff.max, DEFAULT_BACKOFF_MAX,
            "the built-in one"
        );
        assert_eq!(p.timeout.per_try, Duration::from_secs(2));
        assert_eq!(
            p.cache,
            Some(CacheSettings {
                ttl: Duration::from_secs(5)
            })
        );
        assert_eq!(file.defaults.retries.max_attempts.get(), 4);
    }

    #[test]
    fn redis_failure_mode_comes_from_the_route_else_the_redis_table() {
        let limited = |name: &str, extra: &str| {
            format!(
                "[[routes]]\nprefix = \"/{name}\"\nservice = \"{name}\"\n\
                 [routes.policy.rate_limit]\nrequests = 5\n{extra}"
            )
        };
        let text = format!(
            "[redis]\nrate_limit_on_error = \"fail_closed\"\n{}{}",
            limited("a", ""),
            limited("b", "on_redis_error = \"fail_open\"\n")
        );
        let file = parse(&text, "t", None).unwrap();
        let mode = |i: usize| {
            file.routes[i]
                .policy
                .rate_limit
                .as_ref()
                .unwrap()
                .on_redis_error
        };
        assert_eq!((mode(0), mode(1)), (FailMode::Closed, FailMode::Open));
        let plain = parse(&limited("a", ""), "t", None).unwrap();
        assert_eq!(
            plain.routes[0]
                .policy
                .rate_limit
                .as_ref()
                .unwrap()
                .on_redis_error,
            FailMode::Open,
            "fail_open unless the file says otherwise"
        );
    }

    #[test]
    fn a_per_try_override_replaces_only_the_default() {
        let text = format!(
            "{USERS}[[routes]]\nprefix = \"/o\"\nservice = \"o\"\n[routes.policy.timeout]\nper_try = \"3s\"\n"
        );
        let file = parse(&text, "test", Some(Duration::from_millis(250))).unwrap();
        assert_eq!(
            file.routes[0].policy.timeout.per_try,
            Duration::from_millis(250)
        );
        assert_eq!(
            file.routes[1].policy.timeout.per_try,
            Duration::from_secs(3)
        );
    }

    #[test]
    fn seed_breaker_names_are_accepted() {
        let text = format!(
            "{USERS}[routes.policy.breaker]\nmaximumFailuresAllowed = 3\n\
             timeWindowInMilliseconds = 30000\nresetTimeoutInMilliseconds = 15000\n"
        );
        let file = parse(&text, "test", None).unwrap();
        let b = file.routes[0].policy.service.breaker.clone().unwrap();
        let seed = BreakerConfig::from_seed(
            NonZeroU32::new(3).unwrap(),
            Duration::from_secs(30),
            Duration::from_secs(15),
        );
        assert_eq!(b, seed);
        let e = err(&format!(
            "{USERS}[routes.policy.breaker]\nopen_for = \"1s\"\nresetTimeoutInMilliseconds = 5\n"
        ));
        assert!(
            e.starts_with("routes[0].policy.breaker.resetTimeoutInMilliseconds: "),
            "{e}"
        );
        let off = parse(
            &format!("{USERS}[routes.policy.breaker]\nenabled = false\n"),
            "t",
            None,
        )
        .unwrap();
        assert_eq!(off.routes[0].policy.service.breaker, None);
    }

    #[test]
    fn routes_to_one_service_must_agree_on_its_shared_state() {
        let text = format!(
            "{USERS}[[routes]]\nprefix = \"/people\"\nservice = \"user-service\"\n\
             [routes.policy.breaker]\nconsecutive_failures = 3\n"
        );
        let e = err(&text);
        assert!(
            e.starts_with("routes[1].policy.breaker: user-service shares one breaker"),
            "{e}"
        );
        // Route-only settings may differ.
        let ok = format!(
            "{USERS}[[routes]]\nprefix = \"/people\"\nservice = \"user-service\"\n\
             [routes.policy.timeout]\nper_try = \"1s\"\n"
        );
        assert!(parse(&ok, "t", None).is_ok());
    }

    #[test]
    fn methods_are_normalised_and_may_split_a_prefix() {
        let text = "[[routes]]\nprefix = \"/a\"\nservice = \"s\"\nmethods = [\"get\", \"GET\", \"head\"]\n\
                    [[routes]]\nprefix = \"/a\"\nservice = \"t\"\nmethods = [\"POST\"]\n";
        let file = parse(text, "t", None).unwrap();
        assert_eq!(
            file.routes[0].methods,
            Some(vec![Method::GET, Method::HEAD])
        );
    }
}
