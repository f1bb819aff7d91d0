//! Retries: exponential backoff with full jitter, a retry budget, and the one retry
//! decision every caller shares.
//!
//! - [`Backoff`]: `delay(n)` is uniform in `0..=min(max, base * 2^n)` ("full jitter"),
//!   which spreads synchronized clients apart better than any fixed schedule.
//! - [`RetryBudget`]: linkerd/tower `TpsBudget` semantics. Each original request
//!   deposits, each retry withdraws; retries stay within `ratio` of the requests seen in
//!   the last `ttl`, plus a floor of `min_per_sec` so low-traffic callers can still retry.
//! - [`RetryPolicy::decide`]: attempts, then breaker, then deadline, then budget.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::ConfigError;

/// Exponential backoff with full jitter: `delay(n) = random(0 ..= min(max, base * 2^n))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first delay (`n = 0`).
    pub base: Duration,
    /// No delay's ceiling exceeds this.
    pub max: Duration,
}

impl Backoff {
    /// The largest delay `delay(attempt)` can return: `min(max, base * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let grown = 1u32
            .checked_shl(attempt)
            .and_then(|factor| self.base.checked_mul(factor))
            .unwrap_or(Duration::MAX);
        grown.min(self.max)
    }

    /// A delay drawn uniformly from `0..=ceiling(attempt)`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempt).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=ceiling))
    }
}

/// Slots the budget's `ttl` is divided into; a deposit is forgotten 0.9–1.0 `ttl` later.
const BUDGET_SLOTS: usize = 10;

/// Fixed-point scale for one deposit, so fractional ratios (e.g. 0.3) are exact enough.
const DEPOSIT_UNIT: i64 = 1000;

/// A retry budget shared by the callers of one service; thread safe (one short lock).
#[derive(Debug)]
pub struct RetryBudget {
    ttl: Duration,
    min_per_sec: u32,
    ratio: f32,
    slot_len: Duration,
    /// The floor: `min_per_sec * ttl` withdrawals, always available.
    reserve: i64,
    deposit_amount: i64,
    withdraw_amount: i64,
    slots: Mutex<Slots>,
}

#[derive(Debug)]
struct Slots {
    balance: [i64; BUDGET_SLOTS],
    current: usize,
    /// When the current slot began; set by the first access.
    current_start: Option<Instant>,
}

impl RetryBudget {
    /// A budget allowing retries up to `ratio` times the requests deposited in the last
    /// `ttl`, plus `min_per_sec` retries per second. `ratio` is clamped to `0..=1000`
    /// and `ttl` to at least 1 ms; [`RetryBudget::try_new`] rejects them instead.
    pub fn new(ttl: Duration, min_per_sec: u32, ratio: f32) -> Self {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1000.0)
        };
        let ttl = ttl.max(Duration::from_millis(1));
        let (deposit_amount, withdraw_amount) = if ratio > 0.0 {
            // round() rather than truncation: 1000 / 0.2f32 is 4999.9999.
            let withdraw = (DEPOSIT_UNIT as f64 / f64::from(ratio)).round() as i64;
            (DEPOSIT_UNIT, withdraw.max(1))
        } else {
            // Deposits earn nothing; only the floor can be withdrawn.
            (0, DEPOSIT_UNIT)
        };
        let floor = (f64::from(min_per_sec) * ttl.as_secs_f64()).round() as i64;
        Self {
            ttl,
            min_per_sec,
            ratio,
            slot_len: (ttl / BUDGET_SLOTS as u32).max(Duration::from_nanos(1)),
            reserve: floor.saturating_mul(withdraw_amount),
            deposit_amount,
            withdraw_amount,
            slots: Mutex::new(Slots {
                balance: [0; BUDGET_SLOTS],
                current: 0,
                current_start: None,
            }),
        }
    }

    /// Like [`RetryBudget::new`], but rejects a ratio outside `0..=1000` or a `ttl`
    /// shorter than 1 ms.
    pub fn try_new(ttl: Duration, min_per_sec: u32, ratio: f32) -> Result<Self, ConfigError> {
        if !(0.0..=1000.0).contains(&ratio) {
            return Err(ConfigError::new(
                "ratio",
                format!("must be between 0 and 1000, got {ratio}"),
            ));
        }
        if ttl < Duration::from_millis(1) {
            return Err(ConfigError::new("ttl", "must be at least 1 ms"));
        }
        Ok(Self::new(ttl, min_per_sec, ratio))
    }

    /// The window deposits are remembered for.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The floor of retries per second.
    pub fn min_per_sec(&self) -> u32 {
        self.min_per_sec
    }

    /// Retries allowed per original request.
    pub fn ratio(&self) -> f32 {
        self.ratio
    }

    fn lock(&self, now: Instant) -> std::sync::MutexGuard<'_, Slots> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        self.expire(&mut slots, now);
        slots
    }

    /// Zeroes the slots that have aged out by `now`.
    fn expire(&self, slots: &mut Slots, now: Instant) {
        let start = *slots.current_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed < self.slot_len {
            return;
        }
        let passed = elapsed.as_nanos() / self.slot_len.as_nanos();
        let to_reset = passed.min(BUDGET_SLOTS as u128) as usize;
        for _ in 0..to_reset {
            slots.current = (slots.current + 1) % BUDGET_SLOTS;
            slots.balance[slots.current] = 0;
        }
        // Keep slot boundaries on the original grid so no time is lost to rounding.
        let advanced = u32::try_from(passed)
            .ok()
            .and_then(|n| self.slot_len.checked_mul(n))
            .and_then(|d| start.checked_add(d))
            .unwrap_or(now);
        slots.current_start = Some(advanced);
    }

    fn sum(&self, slots: &Slots) -> i64 {
        slots
            .balance
            .iter()
            .fold(self.reserve, |acc, b| acc.saturating_add(*b))
    }

    /// Records an original (non-retry) request.
    pub fn deposit(&self, now: Instant) {
        let mut slots = self.lock(now);
        let current = slots.current;
        slots.balance[current] = slots.balance[current].saturating_add(self.deposit_amount);
    }

    /// Takes one retry from the budget; `false` means it is exhausted: do not retry.
    pub fn withdraw(&self, now: Instant) -> bool {
        let mut slots = self.lock(now);
        if self.sum(&slots) < self.withdraw_amount {
            return false;
        }
        let current = slots.current;
        slots.balance[current] = slots.balance[current].saturating_sub(self.withdraw_amount);
        true
    }

    /// Retries that could be withdrawn now (for the admin API).
    pub fn remaining(&self, now: Instant) -> u32 {
        let slots = self.lock(now);
        let left = self.sum(&slots).max(0) / self.withdraw_amount;
        u32::try_from(left).unwrap_or(u32::MAX)
    }
}

