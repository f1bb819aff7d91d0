//! A bound on concurrent calls: admission is a lock-free compare-and-swap, and the
//! permit gives its slot back when dropped, however the call ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// At most `max` calls in flight at once. Cloning shares the same bound.
#[derive(Clone, Debug)]
pub struct Bulkhead {
    in_flight: Arc<AtomicUsize>,
    max: usize,
}

/// One admitted call; dropping it frees the slot.
#[derive(Debug)]
#[must_use = "the slot is freed as soon as the permit is dropped"]
pub struct BulkheadPermit {
    in_flight: Arc<AtomicUsize>,
}

impl Bulkhead {
    /// A bulkhead admitting at most `max` concurrent calls (0 admits none, e.g. while
    /// draining).
    pub fn new(max: usize) -> Self {
        Self {
            in_flight: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// Admits a call if fewer than `max` are in flight.
    pub fn try_acquire(&self) -> Option<BulkheadPermit> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| BulkheadPermit {
                in_flight: Arc::clone(&self.in_flight),
            })
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for BulkheadPermit {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_is_enforced_and_drop_frees() {
        let b = Bulkhead::new(2);
        let p1 = b.try_acquire().unwrap();
        let p2 = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_none());
        assert_eq!(b.in_flight(), 2);
        assert_eq!(b.max(), 2);
        drop(p1);
        assert_eq!(b.in_flight(), 1);
        let p3 = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_none());
        drop((p2, p3));
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn zero_admits_nothing() {
        let b = Bulkhead::new(0);
        assert!(b.try_acquire().is_none());
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn clones_share_the_bound_across_threads() {
        let b = Bulkhead::new(3);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if let Some(p) = b.try_acquire() {
                            assert!(b.in_flight() <= 3);
                            drop(p);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.in_flight(), 0);
    }
}
