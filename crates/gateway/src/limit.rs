//! Per-route rate limiting: a [`RouteLimiter`] keys each request (client IP, a header,
//! or an API key) and asks breakwater-resilience's GCRA [`KeyedRateLimiter`], or, when
//! the gateway has Redis ([`SharedLimits`]), the same GCRA as one Lua script on the
//! Redis server ([`RedisRateLimiter`]) so that every gateway on the prefix enforces one
//! limit together. While Redis fails or is slower than its timeout, the route's
//! `on_redis_error` decides (this gateway's local limit, or a refusal) and the fallback
//! is counted in `breakwater_gateway_redis_fallbacks_total{kind="rate_limit"}`.
//!
//! Every answer carries the IETF draft's `RateLimit-Limit`, `RateLimit-Remaining` and
//! `RateLimit-Reset` (seconds) headers plus `RateLimit-Policy`; a refusal is a ready 429
//! with `Retry-After` and `x-breakwater-error: rate-limited`, made by
//! [`GatewayError::RateLimited`] like every other gateway-made error.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use breakwater_resilience::rate_limit::{KeyedRateLimiter, RateQuota};
use breakwater_resilience::redis_limit::{
    DecidedBy, DistributedLimit, FailMode, RedisLimitError, RedisRateLimiter,
};
use http::{HeaderMap, HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;

use crate::errors::GatewayError;
// What the tests read a refusal with.
#[cfg(test)]
use {crate::errors::ERROR_HEADER, http::StatusCode, http::header::RETRY_AFTER};

/// `RateLimit-Limit`: requests allowed per window.
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// `RateLimit-Remaining`: requests still allowed now.
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// `RateLimit-Reset`: seconds until the full quota is available again.
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
/// `RateLimit-Policy`: the quota, as `<limit>;w=<window seconds>`.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// The header an API key arrives in.
const API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// Longest header value used as a key: longer values share the bucket of their prefix,
/// so a client cannot grow the key map with huge values (it only limits itself harder).
const MAX_KEY_LEN: usize = 128;

/// What a route's limit counts requests by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// The peer address (IPv4-mapped IPv6 counted as the IPv4 address).
    ClientIp,
    /// The value of this header; requests without it (or with an unreadable value) are
    /// counted by client IP.
    Header(HeaderName),
    /// The `x-api-key` header, falling back to the client IP.
    ApiKey,
}

/// Where a gateway's rate limits are shared: a Redis and the key prefix of its limits.
#[derive(Debug, Clone)]
pub struct SharedLimits {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prefix of every limit key, `<gateway prefix>:limit`; a route's keys are
    /// `<prefix>:<route>:<client key>`.
    pub prefix: String,
    /// Bound on one decision in Redis.
    pub timeout: Duration,
    /// Counts decisions made without Redis.
    pub fallbacks: Counter,
}

/// Who decides a route's limit.
#[derive(Debug)]
enum Backend {
    Local(KeyedRateLimiter),
    Redis {
        // Boxed: it is several times the size of the local limiter.
        limiter: Box<RedisRateLimiter>,
        fallbacks: Counter,
    },
}

/// One route's rate limit.
#[derive(Debug)]
pub struct RouteLimiter {
    backend: Backend,
    key: LimitKey,
    policy: HeaderValue,
}

impl RouteLimiter {
    /// At most `requests` per `per` for each key (GCRA: a full burst, then one request
    /// every `per / requests`). A `per` shorter than 1 ns per request is raised to that.
    pub fn new(requests: NonZeroU32, per: Duration, key: LimitKey) -> Self {
        Self {
            backend: Backend::Local(KeyedRateLimiter::new(RateQuota {
                per,
                burst: requests,
            })),
            key,
            policy: policy_header(requests, per),
        }
    }

    /// The same limit kept in Redis for every gateway on `shared`'s prefix, under
    /// `<prefix>:<route>:<client key>`; `on_redis_error` decides while Redis cannot.
    /// Connects on the first request, so Redis may still be down now. Fails only on a
    /// URL or a limit the shared limiter cannot use (at least 1 µs per request).
    pub fn shared(
        requests: NonZeroU32,
        per: Duration,
        key: LimitKey,
        route: &str,
        on_redis_error: FailMode,
        shared: &SharedLimits,
    ) -> Result<Self, RedisLimitError> {
        let limiter = RedisRateLimiter::new(
            &shared.url,
            format!("{}:{route}", shared.prefix),
            DistributedLimit::Gcra(RateQuota {
                per,
                burst: requests,
            }),
        )?
        .with_fail_mode(on_redis_error)
        .with_timeout(shared.timeout);
        Ok(Self {
            backend: Backend::Redis {
                limiter: Box::new(limiter),
                fallbacks: shared.fallbacks.clone(),
            },
            key,
            policy: policy_header(requests, per),
        })
    }

