//! The read-through cache of metric summaries: the [`SummaryCache`] trait (so a shared
//! cache such as Redis can join) and [`MemorySummaryCache`], the in-process default.
//!
//! A summary computed while a write of its type commits could be older than that write.
//! So a miss hands out a [`Ticket`] and every invalidation makes outstanding tickets
//! void: a summary read before the write is never put back after its invalidation.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::metric::Summary;

/// Proof that a summary was read from the store after the cache missed, as of a moment
/// no invalidation has passed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

impl Ticket {
    /// A ticket issued at invalidation count `epoch` (for caches kept elsewhere).
    pub(crate) fn at(epoch: u64) -> Self {
        Self(epoch)
    }

    /// The invalidation count it was issued at.
    pub(crate) fn epoch(self) -> u64 {
        self.0
    }
}

/// What the cache holds for a type.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// A summary younger than the TTL.
    Hit(Summary),
    /// Nothing usable; read the store, then `put` with this ticket.
    Miss(Ticket),
}

/// Summaries by metric type, each kept for a TTL. A cache that fails answers `Miss`
/// and drops writes: it may only make reads slower, never wrong or failing.
pub trait SummaryCache: Send + Sync {
    /// The cached summary of `kind`, or a ticket to fill it.
    fn get(&self, kind: &str) -> impl Future<Output = Lookup> + Send;
    /// Caches `summary` unless an invalidation came after `ticket` was issued.
    fn put(&self, summary: &Summary, ticket: Ticket) -> impl Future<Output = ()> + Send;
    /// Forgets the summary of `kind` (a metric of that type was just stored).
    fn invalidate(&self, kind: &str) -> impl Future<Output = ()> + Send;
}

/// Entries a [`MemorySummaryCache`] holds at most; types are client-chosen strings, so
/// the map must not grow without bound.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// An in-process [`SummaryCache`] with expiry on `tokio::time` (paused-time testable).
#[derive(Debug)]
pub struct MemorySummaryCache {
    ttl: Duration,
    capacity: usize,
    inner: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    by_kind: HashMap<String, (Summary, Instant)>,
    /// Bumped by every invalidation; tickets carry the value they were issued at.
    epoch: u64,
}

impl MemorySummaryCache {
    /// Keeps summaries for `ttl`, at most `capacity` of them.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            inner: Mutex::new(Entries::default()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SummaryCache for MemorySummaryCache {
    async fn get(&self, kind: &str) -> Lookup {
        let now = Instant::now();
        let mut entries = self.entries();
        match entries.by_kind.get(kind) {
            Some((summary, stored)) if now.saturating_duration_since(*stored) < self.ttl => {
                Lookup::Hit(summary.clone())
            }
            Some(_) => {
                entries.by_kind.remove(kind);
                Lookup::Miss(Ticket(entries.epoch))
            }
            None => Lookup::Miss(Ticket(entries.epoch)),
        }
    }

    async fn put(&self, summary: &Summary, ticket: Ticket) {
        let now = Instant::now();
        let ttl = self.ttl;
        let mut entries = self.entries();
        if ticket.0 != entries.epoch || ttl.is_zero() {
            return;
        }
        if entries.by_kind.len() >= self.capacity && !entries.by_kind.contains_key(&summary.kind) {
            entries
                .by_kind
                .retain(|_, (_, stored)| now.saturating_duration_since(*stored) < ttl);
            if entries.by_kind.len() >= self.capacity {
                return;
            }
        }
        entries
            .by_kind
            .insert(summary.kind.clone(), (summary.clone(), now));
    }

    async fn invalidate(&self, kind: &str) {
        let mut entries = self.entries();
        entries.epoch = entries.epoch.wrapping_add(1);
        entries.by_kind.remove(kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(kind: &str, count: u64) -> Summary {
        Summary {
            kind: kind.into(),
            count,
            average_value: 1.0,
        }
    }

    async fn fill(cache: &MemorySummaryCache, s: &Summary) {
        let Lookup::Miss(ticket) = cache.get(&s.kind).await else {
            panic!("expected a miss");
        };
        cache.put(s, ticket).await;
    }

    #[tokio::test(start_paused = true)]
    async fn entries_live_for_the_ttl() {
        let cache = MemorySummaryCache::new(Duration::from_secs(60), 10);
        fill(&cache, &summary("cpu", 1)).await;
        assert_eq!(cache.get("cpu").await, Lookup::Hit(summary("cpu", 1)));
        tokio::time::advance(Duration::from_millis(59_999)).await;
        assert!(matches!(cache.get("cpu").await, Lookup::Hit(_)));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(cache.get("cpu").await, Lookup::Miss(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn invalidation_forgets_and_voids_older_tickets() {
        let cache = MemorySummaryCache::new(Duration::from_secs(60), 10);
        fill(&cache, &summary("cpu", 1)).await;
        cache.invalidate("cpu").await;
        let Lookup::Miss(stale_ticket) = cache.get("cpu").await else {
            panic!("expected a miss");
        };
        // A write commits and invalidates while the summary is being read.
        cache.invalidate("cpu").await;
        cache.put(&summary("cpu", 1), stale_ticket).await;
        assert!(matches!(cache.get("cpu").await, Lookup::Miss(_)));
        fill(&cache, &summary("cpu", 2)).await;
        assert_eq!(cache.get("cpu").await, Lookup::Hit(summary("cpu", 2)));
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_is_a_bound() {
        let cache = MemorySummaryCache::new(Duration::from_secs(60), 2);
        fill(&cache, &summary("a", 1)).await;
        fill(&cache, &summary("b", 1)).await;
        fill(&cache, &summary("c", 1)).await;
        assert!(matches!(cache.get("c").await, Lookup::Miss(_)));
        // Once the old entries expire, room is made.
        tokio::time::advance(Duration::from_secs(60)).await;
        fill(&cache, &summary("c", 1)).await;
        assert!(matches!(cache.get("c").await, Lookup::Hit(_)));
    }
}
