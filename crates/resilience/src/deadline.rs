//! A request's total deadline, and the per-try timeouts it leaves room for.

use std::time::Duration;

use tokio::time::Instant;

/// The instant by which a whole request (all its tries) must be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline {
    at: Instant,
}

/// How far ahead an "effectively never" deadline lies when `now + total` would overflow.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

impl Deadline {
    /// The deadline `total` after `now`. An absurdly long `total` is capped at about a
    /// century rather than overflowing.
    pub fn after(now: Instant, total: Duration) -> Self {
        let at = now
            .checked_add(total)
            .or_else(|| now.checked_add(FAR_FUTURE))
            .unwrap_or(now);
        Self { at }
    }

    /// A deadline at a given instant.
    pub fn at(at: Instant) -> Self {
        Self { at }
    }

    /// The instant itself.
    pub fn instant(self) -> Instant {
        self.at
    }

    /// Time left, or `None` once the deadline has been reached.
    pub fn remaining(self, now: Instant) -> Option<Duration> {
        let left = self.at.saturating_duration_since(now);
        (!left.is_zero()).then_some(left)
    }

    /// Whether the deadline has been reached.
    pub fn is_expired(self, now: Instant) -> bool {
        self.remaining(now).is_none()
    }

    /// The timeout for the next try: `min(per_try, remaining)`, or `None` when the
    /// deadline has passed and no try should start.
    pub fn try_timeout(self, now: Instant, per_try: Duration) -> Option<Duration> {
        self.remaining(now).map(|left| left.min(per_try))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_counts_down_then_passes() {
        let now = Instant::now();
        let d = Deadline::after(now, Duration::from_millis(100));
        assert_eq!(d.remaining(now), Some(Duration::from_millis(100)));
        assert_eq!(
            d.remaining(now + Duration::from_millis(60)),
            Some(Duration::from_millis(40))
        );
        assert_eq!(d.remaining(now + Duration::from_millis(100)), None);
        assert_eq!(d.remaining(now + Duration::from_secs(5)), None);
        assert!(d.is_expired(now + Duration::from_millis(100)));
        assert!(!d.is_expired(now));
        assert_eq!(d.instant(), now + Duration::from_millis(100));
        assert_eq!(Deadline::at(d.instant()), d);
    }

    #[test]
    fn try_timeout_is_the_smaller_of_per_try_and_remaining() {
        let now = Instant::now();
        let d = Deadline::after(now, Duration::from_secs(1));
        assert_eq!(
            d.try_timeout(now, Duration::from_millis(300)),
            Some(Duration::from_millis(300))
        );
        assert_eq!(
            d.try_timeout(now + Duration::from_millis(900), Duration::from_millis(300)),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            d.try_timeout(now + Duration::from_secs(1), Duration::from_millis(300)),
            None
        );
    }

    #[test]
    fn huge_total_does_not_overflow() {
        let now = Instant::now();
        let d = Deadline::after(now, Duration::MAX);
        assert!(
            d.remaining(now)
                .is_some_and(|r| r > Duration::from_secs(1_000_000))
        );
    }
}
