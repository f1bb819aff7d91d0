//! Keyed rate limits (per client IP, header value or API key).
//!
//! - [`KeyedRateLimiter`]: GCRA on governor's lock-free keyed limiter; smooth (a burst,
//!   then one request per `per / burst`). Call [`KeyedRateLimiter::retain_recent`]
//!   periodically or the key map only grows.
//! - [`WindowRateLimiter`]: "at most N per window" with the window starting at a key's
//!   first request (seed 004's Redis `INCR` + `EXPIRE`), taking `now` so it runs on
//!   paused time.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use crate::ConfigError;

/// The shortest `retry_after` given, so that a client never retries "now".
const MIN_RETRY_AFTER: Duration = Duration::from_millis(1);

/// `burst` requests per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateQuota {
    /// The period the burst replenishes over.
    pub per: Duration,
    /// Requests admitted back to back from a full bucket.
    pub burst: NonZeroU32,
}

impl RateQuota {
    /// Checks that the quota can work (a period of at least 1 ns per request).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if (self.per / self.burst.get()).is_zero() {
            return Err(ConfigError::new(
                "per",
                format!(
                    "{:?} is too short for a burst of {} (at least 1 ns per request)",
                    self.per, self.burst
                ),
            ));
        }
        Ok(())
    }
}

/// An admitted request's view of its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateInfo {
    /// Requests the limit allows per window (the burst).
    pub limit: u32,
    /// Requests still admissible right now after this one.
    pub remaining: u32,
    /// Time until the limit is fully available again (the window end for
    /// [`WindowRateLimiter`]).
    pub reset: Duration,
}

/// A rejected request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rate limited: at most {limit} requests; retry after {retry_after:?}")]
pub struct RateLimited {
    /// Requests the limit allows per window.
    pub limit: u32,
    /// How long until a request would be admitted (at least 1 ms).
    pub retry_after: Duration,
}

type Gcra =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// A keyed GCRA limiter on governor (lock-free per key).
#[derive(Debug)]
pub struct KeyedRateLimiter {
    quota: RateQuota,
    period: Duration,
    limiter: Gcra,
}

impl KeyedRateLimiter {
    /// A limiter admitting `quota.burst` requests per `quota.per` for each key. A
    /// period too short for the burst is raised to 1 ns per request; use
    /// [`RateQuota::validate`] to reject it instead.
    pub fn new(quota: RateQuota) -> Self {
        let period = (quota.per / quota.burst.get()).max(Duration::from_nanos(1));
        let gcra = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(quota.burst);
        Self {
            quota,
            period,
            limiter: RateLimiter::keyed(gcra).with_middleware::<StateInformationMiddleware>(),
        }
    }

    /// The quota this limiter enforces.
    pub fn quota(&self) -> RateQuota {
        self.quota
    }

    /// Admits one request for `key`, or says how long to wait.
    pub fn check(&self, key: &str) -> Result<RateInfo, RateLimited> {
        let limit = self.quota.burst.get();
        // governor's keyed store wants an owned key; the allocation is ~20 ns.
        match self.limiter.check_key(&key.to_owned()) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity().min(limit);
                let used = limit.saturating_sub(remaining);
                Ok(RateInfo {
                    limit,
                    remaining,
                    reset: self.period.saturating_mul(used),
                })
            }
            Err(not_until) => Err(RateLimited {
                limit,
                retry_after: not_until
                    .wait_time_from(self.limiter.clock().now())
                    .max(MIN_RETRY_AFTER),
            }),
        }
    }

    /// Forgets keys whose bucket has fully refilled (they are indistinguishable from
    /// new keys). Call periodically, or memory grows with every key ever seen.
    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// Checks between purges of expired keys in a [`WindowRateLimiter`].
const PURGE_EVERY: u32 = 1024;

/// A keyed fixed-window counter: at most `limit` requests per `window`, the window
/// starting at a key's first request after the previous window ended.
#[derive(Debug)]
pub struct WindowRateLimiter {
    limit: NonZeroU32,
    window: Duration,
    state: Mutex<WindowState>,
}

#[derive(Debug, Default)]
struct WindowState {
    /// Key → (window start, requests admitted in it).
    keys: HashMap<String, (Instant, u32)>,
    checks_since_purge: u32,
}

impl WindowRateLimiter {
    /// At most `limit` requests per `window` for each key. A zero window admits
    /// everything; [`WindowRateLimiter::try_new`] rejects it.
    pub fn new(limit: NonZeroU32, window: Duration) -> Self {
        Self {
            limit,
            window,
            state: Mutex::new(WindowState::default()),
        }
    }

    /// Like [`WindowRateLimiter::new`], but rejects a zero window.
    pub fn try_new(limit: NonZeroU32, window: Duration) -> Result<Self, ConfigError> {
        if window.is_zero() {
            return Err(ConfigError::new("window", "must be longer than zero"));
        }
        Ok(Self::new(limit, window))
    }

