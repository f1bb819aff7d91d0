//! Circuit breaker: an explicit `Closed` / `Open` / `HalfOpen` state machine.
//!
//! - Closed: calls are admitted and their outcomes recorded in a [`Window`]; the breaker
//!   opens on the failure rate or slow-call rate (once `minimum_calls` are in the
//!   window), on a failure count in the window, or on consecutive failures.
//! - Open: calls are rejected with a `retry_after` until `open_for` has elapsed; the
//!   first access after that moves to half-open.
//! - HalfOpen: at most `half_open_probes` probes are admitted; all must succeed to
//!   close (which clears the window); any failure, or a probe not recorded within
//!   `probe_deadline`, re-opens.
//!
//! Time-based moves happen lazily at the next access, but are dated as if they had
//! happened on time, so the machine behaves the same however rarely it is consulted.
//! Every transition is stored as the last one, sent to [`Breaker::subscribe`] receivers and
//! logged once. Each state entered starts a new epoch; a [`Permit`] from an older
//! epoch is ignored when recorded, so a call that started before the breaker opened
//! cannot close it or use up a probe.

mod config;
mod transition;
mod window;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
use tokio::sync::broadcast;
use tokio::time::Instant;

pub use config::{BreakerConfig, Window};
pub use transition::{Outcome, Reason, State, Transition};
pub use window::MAX_TIME_WINDOW_SECS;

pub use crate::ConfigError;
use window::{Counts, Outcomes};

/// Transitions kept for a slow [`Breaker::subscribe`]r before it starts losing the oldest.
pub const EVENT_CAPACITY: usize = 64;

/// The shortest `retry_after` given, so that a client never retries "now".
const MIN_RETRY_AFTER: Duration = Duration::from_millis(1);

/// Rejected by an open breaker, or by a half-open one whose probe slots are all taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// How long until a call could be admitted (at least 1 ms): the rest of the reset
    /// timeout when open, the earliest probe deadline when half-open.
    pub retry_after: Duration,
}

/// A point-in-time view of a breaker, for the admin API and the dashboard.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BreakerSnapshot {
    /// The current state.
    pub state: State,
    /// Calls in the window.
    pub calls: u32,
    /// Failed calls in the window.
    pub failures: u32,
    /// Slow calls in the window.
    pub slow_calls: u32,
    /// Failed fraction of the window's calls (0 when empty).
    pub failure_rate: f64,
    /// Slow fraction of the window's calls (0 when empty).
    pub slow_call_rate: f64,
    /// Failures in a row while closed.
    pub consecutive_failures: u32,
    /// Probes admitted and not yet recorded (half-open only).
    pub probes_in_flight: u32,
    /// The most recent transition, if any.
    pub last_transition: Option<Transition>,
    /// While open: how long until a probe is admitted. Serialized as milliseconds.
    #[serde(rename = "retry_after_ms", serialize_with = "serialize_millis")]
    pub retry_after: Option<Duration>,
}

fn serialize_millis<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => s.serialize_none(),
    }
}

/// A thread-safe circuit breaker. Every operation takes one short, uncontended-fast
/// mutex and never awaits.
#[derive(Debug)]
pub struct Breaker {
    shared: Arc<Shared>,
}

/// Proof of admission, to be handed back to [`Breaker::record`].
///
/// Dropping a permit without recording it releases a half-open probe slot and counts
/// nothing: a cancelled call says nothing about the callee's health.
#[must_use = "record the call's outcome with Breaker::record, or drop the permit to cancel"]
pub struct Permit {
    /// Address of the breaker that issued it, so a foreign permit is ignored.
    owner: usize,
    epoch: u64,
    probe: Option<ProbeTicket>,
}

struct ProbeTicket {
    id: u64,
    shared: Arc<Shared>,
}

impl Permit {
    /// Whether this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("epoch", &self.epoch)
            .field("probe", &self.probe.as_ref().map(|p| p.id))
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(ticket) = self.probe.take() {
            ticket.shared.release_probe(self.epoch, ticket.id);
        }
    }
}

#[derive(Debug)]
struct Shared {
    name: String,
    config: BreakerConfig,
    minimum_calls: u32,
    events: broadcast::Sender<Transition>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Bumped on every transition; permits carry the epoch they were issued in.
    epoch: u64,
    window: Outcomes,
    consecutive_failures: u32,
    /// When the breaker last opened (meaningful while open).
    opened_at: Instant,
    /// Outstanding half-open probes: (id, admitted at).
    probes: Vec<(u64, Instant)>,
    next_probe_id: u64,
    probes_succeeded: u32,
    last_transition: Option<Transition>,
}

