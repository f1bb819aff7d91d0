//! Distributed rate-limit decisions per second against a real Redis (`REDIS_URL`,
//! default `redis://127.0.0.1:6379`): `CONCURRENCY` tasks (default 64) spread over
//! `INSTANCES` limiters (default 2, each its own multiplexed connection, as two gateway
//! instances would be) call `check` in a closed loop for `BENCH_SECONDS` (default 5) per
//! scenario. The connection manager pipelines the concurrent calls on each connection.
//!
//! Prints one Markdown table row per scenario (`bench/redis-rate-limit.sh` collects
//! them). Deletes its keys at the end.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use breakwater_resilience::rate_limit::RateQuota;
use breakwater_resilience::redis_limit::{DistributedLimit, RedisRateLimiter};
use hdrhistogram::Histogram;
use redis::AsyncCommands;
use tokio::time::Instant;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Outcome {
    decisions: u64,
    admitted: u64,
    fallbacks: u64,
    latency: Histogram<u64>,
    elapsed: Duration,
}

async fn scenario(
    url: &str,
    prefix: &str,
    limit: DistributedLimit,
    keys: u64,
    instances: usize,
    concurrency: usize,
    secs: u64,
) -> Outcome {
    let limiters: Vec<Arc<RedisRateLimiter>> = (0..instances)
        .map(|_| {
            Arc::new(
                RedisRateLimiter::new(url, prefix, limit)
                    .unwrap_or_else(|e| panic!("limiter: {e}"))
                    .with_timeout(Duration::from_secs(2)),
            )
        })
        .collect();
    // Connect (and load the script) before the clock starts.
    for l in &limiters {
        let _ = l.check("warm-up").await;
    }
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let limiter = Arc::clone(&limiters[t % instances]);
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3).unwrap_or_else(|e| panic!("{e}"));
                let (mut n, mut ok) = (0u64, 0u64);
                let mut key = t as u64;
                while Instant::now() < end {
                    key = (key + 7919) % keys;
                    let at = Instant::now();
                    let admitted = limiter.check(&format!("client-{key}")).await.is_ok();
                    let _ = hist.record(at.elapsed().as_micros() as u64);
                    n += 1;
                    ok += u64::from(admitted);
                }
                (n, ok, hist)
            })
        })
        .collect();
    let mut out = Outcome {
        decisions: 0,
        admitted: 0,
        fallbacks: 0,
        latency: Histogram::new(3).unwrap_or_else(|e| panic!("{e}")),
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        let (n, ok, hist) = task.await.unwrap_or_else(|e| panic!("task: {e}"));
        out.decisions += n;
        out.admitted += ok;
        let _ = out.latency.add(hist);
    }
    out.elapsed = start.elapsed();
    out.fallbacks = limiters.iter().map(|l| l.fallbacks()).sum();
    out
}

async fn delete_keys(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = {
        let Ok(mut iter) = conn.scan_match::<_, String>(format!("{prefix}:*")).await else {
            return;
        };
        let mut keys = Vec::new();
        while let Some(k) = futures_next(&mut iter).await {
            keys.push(k);
        }
        keys
    };
    for chunk in keys.chunks(500) {
        let _: redis::RedisResult<u64> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
    }
}

async fn futures_next(iter: &mut redis::AsyncIter<'_, String>) -> Option<String> {
    iter.next_item().await.and_then(Result::ok)
}

#[expect(clippy::print_stdout, reason = "the bench's report is its output")]
#[tokio::main]
async fn main() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let secs: u64 = env_or("BENCH_SECONDS", 5);
    let concurrency: usize = env_or("CONCURRENCY", 64).max(1);
    let instances: usize = env_or("INSTANCES", 2).clamp(1, concurrency);
    let prefix = format!("bw-bench-{:016x}", rand::random::<u64>());
    let burst = NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN);
    let scenarios = [
        (
            "GCRA, 100/s per key, 10,000 keys",
            DistributedLimit::Gcra(RateQuota {
                per: Duration::from_secs(1),
                burst,
            }),
            10_000,
        ),
        (
            "GCRA, 100/s per key, 1 hot key",
            DistributedLimit::Gcra(RateQuota {
                per: Duration::from_secs(1),
                burst,
            }),
            1,
        ),
        (
            "fixed window, 100 per 60 s, 10,000 keys",
            DistributedLimit::FixedWindow {
                limit: burst,
                window: Duration::from_secs(60),
            },
            10_000,
        ),
    ];
    for (i, (name, limit, keys)) in scenarios.into_iter().enumerate() {
        let prefix = format!("{prefix}-{i}");
        let o = scenario(&url, &prefix, limit, keys, instances, concurrency, secs).await;
        delete_keys(&url, &prefix).await;
        let rate = o.decisions as f64 / o.elapsed.as_secs_f64();
        println!(
            "| {name} | {instances} x {} | {rate:.0} | {:.1}% | {} | {} | {} | {} |",
            concurrency / instances,
            100.0 * o.admitted as f64 / o.decisions.max(1) as f64,
            o.latency.value_at_quantile(0.5),
            o.latency.value_at_quantile(0.99),
            o.latency.max(),
            o.fallbacks,
        );
    }
}
