//! Seed 001's CPU-bound endpoint: a busy loop run on tokio's blocking pool, so the
//! service keeps answering while it spins, stopped early when its caller goes away.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Semaphore;

/// Iterations between checks of the cancel flag: frequent enough to stop within
/// milliseconds, rare enough to cost nothing measurable.
const CANCEL_CHECK_EVERY: u64 = 1 << 20;

/// Seed 001's loop: the sum of `0..n` (wrapping), with each step hidden from the
/// optimiser so the work is really done. `None` when `cancelled` was set midway.
pub(crate) fn busy_loop(n: u64, cancelled: &AtomicBool) -> Option<u64> {
    let mut sum = 0u64;
    let mut i = 0u64;
    while i < n {
        let end = n.min(i.saturating_add(CANCEL_CHECK_EVERY));
        while i < end {
            sum = sum.wrapping_add(std::hint::black_box(i));
            i += 1;
        }
        if cancelled.load(Ordering::Relaxed) {
            return None;
        }
    }
    Some(sum)
}

/// Runs busy loops off the async workers, at most one per CPU at a time (more would
/// only share the same cores, and would fill the blocking pool other work needs).
#[derive(Debug)]
pub(crate) struct StressPool {
    slots: Semaphore,
    running: Arc<AtomicUsize>,
}

/// Sets the flag when dropped: the handler's future is dropped when its client goes
/// away, and the loop then stops instead of burning a core for nobody.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Counts one running loop for as long as it lives.
struct Running(Arc<AtomicUsize>);

impl Running {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StressPool {
    /// A pool running up to the machine's parallelism at once.
    pub(crate) fn new() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Self {
            slots: Semaphore::new(cpus),
            running: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Loops spinning right now.
    pub(crate) fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Runs `busy_loop(n)` on the blocking pool once a slot is free. `None` if the
    /// blocking task could not finish (runtime shutting down).
    pub(crate) async fn run(&self, n: u64) -> Option<u64> {
        // The semaphore is never closed, so acquiring only fails if it were.
        let _slot = self.slots.acquire().await.ok()?;
        let cancelled = Arc::new(AtomicBool::new(false));
        let _cancel = CancelOnDrop(Arc::clone(&cancelled));
        let running = Arc::clone(&self.running);
        let task = tokio::task::spawn_blocking(move || {
            let _running = Running::start(&running);
            busy_loop(n, &cancelled)
        });
        task.await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_like_the_seed() {
        let go = AtomicBool::new(false);
        assert_eq!(busy_loop(0, &go), Some(0));
        assert_eq!(busy_loop(10, &go), Some(45));
        assert_eq!(busy_loop(3_000_000, &go), Some(3_000_000 * 2_999_999 / 2));
    }

    #[test]
    fn a_set_flag_stops_the_loop() {
        let stop = AtomicBool::new(true);
        assert_eq!(busy_loop(u64::MAX, &stop), None);
    }

    #[tokio::test]
    async fn dropping_the_caller_stops_the_loop() {
        let pool = Arc::new(StressPool::new());
        let task = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.run(u64::MAX).await }
        });
        let wait = async {
            while pool.running() == 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), wait)
            .await
            .unwrap();
        task.abort();
        let stopped = async {
            while pool.running() != 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), stopped)
            .await
            .unwrap();
    }
}
