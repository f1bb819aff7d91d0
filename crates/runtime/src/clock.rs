//! Wall-clock time for wire formats. Durations and deadlines use `tokio::time` instead,
//! so that tests can pause the clock; these functions are only for values that leave
//! the process.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (what the registry contract calls a time).
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The current time as ISO-8601 with milliseconds, e.g. `2024-01-15T10:30:00.000Z`.
pub fn iso8601_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_has_millis_and_zulu() {
        let s = iso8601_now();
        assert_eq!(s.len(), "2024-01-15T10:30:00.000Z".len(), "{s}");
        assert!(s.ends_with('Z'));
        assert_eq!(&s[19..20], ".");
    }

    #[test]
    fn millis_are_recent() {
        assert!(now_millis() > 1_700_000_000_000);
    }
}
