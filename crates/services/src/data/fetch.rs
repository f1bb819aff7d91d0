//! The data service's call to the dependency: a per-try deadline, bounded attempts
//! with full-jitter backoff between them, and the verdict the handler turns into the
//! stored record (the answer, or the fallback).

use std::time::Duration;

use breakwater_resilience::retry::{Decision, RetryPolicy};
use breakwater_runtime::observe::Caller;
use serde_json::Value;

use super::metrics::DataMetrics;
use crate::upstream::Upstream;

/// How the dependency is called.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FetchPolicy {
    /// Deadline of one try.
    pub(crate) try_timeout: Duration,
    /// Attempts and backoff.
    pub(crate) retry: RetryPolicy,
}

/// What the tries came to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fetched {
    /// The dependency's answer, `None` when every try failed.
    pub(crate) data: Option<Value>,
    /// Tries made.
    pub(crate) attempts: u32,
}

/// Calls `upstream` on behalf of `caller` until an answer or until the policy gives up,
/// counting each try's outcome in `metrics`. Each try is its own child span of the
/// caller's.
pub(crate) async fn fetch<U: Upstream>(
    upstream: &U,
    policy: FetchPolicy,
    metrics: &DataMetrics,
    caller: &Caller,
) -> Fetched {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let outcome = match tokio::time::timeout(policy.try_timeout, upstream.fetch(caller)).await {
            Ok(Ok(data)) => {
                metrics.attempt("success");
                return Fetched {
                    data: Some(data),
                    attempts: attempt,
                };
            }
            Ok(Err(err)) => {
                metrics.attempt(err.kind());
                err.to_string()
            }
            Err(_) => {
                metrics.attempt("timeout");
                format!("no answer within {:?}", policy.try_timeout)
            }
        };
        let decision = policy.retry.decide(
            attempt,
            None,
            false,
            None,
            tokio::time::Instant::now(),
            &mut rand::rng(),
        );
        match decision {
            Decision::Retry { after } => {
                tracing::warn!(attempt, %outcome, backoff = ?after, "dependency call failed; retrying");
                tokio::time::sleep(after).await;
            }
            Decision::GiveUp(reason) => {
                tracing::warn!(attempt, %outcome, %reason, "dependency call failed; giving up");
                return Fetched {
                    data: None,
                    attempts: attempt,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::ScriptedUpstream;
    use breakwater_resilience::retry::Backoff;
    use serde_json::json;
    use std::num::NonZeroU32;

    fn policy() -> FetchPolicy {
        FetchPolicy {
            try_timeout: Duration::from_secs(2),
            retry: RetryPolicy {
                max_attempts: NonZeroU32::new(4).unwrap(),
                backoff: Backoff {
                    base: Duration::from_millis(100),
                    max: Duration::from_secs(1),
                },
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn four_failed_tries_then_nothing() {
        let upstream = ScriptedUpstream::failing();
        let metrics = DataMetrics::new();
        let fetched = fetch(&upstream, policy(), &metrics, &Caller::default()).await;
        assert_eq!(
            fetched,
            Fetched {
                data: None,
                attempts: 4
            }
        );
        assert_eq!(upstream.calls(), 4);
        assert_eq!(metrics.attempts("status"), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_success_is_returned() {
        let upstream = ScriptedUpstream::succeeding_after(2);
        let metrics = DataMetrics::new();
        let fetched = fetch(&upstream, policy(), &metrics, &Caller::default()).await;
        assert_eq!(
            fetched.data,
            Some(json!({"message": "External service OK"}))
        );
        assert_eq!(fetched.attempts, 3);
        assert_eq!(metrics.attempts("status"), 2);
        assert_eq!(metrics.attempts("success"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_jittered_and_bounded() {
        let mut gaps = Vec::new();
        for _ in 0..20 {
            let upstream = ScriptedUpstream::failing();
            fetch(&upstream, policy(), &DataMetrics::new(), &Caller::default()).await;
            let times = upstream.call_times();
            assert_eq!(times.len(), 4);
            for (n, pair) in times.windows(2).enumerate() {
                let gap = pair[1] - pair[0];
                // The n-th retry waits at most min(1 s, 100 ms * 2^n).
                let ceiling = Duration::from_millis(100 << n).min(Duration::from_secs(1));
                assert!(gap <= ceiling, "gap {n}: {gap:?} > {ceiling:?}");
                gaps.push(gap);
            }
        }
        gaps.sort();
        gaps.dedup();
        assert!(gaps.len() > 30, "backoff is not jittered: {gaps:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_per_try_timeout_cuts_a_stalled_dependency() {
        let upstream = ScriptedUpstream::stalling();
        let metrics = DataMetrics::new();
        let started = tokio::time::Instant::now();
        let fetched = fetch(&upstream, policy(), &metrics, &Caller::default()).await;
        assert_eq!(fetched.data, None);
        assert_eq!(upstream.calls(), 4);
        assert_eq!(metrics.attempts("timeout"), 4);
        // Four 2 s tries plus at most 100 + 200 + 400 ms of backoff.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_secs(8), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(8_700), "{elapsed:?}");
    }
}
