//! The tally: what one connection counted (latencies, status codes, errors, bytes),
//! kept per connection so the hot loop shares nothing, and merged at the end.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use http::StatusCode;

/// Latencies are recorded in microseconds from 1 µs to 60 s with 3 significant
/// figures; a slower response is clamped to 60 s.
const LOWEST_US: u64 = 1;
const HIGHEST_US: u64 = 60_000_000;
const SIGNIFICANT_FIGURES: u8 = 3;

/// Status codes are three digits (`http::StatusCode` holds 100..=999).
const STATUS_SLOTS: usize = 1000;

/// Why a request attempt produced no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ErrorKind {
    /// The TCP connection could not be made (refused, unreachable, timed out).
    Connect,
    /// No complete response within `--timeout`.
    Timeout,
    /// The peer closed or reset the connection before the response was complete.
    Reset,
    /// The response was not valid HTTP/1.
    Protocol,
    /// Another I/O failure on an open connection.
    Io,
    /// Anything else hyper reports.
    Other,
}

impl ErrorKind {
    /// Every kind, in the order reports list them.
    pub const ALL: [Self; 6] = [
        Self::Connect,
        Self::Timeout,
        Self::Reset,
        Self::Protocol,
        Self::Io,
        Self::Other,
    ];

    /// The machine name used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Protocol => "protocol",
            Self::Io => "io",
            Self::Other => "other",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Counts of one connection, or of all of them once merged.
#[derive(Debug, Clone)]
pub(super) struct Tally {
    latency_us: Histogram<u64>,
    statuses: Box<[u64]>,
    errors: [u64; ErrorKind::ALL.len()],
    bytes_read: u64,
}

impl Tally {
    /// An empty tally; allocates its histogram and status table up front so recording
    /// never allocates.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency_us: Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)?,
            statuses: vec![0; STATUS_SLOTS].into_boxed_slice(),
            errors: [0; ErrorKind::ALL.len()],
            bytes_read: 0,
        })
    }

    /// One complete response.
    pub fn response(&mut self, status: StatusCode, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.saturating_record(us);
        if let Some(slot) = self.statuses.get_mut(usize::from(status.as_u16())) {
            *slot += 1;
        }
    }

    /// One failed attempt.
    pub fn error(&mut self, kind: ErrorKind) {
        self.errors[kind.slot()] += 1;
    }

    /// Bytes read from the wire (headers and bodies).
    pub fn add_bytes_read(&mut self, bytes: u64) {
        self.bytes_read += bytes;
    }

    /// Adds another tally into this one.
    pub fn merge(&mut self, other: &Self) -> anyhow::Result<()> {
        self.latency_us.add(&other.latency_us)?;
        for (mine, theirs) in self.statuses.iter_mut().zip(other.statuses.iter()) {
            *mine += theirs;
        }
        for (mine, theirs) in self.errors.iter_mut().zip(other.errors) {
            *mine += theirs;
        }
        self.bytes_read += other.bytes_read;
        Ok(())
    }

    /// Complete responses, whatever their status.
    pub fn responses(&self) -> u64 {
        self.latency_us.len()
    }

    /// Failed attempts of every kind.
    pub fn errors_total(&self) -> u64 {
        self.errors.iter().sum()
    }

    /// The latency histogram in microseconds.
    pub fn latency_us(&self) -> &Histogram<u64> {
        &self.latency_us
    }

    /// Bytes read from the wire.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Exact status codes seen, with their counts.
    pub fn status_codes(&self) -> BTreeMap<u16, u64> {
        self.statuses
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .filter_map(|(code, &n)| Some((u16::try_from(code).ok()?, n)))
            .collect()
    }

    /// Responses per class: index 0 is 1xx, 4 is 5xx (codes 600..=999 are left out).
    pub fn status_classes(&self) -> [u64; 5] {
        let mut classes = [0; 5];
        for (class, count) in classes.iter_mut().enumerate() {
            let from = (class + 1) * 100;
            *count = self.statuses[from..from + 100].iter().sum();
        }
        classes
    }

    /// Errors per kind, only the kinds that happened.
    pub fn errors(&self) -> BTreeMap<&'static str, u64> {
        ErrorKind::ALL
            .iter()
            .filter(|k| self.errors[k.slot()] > 0)
            .map(|k| (k.name(), self.errors[k.slot()]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_merges() {
        let mut a = Tally::new().unwrap();
        a.response(StatusCode::OK, Duration::from_millis(2));
        a.response(StatusCode::INTERNAL_SERVER_ERROR, Duration::from_millis(4));
        a.error(ErrorKind::Connect);
        a.add_bytes_read(100);
        let mut b = Tally::new().unwrap();
        b.response(StatusCode::OK, Duration::from_secs(3600));
        b.error(ErrorKind::Timeout);
        b.error(ErrorKind::Timeout);
        b.add_bytes_read(50);

        a.merge(&b).unwrap();
        assert_eq!(a.responses(), 3);
        assert_eq!(a.errors_total(), 3);
        assert_eq!(a.bytes_read(), 150);
        assert_eq!(a.status_codes(), BTreeMap::from([(200, 2), (500, 1)]));
        assert_eq!(a.status_classes(), [0, 2, 0, 0, 1]);
        assert_eq!(a.errors(), BTreeMap::from([("connect", 1), ("timeout", 2)]));
        // An hour-long response is clamped to the histogram's 60 s ceiling, not lost.
        let max = a.latency_us().max();
        assert!((59_900_000..=60_100_000).contains(&max), "{max}");
    }

    #[test]
    fn kinds_have_distinct_slots_and_names() {
        for (i, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(kind.slot(), i);
            assert_eq!(kind.to_string(), kind.name());
        }
    }
}
