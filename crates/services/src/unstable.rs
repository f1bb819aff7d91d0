//! The unstable service ("unstable-service"): the external dependency the others must
//! survive. `GET /data` fails or stalls at configurable rates (changeable at run time
//! through `/chaos`, forcible per request), and `GET /stress-test` burns CPU on the
//! blocking pool without stalling anything else.

mod chaos;
mod stress;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use breakwater_runtime::clock::iso8601_now;
use breakwater_runtime::http::{ApiError, Json, method_not_allowed, not_found};
use serde_json::{Value, json};
use tower_http::cors::CorsLayer;

pub use chaos::{Chaos, ChaosSettings, Forcing, MAX_DELAY, Verdict};

use crate::settings::InvalidSetting;
use stress::StressPool;

/// The name unstable instances register under.
pub const SERVICE_NAME: &str = "unstable-service";

/// The largest `?n=` any configuration may allow: about a minute of one core.
pub const STRESS_ITERATIONS_CEILING: u64 = 100_000_000_000;

/// How the unstable service misbehaves.
#[derive(Debug, Clone, PartialEq)]
pub struct UnstableSettings {
    /// Probability that `GET /data` answers 500. Default 0.3.
    pub failure_rate: f64,
    /// Probability that a `GET /data` that does not fail stalls first. Default 0.3.
    pub delay_rate: f64,
    /// How long a stall lasts. Default 3 s, at most [`MAX_DELAY`].
    pub delay: Duration,
    /// Seeds the fault sequence, making a run reproducible. Default: from the OS.
    pub seed: Option<u64>,
    /// Busy-loop iterations of `GET /stress-test` without `?n=`. Default 10 000 000.
    pub stress_iterations: u64,
    /// The largest `?n=` accepted. Default 1 000 000 000, at most
    /// [`STRESS_ITERATIONS_CEILING`].
    pub max_stress_iterations: u64,
}

impl Default for UnstableSettings {
    fn default() -> Self {
        Self {
            failure_rate: 0.3,
            delay_rate: 0.3,
            delay: Duration::from_secs(3),
            seed: None,
            stress_iterations: 10_000_000,
            max_stress_iterations: 1_000_000_000,
        }
    }
}

