//! One test per breaker transition and guard, on explicit instants or paused time.

use std::num::NonZeroU32;
use std::time::Duration;

use tokio::sync::broadcast::error::TryRecvError;
use tokio::time::Instant;

use super::*;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const FAST: Duration = Duration::from_millis(5);

/// Rate mode: window of 10 calls, opens at 50% failures from 5 calls, 30 s open.
fn rate_config() -> BreakerConfig {
    BreakerConfig {
        window: Window::Count(nz(10)),
        minimum_calls: 5,
        ..BreakerConfig::default()
    }
}

fn call(b: &Breaker, outcome: Outcome, now: Instant) {
    let permit = b.try_acquire(now).unwrap();
    b.record(permit, outcome, FAST, now);
}

fn fail_times(b: &Breaker, n: usize, now: Instant) {
    for _ in 0..n {
        call(b, Outcome::Failure, now);
    }
}

/// A breaker opened at `t0` by consecutive failures, with `probes` half-open probes.
fn opened(probes: u32, t0: Instant) -> Breaker {
    let b = Breaker::new(BreakerConfig {
        half_open_probes: nz(probes),
        ..BreakerConfig::consecutive(nz(1), secs(30))
    });
    call(&b, Outcome::Failure, t0);
    assert_eq!(b.state(t0), State::Open);
    b
}

fn last_reason(b: &Breaker, now: Instant) -> Reason {
    b.snapshot(now).last_transition.unwrap().reason
}

#[test]
fn breaker_and_permit_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Breaker>();
    send_sync::<Permit>();
    send_sync::<BreakerSnapshot>();
}

#[test]
fn closed_to_open_on_failure_rate_not_before_minimum_calls() {
    let t0 = Instant::now();
    let b = Breaker::new(rate_config());
    fail_times(&b, 4, t0);
    assert_eq!(
        b.state(t0),
        State::Closed,
        "4 calls are below minimum_calls"
    );
    call(&b, Outcome::Failure, t0);
    assert_eq!(b.state(t0), State::Open);
    assert_eq!(
        last_reason(&b, t0),
        Reason::FailureRate {
            rate: 1.0,
            threshold: 0.5,
            calls: 5
        }
    );
}

#[test]
fn failure_rate_below_threshold_stays_closed() {
    let t0 = Instant::now();
    let b = Breaker::new(rate_config());
    for _ in 0..20 {
        call(&b, Outcome::Success, t0);
        call(&b, Outcome::Success, t0);
        call(&b, Outcome::Failure, t0);
    }
    assert_eq!(b.state(t0), State::Closed);
    let snap = b.snapshot(t0);
    assert_eq!(snap.calls, 10, "the count window holds the last 10 calls");
    assert!(snap.failure_rate < 0.5);
    // The window slides: two more failures make the last ten 50% failures.
    fail_times(&b, 2, t0);
    assert_eq!(b.state(t0), State::Open);
}

#[test]
fn closed_to_open_on_slow_call_rate() {
    let t0 = Instant::now();
    let b = Breaker::new(BreakerConfig {
        slow_call_rate_threshold: 0.5,
        slow_call_duration: secs(1),
        ..rate_config()
    });
    for _ in 0..4 {
        let p = b.try_acquire(t0).unwrap();
        b.record(p, Outcome::Success, secs(2), t0);
    }
    assert_eq!(b.state(t0), State::Closed);
    let p = b.try_acquire(t0).unwrap();
    b.record(p, Outcome::Success, secs(1), t0);
    assert_eq!(b.state(t0), State::Open);
    assert_eq!(
        last_reason(&b, t0),
        Reason::SlowCallRate {
            rate: 1.0,
            threshold: 0.5,
            calls: 5
        }
    );
}

#[test]
fn slow_calls_are_counted_but_do_not_open_when_the_rule_is_off() {
    let t0 = Instant::now();
    let b = Breaker::new(rate_config());
    for _ in 0..10 {
        let p = b.try_acquire(t0).unwrap();
        b.record(p, Outcome::Success, secs(60), t0);
    }
    let snap = b.snapshot(t0);
    assert_eq!(snap.state, State::Closed);
    assert_eq!(snap.slow_calls, 10);
    assert_eq!(snap.slow_call_rate, 1.0);
}

