//! The decision trace: a request carrying `x-breakwater-trace: 1` gets a response header
//! `x-breakwater-trace` listing the route matched, each try (instance, outcome, time)
//! and every breaker, budget, limit and cache decision, e.g.
//! `route=/users; try1=user-service-127.0.0.1-4000 connect-error 0.3ms; try2=user-service-127.0.0.1-4001 200 1.2ms; breaker=closed; budget=ok`.
//!
//! Without the request header a [`Trace`] is `None` inside and every call is a branch
//! on it: no formatting, no allocation.

use std::fmt::Write as _;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

/// The request and response header.
pub const TRACE_HEADER: HeaderName = HeaderName::from_static("x-breakwater-trace");

/// Longest trace sent back; past it the list is cut with `...`.
const MAX_TRACE_LEN: usize = 2048;

/// A request's decision trace, off unless the client asked for it.
#[derive(Debug, Default)]
pub struct Trace(Option<String>);

impl Trace {
    /// On when `headers` carry `x-breakwater-trace: 1` (or `true`).
    pub fn from_request(headers: &HeaderMap) -> Self {
        let on = headers
            .get(TRACE_HEADER)
            .is_some_and(|v| v.as_bytes() == b"1" || v.as_bytes().eq_ignore_ascii_case(b"true"));
        Self(on.then(String::new))
    }

    /// A trace that records nothing.
    pub fn off() -> Self {
        Self(None)
    }

    /// An empty trace that records if this one does (for work done elsewhere, to be
    /// [`Trace::append`]ed later).
    pub fn child(&self) -> Self {
        Self(self.0.as_ref().map(|_| String::new()))
    }

    /// Adds `other`'s entries after this one's.
    pub fn append(&mut self, other: Self) {
        if let (Some(text), Some(more)) = (&mut self.0, other.0)
            && !more.is_empty()
        {
            if !text.is_empty() {
                text.push_str("; ");
            }
            text.push_str(&more);
        }
    }

    /// Whether entries are being recorded.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Adds `key=value`; `value` is only formatted when the trace is on.
    pub fn note(&mut self, key: &str, value: impl std::fmt::Display) {
        if let Some(text) = &mut self.0 {
            if !text.is_empty() {
                text.push_str("; ");
            }
            let _ = write!(text, "{key}={value}");
        }
    }

    /// Adds one try: `tryN=<instance> <outcome> <ms>ms`.
    pub fn attempt(
        &mut self,
        n: u32,
        instance: &str,
        outcome: impl std::fmt::Display,
        took: Duration,
    ) {
        if self.0.is_some() {
            let ms = took.as_secs_f64() * 1e3;
            self.note(
                &format!("try{n}"),
                format_args!("{instance} {outcome} {ms:.1}ms"),
            );
        }
    }

    /// Puts the trace on `headers` (if on), keeping it a valid, bounded header value.
    pub fn finish(self, headers: &mut HeaderMap) {
        let Some(mut text) = self.0 else { return };
        text.retain(|c| c.is_ascii_graphic() || c == ' ');
        if text.len() > MAX_TRACE_LEN {
            text.truncate(MAX_TRACE_LEN - 3);
            text.push_str("...");
        }
        if let Ok(value) = HeaderValue::from_str(&text) {
            headers.insert(TRACE_HEADER, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_unless_asked_and_then_lists_everything_in_order() {
        let mut off = Trace::from_request(&HeaderMap::new());
        off.note("route", "/users");
        let mut h = HeaderMap::new();
        off.finish(&mut h);
        assert!(h.is_empty());

        let mut req = HeaderMap::new();
        req.insert(TRACE_HEADER, HeaderValue::from_static("1"));
        let mut t = Trace::from_request(&req);
        t.note("route", "/users");
        t.attempt(
            1,
            "user-service-127.0.0.1-4000",
            "connect-error",
            Duration::from_micros(300),
        );
        t.attempt(
            2,
            "user-service-127.0.0.1-4001",
            200,
            Duration::from_micros(1200),
        );
        t.note("breaker", "closed");
        t.note("budget", "ok");
        let mut h = HeaderMap::new();
        t.finish(&mut h);
        assert_eq!(
            h[TRACE_HEADER],
            "route=/users; try1=user-service-127.0.0.1-4000 connect-error 0.3ms; \
             try2=user-service-127.0.0.1-4001 200 1.2ms; breaker=closed; budget=ok"
        );
    }

    #[test]
    fn odd_characters_and_length_are_tamed() {
        let mut req = HeaderMap::new();
        req.insert(TRACE_HEADER, HeaderValue::from_static("true"));
        let mut t = Trace::from_request(&req);
        t.note("x", "caf\u{e9}\n");
        for _ in 0..500 {
            t.note("k", "vvvvvvvv");
        }
        let mut h = HeaderMap::new();
        t.finish(&mut h);
        let v = h[TRACE_HEADER].to_str().unwrap();
        assert!(v.starts_with("x=caf; "), "{v}");
        assert!(v.len() <= MAX_TRACE_LEN && v.ends_with("..."));
    }
}
