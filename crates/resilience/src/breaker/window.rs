//! The breaker's outcome windows: the last N calls or the last T seconds, both with
//! running totals so recording and reading are O(1) (amortised for the time window).

use tokio::time::Instant;

use super::config::Window;

/// The largest time window the breaker allocates buckets for (one day).
pub const MAX_TIME_WINDOW_SECS: u32 = 86_400;

/// Totals over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.calls += other.calls;
        self.failures += other.failures;
        self.slow += other.slow;
    }

    fn remove(&mut self, other: Counts) {
        self.calls = self.calls.saturating_sub(other.calls);
        self.failures = self.failures.saturating_sub(other.failures);
        self.slow = self.slow.saturating_sub(other.slow);
    }

    fn one(failed: bool, slow: bool) -> Self {
        Self {
            calls: 1,
            failures: u64::from(failed),
            slow: u64::from(slow),
        }
    }
}

const FAILED: u8 = 1;
const SLOW: u8 = 2;

/// The last `capacity` outcomes. The ring grows as calls arrive, so a large window
/// costs memory only once it has seen that many calls.
#[derive(Debug)]
pub(crate) struct CountWindow {
    capacity: usize,
    ring: Vec<u8>,
    /// Index of the oldest outcome once the ring is full.
    next: usize,
    totals: Counts,
}

impl CountWindow {
    pub(crate) fn new(capacity: u32) -> Self {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX).max(1);
        Self {
            capacity,
            ring: Vec::with_capacity(capacity.min(1024)),
            next: 0,
            totals: Counts::default(),
        }
    }

    pub(crate) fn record(&mut self, failed: bool, slow: bool) {
        let flags = (u8::from(failed) * FAILED) | (u8::from(slow) * SLOW);
        if self.ring.len() < self.capacity {
            self.ring.push(flags);
        } else if let Some(slot) = self.ring.get_mut(self.next) {
            let old = *slot;
            *slot = flags;
            self.totals
                .remove(Counts::one(old & FAILED != 0, old & SLOW != 0));
            self.next = (self.next + 1) % self.capacity;
        }
        self.totals.add(Counts::one(failed, slow));
    }

    pub(crate) fn counts(&self) -> Counts {
        self.totals
    }

    pub(crate) fn clear(&mut self) {
        self.ring.clear();
        self.next = 0;
        self.totals = Counts::default();
    }
}

/// The last `len` whole seconds, one bucket per second. Seconds are counted from the
/// window's first use, so the buckets line up with the caller's clock (paused or not).
/// Buckets that fall out of the window are zeroed lazily when time moves on.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    origin: Option<Instant>,
    buckets: Box<[Counts]>,
    /// The newest second the buckets describe; they hold seconds `head - len + 1 ..= head`.
    head: u64,
    totals: Counts,
}

impl TimeWindow {
    pub(crate) fn new(secs: u32) -> Self {
        let len = secs.clamp(1, MAX_TIME_WINDOW_SECS) as usize;
        Self {
            origin: None,
            buckets: vec![Counts::default(); len].into_boxed_slice(),
            head: 0,
            totals: Counts::default(),
        }
    }

    fn len(&self) -> u64 {
        self.buckets.len() as u64
    }

    fn second(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        now.saturating_duration_since(origin).as_secs()
    }

    fn index(&self, second: u64) -> usize {
        // The remainder is below the bucket count, which is a usize.
        (second % self.len()) as usize
    }

    /// Moves the window's head to `second`, zeroing the buckets it leaves behind.
    fn advance(&mut self, second: u64) {
        if second <= self.head {
            return;
        }
        if second - self.head >= self.len() {
            self.buckets.fill(Counts::default());
            self.totals = Counts::default();
        } else {
            for s in self.head + 1..=second {
                let i = self.index(s);
                if let Some(bucket) = self.buckets.get_mut(i) {
                    let old = std::mem::take(bucket);
                    self.totals.remove(old);
                }
            }
        }
        self.head = second;
    }

    pub(crate) fn record(&mut self, failed: bool, slow: bool, now: Instant) {
        let second = self.second(now);
        self.advance(second);
        // A caller's `now` can be a little older than another's; keep it if its
        // second is still inside the window.
        if second + self.len() <= self.head {
            return;
        }
        let one = Counts::one(failed, slow);
        let i = self.index(second);
        if let Some(bucket) = self.buckets.get_mut(i) {
            bucket.add(one);
            self.totals.add(one);
        }
    }

    pub(crate) fn counts(&mut self, now: Instant) -> Counts {
        let second = self.second(now);
        self.advance(second);
        self.totals
    }

    pub(crate) fn clear(&mut self) {
        self.buckets.fill(Counts::default());
        self.totals = Counts::default();
    }
}

