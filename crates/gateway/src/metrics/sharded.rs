//! A counter and a histogram that every thread writes in its own shard, summed only
//! when scraped.
//!
//! The request and attempt series are written by every worker thread on every
//! request. `prometheus_client`'s counter is one shared atomic and its histogram one
//! shared mutex, so each write moved a cache line between cores. Here each thread
//! writes its own cache-line-aligned shard (relaxed atomics no other thread writes
//! unless more threads than [`SHARDS`] share one), and the scrape adds the shards up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Shards per metric: threads past this share shards (still correct, only slower).
pub const SHARDS: usize = 8;

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard, handed out round-robin as threads first write.
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

fn shard() -> usize {
    SHARD.try_with(|s| *s).unwrap_or(0)
}

/// One shard's slot, alone on its cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// A monotonic counter.
#[derive(Debug, Clone, Default)]
pub struct ShardedCounter {
    shards: Arc<[Padded<AtomicU64>; SHARDS]>,
}

impl ShardedCounter {
    /// Adds one.
    pub fn inc(&self) {
        if let Some(slot) = self.shards.get(shard()) {
            slot.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The total over all shards.
    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[derive(Debug)]
struct HistogramShard {
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
    count: AtomicU64,
    /// Observations per bucket (not cumulative), the last one `+Inf`.
    buckets: Box<[AtomicU64]>,
}

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds, ending with `+Inf`.
    bounds: Box<[f64]>,
    shards: [Padded<HistogramShard>; SHARDS],
}

/// A histogram with fixed buckets.
#[derive(Debug, Clone)]
pub struct ShardedHistogram {
    inner: Arc<HistogramInner>,
}

impl ShardedHistogram {
    /// A histogram with these upper bounds (non-finite ones dropped) and `+Inf`.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Box<[f64]> = bounds
            .into_iter()
            .filter(|b| b.is_finite())
            .chain(std::iter::once(f64::INFINITY))
            .collect();
        let shards = std::array::from_fn(|_| {
            Padded(HistogramShard {
                sum: AtomicU64::new(0_f64.to_bits()),
                count: AtomicU64::new(0),
                buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            })
        });
        Self {
            inner: Arc::new(HistogramInner { bounds, shards }),
        }
    }

    /// Records `v` (a NaN lands in `+Inf`, as `prometheus_client` does).
    pub fn observe(&self, v: f64) {
        let Some(shard) = self.inner.shards.get(shard()) else {
            return;
        };
        let shard = &shard.0;
        let bucket = self
            .inner
            .bounds
            .iter()
            .position(|&bound| bound >= v)
            .unwrap_or(self.inner.bounds.len() - 1);
        if let Some(slot) = shard.buckets.get(bucket) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
        shard.count.fetch_add(1, Ordering::Relaxed);
        // Only this thread writes this shard (unless threads outnumber shards), so
        // the loop runs once.
        let _ = shard
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    /// Sum, count and per-bucket counts (not cumulative) over all shards.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut sum = 0.0;
        let mut count = 0;
        let mut buckets: Vec<(f64, u64)> = self.inner.bounds.iter().map(|&b| (b, 0)).collect();
        for shard in &self.inner.shards {
            let shard = &shard.0;
            sum += f64::from_bits(shard.sum.load(Ordering::Relaxed));
            count += shard.count.load(Ordering::Relaxed);
            for (total, slot) in buckets.iter_mut().zip(shard.buckets.iter()) {
                total.1 += slot.load(Ordering::Relaxed);
            }
        }
        (sum, count, buckets)
    }
}

impl TypedMetric for ShardedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    fn text(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn encodes_exactly_as_prometheus_client_does_across_threads() {
        let bounds = [0.001, 0.01, 0.1, 1.0];
        let values = [0.0005, 0.001, 0.02, 0.5, 3.0, f64::NAN, 0.07];
        let ours = ShardedHistogram::new(bounds);
        let theirs = Histogram::new(bounds);
        let our_count = ShardedCounter::default();
        let their_count = Counter::<u64>::default();
        std::thread::scope(|s| {
            for chunk in values.chunks(2) {
                let (ours, our_count) = (ours.clone(), our_count.clone());
                s.spawn(move || {
                    for &v in chunk {
                        ours.observe(v);
                        our_count.inc();
                    }
                });
            }
        });
        for &v in &values {
            theirs.observe(v);
            their_count.inc();
        }
        // The NaN makes both sums NaN, so the order the shards are added in (which
        // could change a float sum's last digit) does not show.
        let ours_text = text(|r| {
            r.register("lat", "latency", ours.clone());
            r.register("n", "count", our_count.clone());
        });
        let theirs_text = text(|r| {
            r.register("lat", "latency", theirs.clone());
            r.register("n", "count", their_count.clone());
        });
        assert_eq!(ours_text, theirs_text);
        assert_eq!(our_count.get(), 7);
        let (_, count, buckets) = ours.snapshot();
        assert_eq!(count, 7);
        assert_eq!(
            buckets.iter().map(|b| b.1).collect::<Vec<_>>(),
            [2, 0, 2, 1, 2]
        );
    }
}
