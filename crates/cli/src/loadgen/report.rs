//! The report: the merged tally turned into the text table people read or one JSON
//! object for machines.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::plan::Plan;
use super::tally::Tally;

/// Latency percentiles and moments, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub(super) struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
    pub min: u64,
    pub mean: f64,
    pub stdev: f64,
}

/// Every figure of a finished run; serialises to the `--json` object.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Summary {
    pub url: String,
    pub method: String,
    pub connections: usize,
    /// `-R`, when the run was paced.
    pub target_rate: Option<f64>,
    /// Complete responses, whatever their status.
    pub requests: u64,
    /// Failed attempts of every kind.
    pub errors_total: u64,
    pub duration_seconds: f64,
    pub requests_per_second: f64,
    pub bytes_read: u64,
    pub throughput_bytes_per_second: f64,
    pub latency_us: Latency,
    /// Exact codes, e.g. `{"200": 10}`.
    pub status_codes: BTreeMap<String, u64>,
    /// Counts per class: `1xx` .. `5xx`.
    pub status_classes: BTreeMap<String, u64>,
    /// Failures per kind (`connect`, `timeout`, `reset`, `protocol`, `io`, `other`).
    pub errors: BTreeMap<String, u64>,
}

impl Summary {
    /// Sums up `tally` for a run of `plan` that lasted `elapsed`.
    pub fn new(plan: &Plan, tally: &Tally, elapsed: Duration) -> Self {
        let h = tally.latency_us();
        let secs = elapsed.as_secs_f64();
        let per_second = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        Self {
            url: plan.target.url.clone(),
            method: plan.request.method().to_string(),
            connections: plan.connections,
            target_rate: plan.rate,
            requests: tally.responses(),
            errors_total: tally.errors_total(),
            duration_seconds: secs,
            requests_per_second: per_second(tally.responses()),
            bytes_read: tally.bytes_read(),
            throughput_bytes_per_second: per_second(tally.bytes_read()),
            latency_us: Latency {
                p50: h.value_at_quantile(0.5),
                p90: h.value_at_quantile(0.9),
                p99: h.value_at_quantile(0.99),
                p99_9: h.value_at_quantile(0.999),
                max: h.max(),
                min: h.min(),
                mean: h.mean(),
                stdev: h.stdev(),
            },
            status_codes: tally
                .status_codes()
                .into_iter()
                .map(|(code, n)| (code.to_string(), n))
                .collect(),
            status_classes: tally
                .status_classes()
                .iter()
                .enumerate()
                .map(|(i, &n)| (format!("{}xx", i + 1), n))
                .collect(),
            errors: tally
                .errors()
                .into_iter()
                .map(|(kind, n)| (kind.to_owned(), n))
                .collect(),
        }
    }

    /// One JSON object on one line.
    pub fn to_json(&self) -> serde_json::Result<String> {
        let mut line = serde_json::to_string(self)?;
        line.push('\n');
        Ok(line)
    }

    /// The human report: seed 001's two lines first, then the latency table, rates,
    /// status codes and errors.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let pace = self
            .target_rate
            .map(|r| format!(", paced at {r} req/s"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{} {} with {} connection{}{pace}",
            self.method,
            self.url,
            self.connections,
            if self.connections == 1 { "" } else { "s" },
        );
        let _ = writeln!(out, "Number of requests: {}", self.requests);
        let _ = writeln!(out, "Duration (seconds): {:.2}", self.duration_seconds);
        out.push('\n');

        let l = &self.latency_us;
        let ms = |us: u64| us as f64 / 1000.0;
        let _ = writeln!(
            out,
            "{:<14}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "Latency (ms)", "p50", "p90", "p99", "p99.9", "max", "mean", "stdev"
        );
        let _ = writeln!(
            out,
            "{:<14}{:>10.3}{:>10.3}{:>10.3}{:>10.3}{:>10.3}{:>10.3}{:>10.3}",
            "",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p99_9),
            ms(l.max),
            l.mean / 1000.0,
            l.stdev / 1000.0,
        );
        out.push('\n');
        let _ = writeln!(out, "Requests/s (mean): {:.2}", self.requests_per_second);
        let _ = writeln!(
            out,
            "Throughput: {}/s ({} read)",
            human_bytes(self.throughput_bytes_per_second),
            human_bytes(self.bytes_read as f64),
        );

        let classes: Vec<String> = self
            .status_classes
            .iter()
            .map(|(class, n)| format!("{class} {n}"))
            .collect();
        let _ = writeln!(out, "Status classes: {}", classes.join(", "));
        let codes: Vec<String> = self
            .status_codes
            .iter()
            .map(|(code, n)| format!("{code} x {n}"))
            .collect();
        let codes = if codes.is_empty() {
            "none".to_owned()
        } else {
            codes.join(", ")
        };
        let _ = writeln!(out, "Status codes: {codes}");
        if self.errors_total == 0 {
            let _ = writeln!(out, "Errors: none");
        } else {
            let kinds: Vec<String> = self
                .errors
                .iter()
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect();
            let _ = writeln!(out, "Errors: {} ({})", self.errors_total, kinds.join(", "));
        }
        out
    }
}

/// Decimal units, as autocannon and wrk print them.
fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(999.0), "999 B");
        assert_eq!(human_bytes(1500.0), "1.50 kB");
        assert_eq!(human_bytes(2_345_678.0), "2.35 MB");
        assert_eq!(human_bytes(9e15), "9000.00 TB");
    }
}