/// When and whether to retry a failed try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total tries including the first.
    pub max_attempts: NonZeroU32,
    /// The wait before each retry; the first retry uses `backoff.delay(0)`.
    pub backoff: Backoff,
}

/// What [`RetryPolicy::decide`] concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Retry after waiting this long (already withdrawn from the budget).
    Retry {
        /// The jittered backoff delay.
        after: Duration,
    },
    /// Do not retry.
    GiveUp(GiveUpReason),
}

/// Why no retry is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GiveUpReason {
    /// `max_attempts` tries have been made.
    AttemptsExhausted,
    /// The retry budget has no retries left.
    BudgetExhausted,
    /// The breaker would reject the retry anyway.
    BreakerOpen,
    /// The backoff could run past the request's deadline.
    DeadlineTooClose,
}

impl GiveUpReason {
    /// A stable snake_case name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AttemptsExhausted => "attempts_exhausted",
            Self::BudgetExhausted => "budget_exhausted",
            Self::BreakerOpen => "breaker_open",
            Self::DeadlineTooClose => "deadline_too_close",
        }
    }
}

impl fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RetryPolicy {
    /// Decides after a failed try. `attempt` is the number of tries made so far (1 after
    /// the first). In order: attempts exhausted, breaker open, deadline (giving up when
    /// `now + backoff.ceiling(attempt - 1)` reaches it, so a retry never starts past
    /// it), then the budget (withdrawn only when the answer is `Retry`).
    pub fn decide(
        &self,
        attempt: u32,
        budget: Option<&RetryBudget>,
        breaker_open: bool,
        deadline: Option<Instant>,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Decision {
        if attempt >= self.max_attempts.get() {
            return Decision::GiveUp(GiveUpReason::AttemptsExhausted);
        }
        if breaker_open {
            return Decision::GiveUp(GiveUpReason::BreakerOpen);
        }
        let step = attempt.saturating_sub(1);
        let left = match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(now);
                if left <= self.backoff.ceiling(step) {
                    return Decision::GiveUp(GiveUpReason::DeadlineTooClose);
                }
                Some(left)
            }
            None => None,
        };
        if let Some(budget) = budget
            && !budget.withdraw(now)
        {
            return Decision::GiveUp(GiveUpReason::BudgetExhausted);
        }
        let mut after = self.backoff.delay(step, rng);
        if let Some(left) = left {
            // Already below `left` by the check above; kept so that a future change
            // to the check cannot schedule a retry at or past the deadline.
            after = after.min(left.saturating_sub(Duration::from_nanos(1)));
        }
        Decision::Retry { after }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff {
            base: ms(10),
            max: ms(100),
        };
        let ceilings: Vec<_> = (0..6).map(|n| b.ceiling(n)).collect();
        assert_eq!(ceilings, [ms(10), ms(20), ms(40), ms(80), ms(100), ms(100)]);
        assert_eq!(b.ceiling(31), ms(100));
        assert_eq!(b.ceiling(32), ms(100));
        assert_eq!(b.ceiling(u32::MAX), ms(100));
        let huge = Backoff {
            base: Duration::MAX,
            max: Duration::MAX,
        };
        assert_eq!(huge.ceiling(3), Duration::MAX);
    }

    #[test]
    fn every_delay_is_within_its_ceiling_and_jittered() {
        let b = Backoff {
            base: ms(10),
            max: ms(1_000),
        };
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..12 {
            let mut distinct = std::collections::HashSet::new();
            for _ in 0..200 {
                let d = b.delay(attempt, &mut rng);
                assert!(d <= b.ceiling(attempt), "{d:?} > {:?}", b.ceiling(attempt));
                distinct.insert(d);
            }
            assert!(distinct.len() > 100, "not jittered: {}", distinct.len());
        }
        let zero = Backoff {
            base: Duration::ZERO,
            max: ms(10),
        };
        assert_eq!(zero.delay(5, &mut rng), Duration::ZERO);
    }

    #[test]
    fn budget_allows_ratio_of_deposits() {
        let now = Instant::now();
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.2);
        assert!(!budget.withdraw(now));
        for _ in 0..10 {
            budget.deposit(now);
        }
        assert_eq!(budget.remaining(now), 2);
        assert!(budget.withdraw(now));
        assert!(budget.withdraw(now));
        assert!(!budget.withdraw(now));
        assert_eq!(budget.remaining(now), 0);
    }

    #[test]
    fn budget_fractional_ratio_is_not_truncated() {
        let now = Instant::now();
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.3);
        for _ in 0..10 {
            budget.deposit(now);
        }
        assert_eq!(budget.remaining(now), 3);
        let generous = RetryBudget::new(Duration::from_secs(10), 0, 2.5);
        for _ in 0..2 {
            generous.deposit(now);
        }
        assert_eq!(generous.remaining(now), 5);
    }

    #[test]
    fn budget_floor_refills_after_ttl() {
        let now = Instant::now();
        let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.2);
        assert_eq!(budget.remaining(now), 10);
        for _ in 0..10 {
            assert!(budget.withdraw(now));
        }
        assert!(!budget.withdraw(now));
        // Withdrawals are remembered for under ttl, like deposits.
        assert!(!budget.withdraw(now + ms(8_999)));
        assert_eq!(budget.remaining(now + Duration::from_secs(10)), 10);
        assert!(budget.withdraw(now + Duration::from_secs(10)));
    }

    #[test]
    fn deposits_expire_after_ttl() {
        let now = Instant::now();
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
        for _ in 0..5 {
            budget.deposit(now);
        }
        assert_eq!(budget.remaining(now + ms(8_999)), 5);
        assert_eq!(budget.remaining(now + Duration::from_secs(10)), 0);
        // New traffic refills it.
        budget.deposit(now + Duration::from_secs(11));
        assert!(budget.withdraw(now + Duration::from_secs(11)));
    }

    #[test]
    fn zero_ratio_allows_only_the_floor() {
        let now = Instant::now();
        let budget = RetryBudget::new(Duration::from_secs(1), 2, 0.0);
        for _ in 0..100 {
            budget.deposit(now);
        }
        assert_eq!(budget.remaining(now), 2);
    }

    #[test]
    fn try_new_rejects_bad_values() {
        let ttl = Duration::from_secs(10);
        assert_eq!(
            RetryBudget::try_new(ttl, 0, 1001.0).unwrap_err().field,
            "ratio"
        );
        assert_eq!(
            RetryBudget::try_new(ttl, 0, -0.1).unwrap_err().field,
            "ratio"
        );
        assert_eq!(
            RetryBudget::try_new(ttl, 0, f32::NAN).unwrap_err().field,
            "ratio"
        );
        assert_eq!(
            RetryBudget::try_new(Duration::ZERO, 0, 0.2)
                .unwrap_err()
                .field,
            "ttl"
        );
        let ok = RetryBudget::try_new(ttl, 5, 0.2).unwrap();
        assert_eq!((ok.ttl(), ok.min_per_sec(), ok.ratio()), (ttl, 5, 0.2));
        // new() clamps instead of failing.
        let clamped = RetryBudget::new(Duration::ZERO, 0, f32::NAN);
        assert_eq!(clamped.ratio(), 0.0);
        assert_eq!(clamped.ttl(), ms(1));
    }

    #[test]
    fn budget_is_thread_safe() {
        let now = Instant::now();
        let budget = std::sync::Arc::new(RetryBudget::new(Duration::from_secs(10), 0, 0.5));
        for _ in 0..1000 {
            budget.deposit(now);
        }
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || (0..1000).filter(|_| budget.withdraw(now)).count())
            })
            .collect();
        let granted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(granted, 500);
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: nz(3),
            backoff: Backoff {
                base: ms(100),
                max: ms(1_000),
            },
        }
    }

    #[test]
    fn decide_retries_with_jittered_backoff() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(1);
        for attempt in 1..3 {
            match policy().decide(attempt, None, false, None, now, &mut rng) {
                Decision::Retry { after } => {
                    assert!(after <= policy().backoff.ceiling(attempt - 1));
                }
                other => panic!("expected a retry, got {other:?}"),
            }
        }
    }

    #[test]
    fn decide_gives_up_for_each_reason() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(2);
        let p = policy();
        assert_eq!(
            p.decide(3, None, false, None, now, &mut rng),
            Decision::GiveUp(GiveUpReason::AttemptsExhausted)
        );
        assert_eq!(
            p.decide(1, None, true, None, now, &mut rng),
            Decision::GiveUp(GiveUpReason::BreakerOpen)
        );
        // First retry's ceiling is 100 ms: a deadline exactly 100 ms away is too close.
        assert_eq!(
            p.decide(1, None, false, Some(now + ms(100)), now, &mut rng),
            Decision::GiveUp(GiveUpReason::DeadlineTooClose)
        );
        assert_eq!(
            p.decide(1, None, false, Some(now), now + ms(5), &mut rng),
            Decision::GiveUp(GiveUpReason::DeadlineTooClose)
        );
        let empty = RetryBudget::new(Duration::from_secs(10), 0, 0.2);
        assert_eq!(
            p.decide(1, Some(&empty), false, None, now, &mut rng),
            Decision::GiveUp(GiveUpReason::BudgetExhausted)
        );
        assert_eq!(
            GiveUpReason::DeadlineTooClose.to_string(),
            "deadline_too_close"
        );
    }

    #[test]
    fn decide_checks_in_order() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(3);
        let empty = RetryBudget::new(Duration::from_secs(10), 0, 0.2);
        let p = policy();
        // Everything is wrong at once: attempts win, then the breaker, then the deadline.
        let all = p.decide(3, Some(&empty), true, Some(now), now, &mut rng);
        assert_eq!(all, Decision::GiveUp(GiveUpReason::AttemptsExhausted));
        let no_attempts = p.decide(1, Some(&empty), true, Some(now), now, &mut rng);
        assert_eq!(no_attempts, Decision::GiveUp(GiveUpReason::BreakerOpen));
        let deadline = p.decide(1, Some(&empty), false, Some(now), now, &mut rng);
        assert_eq!(deadline, Decision::GiveUp(GiveUpReason::DeadlineTooClose));
    }

    #[test]
    fn decide_withdraws_only_on_retry() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(4);
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
        budget.deposit(now);
        let p = policy();
        let _ = p.decide(1, Some(&budget), true, None, now, &mut rng);
        let _ = p.decide(1, Some(&budget), false, Some(now + ms(1)), now, &mut rng);
        assert_eq!(
            budget.remaining(now),
            1,
            "a give-up must not spend the budget"
        );
        assert!(matches!(
            p.decide(1, Some(&budget), false, None, now, &mut rng),
            Decision::Retry { .. }
        ));
        assert_eq!(budget.remaining(now), 0);
    }

    #[test]
    fn decide_never_schedules_past_the_deadline() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(5);
        let p = RetryPolicy {
            max_attempts: nz(10),
            backoff: Backoff {
                base: ms(100),
                max: ms(10_000),
            },
        };
        for left_ms in [101u64, 150, 250, 500, 1_000, 5_000] {
            let deadline = now + ms(left_ms);
            for attempt in 1..10 {
                match p.decide(attempt, None, false, Some(deadline), now, &mut rng) {
                    Decision::Retry { after } => assert!(now + after < deadline),
                    Decision::GiveUp(reason) => {
                        assert_eq!(reason, GiveUpReason::DeadlineTooClose);
                        assert!(p.backoff.ceiling(attempt - 1) >= ms(left_ms));
                    }
                }
            }
        }
    }
}