#[test]
fn closed_to_open_on_consecutive_failures() {
    let t0 = Instant::now();
    let b = Breaker::new(BreakerConfig::consecutive(nz(3), secs(30)));
    fail_times(&b, 2, t0);
    call(&b, Outcome::Success, t0);
    fail_times(&b, 2, t0);
    assert_eq!(b.state(t0), State::Closed);
    assert_eq!(b.snapshot(t0).consecutive_failures, 2);
    call(&b, Outcome::Failure, t0);
    assert_eq!(b.state(t0), State::Open);
    assert_eq!(
        last_reason(&b, t0),
        Reason::ConsecutiveFailures { count: 3 }
    );
}

#[test]
fn open_rejects_with_retry_after() {
    let t0 = Instant::now();
    let b = opened(1, t0);
    assert_eq!(b.try_acquire(t0).unwrap_err().retry_after, secs(30));
    assert_eq!(
        b.try_acquire(t0 + secs(10)).unwrap_err().retry_after,
        secs(20)
    );
    let almost = t0 + secs(30) - Duration::from_nanos(1);
    assert_eq!(b.try_acquire(almost).unwrap_err().retry_after, ms(1));
    assert!(b.is_rejecting(t0 + secs(10)));
    let snap = b.snapshot(t0 + secs(10));
    assert_eq!(snap.retry_after, Some(secs(20)));
}

#[test]
fn open_to_half_open_exactly_at_open_for() {
    let t0 = Instant::now();
    let b = opened(1, t0);
    assert_eq!(b.state(t0 + secs(30) - ms(1)), State::Open);
    assert!(b.try_acquire(t0 + secs(30) - ms(1)).is_err());
    let permit = b.try_acquire(t0 + secs(30)).unwrap();
    assert!(permit.is_probe());
    assert_eq!(b.state(t0 + secs(30)), State::HalfOpen);
    assert_eq!(last_reason(&b, t0 + secs(30)), Reason::ResetTimeoutElapsed);
    drop(permit);
}

#[test]
fn state_alone_moves_open_to_half_open() {
    let t0 = Instant::now();
    let b = opened(1, t0);
    assert_eq!(b.state(t0 + secs(30)), State::HalfOpen);
    assert!(!b.is_rejecting(t0 + secs(30)));
}

#[test]
fn half_open_admits_exactly_the_configured_probes() {
    let t0 = Instant::now();
    let b = opened(3, t0);
    let t1 = t0 + secs(30);
    let probes: Vec<_> = (0..3).map(|_| b.try_acquire(t1).unwrap()).collect();
    let rejected = b.try_acquire(t1 + secs(1)).unwrap_err();
    // Rejected until the oldest probe's deadline (10 s after it started) at the latest.
    assert_eq!(rejected.retry_after, secs(9));
    assert!(b.is_rejecting(t1));
    assert_eq!(b.snapshot(t1).probes_in_flight, 3);
    drop(probes);
}

#[test]
fn half_open_to_closed_after_all_probes_succeed() {
    let t0 = Instant::now();
    let b = opened(3, t0);
    let t1 = t0 + secs(30);
    for i in 0..3u32 {
        let p = b.try_acquire(t1).unwrap();
        // A success does not free its slot for another probe: 3 probes in total.
        b.record(p, Outcome::Success, FAST, t1);
        if i < 2 {
            assert_eq!(b.state(t1), State::HalfOpen);
        }
    }
    assert_eq!(b.state(t1), State::Closed);
    let snap = b.snapshot(t1);
    assert_eq!(
        snap.last_transition.unwrap().reason,
        Reason::ProbesSucceeded { count: 3 }
    );
    assert_eq!(snap.calls, 0, "closing clears the window");
    assert_eq!(snap.consecutive_failures, 0);
}

#[test]
fn two_successes_of_three_do_not_admit_a_fourth_probe() {
    let t0 = Instant::now();
    let b = opened(3, t0);
    let t1 = t0 + secs(30);
    let (p1, p2, p3) = (
        b.try_acquire(t1).unwrap(),
        b.try_acquire(t1).unwrap(),
        b.try_acquire(t1).unwrap(),
    );
    b.record(p1, Outcome::Success, FAST, t1);
    b.record(p2, Outcome::Success, FAST, t1);
    assert!(b.try_acquire(t1).is_err());
    b.record(p3, Outcome::Success, FAST, t1);
    assert_eq!(b.state(t1), State::Closed);
}

