//! Breaker configuration: the window kind, the trip rules and the recovery timings.

use std::num::NonZeroU32;
use std::time::Duration;

use super::window::MAX_TIME_WINDOW_SECS;
use crate::ConfigError;

/// How outcomes are windowed for the rate and count thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The last N calls (a ring buffer of outcomes).
    Count(NonZeroU32),
    /// The last T seconds (a ring of one-second buckets). The current, partial second
    /// counts, so the window spans between T-1 and T seconds of history.
    Time(NonZeroU32),
}

impl Window {
    /// The window's size: calls for `Count`, seconds for `Time`.
    pub fn size(self) -> NonZeroU32 {
        match self {
            Self::Count(n) | Self::Time(n) => n,
        }
    }
}

/// When a breaker opens and how it recovers.
///
/// Rate thresholds are fractions in `0.0..=1.0`; a threshold of exactly `1.0` turns its
/// rule off (a rate cannot exceed 1, and "every call failed" is better said with
/// `consecutive_failures` or `failure_count_threshold`).
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    /// The window the rates and the failure count are judged over. Default `Count(100)`.
    pub window: Window,
    /// Open when at least this fraction of the window's calls failed. Default 0.5.
    pub failure_rate_threshold: f64,
    /// Open when at least this fraction of the window's calls were slow. Default 1.0 (off).
    pub slow_call_rate_threshold: f64,
    /// A call taking at least this long is slow. Default 5 s.
    pub slow_call_duration: Duration,
    /// Rates are judged only once the window holds this many calls. Default 20.
    pub minimum_calls: u32,
    /// Open after this many consecutive failures (seed 003/004 mode). Default off.
    pub consecutive_failures: Option<NonZeroU32>,
    /// Open when the window holds this many failures, whatever the rate and regardless
    /// of `minimum_calls` (seed 003's `maximumFailuresAllowed` within
    /// `timeWindowInMilliseconds`). Default off.
    pub failure_count_threshold: Option<NonZeroU32>,
    /// How long the breaker stays open before admitting probes. Default 30 s.
    pub open_for: Duration,
    /// Probes admitted while half-open; all must succeed to close. Default 1.
    pub half_open_probes: NonZeroU32,
    /// A probe not recorded within this time counts as failed, so half-open cannot
    /// stick on a call that never returns. Default 10 s.
    pub probe_deadline: Duration,
}

const fn nz(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => NonZeroU32::MIN,
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window: Window::Count(nz(100)),
            failure_rate_threshold: 0.5,
            slow_call_rate_threshold: 1.0,
            slow_call_duration: Duration::from_secs(5),
            minimum_calls: 20,
            consecutive_failures: None,
            failure_count_threshold: None,
            open_for: Duration::from_secs(30),
            half_open_probes: NonZeroU32::MIN,
            probe_deadline: Duration::from_secs(10),
        }
    }
}

impl BreakerConfig {
    /// Seed 003/004 mode: opens after `max_failures` consecutive failures, then admits
    /// exactly one half-open trial after `reset_timeout`. The rate rules are off.
    pub fn consecutive(max_failures: NonZeroU32, reset_timeout: Duration) -> Self {
        Self {
            failure_rate_threshold: 1.0,
            slow_call_rate_threshold: 1.0,
            minimum_calls: 1,
            consecutive_failures: Some(max_failures),
            open_for: reset_timeout,
            half_open_probes: NonZeroU32::MIN,
            ..Self::default()
        }
    }

    /// Seed 003's option names: opens when `maximum_failures_allowed` failures fall
    /// within `time_window` (a [`Window::Time`] of whole seconds, rounded up, with a
    /// failure count threshold and `minimum_calls = 1`); one trial after `reset_timeout`.
    pub fn from_seed(
        maximum_failures_allowed: NonZeroU32,
        time_window: Duration,
        reset_timeout: Duration,
    ) -> Self {
        let secs = time_window.as_secs() + u64::from(time_window.subsec_nanos() > 0);
        let secs = NonZeroU32::new(u32::try_from(secs).unwrap_or(u32::MAX)).unwrap_or(nz(1));
        Self {
            window: Window::Time(secs),
            failure_rate_threshold: 1.0,
            slow_call_rate_threshold: 1.0,
            minimum_calls: 1,
            consecutive_failures: None,
            failure_count_threshold: Some(maximum_failures_allowed),
            open_for: reset_timeout,
            half_open_probes: NonZeroU32::MIN,
            ..Self::default()
        }
    }

