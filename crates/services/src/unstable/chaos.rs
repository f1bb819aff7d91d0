//! The unstable service's faults: how often `GET /data` fails or stalls, changeable at
//! run time, drawn from one random sequence that a seed makes reproducible.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::settings::{InvalidSetting, check_rate};

/// The longest delay `PUT /chaos` or a setting may ask for.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// The fault rates in force, as `GET /chaos` and `PUT /chaos` show them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChaosSettings {
    /// Probability of a 500, 0..=1.
    pub failure_rate: f64,
    /// Probability, for a call that does not fail, of a stall before answering.
    pub delay_rate: f64,
    /// How long a stall lasts, in milliseconds (at most 60 000).
    pub delay_ms: u64,
}

impl ChaosSettings {
    /// Checks every value; the error names the setting.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        check_rate("failure_rate", self.failure_rate)?;
        check_rate("delay_rate", self.delay_rate)?;
        if Duration::from_millis(self.delay_ms) > MAX_DELAY {
            return Err(InvalidSetting::new(
                "delay",
                format!("{} ms is longer than {MAX_DELAY:?}", self.delay_ms),
            ));
        }
        Ok(())
    }

    /// These settings changed by a `PUT /chaos` body `{failureRate?, delayRate?,
    /// delayMs?}`. Every field is checked before anything changes; the error names the
    /// field. Unknown fields are refused, so a misspelt one is not silently ignored.
    pub(crate) fn updated_by(&self, body: &Value) -> Result<Self, String> {
        let fields: &Map<String, Value> = body
            .as_object()
            .ok_or_else(|| "Request body must be a JSON object".to_owned())?;
        let mut next = *self;
        for (key, value) in fields {
            match key.as_str() {
                "failureRate" => next.failure_rate = rate(key, value)?,
                "delayRate" => next.delay_rate = rate(key, value)?,
                "delayMs" => {
                    next.delay_ms = value
                        .as_u64()
                        .filter(|&ms| Duration::from_millis(ms) <= MAX_DELAY)
                        .ok_or_else(|| {
                            format!(
                                "Field 'delayMs' must be an integer between 0 and {}",
                                MAX_DELAY.as_millis()
                            )
                        })?;
                }
                other => {
                    return Err(format!(
                        "Unknown field '{other}' (expected failureRate, delayRate, delayMs)"
                    ));
                }
            }
        }
        Ok(next)
    }
}

fn rate(key: &str, value: &Value) -> Result<f64, String> {
    value
        .as_f64()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| format!("Field '{key}' must be a number between 0 and 1"))
}

/// What one `GET /data` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Answer 500 `{"error":"Simulated failure"}`.
    Fail,
    /// Wait this long, then answer 200.
    Delay(Duration),
    /// Answer 200 at once.
    Answer,
}

/// A caller's wish for one request: `Some(true)` forces the fault, `Some(false)`
/// suppresses it, `None` leaves it to chance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forcing {
    /// From `?fail=`.
    pub fail: Option<bool>,
    /// From `?delay=`.
    pub delay: Option<bool>,
}

/// The current settings and the random sequence faults are drawn from.
#[derive(Debug)]
pub struct Chaos {
    settings: Mutex<ChaosSettings>,
    // One generator behind a lock (not one per thread) so that a seed fixes the whole
    // sequence of verdicts in request order.
    rng: Mutex<StdRng>,
}

