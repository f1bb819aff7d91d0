//! Rate limits shared by every instance through Redis (feature `redis`).
//!
//! Each decision is one round trip running one Lua script, so it is atomic across
//! instances and needs no clock agreement between them:
//!
//! - [`DistributedLimit::Gcra`]: GCRA on the Redis server's clock (`TIME`), the key
//!   holding the theoretical arrival time; the same smoothing as
//!   [`KeyedRateLimiter`](crate::rate_limit::KeyedRateLimiter).
//! - [`DistributedLimit::FixedWindow`]: `INCR` + `PEXPIRE`, the window opening at a key's
//!   first request, as [`WindowRateLimiter`](crate::rate_limit::WindowRateLimiter) and
//!   seed 004 do; exactly `limit` requests pass per window in total.
//!
//! When Redis fails or is slower than the call timeout, [`RedisRateLimiter::check`]
//! decides with a local limiter of the same shape ([`FailMode::Open`], the default) or
//! rejects ([`FailMode::Closed`]), and counts the fallback. It never returns an error and
//! never panics: the limiter must not be why a request fails.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::ConfigError;
use crate::rate_limit::{KeyedRateLimiter, RateInfo, RateLimited, RateQuota, WindowRateLimiter};

/// GCRA with the server's clock, in microseconds. `tat` is the key's theoretical
/// arrival time; a request is admitted while `tat + T - burst x T <= now`.
/// Returns `{admitted, remaining, retry_after_us, reset_us}`.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + period
local allow_at = new_tat - period * burst
if allow_at > now then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor((now - allow_at) / period), 0, new_tat - now}
";

/// Fixed window: the first `INCR` of a window sets its expiry. A key found without an
/// expiry (written by something else) gets one, so it cannot block forever.
/// Returns `{admitted, remaining, 0, reset_us}`.
const WINDOW: &str = r"
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], window) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], window); ttl = window end
if n > limit then return {0, 0, ttl * 1000, ttl * 1000} end
return {1, limit - n, 0, ttl * 1000}
";

/// The shortest `retry_after` given, so that a client never retries "now".
const MIN_RETRY_AFTER: Duration = Duration::from_millis(1);

/// After a decision Redis failed (an error or the timeout), Redis is not asked again for
/// this long and the fallback decides at once: during an outage every request would
/// otherwise first wait out the timeout.
pub const REDIS_PAUSE: Duration = Duration::from_secs(1);

/// Default bound on one Redis decision before the fallback decides instead.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

/// Which limit the shared counter enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DistributedLimit {
    /// GCRA: a burst of `burst`, refilled smoothly over `per`.
    Gcra(RateQuota),
    /// At most `limit` requests per `window`, the window opening at a key's first
    /// request.
    FixedWindow {
        /// Requests admitted per window.
        limit: NonZeroU32,
        /// Window length (whole milliseconds count).
        window: Duration,
    },
}

impl DistributedLimit {
    /// Checks that the limit can work: a GCRA period of at least 1 µs per request, a
    /// window of at least 1 ms.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            Self::Gcra(quota) => {
                quota.validate()?;
                if (quota.per / quota.burst.get()) < Duration::from_micros(1) {
                    return Err(ConfigError::new(
                        "per",
                        "too short for the burst (the shared limiter counts whole microseconds per request)",
                    ));
                }
                Ok(())
            }
            Self::FixedWindow { window, .. } if *window < Duration::from_millis(1) => {
                Err(ConfigError::new("window", "must be at least 1 ms"))
            }
            Self::FixedWindow { .. } => Ok(()),
        }
    }

    fn limit(&self) -> u32 {
        match self {
            Self::Gcra(quota) => quota.burst.get(),
            Self::FixedWindow { limit, .. } => limit.get(),
        }
    }
}

/// What [`RedisRateLimiter::check`] does when Redis cannot decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailMode {
    /// Decide with this instance's local limiter of the same shape: the service stays
    /// up, and the total admitted grows to at most `limit` per instance.
    #[default]
    Open,
    /// Reject every request until Redis answers again.
    Closed,
}

/// Who made a [`RedisRateLimiter::decide`] decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecidedBy {
    /// The shared limit in Redis.
    Redis,
    /// The fail mode, because Redis failed or was too slow.
    Fallback,
}

/// Why a [`RedisRateLimiter`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RedisLimitError {
    /// The Redis URL is not one redis-rs accepts.
    #[error("invalid Redis URL: {0}")]
    Url(#[source] redis::RedisError),
    /// The limit cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The local decision maker used while Redis is away.
#[derive(Debug)]
enum Local {
    Gcra(KeyedRateLimiter),
    Window(WindowRateLimiter),
}

/// A rate limiter shared through Redis, with a local fallback (see the module docs).
/// Connects lazily, so it can be built while Redis is still down.
pub struct RedisRateLimiter {
    client: Client,
    conn: OnceCell<ConnectionManager>,
    script: Script,
    prefix: String,
    limit: DistributedLimit,
    /// `ARGV` of the script, computed once.
    args: [u64; 2],
    local: Local,
    fail_mode: FailMode,
    timeout: Duration,
    fallbacks: AtomicU64,
    /// Where this limiter's clock starts; `paused_until` counts milliseconds from it.
    origin: Instant,
    /// Redis is not asked before this many ms after `origin` ([`REDIS_PAUSE`]).
    paused_until: AtomicU64,
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("prefix", &self.prefix)
            .field("limit", &self.limit)
            .field("fail_mode", &self.fail_mode)
            .field("timeout", &self.timeout)
            .field("fallbacks", &self.fallbacks())
            .finish_non_exhaustive()
    }
}