fn saturating_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn rate(part: u64, calls: u64) -> f64 {
    if calls == 0 {
        0.0
    } else {
        part as f64 / calls as f64
    }
}

/// Wall-clock milliseconds at `at`, given that it is `now` on the monotonic clock.
fn unix_ms_at(at: Instant, now: Instant) -> u64 {
    let wall = SystemTime::now()
        .checked_sub(now.saturating_duration_since(at))
        .unwrap_or(UNIX_EPOCH);
    wall.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Breaker {
    /// A breaker with this configuration, closed. Out-of-range values are clamped
    /// rather than rejected; call [`BreakerConfig::validate`] (or use
    /// [`Breaker::try_new`]) to reject them instead.
    pub fn new(config: BreakerConfig) -> Self {
        Self::named(String::new(), config)
    }

    /// Like [`Breaker::new`], but the configuration must pass [`BreakerConfig::validate`].
    pub fn try_new(config: BreakerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self::new(config))
    }

    /// A breaker whose log lines carry `breaker = name` (e.g. the service it guards).
    pub fn named(name: impl Into<String>, config: BreakerConfig) -> Self {
        let now = Instant::now();
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let inner = Inner {
            state: State::Closed,
            epoch: 0,
            window: Outcomes::new(config.window),
            consecutive_failures: 0,
            opened_at: now,
            probes: Vec::new(),
            next_probe_id: 0,
            probes_succeeded: 0,
            last_transition: None,
        };
        Self {
            shared: Arc::new(Shared {
                name: name.into(),
                minimum_calls: config.effective_minimum_calls(),
                config,
                events,
                inner: Mutex::new(inner),
            }),
        }
    }

    /// The name given to [`Breaker::named`] (empty for [`Breaker::new`]).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The configuration this breaker runs with.
    pub fn config(&self) -> &BreakerConfig {
        &self.shared.config
    }

    fn owner(&self) -> usize {
        Arc::as_ptr(&self.shared).addr()
    }

    /// Admission. In Open past `open_for`, moves to HalfOpen (emitting a transition)
    /// and admits a probe.
    pub fn try_acquire(&self, now: Instant) -> Result<Permit, Rejected> {
        let shared = &*self.shared;
        let mut inner = shared.lock();
        shared.advance(&mut inner, now);
        match inner.state {
            State::Closed => Ok(Permit {
                owner: self.owner(),
                epoch: inner.epoch,
                probe: None,
            }),
            State::Open => Err(Rejected {
                retry_after: shared.open_remaining(&inner, now),
            }),
            State::HalfOpen => {
                let taken = u64::try_from(inner.probes.len()).unwrap_or(u64::MAX)
                    + u64::from(inner.probes_succeeded);
                if taken < u64::from(shared.config.half_open_probes.get()) {
                    let id = inner.next_probe_id;
                    inner.next_probe_id += 1;
                    inner.probes.push((id, now));
                    Ok(Permit {
                        owner: self.owner(),
                        epoch: inner.epoch,
                        probe: Some(ProbeTicket {
                            id,
                            shared: Arc::clone(&self.shared),
                        }),
                    })
                } else {
                    let retry_after = shared
                        .earliest_probe_deadline(&inner)
                        .map_or(MIN_RETRY_AFTER, |d| d.saturating_duration_since(now))
                        .max(MIN_RETRY_AFTER);
                    Err(Rejected { retry_after })
                }
            }
        }
    }

    /// Records a call's outcome; `elapsed` is judged against `slow_call_duration`.
    /// A permit from an earlier epoch (or another breaker) is ignored.
    pub fn record(&self, mut permit: Permit, outcome: Outcome, elapsed: Duration, now: Instant) {
        if permit.owner != self.owner() {
            // Dropping it releases its probe slot, if any, on the breaker that issued it.
            return;
        }
        let ticket = permit.probe.take();
        let shared = &*self.shared;
        let config = &shared.config;
        let mut inner = shared.lock();
        shared.advance(&mut inner, now);
        if permit.epoch != inner.epoch {
            return;
        }
        let failed = outcome == Outcome::Failure;
        let slow = elapsed >= config.slow_call_duration;
        match (inner.state, ticket) {
            (State::Closed, None) => {
                inner.window.record(failed, slow, now);
                inner.consecutive_failures = if failed {
                    inner.consecutive_failures.saturating_add(1)
                } else {
                    0
                };
                if let Some(reason) = shared.trip_reason(&mut inner, now) {
                    shared.enter(&mut inner, State::Open, reason, now, now);
                }
            }
            (State::HalfOpen, Some(ticket)) => {
                let Some(at) = inner.probes.iter().position(|&(id, _)| id == ticket.id) else {
                    return;
                };
                inner.probes.swap_remove(at);
                if failed || (slow && config.slow_rate_rule()) {
                    shared.enter(&mut inner, State::Open, Reason::ProbeFailed, now, now);
                } else {
                    inner.probes_succeeded += 1;
                    if inner.probes_succeeded >= config.half_open_probes.get() {
                        let count = inner.probes_succeeded;
                        let reason = Reason::ProbesSucceeded { count };
                        shared.enter(&mut inner, State::Closed, reason, now, now);
                    }
                }
            }
            // A permit that does not fit the state it claims: nothing to learn from it.
            _ => {}
        }
    }

    /// The current state, after applying a due reset timeout or probe deadline.
    pub fn state(&self, now: Instant) -> State {
        let mut inner = self.shared.lock();
        self.shared.advance(&mut inner, now);
        inner.state
    }

    /// Whether a call would be rejected now (open, or half-open with no free probe
    /// slot), without admitting one. For fallbacks and retry decisions.
    pub fn is_rejecting(&self, now: Instant) -> bool {
        let shared = &*self.shared;
        let mut inner = shared.lock();
        shared.advance(&mut inner, now);
        match inner.state {
            State::Closed => false,
            State::Open => true,
            State::HalfOpen => {
                let taken = u64::try_from(inner.probes.len()).unwrap_or(u64::MAX)
                    + u64::from(inner.probes_succeeded);
                taken >= u64::from(shared.config.half_open_probes.get())
            }
        }
    }

    /// A point-in-time view: state, window rates, last transition, retry-after.
    pub fn snapshot(&self, now: Instant) -> BreakerSnapshot {
        let shared = &*self.shared;
        let mut inner = shared.lock();
        shared.advance(&mut inner, now);
        let counts = inner.window.counts(now);
        BreakerSnapshot {
            state: inner.state,
            calls: saturating_u32(counts.calls),
            failures: saturating_u32(counts.failures),
            slow_calls: saturating_u32(counts.slow),
            failure_rate: rate(counts.failures, counts.calls),
            slow_call_rate: rate(counts.slow, counts.calls),
            consecutive_failures: inner.consecutive_failures,
            probes_in_flight: u32::try_from(inner.probes.len()).unwrap_or(u32::MAX),
            last_transition: inner.last_transition.clone(),
            retry_after: (inner.state == State::Open).then(|| shared.open_remaining(&inner, now)),
        }
    }

    /// Transitions are also delivered here (a bounded broadcast of
    /// [`EVENT_CAPACITY`]; a lagging receiver loses the oldest events).
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.shared.events.subscribe()
    }

    /// Admin: opens the breaker now (reason `Forced`). It recovers as after any trip:
    /// probes after `open_for`. If already open, the reset timeout restarts.
    pub fn force_open(&self, now: Instant) {
        let shared = &*self.shared;
        let mut inner = shared.lock();
        shared.advance(&mut inner, now);
        if inner.state == State::Open {
            inner.opened_at = now;
        } else {
            shared.enter(&mut inner, State::Open, Reason::Forced, now, now);
        }
    }

    /// Admin: closes the breaker now (reason `Reset`) with an empty window. If already
    /// closed, the window and the consecutive-failure count are cleared (no event).
    /// Either way, calls admitted before the reset are not recorded.
    pub fn reset(&self, now: Instant) {
        let shared = &*self.shared;
        let mut inner = shared.lock();
        shared.advance(&mut inner, now);
        if inner.state == State::Closed {
            // A new epoch without a transition: calls admitted before the reset must
            // not refill the window it just cleared.
            inner.window.clear();
            inner.consecutive_failures = 0;
            inner.epoch += 1;
        } else {
            shared.enter(&mut inner, State::Closed, Reason::Reset, now, now);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while the lock is held; if something ever did, the state is
        // still a valid machine, so carry on with it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies the time-driven transitions that are due by `now`, each dated when it
    /// became due. At most two rounds: a timed-out probe re-opens, and that opening's
    /// reset timeout may itself have elapsed.
    fn advance(&self, inner: &mut Inner, now: Instant) {
        loop {
            match inner.state {
                State::Closed => return,
                State::Open => match inner.opened_at.checked_add(self.config.open_for) {
                    Some(due) if now >= due => {
                        self.enter(
                            inner,
                            State::HalfOpen,
                            Reason::ResetTimeoutElapsed,
                            due,
                            now,
                        );
                    }
                    _ => return,
                },
                State::HalfOpen => match self.earliest_probe_deadline(inner) {
                    Some(due) if now >= due => {
                        self.enter(inner, State::Open, Reason::ProbeTimedOut, due, now);
                    }
                    _ => return,
                },
            }
        }
    }

    fn earliest_probe_deadline(&self, inner: &Inner) -> Option<Instant> {
        let oldest = inner.probes.iter().map(|&(_, at)| at).min()?;
        oldest.checked_add(self.config.probe_deadline)
    }

    fn open_remaining(&self, inner: &Inner, now: Instant) -> Duration {
        self.config
            .open_for
            .saturating_sub(now.saturating_duration_since(inner.opened_at))
            .max(MIN_RETRY_AFTER)
    }

    /// Whether the closed breaker's counts call for opening, and why.
    fn trip_reason(&self, inner: &mut Inner, now: Instant) -> Option<Reason> {
        let config = &self.config;
        if let Some(max) = config.consecutive_failures
            && inner.consecutive_failures >= max.get()
        {
            return Some(Reason::ConsecutiveFailures {
                count: inner.consecutive_failures,
            });
        }
        let Counts {
            calls,
            failures,
            slow,
        } = inner.window.counts(now);
        if let Some(max) = config.failure_count_threshold
            && failures >= u64::from(max.get())
        {
            return Some(Reason::FailureCount {
                failures: saturating_u32(failures),
                threshold: max.get(),
            });
        }
        if calls < u64::from(self.minimum_calls) {
            return None;
        }
        let failure_rate = rate(failures, calls);
        if config.failure_rate_rule() && failure_rate >= config.failure_rate_threshold {
            return Some(Reason::FailureRate {
                rate: failure_rate,
                threshold: config.failure_rate_threshold,
                calls: saturating_u32(calls),
            });
        }
        let slow_rate = rate(slow, calls);
        if config.slow_rate_rule() && slow_rate >= config.slow_call_rate_threshold {
            return Some(Reason::SlowCallRate {
                rate: slow_rate,
                threshold: config.slow_call_rate_threshold,
                calls: saturating_u32(calls),
            });
        }
        None
    }

    /// The one place a state changes: new epoch, state-entry bookkeeping, then the
    /// transition is stored, broadcast and logged. `at` is when it became due.
    fn enter(&self, inner: &mut Inner, to: State, reason: Reason, at: Instant, now: Instant) {
        let from = inner.state;
        inner.state = to;
        inner.epoch += 1;
        inner.probes.clear();
        inner.probes_succeeded = 0;
        match to {
            State::Open => inner.opened_at = at,
            State::Closed => {
                inner.window.clear();
                inner.consecutive_failures = 0;
            }
            State::HalfOpen => {}
        }
        let transition = Transition {
            from,
            to,
            reason,
            at_unix_ms: unix_ms_at(at, now),
        };
        if to == State::Open {
            tracing::warn!(breaker = %self.name, from = %from, to = %to, reason = %transition.reason, "circuit breaker transition");
        } else {
            tracing::info!(breaker = %self.name, from = %from, to = %to, reason = %transition.reason, "circuit breaker transition");
        }
        // Sending under the lock keeps subscribers' order equal to the real order; an
        // error only means nobody is listening.
        let _ = self.events.send(transition.clone());
        inner.last_transition = Some(transition);
    }

    /// A probe permit was dropped unrecorded: free its slot if it is still current.
    fn release_probe(&self, epoch: u64, id: u64) {
        let mut inner = self.lock();
        if inner.epoch == epoch
            && inner.state == State::HalfOpen
            && let Some(at) = inner.probes.iter().position(|&(p, _)| p == id)
        {
            inner.probes.swap_remove(at);
        }
    }
}

#[cfg(test)]
mod tests;