impl UnstableSettings {
    /// Checks every value; the error names the setting.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        self.chaos()?.validate()?;
        if self.max_stress_iterations == 0 || self.max_stress_iterations > STRESS_ITERATIONS_CEILING
        {
            return Err(InvalidSetting::new(
                "max_stress_iterations",
                format!(
                    "{} is outside 1..={STRESS_ITERATIONS_CEILING}",
                    self.max_stress_iterations
                ),
            ));
        }
        if self.stress_iterations == 0 || self.stress_iterations > self.max_stress_iterations {
            return Err(InvalidSetting::new(
                "stress_iterations",
                format!(
                    "{} is outside 1..={} (max_stress_iterations)",
                    self.stress_iterations, self.max_stress_iterations
                ),
            ));
        }
        Ok(())
    }

    fn chaos(&self) -> Result<ChaosSettings, InvalidSetting> {
        if self.delay > MAX_DELAY {
            return Err(InvalidSetting::new(
                "delay",
                format!("{:?} is longer than {MAX_DELAY:?}", self.delay),
            ));
        }
        Ok(ChaosSettings {
            failure_rate: self.failure_rate,
            delay_rate: self.delay_rate,
            delay_ms: u64::try_from(self.delay.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// What the unstable handlers share.
#[derive(Debug)]
pub struct UnstableState {
    instance: String,
    port: u16,
    chaos: Chaos,
    stress: StressPool,
    stress_iterations: u64,
    max_stress_iterations: u64,
}

impl UnstableState {
    /// State for instance `instance` advertised on `port`, behaving as `settings` say.
    pub fn new(
        instance: impl Into<String>,
        port: u16,
        settings: &UnstableSettings,
    ) -> Result<Self, InvalidSetting> {
        settings.validate()?;
        Ok(Self {
            instance: instance.into(),
            port,
            chaos: Chaos::new(settings.chaos()?, settings.seed),
            stress: StressPool::new(),
            stress_iterations: settings.stress_iterations,
            max_stress_iterations: settings.max_stress_iterations,
        })
    }
}

/// The unstable service's routes: `GET /health`, `GET /data`, `GET|PUT /chaos`,
/// `GET /stress-test`, with JSON 404/405 fallbacks and permissive CORS.
pub fn app(state: UnstableState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/data", get(data))
        .route("/chaos", get(read_chaos).put(write_chaos))
        .route("/stress-test", get(stress_test))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CorsLayer::permissive())
        .with_state(Arc::new(state))
}

type Shared = State<Arc<UnstableState>>;
type QueryParams = Result<Query<HashMap<String, String>>, QueryRejection>;

async fn health(State(state): Shared) -> Json<Value> {
    Json(json!({
        "service": SERVICE_NAME,
        "instance": state.instance,
        "port": state.port,
        "status": "healthy",
        "timestamp": iso8601_now(),
        "chaos": state.chaos.settings(),
        "stressTestsRunning": state.stress.running(),
    }))
}

async fn data(State(state): Shared, query: QueryParams) -> Result<Response, ApiError> {
    let params = params(query)?;
    let forcing = Forcing {
        fail: flag(&params, "fail")?,
        delay: flag(&params, "delay")?,
    };
    match state.chaos.decide(forcing) {
        Verdict::Fail => {
            return Ok((
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": "Simulated failure"})),
            )
                .into_response());
        }
        Verdict::Delay(pause) => tokio::time::sleep(pause).await,
        Verdict::Answer => {}
    }
    Ok(Json(json!({
        "timestamp": iso8601_now(),
        "message": "External service OK",
    }))
    .into_response())
}

async fn read_chaos(State(state): Shared) -> Json<ChaosSettings> {
    Json(state.chaos.settings())
}

async fn write_chaos(
    State(state): Shared,
    Json(body): Json<Value>,
) -> Result<Json<ChaosSettings>, ApiError> {
    let next = state
        .chaos
        .settings()
        .updated_by(&body)
        .map_err(ApiError::bad_request)?;
    state.chaos.set(next);
    tracing::info!(
        failure_rate = next.failure_rate,
        delay_rate = next.delay_rate,
        delay_ms = next.delay_ms,
        "chaos settings changed"
    );
    Ok(Json(next))
}

async fn stress_test(State(state): Shared, query: QueryParams) -> Result<Json<Value>, ApiError> {
    let params = params(query)?;
    let n = match params.get("n") {
        None => state.stress_iterations,
        Some(raw) => raw
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=state.max_stress_iterations).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Query parameter 'n' must be an integer between 1 and {}",
                    state.max_stress_iterations
                ))
            })?,
    };
    let started = tokio::time::Instant::now();
    let sum = state
        .stress
        .run(n)
        .await
        .ok_or_else(|| ApiError::unavailable("Stress test interrupted"))?;
    Ok(Json(json!({
        "message": "Stress test completed",
        "iterations": n,
        "result": sum,
        "durationMs": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "instance": state.instance,
    })))
}

fn params(query: QueryParams) -> Result<HashMap<String, String>, ApiError> {
    query
        .map(|Query(params)| params)
        .map_err(|e| ApiError::bad_request(format!("Malformed query string: {e}")))
}