impl RedisRateLimiter {
    /// A limiter keeping its counters in the Redis at `url` under `prefix` (instances
    /// that share a limit use the same prefix). Fails only on a bad URL or limit; Redis
    /// itself is first contacted by the first [`check`](Self::check).
    pub fn new(
        url: &str,
        prefix: impl Into<String>,
        limit: DistributedLimit,
    ) -> Result<Self, RedisLimitError> {
        limit.validate()?;
        let client = Client::open(url).map_err(RedisLimitError::Url)?;
        let (script, args, local) = match limit {
            DistributedLimit::Gcra(quota) => {
                let period = quota.per / quota.burst.get();
                (
                    Script::new(GCRA),
                    [
                        u64::try_from(period.as_micros()).unwrap_or(u64::MAX),
                        u64::from(quota.burst.get()),
                    ],
                    Local::Gcra(KeyedRateLimiter::new(quota)),
                )
            }
            DistributedLimit::FixedWindow { limit, window } => (
                Script::new(WINDOW),
                [
                    u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
                    u64::from(limit.get()),
                ],
                Local::Window(WindowRateLimiter::new(limit, window)),
            ),
        };
        Ok(Self {
            client,
            conn: OnceCell::new(),
            script,
            prefix: prefix.into(),
            limit,
            args,
            local,
            fail_mode: FailMode::default(),
            timeout: DEFAULT_TIMEOUT,
            fallbacks: AtomicU64::new(0),
            origin: Instant::now(),
            paused_until: AtomicU64::new(0),
        })
    }

    /// Sets what happens when Redis cannot decide.
    #[must_use]
    pub fn with_fail_mode(mut self, fail_mode: FailMode) -> Self {
        self.fail_mode = fail_mode;
        self
    }

    /// Bounds one Redis decision (connecting included); past it the fallback decides.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The limit enforced.
    pub fn limit(&self) -> DistributedLimit {
        self.limit
    }

    /// Decisions Redis could not make (failed, timed out or unreachable) since start.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Forgets fallback state that no longer limits anything. The fallback only holds
    /// keys seen during Redis outages; call this periodically (as for
    /// [`KeyedRateLimiter::retain_recent`]) so an outage does not leave them behind.
    pub fn retain_recent(&self) {
        match &self.local {
            Local::Gcra(local) => local.retain_recent(),
            Local::Window(local) => local.purge(Instant::now()),
        }
    }

    /// Admits one request for `key` against the shared limit, or says how long to wait.
    /// When Redis cannot decide, the fail mode does (and the fallback is counted).
    pub async fn check(&self, key: &str) -> Result<RateInfo, RateLimited> {
        self.decide(key).await.0
    }

    /// [`check`](Self::check), also saying who decided, so a caller can count
    /// fallbacks in its own metrics.
    pub async fn decide(&self, key: &str) -> (Result<RateInfo, RateLimited>, DecidedBy) {
        if self.now_ms() < self.paused_until.load(Ordering::Relaxed) {
            return (
                self.fall_back(key, "paused after a failed Redis decision"),
                DecidedBy::Fallback,
            );
        }
        match tokio::time::timeout(self.timeout, self.ask_redis(key)).await {
            Ok(Ok(decision)) => (decision, DecidedBy::Redis),
            Ok(Err(err)) => {
                self.pause();
                (self.fall_back(key, &err.to_string()), DecidedBy::Fallback)
            }
            Err(_) => {
                self.pause();
                (self.fall_back(key, "timed out"), DecidedBy::Fallback)
            }
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn pause(&self) {
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(REDIS_PAUSE.as_millis()).unwrap_or(u64::MAX));
        self.paused_until.fetch_max(until, Ordering::Relaxed);
    }

    async fn ask_redis(&self, key: &str) -> redis::RedisResult<Result<RateInfo, RateLimited>> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await?;
        let (admitted, remaining, retry_after_us, reset_us): (u8, u64, u64, u64) = self
            .script
            .key(format!("{}:{key}", self.prefix))
            .arg(self.args[0])
            .arg(self.args[1])
            .invoke_async(&mut conn.clone())
            .await?;
        let limit = self.limit.limit();
        Ok(if admitted == 1 {
            Ok(RateInfo {
                limit,
                remaining: u32::try_from(remaining).unwrap_or(u32::MAX).min(limit),
                reset: Duration::from_micros(reset_us),
            })
        } else {
            Err(RateLimited {
                limit,
                retry_after: Duration::from_micros(retry_after_us).max(MIN_RETRY_AFTER),
            })
        })
    }

