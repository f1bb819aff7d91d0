//! Keyed GCRA check cost for one key, and contended from two threads.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use breakwater_resilience::rate_limit::{KeyedRateLimiter, RateQuota};
use criterion::{Criterion, criterion_group, criterion_main};
use tokio::time::Instant;

fn limiter() -> KeyedRateLimiter {
    // One request per nanosecond: the bench measures the admitted path.
    KeyedRateLimiter::new(RateQuota {
        per: Duration::from_secs(1),
        burst: NonZeroU32::new(1_000_000_000).unwrap_or(NonZeroU32::MIN),
    })
}

fn single_key(c: &mut Criterion) {
    let limiter = limiter();
    c.bench_function("keyed_rate_limit_single_key", |b| {
        b.iter(|| black_box(limiter.check(black_box("203.0.113.7")).is_ok()))
    });
}

fn contended(c: &mut Criterion) {
    let limiter = Arc::new(limiter());
    c.bench_function("keyed_rate_limit_contended_2_threads", |b| {
        b.iter_custom(|iters| {
            let other = Arc::clone(&limiter);
            let helper = std::thread::spawn(move || {
                for _ in 0..iters {
                    black_box(other.check("203.0.113.7").is_ok());
                }
            });
            let start = Instant::now();
            for _ in 0..iters {
                black_box(limiter.check("203.0.113.7").is_ok());
            }
            let elapsed = start.elapsed();
            let _ = helper.join();
            elapsed
        });
    });
}

criterion_group!(benches, single_key, contended);
criterion_main!(benches);
