//! The breaker's states, call outcomes, and the transitions between states with their
//! reasons (what logs, the admin API and event streams show).

use std::fmt;

use serde::Serialize;

/// A breaker state, spelled `CLOSED` / `OPEN` / `HALF_OPEN` on the wire (seed 004).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Calls flow; outcomes are recorded in the window.
    Closed,
    /// Calls are rejected until the reset timeout has elapsed.
    Open,
    /// A bounded number of probe calls decide between closing and re-opening.
    HalfOpen,
}

impl State {
    /// The wire spelling: `"CLOSED"`, `"OPEN"` or `"HALF_OPEN"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "CLOSED",
            Self::Open => "OPEN",
            Self::HalfOpen => "HALF_OPEN",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a call ended, as the caller classified it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The call succeeded (it may still be slow).
    Success,
    /// The call failed in a way that says something about the callee's health.
    Failure,
}

impl Outcome {
    /// `Success` when `ok`, else `Failure`.
    pub fn from_ok(ok: bool) -> Self {
        if ok { Self::Success } else { Self::Failure }
    }
}

/// Why a transition happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// Closed → Open: the failure rate reached the threshold.
    FailureRate {
        /// Failed fraction of the window's calls.
        rate: f64,
        /// The configured threshold.
        threshold: f64,
        /// Calls in the window.
        calls: u32,
    },
    /// Closed → Open: the slow-call rate reached the threshold.
    SlowCallRate {
        /// Slow fraction of the window's calls.
        rate: f64,
        /// The configured threshold.
        threshold: f64,
        /// Calls in the window.
        calls: u32,
    },
    /// Closed → Open: this many failures in a row.
    ConsecutiveFailures {
        /// Failures in a row.
        count: u32,
    },
    /// Closed → Open: the window holds this many failures (seed 003 mode).
    FailureCount {
        /// Failures in the window.
        failures: u32,
        /// The configured maximum.
        threshold: u32,
    },
    /// Open → HalfOpen: the reset timeout elapsed.
    ResetTimeoutElapsed,
    /// HalfOpen → Open: a probe failed (or was slow while the slow-call rule is on).
    ProbeFailed,
    /// HalfOpen → Open: a probe was not recorded within the probe deadline.
    ProbeTimedOut,
    /// HalfOpen → Closed: this many probes succeeded.
    ProbesSucceeded {
        /// Probes that succeeded.
        count: u32,
    },
    /// → Open by an operator.
    Forced,
    /// → Closed by an operator.
    Reset,
}

fn percent(rate: f64) -> f64 {
    (rate * 100.0).round()
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FailureRate {
                rate,
                threshold,
                calls,
            } => write!(
                f,
                "failure rate {}% >= {}% over {calls} calls",
                percent(*rate),
                percent(*threshold)
            ),
            Self::SlowCallRate {
                rate,
                threshold,
                calls,
            } => write!(
                f,
                "slow-call rate {}% >= {}% over {calls} calls",
                percent(*rate),
                percent(*threshold)
            ),
            Self::ConsecutiveFailures { count } => write!(f, "{count} consecutive failures"),
            Self::FailureCount {
                failures,
                threshold,
            } => write!(f, "{failures} failures in the window (maximum {threshold})"),
            Self::ResetTimeoutElapsed => f.write_str("reset timeout elapsed"),
            Self::ProbeFailed => f.write_str("half-open probe failed"),
            Self::ProbeTimedOut => f.write_str("half-open probe not recorded before its deadline"),
            Self::ProbesSucceeded { count } => write!(f, "{count} half-open probes succeeded"),
            Self::Forced => f.write_str("forced open by an operator"),
            Self::Reset => f.write_str("reset by an operator"),
        }
    }
}

/// One state change of a breaker.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Transition {
    /// The state left.
    pub from: State,
    /// The state entered.
    pub to: State,
    /// Why.
    pub reason: Reason,
    /// Wall-clock time of the change, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}: {}", self.from, self.to, self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_spelled_like_the_seed() {
        assert_eq!(State::HalfOpen.as_str(), "HALF_OPEN");
        assert_eq!(State::Closed.to_string(), "CLOSED");
        assert_eq!(
            serde_json::to_string(&State::HalfOpen).unwrap(),
            "\"HALF_OPEN\""
        );
        assert_eq!(serde_json::to_string(&State::Open).unwrap(), "\"OPEN\"");
    }

    #[test]
    fn reasons_read_as_sentences() {
        let r = Reason::FailureRate {
            rate: 0.625,
            threshold: 0.5,
            calls: 20,
        };
        assert_eq!(r.to_string(), "failure rate 63% >= 50% over 20 calls");
        assert_eq!(
            Reason::ConsecutiveFailures { count: 3 }.to_string(),
            "3 consecutive failures"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["kind"], "failure_rate");
        assert_eq!(json["calls"], 20);
    }

    #[test]
    fn transition_serializes_with_wire_states() {
        let t = Transition {
            from: State::Open,
            to: State::HalfOpen,
            reason: Reason::ResetTimeoutElapsed,
            at_unix_ms: 5,
        };
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["from"], "OPEN");
        assert_eq!(json["to"], "HALF_OPEN");
        assert_eq!(json["reason"]["kind"], "reset_timeout_elapsed");
        assert_eq!(t.to_string(), "OPEN -> HALF_OPEN: reset timeout elapsed");
    }
}
