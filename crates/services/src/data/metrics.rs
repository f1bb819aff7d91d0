//! The data instance's own figures: Prometheus counters for `GET /metrics` and the
//! process's resident memory for `GET /stats`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type OutcomeLabel = [(&'static str, &'static str); 1];

/// Counters of one data instance. Cheap to clone: clones share the counters.
#[derive(Debug, Clone)]
pub(crate) struct DataMetrics {
    requests: Counter,
    attempts: Family<OutcomeLabel, Counter>,
    fallbacks: Counter,
    saved: Counter,
    stored: Gauge,
}

impl DataMetrics {
    pub(crate) fn new() -> Self {
        Self {
            requests: Counter::default(),
            attempts: Family::default(),
            fallbacks: Counter::default(),
            saved: Counter::default(),
            stored: Gauge::default(),
        }
    }

    /// Counts one request served by this instance, whatever its path.
    pub(crate) fn request(&self) {
        self.requests.inc();
    }

    /// Requests served by this instance so far.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.get()
    }

    /// Counts one try of the dependency by outcome (`success`, `timeout`, or an
    /// [`UpstreamError::kind`](crate::upstream::UpstreamError::kind)).
    pub(crate) fn attempt(&self, outcome: &'static str) {
        self.attempts.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// Tries with this outcome so far.
    #[cfg(test)]
    pub(crate) fn attempts(&self, outcome: &'static str) -> u64 {
        self.attempts
            .get(&[("outcome", outcome)])
            .map_or(0, |c| c.get())
    }

    /// Counts one answer made of the fallback.
    pub(crate) fn fallback(&self) {
        self.fallbacks.inc();
    }

    /// Counts one record saved by this instance.
    pub(crate) fn saved(&self) {
        self.saved.inc();
    }

    /// Prometheus text of every figure; `stored` is the record count over all shards
    /// (every instance), measured by the caller just before.
    pub(crate) fn render(&self, stored: u64) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry, stored);
        let mut text = String::new();
        // Writing into a String cannot fail; an error would leave a partial page,
        // which Prometheus rejects as a whole rather than misreading.
        if encode(&mut text, &registry).is_err() {
            tracing::error!("cannot encode metrics");
        }
        text
    }

    /// Adds every figure, under the `data_` prefix, to `registry` (so they can share a
    /// page with the process's HTTP metrics); `stored` as in [`Self::render`].
    pub(crate) fn register(&self, registry: &mut Registry, stored: u64) {
        self.stored.set(i64::try_from(stored).unwrap_or(i64::MAX));
        let registry = registry.sub_registry_with_prefix("data");
        registry.register(
            "requests",
            "HTTP requests served by this instance",
            self.requests.clone(),
        );
        registry.register(
            "upstream_attempts",
            "Tries of the dependency's GET /data, by outcome",
            self.attempts.clone(),
        );
        registry.register(
            "fallbacks",
            "Answers made of the fallback after every try failed",
            self.fallbacks.clone(),
        );
        registry.register(
            "saved",
            "Records saved by this instance",
            self.saved.clone(),
        );
        registry.register(
            "stored_records",
            "Records stored over all shards, by every instance",
            self.stored.clone(),
        );
    }
}

/// The process's resident set size in bytes, from `/proc/self/status` (`None` where
/// there is no procfs).
pub(crate) fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    vm_rss_bytes(&status)
}

/// The `VmRSS:` line of a `/proc/<pid>/status` text, in bytes.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_from_the_status_text() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t4\n";
        assert_eq!(vm_rss_bytes(status), Some(1234 * 1024));
        assert_eq!(vm_rss_bytes("Name:\tx\n"), None);
        assert_eq!(vm_rss_bytes("VmRSS:\tlots kB\n"), None);
        if cfg!(target_os = "linux") {
            assert!(resident_bytes().unwrap() > 1024 * 1024);
        }
    }

    #[test]
    fn renders_prometheus_text() {
        let m = DataMetrics::new();
        m.request();
        m.request();
        m.attempt("success");
        m.attempt("timeout");
        m.attempt("timeout");
        m.fallback();
        m.saved();
        let text = m.render(17);
        for line in [
            "data_requests_total 2",
            "data_upstream_attempts_total{outcome=\"timeout\"} 2",
            "data_upstream_attempts_total{outcome=\"success\"} 1",
            "data_fallbacks_total 1",
            "data_saved_total 1",
            "data_stored_records 17",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        assert_eq!(m.requests(), 2);
    }
}
