//! Which instance of a service a request tries first, and which ones next.
//!
//! Round-robin with one cursor per service: each request starts one step further along
//! the resolved list and, on failover, walks on from there. The walk never revisits an
//! instance, so a request tries each instance at most once. Later issues replace the
//! choice (P2C over outstanding requests, ejection) behind the same `order` call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

/// Most instances one request tries before giving up.
pub const MAX_TRIES: usize = 3;

/// Round-robin cursors, one per service name.
#[derive(Debug, Default)]
pub struct RoundRobin {
    // Written once per service name, read on every request; the lock is never held
    // across anything but a map lookup.
    cursors: RwLock<HashMap<String, Arc<AtomicUsize>>>,
}

impl RoundRobin {
    /// No cursors yet; they appear on first use of a service name.
    pub fn new() -> Self {
        Self::default()
    }

    /// Indices into a list of `len` instances, in the order one request should try them:
    /// at most `min(max_tries, len)` of them, each once. Empty when `len` is 0.
    pub fn order(
        &self,
        service: &str,
        len: usize,
        max_tries: usize,
    ) -> impl Iterator<Item = usize> + use<> {
        let start = if len == 0 {
            0
        } else {
            self.cursor(service).fetch_add(1, Ordering::Relaxed) % len
        };
        (0..len.min(max_tries)).map(move |step| (start + step) % len)
    }

    fn cursor(&self, service: &str) -> Arc<AtomicUsize> {
        if let Some(c) = self
            .cursors
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(service)
        {
            return Arc::clone(c);
        }
        let mut map = self.cursors.write().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(service.to_owned()).or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_rotate_over_every_instance() {
        let rr = RoundRobin::new();
        let firsts: Vec<usize> = (0..6)
            .map(|_| rr.order("user-service", 3, MAX_TRIES).next().unwrap())
            .collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn a_walk_visits_distinct_instances_and_wraps() {
        let rr = RoundRobin::new();
        let _ = rr.order("s", 4, MAX_TRIES).count();
        let _ = rr.order("s", 4, MAX_TRIES).count();
        let _ = rr.order("s", 4, MAX_TRIES).count();
        assert_eq!(rr.order("s", 4, MAX_TRIES).collect::<Vec<_>>(), [3, 0, 1]);
    }

    #[test]
    fn tries_are_bounded_by_the_instance_count() {
        let rr = RoundRobin::new();
        assert_eq!(rr.order("s", 2, MAX_TRIES).count(), 2);
        assert_eq!(rr.order("s", 1, MAX_TRIES).collect::<Vec<_>>(), [0]);
        assert_eq!(rr.order("s", 0, MAX_TRIES).count(), 0);
        assert_eq!(rr.order("s", 10, MAX_TRIES).count(), 3);
    }

    #[test]
    fn services_have_their_own_cursor() {
        let rr = RoundRobin::new();
        let _ = rr.order("a", 3, 1).count();
        let _ = rr.order("a", 3, 1).count();
        assert_eq!(rr.order("b", 3, 1).next(), Some(0));
        assert_eq!(rr.order("a", 3, 1).next(), Some(2));
    }
}