fn flag(params: &HashMap<String, String>, name: &str) -> Result<Option<bool>, ApiError> {
    match params.get(name).map(String::as_str) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(ApiError::bad_request(format!(
            "Query parameter '{name}' must be true or false"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::call;

    fn quiet() -> UnstableSettings {
        UnstableSettings {
            failure_rate: 0.0,
            delay_rate: 0.0,
            ..UnstableSettings::default()
        }
    }

    fn unstable_app(settings: &UnstableSettings) -> Router {
        app(UnstableState::new("unstable-service-9000", 9000, settings).unwrap())
    }

    /// The status of each of `n` plain `GET /data` calls.
    async fn statuses(app: &Router, n: usize) -> Vec<StatusCode> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(call(app, "GET", "/data", None).await.0);
        }
        out
    }

    #[tokio::test]
    async fn health_names_the_instance() {
        let app = unstable_app(&UnstableSettings::default());
        let (status, body) = call(&app, "GET", "/health", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["service"], "unstable-service");
        assert_eq!(body["instance"], "unstable-service-9000");
        assert_eq!(body["port"], 9000);
        assert_eq!(body["status"], "healthy");
        assert_eq!(body["stressTestsRunning"], 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_seeded_service_repeats_its_sequence() {
        let seeded = UnstableSettings {
            seed: Some(42),
            ..UnstableSettings::default()
        };
        let a = statuses(&unstable_app(&seeded), 60).await;
        let b = statuses(&unstable_app(&seeded), 60).await;
        assert_eq!(a, b);
        assert!(a.contains(&StatusCode::INTERNAL_SERVER_ERROR), "{a:?}");
        assert!(a.contains(&StatusCode::OK), "{a:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn answers_and_failures_have_the_contract_bodies() {
        let app = unstable_app(&quiet());
        let (status, body) = call(&app, "GET", "/data", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["message"], "External service OK");
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'), "{body}");

        let (status, body) = call(&app, "GET", "/data?fail=true", None).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body, json!({"error": "Simulated failure"}));
    }

    #[tokio::test(start_paused = true)]
    async fn forced_delay_stalls_for_the_configured_time() {
        let app = unstable_app(&quiet());
        let started = tokio::time::Instant::now();
        let (status, _) = call(&app, "GET", "/data?delay=true", None).await;
        assert_eq!(status, StatusCode::OK);
        // The paused clock rounds timers up to the millisecond.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(3_001), "{elapsed:?}");

        let started = tokio::time::Instant::now();
        let (status, _) = call(&app, "GET", "/data", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn forcing_false_suppresses_faults() {
        let loud = UnstableSettings {
            failure_rate: 1.0,
            delay_rate: 1.0,
            ..UnstableSettings::default()
        };
        let app = unstable_app(&loud);
        let (status, _) = call(&app, "GET", "/data", None).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let started = tokio::time::Instant::now();
        let (status, _) = call(&app, "GET", "/data?fail=false&delay=false", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn bad_flags_are_400s() {
        let app = unstable_app(&quiet());
        let (status, body) = call(&app, "GET", "/data?fail=yes", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body,
            json!({"error": "Query parameter 'fail' must be true or false"})
        );
        let (status, body) = call(&app, "GET", "/data?delay=1", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body,
            json!({"error": "Query parameter 'delay' must be true or false"})
        );
    }

    #[tokio::test(start_paused = true)]
    async fn chaos_can_be_read_and_changed() {
        let app = unstable_app(&UnstableSettings::default());
        let (status, body) = call(&app, "GET", "/chaos", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"failureRate": 0.3, "delayRate": 0.3, "delayMs": 3000})
        );

        let (status, body) = call(
            &app,
            "PUT",
            "/chaos",
            Some(r#"{"failureRate":1,"delayMs":10}"#),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"failureRate": 1.0, "delayRate": 0.3, "delayMs": 10})
        );
        assert_eq!(
            statuses(&app, 5).await,
            vec![StatusCode::INTERNAL_SERVER_ERROR; 5]
        );
        let (_, body) = call(&app, "GET", "/chaos", None).await;
        assert_eq!(body["failureRate"], 1.0);
    }

    #[tokio::test]
    async fn invalid_chaos_is_a_400_and_changes_nothing() {
        let app = unstable_app(&UnstableSettings::default());
        let (_, before) = call(&app, "GET", "/chaos", None).await;
        let cases = [
            (
                r#"{"failureRate":0.5,"delayRate":2}"#,
                "Field 'delayRate' must be a number between 0 and 1",
            ),
            (
                r#"{"delayMs":60001}"#,
                "Field 'delayMs' must be an integer between 0 and 60000",
            ),
            (
                r#"{"nope":1}"#,
                "Unknown field 'nope' (expected failureRate, delayRate, delayMs)",
            ),
            ("[1]", "Request body must be a JSON object"),
        ];
        for (body, message) in cases {
            let (status, got) = call(&app, "PUT", "/chaos", Some(body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(got, json!({"error": message}), "{body}");
        }
        let (status, got) = call(&app, "PUT", "/chaos", Some("{")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(got["error"].as_str().unwrap().starts_with("Malformed JSON"));
        let (_, after) = call(&app, "GET", "/chaos", None).await;
        assert_eq!(before, after);
    }

    #[tokio::test]
    async fn stress_test_sums_and_bounds_its_size() {
        let app = unstable_app(&UnstableSettings {
            stress_iterations: 1000,
            max_stress_iterations: 5000,
            ..quiet()
        });
        let (status, body) = call(&app, "GET", "/stress-test", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["message"], "Stress test completed");
        assert_eq!(body["iterations"], 1000);
        assert_eq!(body["result"], 999 * 1000 / 2);

        let (status, body) = call(&app, "GET", "/stress-test?n=5000", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["iterations"], 5000);
        for bad in ["0", "5001", "x", "-1"] {
            let (status, body) = call(&app, "GET", &format!("/stress-test?n={bad}"), None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(
                body,
                json!({"error": "Query parameter 'n' must be an integer between 1 and 5000"})
            );
        }
    }

    #[tokio::test]
    async fn a_long_stress_test_does_not_block_health() {
        let app = unstable_app(&UnstableSettings {
            max_stress_iterations: STRESS_ITERATIONS_CEILING,
            ..quiet()
        });
        let stress = tokio::spawn({
            let app = app.clone();
            async move {
                call(
                    &app,
                    "GET",
                    &format!("/stress-test?n={STRESS_ITERATIONS_CEILING}"),
                    None,
                )
                .await
            }
        });
        // Every health call below is answered while the loop spins.
        let running = async {
            loop {
                let (status, body) = call(&app, "GET", "/health", None).await;
                assert_eq!(status, StatusCode::OK);
                if body["stressTestsRunning"] == 1 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .unwrap();
        let (status, _) = call(&app, "GET", "/data", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!stress.is_finished());

        // The client goes away: the loop stops instead of spinning on.
        stress.abort();
        let stopped = async {
            loop {
                let (_, body) = call(&app, "GET", "/health", None).await;
                if body["stressTestsRunning"] == 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), stopped)
            .await
            .unwrap();
    }

    #[test]
    fn settings_validation_names_the_setting() {
        assert!(UnstableSettings::default().validate().is_ok());
        let cases = [
            (
                UnstableSettings {
                    failure_rate: -0.1,
                    ..UnstableSettings::default()
                },
                "failure_rate",
            ),
            (
                UnstableSettings {
                    delay: Duration::from_secs(61),
                    ..UnstableSettings::default()
                },
                "delay",
            ),
            (
                UnstableSettings {
                    stress_iterations: 0,
                    ..UnstableSettings::default()
                },
                "stress_iterations",
            ),
            (
                UnstableSettings {
                    stress_iterations: 2_000_000_000,
                    ..UnstableSettings::default()
                },
                "stress_iterations",
            ),
            (
                UnstableSettings {
                    max_stress_iterations: STRESS_ITERATIONS_CEILING + 1,
                    ..UnstableSettings::default()
                },
                "max_stress_iterations",
            ),
        ];
        for (settings, name) in cases {
            assert_eq!(settings.validate().unwrap_err().setting, name);
            assert!(UnstableState::new("u", 1, &settings).is_err());
        }
    }
}
