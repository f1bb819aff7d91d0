//! Resilience primitives for Breakwater, as pure state machines that take `now`
//! (a [`tokio::time::Instant`]) so that paused-time tests drive them exactly.
//!
//! - [`breaker`]: circuit breaker (`Closed` / `Open` / `HalfOpen`) over a count or time
//!   window, with bounded half-open probes, probe deadlines and transition events.
//! - [`retry`]: exponential backoff with full jitter, a TPS retry budget, and the retry
//!   decision that combines attempts, breaker, deadline and budget.
//! - [`deadline`]: a request's total deadline and the per-try timeouts it allows.
//! - [`bulkhead`]: a bound on concurrent calls with RAII permits.
//! - [`rate_limit`]: a keyed GCRA limiter (governor) and a keyed fixed-window counter.
//! - `redis_limit` (feature `redis`): the same two limits shared by every instance
//!   through Redis, one Lua script per decision, falling back to the local limiter
//!   when Redis fails.
//!
//! Nothing here knows HTTP or any other Breakwater crate (the Redis limiter speaks only
//! to Redis, and only when its feature is on); the gateway and the services
//! turn these decisions into responses.

pub mod breaker;
pub mod bulkhead;
pub mod deadline;
pub mod rate_limit;
#[cfg(feature = "redis")]
pub mod redis_limit;
pub mod retry;

/// A configuration value that cannot work, naming the field and the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {problem}")]
pub struct ConfigError {
    /// The configuration field at fault, e.g. `failure_rate_threshold`.
    pub field: &'static str,
    /// What is wrong with it, in words.
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}
