//! Traffic history for the dashboard's charts: per route, requests/s, error rate and
//! p50/p99 latency for each of the last [`HISTORY_SECONDS`] seconds.
//!
//! It is derived from [`Metrics`](crate::metrics::Metrics), not recorded on the request
//! path: a background task reads the Prometheus text once a second and keeps the
//! difference from the previous reading. The request path stays exactly as fast as it
//! was, and the numbers agree with what `/metrics` scrapers see.
//!
//! - [`TrafficHistory`]: the ring of one-second [`Second`]s, fed by [`TrafficHistory::record`].
//! - [`spawn_sampler`]: the once-a-second task.
//! - [`Exposition`]: the few series read from the text (request counts, the duration
//!   histogram, upstream attempts per instance).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

use crate::server::GatewayState;

/// How many one-second buckets are kept (five minutes).
pub const HISTORY_SECONDS: usize = 300;

const REQUESTS: &str = "breakwater_gateway_requests_total";
const DURATION_BUCKET: &str = "breakwater_gateway_request_duration_seconds_bucket";
const ATTEMPTS: &str = "breakwater_gateway_upstream_attempts_total";

/// One route's traffic in one second.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RouteSecond {
    /// Requests answered.
    pub requests: u64,
    /// Of those, answered with a 5xx.
    pub errors: u64,
    /// Median latency in ms (`None`: no request).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency in ms (`None`: no request).
    pub p99_ms: Option<f64>,
}

/// Every route's traffic in one second, and all routes together.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Second {
    /// End of the second, in ms since the Unix epoch.
    pub at_unix_ms: u64,
    /// All routes together.
    pub total: RouteSecond,
    /// By route label; routes without traffic in this second are left out.
    pub routes: BTreeMap<String, RouteSecond>,
}

/// Upstream attempts to one instance since the gateway started.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InstanceTotals {
    /// Attempts sent.
    pub attempts: u64,
    /// Attempts that failed (5xx, connect error, timeout, protocol error).
    pub failures: u64,
}

/// The series of one reading of the Prometheus text that the history needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    /// Per route: requests and 5xx answers, cumulative.
    requests: BTreeMap<String, (u64, u64)>,
    /// Per route: cumulative histogram buckets `(le, count)`, in ascending `le`.
    buckets: BTreeMap<String, Vec<(f64, u64)>>,
    /// Per `(service, instance)`.
    instances: BTreeMap<(String, String), InstanceTotals>,
}

impl Exposition {
    /// Reads the Prometheus text format; lines it does not need or cannot read are
    /// skipped, so a new series in `/metrics` never breaks the charts.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((name, labels, value)) = split_sample(line) else {
                continue;
            };
            let label = |key: &str| labels.iter().find(|(k, _)| k == key).map(|(_, v)| v);
            match name {
                REQUESTS => {
                    let (Some(route), Some(status)) = (label("route"), label("status")) else {
                        continue;
                    };
                    let n = count(value);
                    let entry = out.requests.entry(route.clone()).or_default();
                    entry.0 += n;
                    if status.starts_with('5') {
                        entry.1 += n;
                    }
                }
                DURATION_BUCKET => {
                    let (Some(route), Some(le)) = (label("route"), label("le")) else {
                        continue;
                    };
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        match le.parse::<f64>() {
                            Ok(le) => le,
                            Err(_) => continue,
                        }
                    };
                    out.buckets
                        .entry(route.clone())
                        .or_default()
                        .push((le, count(value)));
                }
                ATTEMPTS => {
                    let (Some(service), Some(instance), Some(outcome)) =
                        (label("service"), label("instance"), label("outcome"))
                    else {
                        continue;
                    };
                    let n = count(value);
                    let entry = out
                        .instances
                        .entry((service.clone(), instance.clone()))
                        .or_default();
                    entry.attempts += n;
                    // A 4xx is the client's fault, not the instance's.
                    if outcome != "success" && outcome != "4xx" {
                        entry.failures += n;
                    }
                }
                _ => {}
            }
        }
        for list in out.buckets.values_mut() {
            list.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        out
    }
}

/// A counter's value as a whole number (the text writes counters as integers or floats).
fn count(value: &str) -> u64 {
    value
        .parse::<u64>()
        .ok()
        .or_else(|| {
            value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .map(|v| v.round() as u64)
        })
        .unwrap_or(0)
}

/// A sample line's metric name, labels and value text.
type Sample<'a> = (&'a str, Vec<(String, String)>, &'a str);

