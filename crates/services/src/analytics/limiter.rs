//! The per-client limit on `POST /api/metrics`: in this process, or shared by every
//! instance through Redis with the local limiter standing in while Redis is away.

use std::sync::atomic::{AtomicBool, Ordering};

use breakwater_resilience::rate_limit::{RateInfo, RateLimited, WindowRateLimiter};
use breakwater_resilience::redis_limit::RedisRateLimiter;
use tokio::time::Instant;

/// Where the per-client counters live.
#[derive(Debug)]
pub(crate) enum ClientLimiter {
    /// In this process: each instance admits `RATE_LIMIT_MAX` per window by itself.
    Local(WindowRateLimiter),
    /// In Redis (fixed window, fail-open): all instances together admit
    /// `RATE_LIMIT_MAX` per window.
    Shared {
        /// Boxed: it is several times the size of the local limiter.
        limiter: Box<RedisRateLimiter>,
        /// Whether the last decision was a fallback, so an outage is logged once when it
        /// starts and once when it ends rather than per request.
        outage: AtomicBool,
    },
}

impl ClientLimiter {
    pub(crate) fn shared(limiter: RedisRateLimiter) -> Self {
        Self::Shared {
            limiter: Box::new(limiter),
            outage: AtomicBool::new(false),
        }
    }

    /// Admits one request from `key` or says how long to wait; never fails otherwise.
    pub(crate) async fn check(&self, key: &str) -> Result<RateInfo, RateLimited> {
        match self {
            Self::Local(local) => local.check(key, Instant::now()),
            Self::Shared { limiter, outage } => {
                let before = limiter.fallbacks();
                let decision = limiter.check(key).await;
                let fell_back = limiter.fallbacks() > before;
                if outage.swap(fell_back, Ordering::Relaxed) != fell_back {
                    if fell_back {
                        tracing::warn!(
                            fallbacks = limiter.fallbacks(),
                            "metrics rate limit: Redis unavailable, limiting per instance"
                        );
                    } else {
                        tracing::info!(
                            fallbacks = limiter.fallbacks(),
                            "metrics rate limit: Redis is back, limiting across instances"
                        );
                    }
                }
                decision
            }
        }
    }
}
