//! Property: for random configurations and random sequences of calls, cancellations and
//! time steps, the breaker's state, window counts, admissions and transitions equal a
//! naive reference model that keeps every call in a Vec and filters it on each question.

use std::num::NonZeroU32;
use std::time::Duration;

use breakwater_resilience::breaker::{
    Breaker, BreakerConfig, Outcome, Permit, Reason, State, Window,
};
use proptest::prelude::*;
use tokio::time::Instant;

const MIN_RETRY_AFTER: Duration = Duration::from_millis(1);

#[derive(Clone, Debug)]
enum Op {
    Acquire,
    Record {
        pick: usize,
        failed: bool,
        slow: bool,
    },
    Cancel {
        pick: usize,
    },
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Acquire),
        4 => (any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(pick, failed, slow)| Op::Record { pick, failed, slow }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        2 => (0u64..3_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

fn config() -> impl Strategy<Value = BreakerConfig> {
    let window = prop_oneof![
        (1u32..20).prop_map(|n| Window::Count(nz(n))),
        (1u32..10).prop_map(|n| Window::Time(nz(n))),
    ];
    (
        window,
        prop::sample::select(vec![0.3, 0.5, 0.8, 1.0]),
        prop::sample::select(vec![0.5, 1.0]),
        1u32..25,
        prop::option::of(1u32..5),
        prop::option::of(1u32..8),
        500u64..5_000,
        1u32..4,
        100u64..3_000,
    )
        .prop_map(
            |(window, failure, slow, min, consecutive, count, open_ms, probes, deadline_ms)| {
                let size = window.size().get();
                let bounded = |n: u32| match window {
                    Window::Count(_) => n.min(size),
                    Window::Time(_) => n,
                };
                BreakerConfig {
                    window,
                    failure_rate_threshold: failure,
                    slow_call_rate_threshold: slow,
                    slow_call_duration: Duration::from_secs(1),
                    minimum_calls: bounded(min),
                    consecutive_failures: consecutive.map(nz),
                    failure_count_threshold: count.map(|c| nz(bounded(c))),
                    open_for: Duration::from_millis(open_ms),
                    half_open_probes: nz(probes),
                    probe_deadline: Duration::from_millis(deadline_ms),
                }
            },
        )
}

/// The reference: every call since the last close, filtered on demand.
struct Model {
    config: BreakerConfig,
    origin: Instant,
    state: State,
    epoch: u64,
    /// (time, failed, slow) of every call recorded since the window was last cleared.
    calls: Vec<(Instant, bool, bool)>,
    opened_at: Instant,
    probes: Vec<(u64, Instant)>,
    next_probe: u64,
    succeeded: u32,
    events: Vec<(State, State, Reason)>,
}

#[derive(Clone, Copy, Debug)]
struct ModelPermit {
    epoch: u64,
    probe: Option<u64>,
}

impl Model {
    fn new(config: BreakerConfig, origin: Instant) -> Self {
        Self {
            config,
            origin,
            state: State::Closed,
            epoch: 0,
            calls: Vec::new(),
            opened_at: origin,
            probes: Vec::new(),
            next_probe: 0,
            succeeded: 0,
            events: Vec::new(),
        }
    }

    fn window(&self, now: Instant) -> Vec<(Instant, bool, bool)> {
        match self.config.window {
            Window::Count(n) => {
                let start = self.calls.len().saturating_sub(n.get() as usize);
                self.calls[start..].to_vec()
            }
            Window::Time(t) => {
                let second = |at: Instant| (at - self.origin).as_secs();
                let current = second(now);
                self.calls
                    .iter()
                    .copied()
                    .filter(|&(at, _, _)| second(at) + u64::from(t.get()) > current)
                    .collect()
            }
        }
    }

    fn counts(&self, now: Instant) -> (u32, u32, u32) {
        let w = self.window(now);
        let failures = w.iter().filter(|c| c.1).count() as u32;
        let slow = w.iter().filter(|c| c.2).count() as u32;
        (w.len() as u32, failures, slow)
    }

    fn consecutive(&self) -> u32 {
        self.calls.iter().rev().take_while(|c| c.1).count() as u32
    }

    fn enter(&mut self, to: State, reason: Reason, at: Instant) {
        self.events.push((self.state, to, reason));
        self.state = to;
        self.epoch += 1;
        self.probes.clear();
        self.succeeded = 0;
        match to {
            State::Open => self.opened_at = at,
            State::Closed => self.calls.clear(),
            State::HalfOpen => {}
        }
    }

    fn advance(&mut self, now: Instant) {
        loop {
            match self.state {
                State::Open if now >= self.opened_at + self.config.open_for => {
                    let at = self.opened_at + self.config.open_for;
                    self.enter(State::HalfOpen, Reason::ResetTimeoutElapsed, at);
                }
                State::HalfOpen => {
                    let deadline = self
                        .probes
                        .iter()
                        .map(|p| p.1 + self.config.probe_deadline)
                        .min();
                    match deadline {
                        Some(d) if now >= d => self.enter(State::Open, Reason::ProbeTimedOut, d),
                        _ => return,
                    }
                }
                _ => return,
            }
        }
    }

    fn acquire(&mut self, now: Instant) -> Result<ModelPermit, Duration> {
        self.advance(now);
        match self.state {
            State::Closed => Ok(ModelPermit {
                epoch: self.epoch,
                probe: None,
            }),
            State::Open => {
                let until = self.opened_at + self.config.open_for;
                Err((until - now).max(MIN_RETRY_AFTER))
            }
            State::HalfOpen => {
                if (self.probes.len() as u32 + self.succeeded) < self.config.half_open_probes.get()
                {
                    let id = self.next_probe;
                    self.next_probe += 1;
                    self.probes.push((id, now));
                    Ok(ModelPermit {
                        epoch: self.epoch,
                        probe: Some(id),
                    })
                } else {
                    let deadline = self
                        .probes
                        .iter()
                        .map(|p| p.1 + self.config.probe_deadline)
                        .min();
                    Err(deadline.map_or(MIN_RETRY_AFTER, |d| {
                        d.saturating_duration_since(now).max(MIN_RETRY_AFTER)
                    }))
                }
            }
        }
    }

    fn trip(&self, now: Instant) -> Option<Reason> {
        let c = &self.config;
        let consecutive = self.consecutive();
        if c.consecutive_failures
            .is_some_and(|n| consecutive >= n.get())
        {
            return Some(Reason::ConsecutiveFailures { count: consecutive });
        }
        let (calls, failures, slow) = self.counts(now);
        if let Some(n) = c.failure_count_threshold
            && failures >= n.get()
        {
            return Some(Reason::FailureCount {
                failures,
                threshold: n.get(),
            });
        }
        if calls < c.minimum_calls {
            return None;
        }
        let failure_rate = f64::from(failures) / f64::from(calls);
        if c.failure_rate_threshold < 1.0 && failure_rate >= c.failure_rate_threshold {
            return Some(Reason::FailureRate {
                rate: failure_rate,
                threshold: c.failure_rate_threshold,
                calls,
            });
        }
        let slow_rate = f64::from(slow) / f64::from(calls);
        if c.slow_call_rate_threshold < 1.0 && slow_rate >= c.slow_call_rate_threshold {
            return Some(Reason::SlowCallRate {
                rate: slow_rate,
                threshold: c.slow_call_rate_threshold,
                calls,
            });
        }
        None
    }

    fn record(&mut self, permit: ModelPermit, failed: bool, slow: bool, now: Instant) {
        self.advance(now);
        if permit.epoch != self.epoch {
            return;
        }
        match (self.state, permit.probe) {
            (State::Closed, None) => {
                self.calls.push((now, failed, slow));
                if let Some(reason) = self.trip(now) {
                    self.enter(State::Open, reason, now);
                }
            }
            (State::HalfOpen, Some(id)) => {
                let Some(at) = self.probes.iter().position(|p| p.0 == id) else {
                    return;
                };
                self.probes.remove(at);
                if failed || (slow && self.config.slow_call_rate_threshold < 1.0) {
                    self.enter(State::Open, Reason::ProbeFailed, now);
                } else {
                    self.succeeded += 1;
                    if self.succeeded >= self.config.half_open_probes.get() {
                        let count = self.succeeded;
                        self.enter(State::Closed, Reason::ProbesSucceeded { count }, now);
                    }
                }
            }
            _ => {}
        }
    }

    fn cancel(&mut self, permit: ModelPermit) {
        if let Some(id) = permit.probe
            && permit.epoch == self.epoch
            && self.state == State::HalfOpen
        {
            self.probes.retain(|p| p.0 != id);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn breaker_matches_reference_model(
        config in config(),
        ops in prop::collection::vec(op(), 1..150),
    ) {
        let breaker = Breaker::try_new(config.clone()).unwrap();
        let mut events = breaker.subscribe();
        let mut now = Instant::now();
        // The first use fixes the time window's second 0; the model uses the same.
        breaker.snapshot(now);
        let mut model = Model::new(config.clone(), now);
        let mut outstanding: Vec<(Permit, ModelPermit)> = Vec::new();
        let slow_elapsed = config.slow_call_duration;

        for op in ops {
            match op {
                Op::Acquire => {
                    let real = breaker.try_acquire(now);
                    let expected = model.acquire(now);
                    match (real, expected) {
                        (Ok(p), Ok(m)) => {
                            prop_assert_eq!(p.is_probe(), m.probe.is_some());
                            outstanding.push((p, m));
                        }
                        (Err(r), Err(retry_after)) => prop_assert_eq!(r.retry_after, retry_after),
                        (real, expected) => prop_assert!(
                            false, "admission differs: {:?} vs {:?}", real, expected
                        ),
                    }
                }
                Op::Record { pick, failed, slow } if !outstanding.is_empty() => {
                    let (p, m) = outstanding.swap_remove(pick % outstanding.len());
                    let elapsed = if slow { slow_elapsed } else { Duration::ZERO };
                    breaker.record(p, Outcome::from_ok(!failed), elapsed, now);
                    model.record(m, failed, slow, now);
                }
                Op::Cancel { pick } if !outstanding.is_empty() => {
                    let (p, m) = outstanding.swap_remove(pick % outstanding.len());
                    drop(p);
                    model.cancel(m);
                }
                Op::Advance { ms } => now += Duration::from_millis(ms),
                _ => {}
            }
            prop_assert_eq!(breaker.state(now), { model.advance(now); model.state });
            let snap = breaker.snapshot(now);
            let (calls, failures, slow) = model.counts(now);
            prop_assert_eq!((snap.calls, snap.failures, snap.slow_calls), (calls, failures, slow));
            if model.state == State::Closed {
                prop_assert_eq!(snap.consecutive_failures, model.consecutive());
            }
            let got: Vec<_> = std::iter::from_fn(|| events.try_recv().ok())
                .map(|t| (t.from, t.to, t.reason))
                .collect();
            prop_assert_eq!(got, std::mem::take(&mut model.events));
        }
    }
}