/// `name{k="v",...} value` into its parts; `None` for anything else.
fn split_sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    let Some(open) = line.find('{') else {
        let (name, value) = line.split_once(' ')?;
        return Some((name, Vec::new(), value.split_whitespace().next()?));
    };
    let name = &line[..open];
    let mut labels = Vec::new();
    let mut chars = line[open + 1..].char_indices();
    let rest_start;
    loop {
        // Skip separators to the next key, or the closing brace.
        let (i, c) = chars.next()?;
        if c == ',' || c == ' ' {
            continue;
        }
        if c == '}' {
            rest_start = open + 1 + i + 1;
            break;
        }
        let mut key = String::from(c);
        loop {
            let (_, c) = chars.next()?;
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            let (_, c) = chars.next()?;
            match c {
                '"' => break,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        labels.push((key.trim().to_owned(), value));
    }
    let value = line[rest_start..].split_whitespace().next()?;
    Some((name, labels, value))
}

/// The `q` quantile in ms of the observations between two cumulative histogram
/// readings, interpolated linearly inside the bucket it falls in (as Prometheus'
/// `histogram_quantile` does). `None` when nothing was observed.
fn quantile_ms(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, n)| {
            let old = before
                .iter()
                .find(|(b, _)| b.total_cmp(&le).is_eq())
                .map_or(0, |&(_, n)| n);
            (le, n.saturating_sub(old))
        })
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut lower_bound = 0.0;
    let mut lower_count = 0_u64;
    for &(le, n) in &delta {
        if n as f64 >= rank {
            if le.is_infinite() {
                // Past the last finite bound: that bound is the best honest answer.
                return Some(lower_bound * 1000.0);
            }
            let in_bucket = n.saturating_sub(lower_count) as f64;
            let fraction = if in_bucket > 0.0 {
                (rank - lower_count as f64) / in_bucket
            } else {
                1.0
            };
            return Some((lower_bound + (le - lower_bound) * fraction) * 1000.0);
        }
        lower_bound = le;
        lower_count = n;
    }
    Some(lower_bound * 1000.0)
}

/// Adds two cumulative histograms with the same bounds (bounds missing in one count 0).
fn merge_buckets(into: &mut Vec<(f64, u64)>, add: &[(f64, u64)]) {
    for &(le, n) in add {
        match into.iter_mut().find(|(b, _)| b.total_cmp(&le).is_eq()) {
            Some(slot) => slot.1 += n,
            None => into.push((le, n)),
        }
    }
    into.sort_by(|a, b| a.0.total_cmp(&b.0));
}

#[derive(Debug, Default)]
struct Ring {
    previous: Option<Exposition>,
    seconds: VecDeque<Second>,
}

/// The last [`HISTORY_SECONDS`] seconds of traffic, one [`Second`] per reading.
#[derive(Debug, Default)]
pub struct TrafficHistory {
    ring: Mutex<Ring>,
}

impl TrafficHistory {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one reading of the metrics text at `at_unix_ms`: the first reading is only
    /// the baseline; each later one adds the second since the previous reading.
    pub fn record(&self, metrics_text: &str, at_unix_ms: u64) {
        let now = Exposition::parse(metrics_text);
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(before) = ring.previous.take() {
            let second = difference(&before, &now, at_unix_ms);
            if ring.seconds.len() == HISTORY_SECONDS {
                ring.seconds.pop_front();
            }
            ring.seconds.push_back(second);
        }
        ring.previous = Some(now);
    }

    /// The last `n` seconds, oldest first.
    pub fn last(&self, n: usize) -> Vec<Second> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = ring.seconds.len().saturating_sub(n);
        ring.seconds.iter().skip(skip).cloned().collect()
    }

    /// Attempts and failures per `(service, instance)` at the latest reading.
    pub fn instances(&self) -> BTreeMap<(String, String), InstanceTotals> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.previous
            .as_ref()
            .map(|e| e.instances.clone())
            .unwrap_or_default()
    }
}

fn difference(before: &Exposition, now: &Exposition, at_unix_ms: u64) -> Second {
    let empty = Vec::new();
    let mut second = Second {
        at_unix_ms,
        ..Second::default()
    };
    let mut total_before = Vec::new();
    let mut total_now = Vec::new();
    for (route, &(requests, errors)) in &now.requests {
        let (old_requests, old_errors) = before.requests.get(route).copied().unwrap_or((0, 0));
        let requests = requests.saturating_sub(old_requests);
        if requests == 0 {
            continue;
        }
        let after = now.buckets.get(route).unwrap_or(&empty);
        let prior = before.buckets.get(route).unwrap_or(&empty);
        merge_buckets(&mut total_now, after);
        merge_buckets(&mut total_before, prior);
        let errors = errors.saturating_sub(old_errors);
        second.total.requests += requests;
        second.total.errors += errors;
        second.routes.insert(
            route.clone(),
            RouteSecond {
                requests,
                errors,
                p50_ms: quantile_ms(prior, after, 0.5),
                p99_ms: quantile_ms(prior, after, 0.99),
            },
        );
    }
    second.total.p50_ms = quantile_ms(&total_before, &total_now, 0.5);
    second.total.p99_ms = quantile_ms(&total_before, &total_now, 0.99);
    second
}

