//! The Redis rate limiter against real Redis servers: two instances sharing one Redis
//! admit exactly the limit in total, and a Redis that goes away mid-test makes the
//! limiter fall back (counted) without an error. Needs `REDIS_URL` (and `redis-server`
//! on PATH for the outage test); skipped without unless `BREAKWATER_REQUIRE_SERVICES=1`.

#![expect(clippy::unwrap_used, reason = "helpers of a test fail it by panicking")]
#![expect(
    clippy::print_stderr,
    reason = "a skipped test says so, as DESIGN.md asks"
)]

use std::num::NonZeroU32;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use breakwater_resilience::rate_limit::RateQuota;
use breakwater_resilience::redis_limit::{DistributedLimit, FailMode, RedisRateLimiter};
use redis::AsyncCommands;

fn required() -> bool {
    std::env::var("BREAKWATER_REQUIRE_SERVICES").as_deref() == Ok("1")
}

/// The Redis URL, or `None` when the test should be skipped.
fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                !required(),
                "BREAKWATER_REQUIRE_SERVICES=1 but REDIS_URL is not set"
            );
            eprintln!("SKIPPED (no REDIS_URL)");
            None
        }
    }
}

fn prefix() -> String {
    format!("bw-test-limit-{:016x}", rand::random::<u64>())
}

async fn delete_keys(url: &str, prefix: &str) {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut keys = Vec::new();
    {
        let mut iter = conn
            .scan_match::<_, String>(format!("{prefix}:*"))
            .await
            .unwrap();
        while let Some(k) = iter.next_item().await {
            keys.push(k.unwrap());
        }
    }
    if !keys.is_empty() {
        let _: u64 = conn.del(keys).await.unwrap();
    }
}

/// Fires `per_instance` concurrent checks of one key at each of two limiters sharing a
/// prefix; returns how many were admitted in total.
async fn admitted_by_two_instances(
    url: &str,
    prefix: &str,
    limit: DistributedLimit,
    per_instance: usize,
) -> (usize, Vec<Arc<RedisRateLimiter>>) {
    let limiters: Vec<Arc<RedisRateLimiter>> = (0..2)
        .map(|_| {
            Arc::new(
                RedisRateLimiter::new(url, prefix, limit)
                    .unwrap()
                    .with_timeout(Duration::from_secs(5)),
            )
        })
        .collect();
    let mut calls = Vec::new();
    for limiter in &limiters {
        for _ in 0..per_instance {
            let limiter = Arc::clone(limiter);
            calls.push(tokio::spawn(async move { limiter.check("client-a").await }));
        }
    }
    let mut admitted = 0;
    for call in calls {
        if call.await.unwrap().is_ok() {
            admitted += 1;
        }
    }
    (admitted, limiters)
}

#[tokio::test]
async fn two_instances_admit_exactly_the_fixed_window_limit() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix();
    let limit = DistributedLimit::FixedWindow {
        limit: NonZeroU32::new(50).unwrap(),
        window: Duration::from_secs(60),
    };
    let (admitted, limiters) = admitted_by_two_instances(&url, &prefix, limit, 100).await;
    assert_eq!(admitted, 50, "exactly the limit across both instances");
    assert!(
        limiters.iter().all(|l| l.fallbacks() == 0),
        "Redis decided every call"
    );
    let refused = limiters[1].check("client-a").await.unwrap_err();
    assert_eq!(refused.limit, 50);
    assert!(
        refused.retry_after > Duration::from_secs(50)
            && refused.retry_after <= Duration::from_secs(60),
        "{refused:?}"
    );
    let other = limiters[0].check("client-b").await.unwrap();
    assert_eq!(
        (other.limit, other.remaining),
        (50, 49),
        "keys are limited apart"
    );
    assert!(other.reset <= Duration::from_secs(60));
    delete_keys(&url, &prefix).await;
}

#[tokio::test]
async fn two_instances_admit_exactly_the_gcra_burst() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix();
    // One token per 72 s: nothing refills while the test runs.
    let limit = DistributedLimit::Gcra(RateQuota {
        per: Duration::from_secs(3600),
        burst: NonZeroU32::new(50).unwrap(),
    });
    let (admitted, limiters) = admitted_by_two_instances(&url, &prefix, limit, 100).await;
    assert_eq!(admitted, 50, "exactly the burst across both instances");
    assert!(limiters.iter().all(|l| l.fallbacks() == 0));
    let refused = limiters[0].check("client-a").await.unwrap_err();
    assert!(
        refused.retry_after > Duration::from_secs(60)
            && refused.retry_after <= Duration::from_secs(72),
        "{refused:?}"
    );
    let fresh = limiters[1].check("client-b").await.unwrap();
    assert_eq!(
        (fresh.remaining, fresh.reset),
        (49, Duration::from_secs(72))
    );
    delete_keys(&url, &prefix).await;
}

/// A private `redis-server` on a free port, killed on drop.
struct OwnRedis {
    child: tokio::process::Child,
    url: String,
}

impl OwnRedis {
    async fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(err) => {
                assert!(
                    !required(),
                    "BREAKWATER_REQUIRE_SERVICES=1 but redis-server cannot start: {err}"
                );
                eprintln!("SKIPPED (no redis-server: {err})");
                return None;
            }
        };
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str()).unwrap();
        for _ in 0..250 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return Some(Self { child, url });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server on port {port} did not answer within 5 s");
    }

    async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

#[tokio::test]
async fn a_redis_that_goes_away_mid_test_makes_the_limiter_fall_back() {
    let Some(redis) = OwnRedis::start().await else {
        return;
    };
    let limit = DistributedLimit::FixedWindow {
        limit: NonZeroU32::new(3).unwrap(),
        window: Duration::from_secs(60),
    };
    let open = RedisRateLimiter::new(&redis.url, "outage", limit).unwrap();
    let closed = RedisRateLimiter::new(&redis.url, "outage-closed", limit)
        .unwrap()
        .with_fail_mode(FailMode::Closed);
    // While Redis is up it decides: the shared window is spent after 3.
    for remaining in [2, 1, 0] {
        assert_eq!(open.check("k").await.unwrap().remaining, remaining);
    }
    assert!(open.check("k").await.is_err());
    assert!(closed.check("k").await.is_ok());
    assert_eq!((open.fallbacks(), closed.fallbacks()), (0, 0));

    redis.stop().await;

    // Fail-open: the local window (fresh, so 3 more) decides; no error, no panic.
    for remaining in [2, 1, 0] {
        assert_eq!(
            open.check("k").await.unwrap().remaining,
            remaining,
            "the local limiter decides"
        );
    }
    assert!(
        open.check("k").await.is_err(),
        "the local limit still holds"
    );
    assert_eq!(
        open.fallbacks(),
        4,
        "every decision without Redis is counted"
    );
    // Fail-closed: everything is refused while Redis is away, and counted.
    let refused = closed.check("k2").await.unwrap_err();
    assert_eq!(refused.limit, 3);
    assert!(refused.retry_after >= Duration::from_millis(1));
    assert_eq!(closed.fallbacks(), 1);
}