#[test]
fn half_open_to_open_on_a_probe_failure() {
    let t0 = Instant::now();
    let b = opened(2, t0);
    let t1 = t0 + secs(30);
    let (p1, p2) = (b.try_acquire(t1).unwrap(), b.try_acquire(t1).unwrap());
    b.record(p1, Outcome::Success, FAST, t1);
    b.record(p2, Outcome::Failure, FAST, t1 + secs(1));
    assert_eq!(b.state(t1 + secs(1)), State::Open);
    assert_eq!(last_reason(&b, t1 + secs(1)), Reason::ProbeFailed);
    // Open again for a full open_for from the failure.
    assert_eq!(
        b.try_acquire(t1 + secs(2)).unwrap_err().retry_after,
        secs(29)
    );
    assert_eq!(b.state(t1 + secs(31)), State::HalfOpen);
}

#[test]
fn slow_probe_fails_when_the_slow_rule_is_on() {
    let t0 = Instant::now();
    let b = Breaker::new(BreakerConfig {
        slow_call_rate_threshold: 0.5,
        slow_call_duration: secs(1),
        ..BreakerConfig::consecutive(nz(1), secs(30))
    });
    call(&b, Outcome::Failure, t0);
    let t1 = t0 + secs(30);
    let p = b.try_acquire(t1).unwrap();
    b.record(p, Outcome::Success, secs(2), t1);
    assert_eq!(b.state(t1), State::Open);
    assert_eq!(last_reason(&b, t1), Reason::ProbeFailed);
}

#[test]
fn probe_deadline_reopens_so_half_open_cannot_stick() {
    let t0 = Instant::now();
    let b = opened(1, t0);
    let t1 = t0 + secs(30);
    let stuck = b.try_acquire(t1).unwrap();
    assert_eq!(b.state(t1 + secs(10) - ms(1)), State::HalfOpen);
    assert_eq!(b.state(t1 + secs(10)), State::Open);
    assert_eq!(last_reason(&b, t1 + secs(10)), Reason::ProbeTimedOut);
    // The late probe is from an old epoch: ignored, it cannot close the breaker.
    b.record(stuck, Outcome::Success, FAST, t1 + secs(11));
    assert_eq!(b.state(t1 + secs(11)), State::Open);
    // Dated at its deadline, so the next half-open comes open_for after that.
    assert_eq!(b.state(t1 + secs(40) - ms(1)), State::Open);
    assert_eq!(b.state(t1 + secs(40)), State::HalfOpen);
}

#[test]
fn probe_timeout_noticed_late_is_dated_on_time() {
    let t0 = Instant::now();
    let b = opened(1, t0);
    let mut events = b.subscribe();
    let t1 = t0 + secs(30);
    let stuck = b.try_acquire(t1).unwrap();
    // Nobody looks for 100 s: the probe timed out at t1+10 s, the breaker re-opened
    // then and went half-open again at t1+40 s, so a probe is admitted now.
    let fresh = b.try_acquire(t1 + secs(100)).unwrap();
    assert!(fresh.is_probe());
    let reasons: Vec<_> = std::iter::from_fn(|| events.try_recv().ok())
        .map(|t| (t.from, t.to, t.reason))
        .collect();
    assert_eq!(
        reasons,
        [
            (State::Open, State::HalfOpen, Reason::ResetTimeoutElapsed),
            (State::HalfOpen, State::Open, Reason::ProbeTimedOut),
            (State::Open, State::HalfOpen, Reason::ResetTimeoutElapsed),
        ]
    );
    drop((stuck, fresh));
}

#[test]
fn dropped_permit_releases_its_probe_slot_and_counts_nothing() {
    let t0 = Instant::now();
    let b = opened(1, t0);
    let t1 = t0 + secs(30);
    let p = b.try_acquire(t1).unwrap();
    assert!(b.try_acquire(t1).is_err());
    drop(p);
    assert_eq!(
        b.state(t1),
        State::HalfOpen,
        "a cancelled probe is not a failure"
    );
    let p = b.try_acquire(t1).unwrap();
    b.record(p, Outcome::Success, FAST, t1);
    assert_eq!(b.state(t1), State::Closed);
}

