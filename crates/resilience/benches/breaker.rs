//! Breaker admission + recording cost, uncontended and contended from two threads.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use breakwater_resilience::breaker::{Breaker, BreakerConfig, Outcome, Window};
use criterion::{Criterion, criterion_group, criterion_main};
use tokio::time::Instant;

fn acquire_record(breaker: &Breaker, now: Instant) {
    if let Ok(permit) = breaker.try_acquire(now) {
        breaker.record(permit, Outcome::Success, Duration::from_millis(3), now);
    }
}

fn configs() -> [(&'static str, BreakerConfig); 2] {
    let count = BreakerConfig::default();
    let time = BreakerConfig {
        window: Window::Time(std::num::NonZeroU32::new(60).unwrap_or(std::num::NonZeroU32::MIN)),
        ..BreakerConfig::default()
    };
    [("count_window", count), ("time_window", time)]
}

fn uncontended(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker_uncontended");
    for (name, config) in configs() {
        let breaker = Breaker::new(config);
        let now = Instant::now();
        group.bench_function(name, |b| {
            b.iter(|| acquire_record(black_box(&breaker), now))
        });
    }
    group.finish();
}

fn contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker_contended_2_threads");
    for (name, config) in configs() {
        let breaker = Arc::new(Breaker::new(config));
        let now = Instant::now();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let other = Arc::clone(&breaker);
                let helper = std::thread::spawn(move || {
                    for _ in 0..iters {
                        acquire_record(&other, now);
                    }
                });
                let start = Instant::now();
                for _ in 0..iters {
                    acquire_record(&breaker, now);
                }
                let elapsed = start.elapsed();
                let _ = helper.join();
                elapsed
            });
        });
    }
    group.finish();
}

criterion_group!(benches, uncontended, contended);
criterion_main!(benches);