    /// Whether the limit is kept in Redis.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Redis { .. })
    }

    /// Admits or refuses one request from `peer` with `headers`.
    ///
    /// `Ok`: the `RateLimit-*` headers to add to the response. `Err`: a ready 429 with
    /// `{"error":"Too many requests"}`, `Retry-After` (whole seconds, rounded up, at
    /// least 1), the `RateLimit-*` headers and `x-breakwater-error: rate-limited`.
    pub async fn check(&self, headers: &HeaderMap, peer: IpAddr) -> Result<HeaderMap, Response> {
        let key = self.key_of(headers, peer);
        let decision = match &self.backend {
            Backend::Local(limiter) => limiter.check(&key),
            Backend::Redis { limiter, fallbacks } => {
                let (decision, by) = limiter.decide(&key).await;
                if by == DecidedBy::Fallback {
                    fallbacks.inc();
                }
                decision
            }
        };
        match decision {
            Ok(info) => Ok(self.rate_headers(info.limit, info.remaining, ceil_secs(info.reset))),
            Err(limited) => Err(GatewayError::RateLimited {
                limit: limited.limit,
                retry_after: limited.retry_after,
                policy: self.policy.clone(),
            }
            .into_response()),
        }
    }

    /// Forgets keys whose quota has fully refilled (for a shared limit: the fallback's
    /// keys); call periodically (the key map otherwise grows with every client ever
    /// seen).
    pub fn retain_recent(&self) {
        match &self.backend {
            Backend::Local(limiter) => limiter.retain_recent(),
            Backend::Redis { limiter, .. } => limiter.retain_recent(),
        }
    }

    /// Keys tracked in this process now (a shared limit keeps its keys in Redis: 0).
    pub fn tracked_keys(&self) -> usize {
        match &self.backend {
            Backend::Local(limiter) => limiter.len(),
            Backend::Redis { .. } => 0,
        }
    }

    /// The bucket key of a request. The `ip:` / `h:` prefixes keep a header value that
    /// looks like an address from sharing that address's bucket.
    fn key_of(&self, headers: &HeaderMap, peer: IpAddr) -> String {
        let header = match &self.key {
            LimitKey::ClientIp => None,
            LimitKey::Header(name) => header_key(headers, name),
            LimitKey::ApiKey => header_key(headers, &API_KEY),
        };
        match header {
            Some(value) => format!("h:{value}"),
            None => format!("ip:{}", peer.to_canonical()),
        }
    }

    fn rate_headers(&self, limit: u32, remaining: u32, reset_secs: u64) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(5);
        headers.insert(RATELIMIT_LIMIT, HeaderValue::from(limit));
        headers.insert(RATELIMIT_REMAINING, HeaderValue::from(remaining));
        headers.insert(RATELIMIT_RESET, HeaderValue::from(reset_secs));
        headers.insert(RATELIMIT_POLICY, self.policy.clone());
        headers
    }
}