/// Either window kind.
#[derive(Debug)]
pub(crate) enum Outcomes {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Outcomes {
    pub(crate) fn new(window: Window) -> Self {
        match window {
            Window::Count(n) => Self::Count(CountWindow::new(n.get())),
            Window::Time(secs) => Self::Time(TimeWindow::new(secs.get())),
        }
    }

    pub(crate) fn record(&mut self, failed: bool, slow: bool, now: Instant) {
        match self {
            Self::Count(w) => w.record(failed, slow),
            Self::Time(w) => w.record(failed, slow, now),
        }
    }

    pub(crate) fn counts(&mut self, now: Instant) -> Counts {
        match self {
            Self::Count(w) => w.counts(),
            Self::Time(w) => w.counts(now),
        }
    }

    pub(crate) fn clear(&mut self) {
        match self {
            Self::Count(w) => w.clear(),
            Self::Time(w) => w.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn naive(calls: &[(u64, bool, bool)]) -> Counts {
        let mut c = Counts::default();
        for &(_, failed, slow) in calls {
            c.add(Counts::one(failed, slow));
        }
        c
    }

    #[test]
    fn count_window_slides() {
        let mut w = CountWindow::new(3);
        w.record(true, false);
        w.record(true, true);
        w.record(false, false);
        assert_eq!(
            w.counts(),
            Counts {
                calls: 3,
                failures: 2,
                slow: 1
            }
        );
        w.record(false, false);
        assert_eq!(
            w.counts(),
            Counts {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        w.record(false, false);
        assert_eq!(
            w.counts(),
            Counts {
                calls: 3,
                failures: 0,
                slow: 0
            }
        );
        w.clear();
        assert_eq!(w.counts(), Counts::default());
    }

    #[test]
    fn time_window_forgets_old_seconds() {
        let origin = Instant::now();
        let mut w = TimeWindow::new(10);
        w.record(true, false, origin);
        w.record(true, true, origin + Duration::from_millis(9_999));
        assert_eq!(w.counts(origin + Duration::from_millis(9_999)).calls, 2);
        // Second 10: second 0 has left the 10-second window, second 9 has not.
        assert_eq!(w.counts(origin + Duration::from_secs(10)).calls, 1);
        assert_eq!(w.counts(origin + Duration::from_secs(19)).calls, 0);
        // A jump far ahead clears everything at once.
        w.record(false, false, origin + Duration::from_secs(20));
        assert_eq!(w.counts(origin + Duration::from_secs(1_000)).calls, 0);
    }

    #[test]
    fn time_window_keeps_slightly_late_records() {
        let origin = Instant::now();
        let mut w = TimeWindow::new(5);
        // The first use fixes second 0.
        assert_eq!(w.counts(origin), Counts::default());
        w.record(false, false, origin + Duration::from_secs(7));
        w.record(true, false, origin + Duration::from_secs(4));
        assert_eq!(w.counts(origin + Duration::from_secs(7)).failures, 1);
        // Too late: second 2 left the window when the head reached second 7.
        w.record(true, false, origin + Duration::from_secs(2));
        assert_eq!(w.counts(origin + Duration::from_secs(7)).failures, 1);
        assert_eq!(w.counts(origin + Duration::from_secs(9)).failures, 0);
    }

    proptest! {
        #[test]
        fn count_window_matches_naive(
            size in 1u32..20,
            calls in prop::collection::vec((any::<bool>(), any::<bool>()), 0..200),
        ) {
            let mut w = CountWindow::new(size);
            let mut all = Vec::new();
            for (i, (failed, slow)) in calls.into_iter().enumerate() {
                w.record(failed, slow);
                all.push((i as u64, failed, slow));
                let start = all.len().saturating_sub(size as usize);
                prop_assert_eq!(w.counts(), naive(&all[start..]));
            }
        }

        #[test]
        fn time_window_matches_naive(
            secs in 1u32..15,
            steps in prop::collection::vec((any::<bool>(), any::<bool>(), 0u64..4_000), 0..200),
        ) {
            let origin = Instant::now();
            let mut w = TimeWindow::new(secs);
            w.counts(origin);
            let mut all = Vec::new();
            let mut elapsed_ms = 0;
            for (failed, slow, step_ms) in steps {
                elapsed_ms += step_ms;
                let now = origin + Duration::from_millis(elapsed_ms);
                w.record(failed, slow, now);
                all.push((elapsed_ms / 1000, failed, slow));
                let current = elapsed_ms / 1000;
                let live: Vec<_> = all
                    .iter()
                    .copied()
                    .filter(|&(s, _, _)| s + u64::from(secs) > current)
                    .collect();
                prop_assert_eq!(w.counts(now), naive(&live));
            }
        }
    }
}