#[test]
fn dropped_closed_permit_counts_nothing() {
    let t0 = Instant::now();
    let b = Breaker::new(rate_config());
    for _ in 0..100 {
        drop(b.try_acquire(t0).unwrap());
    }
    assert_eq!(b.snapshot(t0).calls, 0);
}

#[test]
fn stale_epoch_permit_is_ignored() {
    let t0 = Instant::now();
    let b = Breaker::new(BreakerConfig::consecutive(nz(1), secs(30)));
    // Started while closed, finishes after the breaker opened and went half-open.
    let slow_call = b.try_acquire(t0).unwrap();
    call(&b, Outcome::Failure, t0);
    let t1 = t0 + secs(30);
    let probe = b.try_acquire(t1).unwrap();
    b.record(slow_call, Outcome::Success, FAST, t1);
    assert_eq!(
        b.state(t1),
        State::HalfOpen,
        "a stale success must not close"
    );
    assert!(b.try_acquire(t1).is_err(), "nor free the probe slot");
    b.record(probe, Outcome::Success, FAST, t1);
    assert_eq!(b.state(t1), State::Closed);
    // A call admitted before an admin reset is stale too: it cannot re-open.
    let before_reset = b.try_acquire(t1).unwrap();
    b.reset(t1);
    b.record(before_reset, Outcome::Failure, FAST, t1);
    assert_eq!(b.state(t1), State::Closed);
    assert_eq!(b.snapshot(t1).calls, 0);
}

#[test]
fn stale_probe_dropped_after_reopening_frees_nothing() {
    let t0 = Instant::now();
    let b = opened(2, t0);
    let t1 = t0 + secs(30);
    let (p1, p2) = (b.try_acquire(t1).unwrap(), b.try_acquire(t1).unwrap());
    b.record(p1, Outcome::Failure, FAST, t1);
    let t2 = t1 + secs(30);
    let (q1, q2) = (b.try_acquire(t2).unwrap(), b.try_acquire(t2).unwrap());
    drop(p2);
    assert!(
        b.try_acquire(t2).is_err(),
        "the old probe's drop freed a new slot"
    );
    drop((q1, q2));
}

#[test]
fn permit_from_another_breaker_is_ignored() {
    let t0 = Instant::now();
    let a = Breaker::new(BreakerConfig::consecutive(nz(1), secs(30)));
    let b = Breaker::new(BreakerConfig::consecutive(nz(1), secs(30)));
    let foreign = a.try_acquire(t0).unwrap();
    b.record(foreign, Outcome::Failure, FAST, t0);
    assert_eq!(b.state(t0), State::Closed);
    assert_eq!(a.state(t0), State::Closed);
    // A foreign probe is not counted either, and its own breaker gets the slot back.
    let h = opened(1, t0);
    let probe = h.try_acquire(t0 + secs(30)).unwrap();
    b.record(probe, Outcome::Success, FAST, t0 + secs(30));
    assert_eq!(h.state(t0 + secs(30)), State::HalfOpen);
    assert!(h.try_acquire(t0 + secs(30)).is_ok_and(|p| p.is_probe()));
}

#[test]
fn time_window_forgets_outcomes_older_than_t() {
    let t0 = Instant::now();
    let b = Breaker::new(BreakerConfig {
        window: Window::Time(nz(10)),
        ..rate_config()
    });
    fail_times(&b, 4, t0);
    assert_eq!(b.snapshot(t0 + secs(9)).calls, 4);
    assert_eq!(b.snapshot(t0 + secs(10)).calls, 0);
    // The old failures no longer count towards minimum_calls or the rate.
    call(&b, Outcome::Failure, t0 + secs(10));
    assert_eq!(b.state(t0 + secs(10)), State::Closed);
    fail_times(&b, 4, t0 + secs(11));
    assert_eq!(b.state(t0 + secs(11)), State::Open);
}