/// `RateLimit-Policy`: `<requests>;w=<window seconds, at least 1>`.
fn policy_header(requests: NonZeroU32, per: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("{requests};w={}", ceil_secs(per).max(1)))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A usable key from header `name`: present, visible ASCII, not blank; cut to
/// [`MAX_KEY_LEN`].
fn header_key<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    let value = headers.get(name)?.to_str().ok()?.trim();
    if value.is_empty() {
        return None;
    }
    // `to_str` admits only visible ASCII, so any byte index is a char boundary.
    Some(value.get(..MAX_KEY_LEN).unwrap_or(value))
}

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    fn three_per_minute(key: LimitKey) -> RouteLimiter {
        RouteLimiter::new(NonZeroU32::new(3).unwrap(), Duration::from_secs(60), key)
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn num(h: &HeaderMap, name: &HeaderName) -> u64 {
        h[name].to_str().unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn a_burst_is_admitted_then_429_with_retry_after() {
        let limiter = three_per_minute(LimitKey::ClientIp);
        let none = HeaderMap::new();
        for remaining in [2, 1, 0] {
            let h = limiter.check(&none, A).await.unwrap();
            assert_eq!(num(&h, &RATELIMIT_LIMIT), 3);
            assert_eq!(num(&h, &RATELIMIT_REMAINING), remaining);
            assert!((1..=60).contains(&num(&h, &RATELIMIT_RESET)));
            assert_eq!(h[RATELIMIT_POLICY], "3;w=60");
        }
        let res = limiter.check(&none, A).await.unwrap_err();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = res.headers().clone();
        let retry_after = num(&h, &RETRY_AFTER);
        assert!((1..=20).contains(&retry_after), "{retry_after}");
        assert_eq!(num(&h, &RATELIMIT_RESET), retry_after);
        assert_eq!(num(&h, &RATELIMIT_REMAINING), 0);
        assert_eq!(h[ERROR_HEADER], "rate-limited");
        let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
        assert_eq!(body, r#"{"error":"Too many requests"}"#);
    }

    #[tokio::test]
    async fn keys_are_independent() {
        let limiter = three_per_minute(LimitKey::ClientIp);
        let none = HeaderMap::new();
        for _ in 0..3 {
            limiter.check(&none, A).await.unwrap();
        }
        assert!(limiter.check(&none, A).await.is_err());
        assert!(limiter.check(&none, B).await.is_ok());
        assert_eq!(limiter.tracked_keys(), 2);
    }

    #[tokio::test]
    async fn mapped_ipv6_counts_as_its_ipv4() {
        let limiter = three_per_minute(LimitKey::ClientIp);
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        let none = HeaderMap::new();
        for _ in 0..3 {
            limiter.check(&none, mapped).await.unwrap();
        }
        assert!(limiter.check(&none, A).await.is_err());
        assert!(
            limiter
                .check(&none, IpAddr::V6(Ipv6Addr::LOCALHOST))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn header_key_counts_by_value_and_falls_back_to_the_ip() {
        let limiter = three_per_minute(LimitKey::Header(HeaderName::from_static("x-tenant")));
        let acme = headers(&[("x-tenant", "acme")]);
        for _ in 0..3 {
            // Different peers, one tenant: one bucket.
            limiter.check(&acme, B).await.unwrap();
        }
        assert!(limiter.check(&acme, A).await.is_err());
        assert!(
            limiter
                .check(&headers(&[("x-tenant", "globex")]), A)
                .await
                .is_ok()
        );
        // No header, or a blank one: counted by IP, apart from the tenants.
        let none = HeaderMap::new();
        limiter.check(&none, A).await.unwrap();
        limiter
            .check(&headers(&[("x-tenant", "  ")]), A)
            .await
            .unwrap();
        limiter.check(&none, A).await.unwrap();
        assert!(limiter.check(&none, A).await.is_err());
        assert!(limiter.check(&none, B).await.is_ok());
    }

    #[tokio::test]
    async fn a_header_value_cannot_borrow_an_ip_bucket() {
        let limiter = three_per_minute(LimitKey::ApiKey);
        let spoof = headers(&[("x-api-key", "10.0.0.1")]);
        for _ in 0..3 {
            limiter.check(&spoof, B).await.unwrap();
        }
        assert!(limiter.check(&HeaderMap::new(), A).await.is_ok());
    }

    #[tokio::test]
    async fn api_key_falls_back_to_the_client_ip() {
        let limiter = three_per_minute(LimitKey::ApiKey);
        let key = headers(&[("x-api-key", "k1")]);
        for _ in 0..3 {
            limiter.check(&key, A).await.unwrap();
        }
        assert!(limiter.check(&key, B).await.is_err());
        assert!(limiter.check(&HeaderMap::new(), A).await.is_ok());
    }

    #[tokio::test]
    async fn long_header_values_share_their_prefix_bucket() {
        let limiter = three_per_minute(LimitKey::ApiKey);
        let long = |last: char| {
            let mut h = HeaderMap::new();
            let value = format!("{}{last}", "k".repeat(MAX_KEY_LEN));
            h.insert(API_KEY, HeaderValue::from_str(&value).unwrap());
            h
        };
        for _ in 0..3 {
            limiter.check(&long('a'), A).await.unwrap();
        }
        assert!(limiter.check(&long('b'), B).await.is_err());
    }

    #[tokio::test]
    async fn retain_recent_keeps_active_keys() {
        let limiter = three_per_minute(LimitKey::ClientIp);
        limiter.check(&HeaderMap::new(), A).await.unwrap();
        limiter.retain_recent();
        assert_eq!(limiter.tracked_keys(), 1);
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2001)), 3);
    }

    #[tokio::test]
    async fn sub_second_windows_advertise_one_second() {
        let limiter = RouteLimiter::new(
            NonZeroU32::new(5).unwrap(),
            Duration::from_millis(100),
            LimitKey::ClientIp,
        );
        let h = limiter.check(&HeaderMap::new(), A).await.unwrap();
        assert_eq!(h[RATELIMIT_POLICY], "5;w=1");
    }
}