    fn fall_back(&self, key: &str, reason: &str) -> Result<RateInfo, RateLimited> {
        let count = self.fallbacks.fetch_add(1, Ordering::Relaxed) + 1;
        // One line per burst of failures is enough: the first, then every 1000th.
        if count == 1 || count.is_multiple_of(1000) {
            tracing::warn!(
                prefix = %self.prefix, fallbacks = count, reason,
                fail_mode = ?self.fail_mode,
                "Redis rate limiter unavailable; deciding locally"
            );
        }
        match (self.fail_mode, &self.local) {
            (FailMode::Open, Local::Gcra(local)) => local.check(key),
            (FailMode::Open, Local::Window(local)) => local.check(key, Instant::now()),
            (FailMode::Closed, _) => Err(RateLimited {
                limit: self.limit.limit(),
                retry_after: self.timeout.max(MIN_RETRY_AFTER),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(burst: u32, per: Duration) -> RateQuota {
        RateQuota {
            per,
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn limits_are_validated() {
        assert!(
            DistributedLimit::Gcra(quota(10, Duration::from_secs(1)))
                .validate()
                .is_ok()
        );
        let too_fine = DistributedLimit::Gcra(quota(1000, Duration::from_micros(100)));
        assert_eq!(too_fine.validate().unwrap_err().field, "per");
        let no_window = DistributedLimit::FixedWindow {
            limit: NonZeroU32::new(1).unwrap(),
            window: Duration::from_micros(10),
        };
        assert_eq!(no_window.validate().unwrap_err().field, "window");
        assert!(matches!(
            RedisRateLimiter::new("redis://127.0.0.1:1", "p", too_fine),
            Err(RedisLimitError::Config(_))
        ));
        let ok = DistributedLimit::FixedWindow {
            limit: NonZeroU32::new(1).unwrap(),
            window: Duration::from_secs(1),
        };
        assert!(matches!(
            RedisRateLimiter::new("not a url", "p", ok),
            Err(RedisLimitError::Url(_))
        ));
    }

    #[tokio::test]
    async fn an_unreachable_redis_falls_back_to_the_local_limit() {
        // Port 1 on loopback refuses connections, so no time passes waiting.
        let limit = DistributedLimit::FixedWindow {
            limit: NonZeroU32::new(2).unwrap(),
            window: Duration::from_secs(60),
        };
        let open = RedisRateLimiter::new("redis://127.0.0.1:1", "p", limit).unwrap();
        assert_eq!(open.check("k").await.unwrap().remaining, 1);
        assert_eq!(open.check("k").await.unwrap().remaining, 0);
        assert_eq!(open.check("k").await.unwrap_err().limit, 2);
        assert_eq!(open.fallbacks(), 3);
        open.retain_recent();
        assert!(open.check("k").await.is_err(), "a live window is kept");

        let closed = RedisRateLimiter::new("redis://127.0.0.1:1", "p", limit)
            .unwrap()
            .with_fail_mode(FailMode::Closed);
        let (decision, by) = closed.decide("k").await;
        assert!(decision.is_err());
        assert_eq!(by, DecidedBy::Fallback);
        assert_eq!(closed.fallbacks(), 1);
    }

    /// A Redis that accepts connections and reads commands but never answers; counts
    /// the bytes it was sent.
    async fn silent_redis() -> (String, std::sync::Arc<AtomicU64>) {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let received = std::sync::Arc::new(AtomicU64::new(0));
        let seen = std::sync::Arc::clone(&received);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let seen = std::sync::Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        seen.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        (url, received)
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failed_decision_redis_is_left_alone_for_a_pause() {
        let (url, received) = silent_redis().await;
        let limit = DistributedLimit::FixedWindow {
            limit: NonZeroU32::new(3).unwrap(),
            window: Duration::from_secs(60),
        };
        let limiter = RedisRateLimiter::new(&url, "p", limit)
            .unwrap()
            .with_timeout(Duration::from_millis(100));
        let started = Instant::now();
        let (_, by) = limiter.decide("k").await;
        assert_eq!(by, DecidedBy::Fallback);
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "waited the timeout"
        );

        // Within the pause: decided locally at once, and nothing more is sent to Redis.
        let sent = received.load(Ordering::Relaxed);
        let paused_at = Instant::now();
        for _ in 0..5 {
            assert_eq!(limiter.decide("k").await.1, DecidedBy::Fallback);
        }
        assert_eq!(paused_at.elapsed(), Duration::ZERO, "no wait while paused");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(received.load(Ordering::Relaxed), sent, "Redis not asked");
        assert_eq!(limiter.fallbacks(), 6);
        // The local window counts every one of them: 3 admitted, then refused.
        assert!(limiter.check("k").await.is_err());

        // After the pause, Redis is asked again (and, still silent, times out again).
        tokio::time::sleep(REDIS_PAUSE).await;
        let retried = Instant::now();
        let (_, by) = limiter.decide("other").await;
        assert_eq!(by, DecidedBy::Fallback);
        assert!(
            retried.elapsed() >= Duration::from_millis(100),
            "asked Redis again"
        );
    }
}