impl Chaos {
    /// Starts with `settings`; `seed` makes the verdict sequence reproducible.
    pub fn new(settings: ChaosSettings, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            settings: Mutex::new(settings),
            rng: Mutex::new(rng),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> ChaosSettings {
        *self.settings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the settings (already validated by the caller).
    pub fn set(&self, settings: ChaosSettings) {
        *self.settings.lock().unwrap_or_else(PoisonError::into_inner) = settings;
    }

    /// Decides one request. Only decisions left to chance draw from the sequence, so a
    /// forced request does not shift the verdicts of the others. `?delay=true` alone
    /// also rules out the random failure: the caller asked for a slow success.
    pub fn decide(&self, forcing: Forcing) -> Verdict {
        let settings = self.settings();
        let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
        let fail = match (forcing.fail, forcing.delay) {
            (Some(fail), _) => fail,
            (None, Some(true)) => false,
            (None, _) => rng.random::<f64>() < settings.failure_rate,
        };
        if fail {
            return Verdict::Fail;
        }
        let delay = match forcing.delay {
            Some(delay) => delay,
            None => rng.random::<f64>() < settings.delay_rate,
        };
        if delay {
            Verdict::Delay(Duration::from_millis(settings.delay_ms))
        } else {
            Verdict::Answer
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DEFAULTS: ChaosSettings = ChaosSettings {
        failure_rate: 0.3,
        delay_rate: 0.3,
        delay_ms: 3000,
    };

    fn sequence(chaos: &Chaos, n: usize) -> Vec<Verdict> {
        (0..n).map(|_| chaos.decide(Forcing::default())).collect()
    }

    #[test]
    fn a_seed_fixes_the_sequence() {
        let a = sequence(&Chaos::new(DEFAULTS, Some(7)), 200);
        let b = sequence(&Chaos::new(DEFAULTS, Some(7)), 200);
        assert_eq!(a, b);
        let other = sequence(&Chaos::new(DEFAULTS, Some(8)), 200);
        assert_ne!(a, other);
    }

    #[test]
    fn rates_shape_the_mix() {
        let verdicts = sequence(&Chaos::new(DEFAULTS, Some(1)), 10_000);
        let fails = verdicts.iter().filter(|v| **v == Verdict::Fail).count();
        let delays = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Delay(_)))
            .count();
        // 30% fail; 30% of the remaining 70% stall (21%). Binomial sd is about 0.5%.
        assert!((2_700..=3_300).contains(&fails), "{fails}");
        assert!((1_800..=2_400).contains(&delays), "{delays}");
        assert!(verdicts.contains(&Verdict::Delay(Duration::from_secs(3))));
    }

    #[test]
    fn extreme_rates_are_certain() {
        let always = Chaos::new(
            ChaosSettings {
                failure_rate: 1.0,
                ..DEFAULTS
            },
            None,
        );
        assert!(sequence(&always, 100).iter().all(|v| *v == Verdict::Fail));
        let never = Chaos::new(
            ChaosSettings {
                failure_rate: 0.0,
                delay_rate: 0.0,
                delay_ms: 0,
            },
            None,
        );
        assert!(sequence(&never, 100).iter().all(|v| *v == Verdict::Answer));
    }

    #[test]
    fn forcing_overrides_chance_and_draws_nothing() {
        let quiet = ChaosSettings {
            failure_rate: 0.0,
            delay_rate: 0.0,
            delay_ms: 250,
        };
        let chaos = Chaos::new(quiet, Some(3));
        let fail = Forcing {
            fail: Some(true),
            delay: None,
        };
        let delay = Forcing {
            fail: None,
            delay: Some(true),
        };
        assert_eq!(chaos.decide(fail), Verdict::Fail);
        assert_eq!(
            chaos.decide(delay),
            Verdict::Delay(Duration::from_millis(250))
        );
        let loud = Chaos::new(
            ChaosSettings {
                failure_rate: 1.0,
                delay_rate: 1.0,
                delay_ms: 250,
            },
            Some(3),
        );
        let calm = Forcing {
            fail: Some(false),
            delay: Some(false),
        };
        assert_eq!(loud.decide(calm), Verdict::Answer);
        assert_eq!(
            loud.decide(delay),
            Verdict::Delay(Duration::from_millis(250))
        );

        // Forced calls between random ones leave the random sequence as it was.
        let plain = sequence(&Chaos::new(DEFAULTS, Some(9)), 50);
        let mixed_chaos = Chaos::new(DEFAULTS, Some(9));
        let mut mixed = Vec::new();
        for _ in 0..50 {
            mixed_chaos.decide(fail);
            mixed_chaos.decide(calm);
            mixed.push(mixed_chaos.decide(Forcing::default()));
        }
        assert_eq!(plain, mixed);
    }

    #[test]
    fn updates_are_checked_whole() {
        let next = DEFAULTS
            .updated_by(&json!({"failureRate": 0.5, "delayMs": 100}))
            .unwrap();
        assert_eq!(
            next,
            ChaosSettings {
                failure_rate: 0.5,
                delay_rate: 0.3,
                delay_ms: 100
            }
        );
        assert_eq!(DEFAULTS.updated_by(&json!({})).unwrap(), DEFAULTS);
        let cases = [
            (json!([]), "Request body must be a JSON object"),
            (
                json!({"failureRate": 1.5}),
                "Field 'failureRate' must be a number between 0 and 1",
            ),
            (
                json!({"delayRate": "0.1"}),
                "Field 'delayRate' must be a number between 0 and 1",
            ),
            (
                json!({"delayMs": 60_001}),
                "Field 'delayMs' must be an integer between 0 and 60000",
            ),
            (
                json!({"delayMs": -1}),
                "Field 'delayMs' must be an integer between 0 and 60000",
            ),
            (
                json!({"delayMs": 1.5}),
                "Field 'delayMs' must be an integer between 0 and 60000",
            ),
            (
                json!({"failRate": 0.1}),
                "Unknown field 'failRate' (expected failureRate, delayRate, delayMs)",
            ),
        ];
        for (body, message) in cases {
            assert_eq!(DEFAULTS.updated_by(&body).unwrap_err(), message, "{body}");
        }
    }

    #[test]
    fn settings_validation_names_the_setting() {
        assert!(DEFAULTS.validate().is_ok());
        let bad = ChaosSettings {
            delay_rate: 2.0,
            ..DEFAULTS
        };
        assert_eq!(bad.validate().unwrap_err().setting, "delay_rate");
        let long = ChaosSettings {
            delay_ms: 60_001,
            ..DEFAULTS
        };
        assert_eq!(long.validate().unwrap_err().setting, "delay");
    }
}