/// Reads `state`'s metrics into `history` once a second, for as long as `history` is
/// kept by someone else (the admin router); a no-op outside a Tokio runtime.
pub fn spawn_sampler(history: &Arc<TrafficHistory>, state: GatewayState) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let history = Arc::downgrade(history);
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let Some(history) = history.upgrade() else {
                break;
            };
            history.record(
                &state.metrics().render_prometheus_text(),
                breakwater_runtime::clock::now_millis(),
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{AttemptOutcome, Metrics};
    use axum::http::Method;

    #[test]
    fn reads_labels_with_escapes_and_any_order() {
        let (name, labels, value) = split_sample(r#"x_total{b="q\"uo,te}",a="1"} 7"#).unwrap();
        assert_eq!(name, "x_total");
        assert_eq!(labels[0], ("b".into(), "q\"uo,te}".into()));
        assert_eq!(labels[1], ("a".into(), "1".into()));
        assert_eq!(value, "7");
        assert_eq!(split_sample("up 1").unwrap().2, "1");
        assert!(split_sample(r#"broken{a="1"#).is_none());
        assert!(split_sample("").is_none());
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let before = [(0.1, 0), (0.2, 0), (f64::INFINITY, 0)];
        let after = [(0.1, 50), (0.2, 100), (f64::INFINITY, 100)];
        let p50 = quantile_ms(&before, &after, 0.5).unwrap();
        assert!((p50 - 100.0).abs() < 1e-9, "{p50}");
        let p99 = quantile_ms(&before, &after, 0.99).unwrap();
        assert!((p99 - 198.0).abs() < 1e-9, "{p99}");
        assert_eq!(quantile_ms(&after, &after, 0.5), None);
        let slow = [(0.1, 0), (0.2, 0), (f64::INFINITY, 4)];
        assert_eq!(quantile_ms(&before, &slow, 0.99), Some(200.0));
    }

    #[test]
    fn one_second_of_real_metrics() {
        let metrics = Metrics::new();
        let history = TrafficHistory::new();
        metrics.request("users", &Method::GET, 200, Duration::from_millis(3));
        history.record(&metrics.render_prometheus_text(), 1_000);
        assert!(
            history.last(10).is_empty(),
            "the first reading is a baseline"
        );

        for _ in 0..3 {
            metrics.request("users", &Method::GET, 200, Duration::from_millis(3));
        }
        metrics.request("users", &Method::GET, 503, Duration::from_millis(30));
        metrics.request("orders", &Method::POST, 201, Duration::from_millis(1));
        metrics.attempt("users", "users-a", AttemptOutcome::Success, Duration::ZERO);
        metrics.attempt(
            "users",
            "users-a",
            AttemptOutcome::Status5xx,
            Duration::ZERO,
        );
        metrics.attempt(
            "users",
            "users-a",
            AttemptOutcome::Status4xx,
            Duration::ZERO,
        );
        history.record(&metrics.render_prometheus_text(), 2_000);

        let seconds = history.last(10);
        assert_eq!(seconds.len(), 1);
        let s = &seconds[0];
        assert_eq!(s.at_unix_ms, 2_000);
        assert_eq!(s.total.requests, 5);
        assert_eq!(s.total.errors, 1);
        let users = &s.routes["users"];
        assert_eq!((users.requests, users.errors), (4, 1));
        let p50 = users.p50_ms.unwrap();
        assert!((2.5..=5.0).contains(&p50), "{p50}");
        let p99 = users.p99_ms.unwrap();
        assert!((25.0..=50.0).contains(&p99), "{p99}");
        assert_eq!(s.routes["orders"].requests, 1);
        let a = &history.instances()[&("users".to_owned(), "users-a".to_owned())];
        assert_eq!((a.attempts, a.failures), (3, 1));

        // A quiet second has no routes and no latency.
        history.record(&metrics.render_prometheus_text(), 3_000);
        let quiet = history.last(1).remove(0);
        assert_eq!(quiet.total.requests, 0);
        assert!(quiet.routes.is_empty());
        assert_eq!(quiet.total.p50_ms, None);
    }

    #[test]
    fn keeps_only_the_last_five_minutes() {
        let history = TrafficHistory::new();
        for i in 0..(HISTORY_SECONDS as u64 + 20) {
            history.record("", i * 1000);
        }
        let all = history.last(usize::MAX);
        assert_eq!(all.len(), HISTORY_SECONDS);
        assert_eq!(
            all[0].at_unix_ms, 20_000,
            "the first reading is only a baseline"
        );
        assert_eq!(history.last(2).len(), 2);
    }
}