    /// The requests allowed per window.
    pub fn limit(&self) -> NonZeroU32 {
        self.limit
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Admits one request for `key` at `now`, or says how long until its window ends.
    pub fn check(&self, key: &str, now: Instant) -> Result<RateInfo, RateLimited> {
        let limit = self.limit.get();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.checks_since_purge += 1;
        if state.checks_since_purge >= PURGE_EVERY {
            state.checks_since_purge = 0;
            self.purge_locked(&mut state, now);
        }
        let Some(entry) = state.keys.get_mut(key) else {
            // A new key's first request opens its window; only now is the key copied.
            state.keys.insert(key.to_owned(), (now, 1));
            return Ok(RateInfo {
                limit,
                remaining: limit - 1,
                reset: self.window,
            });
        };
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        let reset = self
            .window
            .saturating_sub(now.saturating_duration_since(entry.0));
        if entry.1 < limit {
            entry.1 += 1;
            Ok(RateInfo {
                limit,
                remaining: limit - entry.1,
                reset,
            })
        } else {
            Err(RateLimited {
                limit,
                retry_after: reset.max(MIN_RETRY_AFTER),
            })
        }
    }

    /// Forgets keys whose window has ended (they would start afresh anyway). `check`
    /// also does this every 1024 calls.
    pub fn purge(&self, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.purge_locked(&mut state, now);
    }

    fn purge_locked(&self, state: &mut WindowState, now: Instant) {
        state
            .keys
            .retain(|_, (start, _)| now.saturating_duration_since(*start) < self.window);
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn burst_is_admitted_then_limited() {
        let limiter = KeyedRateLimiter::new(RateQuota {
            per: Duration::from_secs(60),
            burst: nz(5),
        });
        for expected_remaining in (0..5).rev() {
            let info = limiter.check("10.0.0.1").unwrap();
            assert_eq!(info.limit, 5);
            assert_eq!(info.remaining, expected_remaining);
        }
        let limited = limiter.check("10.0.0.1").unwrap_err();
        assert_eq!(limited.limit, 5);
        assert!(limited.retry_after > Duration::ZERO);
        // One request replenishes every 12 s.
        assert!(
            limited.retry_after <= Duration::from_secs(12),
            "{limited:?}"
        );
        assert!(limited.retry_after > Duration::from_secs(11), "{limited:?}");
        assert_eq!(limiter.len(), 1);
        assert!(!limiter.is_empty());
    }

    #[test]
    fn keys_are_independent() {
        let limiter = KeyedRateLimiter::new(RateQuota {
            per: Duration::from_secs(60),
            burst: nz(1),
        });
        assert!(limiter.check("a").is_ok());
        assert!(limiter.check("a").is_err());
        assert!(limiter.check("b").is_ok());
        assert!(limiter.check("b").is_err());
        assert_eq!(limiter.len(), 2);
        // Neither bucket has refilled, so both stay.
        limiter.retain_recent();
        assert_eq!(limiter.len(), 2);
    }

    #[test]
    fn quota_validation() {
        let ok = RateQuota {
            per: Duration::from_secs(1),
            burst: nz(10),
        };
        assert_eq!(ok.validate(), Ok(()));
        let bad = RateQuota {
            per: Duration::ZERO,
            burst: nz(10),
        };
        assert_eq!(bad.validate().unwrap_err().field, "per");
        // new() still works: 1 ns per request.
        let limiter = KeyedRateLimiter::new(bad);
        assert!(limiter.check("k").is_ok());
        assert_eq!(limiter.quota(), bad);
    }

    #[test]
    fn window_admits_exactly_n_then_resets_at_window_end() {
        let start = Instant::now();
        let limiter = WindowRateLimiter::try_new(nz(5), Duration::from_secs(60)).unwrap();
        for i in 0..5u32 {
            let info = limiter
                .check("ip", start + Duration::from_secs(u64::from(i)))
                .unwrap();
            assert_eq!(info.remaining, 4 - i);
            assert_eq!(info.reset, Duration::from_secs(60 - u64::from(i)));
        }
        let limited = limiter
            .check("ip", start + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!(
            limited,
            RateLimited {
                limit: 5,
                retry_after: Duration::from_secs(50)
            }
        );
        let last = start + Duration::from_millis(59_999);
        assert_eq!(
            limiter.check("ip", last).unwrap_err().retry_after,
            Duration::from_millis(1)
        );
        // The window is aligned to the first request and resets exactly at its end.
        let info = limiter
            .check("ip", start + Duration::from_secs(60))
            .unwrap();
        assert_eq!(info.remaining, 4);
        assert_eq!(info.reset, Duration::from_secs(60));
    }

    #[test]
    fn window_keys_are_independent_and_purged() {
        let start = Instant::now();
        let limiter = WindowRateLimiter::new(nz(1), Duration::from_secs(10));
        assert!(limiter.check("a", start).is_ok());
        assert!(limiter.check("a", start).is_err());
        assert!(limiter.check("b", start + Duration::from_secs(5)).is_ok());
        assert_eq!(limiter.len(), 2);
        limiter.purge(start + Duration::from_secs(10));
        assert_eq!(limiter.len(), 1);
        limiter.purge(start + Duration::from_secs(15));
        assert!(limiter.is_empty());
        assert_eq!(
            (limiter.limit(), limiter.window()),
            (nz(1), Duration::from_secs(10))
        );
    }

    #[test]
    fn window_purges_on_its_own() {
        let start = Instant::now();
        let limiter = WindowRateLimiter::new(nz(1), Duration::from_secs(1));
        for i in 0..PURGE_EVERY {
            let _ = limiter.check(&format!("k{i}"), start);
        }
        assert!(limiter.len() <= PURGE_EVERY as usize);
        let later = start + Duration::from_secs(2);
        for i in 0..PURGE_EVERY {
            let _ = limiter.check("same", later + Duration::from_nanos(u64::from(i)));
        }
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn zero_window_is_rejected_by_try_new() {
        let err = WindowRateLimiter::try_new(nz(1), Duration::ZERO).unwrap_err();
        assert_eq!(err.field, "window");
    }
}