    /// Checks that every field can work; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("failure_rate_threshold", self.failure_rate_threshold),
            ("slow_call_rate_threshold", self.slow_call_rate_threshold),
        ] {
            if !(value > 0.0 && value <= 1.0) {
                return Err(ConfigError::new(
                    field,
                    format!("must be a fraction in (0, 1] (1 turns the rule off), got {value}"),
                ));
            }
        }
        if self.minimum_calls == 0 {
            return Err(ConfigError::new("minimum_calls", "must be at least 1"));
        }
        if let Window::Count(n) = self.window
            && self.minimum_calls > n.get()
        {
            return Err(ConfigError::new(
                "minimum_calls",
                format!(
                    "{} exceeds the count window of {n} calls, so the rates could never be judged",
                    self.minimum_calls
                ),
            ));
        }
        if let (Window::Count(n), Some(count)) = (self.window, self.failure_count_threshold)
            && count > n
        {
            return Err(ConfigError::new(
                "failure_count_threshold",
                format!("{count} exceeds the count window of {n} calls"),
            ));
        }
        if let Window::Time(secs) = self.window
            && secs.get() > MAX_TIME_WINDOW_SECS
        {
            return Err(ConfigError::new(
                "window",
                format!(
                    "a time window of {secs} s exceeds the maximum of {MAX_TIME_WINDOW_SECS} s"
                ),
            ));
        }
        if self.open_for.is_zero() {
            return Err(ConfigError::new("open_for", "must be longer than zero"));
        }
        if self.probe_deadline.is_zero() {
            return Err(ConfigError::new(
                "probe_deadline",
                "must be longer than zero",
            ));
        }
        if self.slow_call_duration.is_zero() {
            return Err(ConfigError::new(
                "slow_call_duration",
                "must be longer than zero (every call would be slow)",
            ));
        }
        Ok(())
    }

    /// The failure-rate rule is on (its threshold is below 1; NaN counts as off).
    pub(crate) fn failure_rate_rule(&self) -> bool {
        self.failure_rate_threshold < 1.0
    }

    /// The slow-call-rate rule is on.
    pub(crate) fn slow_rate_rule(&self) -> bool {
        self.slow_call_rate_threshold < 1.0
    }

    /// `minimum_calls` as the breaker applies it: at least 1, at most a count window.
    pub(crate) fn effective_minimum_calls(&self) -> u32 {
        let floor = self.minimum_calls.max(1);
        match self.window {
            Window::Count(n) => floor.min(n.get()),
            Window::Time(_) => floor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(BreakerConfig::default().validate(), Ok(()));
    }

    #[test]
    fn seed_constructors_are_valid() {
        let c = BreakerConfig::consecutive(nz(3), Duration::from_secs(30));
        assert_eq!(c.validate(), Ok(()));
        assert!(!c.failure_rate_rule());
        let s = BreakerConfig::from_seed(
            nz(3),
            Duration::from_millis(30_000),
            Duration::from_secs(30),
        );
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.window, Window::Time(nz(30)));
        assert_eq!(s.failure_count_threshold, Some(nz(3)));
        let rounded =
            BreakerConfig::from_seed(nz(3), Duration::from_millis(1_500), Duration::from_secs(1));
        assert_eq!(rounded.window, Window::Time(nz(2)));
        let tiny = BreakerConfig::from_seed(nz(3), Duration::ZERO, Duration::from_secs(1));
        assert_eq!(tiny.window, Window::Time(nz(1)));
    }

    #[test]
    fn validate_names_the_bad_field() {
        let cases: Vec<(BreakerConfig, &str)> = vec![
            (
                BreakerConfig {
                    failure_rate_threshold: 1.5,
                    ..Default::default()
                },
                "failure_rate_threshold",
            ),
            (
                BreakerConfig {
                    failure_rate_threshold: f64::NAN,
                    ..Default::default()
                },
                "failure_rate_threshold",
            ),
            (
                BreakerConfig {
                    slow_call_rate_threshold: 0.0,
                    ..Default::default()
                },
                "slow_call_rate_threshold",
            ),
            (
                BreakerConfig {
                    minimum_calls: 0,
                    ..Default::default()
                },
                "minimum_calls",
            ),
            (
                BreakerConfig {
                    minimum_calls: 101,
                    ..Default::default()
                },
                "minimum_calls",
            ),
            (
                BreakerConfig {
                    failure_count_threshold: Some(nz(101)),
                    ..Default::default()
                },
                "failure_count_threshold",
            ),
            (
                BreakerConfig {
                    window: Window::Time(nz(100_000)),
                    ..Default::default()
                },
                "window",
            ),
            (
                BreakerConfig {
                    open_for: Duration::ZERO,
                    ..Default::default()
                },
                "open_for",
            ),
            (
                BreakerConfig {
                    probe_deadline: Duration::ZERO,
                    ..Default::default()
                },
                "probe_deadline",
            ),
            (
                BreakerConfig {
                    slow_call_duration: Duration::ZERO,
                    ..Default::default()
                },
                "slow_call_duration",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().unwrap_err();
            assert_eq!(err.field, field);
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn time_window_allows_any_minimum() {
        let c = BreakerConfig {
            window: Window::Time(nz(10)),
            minimum_calls: 1000,
            ..Default::default()
        };
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.effective_minimum_calls(), 1000);
    }
}