#[test]
fn subscribe_receives_each_transition_with_its_reason() {
    let t0 = Instant::now();
    let b = Breaker::named("users", BreakerConfig::consecutive(nz(2), secs(30)));
    assert_eq!(b.name(), "users");
    let mut events = b.subscribe();
    fail_times(&b, 2, t0);
    let t1 = t0 + secs(30);
    let p = b.try_acquire(t1).unwrap();
    b.record(p, Outcome::Failure, FAST, t1);
    let t2 = t1 + secs(30);
    let p = b.try_acquire(t2).unwrap();
    b.record(p, Outcome::Success, FAST, t2);
    b.force_open(t2);
    b.reset(t2);
    let got: Vec<_> = std::iter::from_fn(|| events.try_recv().ok())
        .map(|t| (t.from, t.to, t.reason))
        .collect();
    use State::*;
    assert_eq!(
        got,
        [
            (Closed, Open, Reason::ConsecutiveFailures { count: 2 }),
            (Open, HalfOpen, Reason::ResetTimeoutElapsed),
            (HalfOpen, Open, Reason::ProbeFailed),
            (Open, HalfOpen, Reason::ResetTimeoutElapsed),
            (HalfOpen, Closed, Reason::ProbesSucceeded { count: 1 }),
            (Closed, Open, Reason::Forced),
            (Open, Closed, Reason::Reset),
        ]
    );
    assert_eq!(events.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn lagging_subscriber_loses_the_oldest_events() {
    let t0 = Instant::now();
    let b = Breaker::new(BreakerConfig::default());
    let mut events = b.subscribe();
    for _ in 0..EVENT_CAPACITY {
        b.force_open(t0);
        b.reset(t0);
    }
    assert!(
        matches!(events.try_recv(), Err(TryRecvError::Lagged(n)) if n == EVENT_CAPACITY as u64)
    );
    assert_eq!(events.try_recv().unwrap().reason, Reason::Forced);
}

#[test]
fn transitions_carry_wall_clock_time() {
    let t0 = Instant::now();
    let b = opened(1, t0);
    let at = b.snapshot(t0).last_transition.unwrap().at_unix_ms;
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(at.abs_diff(wall) < 5_000, "{at} vs {wall}");
}

#[test]
fn force_open_and_reset() {
    let t0 = Instant::now();
    let b = Breaker::new(rate_config());
    fail_times(&b, 3, t0);
    b.force_open(t0);
    assert_eq!(b.state(t0), State::Open);
    assert_eq!(last_reason(&b, t0), Reason::Forced);
    // Forcing again restarts the reset timeout without a new event.
    b.force_open(t0 + secs(20));
    assert_eq!(b.state(t0 + secs(49)), State::Open);
    b.reset(t0 + secs(49));
    assert_eq!(b.state(t0 + secs(49)), State::Closed);
    let snap = b.snapshot(t0 + secs(49));
    assert_eq!(snap.last_transition.unwrap().reason, Reason::Reset);
    assert_eq!(snap.calls, 0);
    // Reset while closed clears the counts.
    fail_times(&b, 3, t0 + secs(50));
    b.reset(t0 + secs(50));
    let snap = b.snapshot(t0 + secs(50));
    assert_eq!((snap.calls, snap.consecutive_failures), (0, 0));
}

#[test]
fn snapshot_reports_the_window() {
    let t0 = Instant::now();
    let b = Breaker::new(rate_config());
    call(&b, Outcome::Success, t0);
    call(&b, Outcome::Success, t0);
    call(&b, Outcome::Failure, t0);
    call(&b, Outcome::Success, t0);
    let snap = b.snapshot(t0);
    assert_eq!(snap.state, State::Closed);
    assert_eq!((snap.calls, snap.failures, snap.slow_calls), (4, 1, 0));
    assert_eq!(snap.failure_rate, 0.25);
    assert_eq!(snap.retry_after, None);
    assert_eq!(snap.last_transition, None);
    let json = serde_json::to_value(&snap).unwrap();
    assert_eq!(json["state"], "CLOSED");
    assert_eq!(json["retry_after_ms"], serde_json::Value::Null);
    let open = opened(1, t0);
    let json = serde_json::to_value(open.snapshot(t0 + secs(1))).unwrap();
    assert_eq!(json["retry_after_ms"], 29_000);
    assert_eq!(json["last_transition"]["to"], "OPEN");
}

#[test]
fn try_new_validates() {
    let bad = BreakerConfig {
        failure_rate_threshold: 2.0,
        ..BreakerConfig::default()
    };
    assert_eq!(
        Breaker::try_new(bad).unwrap_err().field,
        "failure_rate_threshold"
    );
    let b = Breaker::try_new(rate_config()).unwrap();
    assert_eq!(b.config(), &rate_config());
}

#[test]
fn out_of_range_config_does_not_panic() {
    let t0 = Instant::now();
    let b = Breaker::new(BreakerConfig {
        failure_rate_threshold: f64::NAN,
        slow_call_rate_threshold: -1.0,
        minimum_calls: 0,
        open_for: Duration::MAX,
        probe_deadline: Duration::MAX,
        window: Window::Time(nz(u32::MAX)),
        ..BreakerConfig::default()
    });
    call(&b, Outcome::Failure, t0);
    // A negative slow threshold trips on the first call; NaN turned the failure rule off.
    assert_eq!(b.state(t0), State::Open);
    assert!(b.try_acquire(t0 + secs(1_000_000)).is_err());
}

/// Seed 003/004: three consecutive failures open; after 30 s exactly one trial call.
#[tokio::test(start_paused = true)]
async fn seed_mode_three_failures_then_one_trial_after_30s() {
    let b = Breaker::new(BreakerConfig::consecutive(nz(3), secs(30)));
    fail_times(&b, 3, Instant::now());
    assert_eq!(b.state(Instant::now()), State::Open);
    tokio::time::advance(secs(30) - ms(1)).await;
    assert!(b.try_acquire(Instant::now()).is_err());
    tokio::time::advance(ms(1)).await;
    let trial = b.try_acquire(Instant::now()).unwrap();
    assert_eq!(b.state(Instant::now()), State::HalfOpen);
    assert!(b.try_acquire(Instant::now()).is_err(), "only one trial");
    tokio::time::advance(secs(2)).await;
    b.record(trial, Outcome::Success, secs(2), Instant::now());
    assert_eq!(b.state(Instant::now()), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn seed_mode_failed_trial_reopens_for_another_30s() {
    let b = Breaker::new(BreakerConfig::consecutive(nz(3), secs(30)));
    fail_times(&b, 3, Instant::now());
    tokio::time::advance(secs(30)).await;
    let trial = b.try_acquire(Instant::now()).unwrap();
    b.record(trial, Outcome::Failure, FAST, Instant::now());
    assert_eq!(
        b.try_acquire(Instant::now()).unwrap_err().retry_after,
        secs(30)
    );
}

/// Seed 003's names: 3 failures within a 30 s window open, whatever the successes.
#[tokio::test(start_paused = true)]
async fn from_seed_counts_failures_within_the_time_window() {
    let config = BreakerConfig::from_seed(nz(3), ms(30_000), ms(30_000));
    let b = Breaker::new(config);
    for _ in 0..2 {
        call(&b, Outcome::Failure, Instant::now());
        for _ in 0..10 {
            call(&b, Outcome::Success, Instant::now());
        }
        tokio::time::advance(secs(20)).await;
    }
    // The first failure (40 s ago) has left the window: only one is in it.
    call(&b, Outcome::Failure, Instant::now());
    assert_eq!(b.state(Instant::now()), State::Closed);
    call(&b, Outcome::Failure, Instant::now());
    assert_eq!(b.state(Instant::now()), State::Open);
    assert_eq!(
        last_reason(&b, Instant::now()),
        Reason::FailureCount {
            failures: 3,
            threshold: 3
        }
    );
    tokio::time::advance(secs(30)).await;
    let trial = b.try_acquire(Instant::now()).unwrap();
    assert!(b.try_acquire(Instant::now()).is_err());
    b.record(trial, Outcome::Success, FAST, Instant::now());
    assert_eq!(b.state(Instant::now()), State::Closed);
}

#[test]
fn contended_breaker_stays_consistent() {
    let t0 = Instant::now();
    let b = std::sync::Arc::new(Breaker::new(BreakerConfig {
        half_open_probes: nz(4),
        open_for: ms(1),
        ..rate_config()
    }));
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let b = b.clone();
            std::thread::spawn(move || {
                let mut admitted_probes = 0;
                for step in 0..5_000u64 {
                    let now = t0 + ms(step);
                    if let Ok(p) = b.try_acquire(now) {
                        admitted_probes += u32::from(p.is_probe());
                        let outcome = Outcome::from_ok((step + i) % 2 != 0);
                        b.record(p, outcome, FAST, now);
                    }
                }
                admitted_probes
            })
        })
        .collect();
    let probes: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(probes > 0);
    let snap = b.snapshot(t0 + secs(10));
    assert!(snap.probes_in_flight <= 4);
}
