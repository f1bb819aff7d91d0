//! What the analytics, data and unstable services can be told at start: the error a bad
//! value gives, and the checks their settings share.

use std::time::Duration;

/// A setting with a value it cannot take. `setting` is the name the user wrote it
/// under (an environment variable, a flag, or a field of the settings struct), so the
/// CLI can print it and exit 64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {setting}: {reason}")]
pub struct InvalidSetting {
    /// The setting's name, e.g. `RATE_LIMIT_WINDOW` or `failure_rate`.
    pub setting: String,
    /// What is wrong with the value.
    pub reason: String,
}

impl InvalidSetting {
    /// An error for `setting`.
    pub fn new(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}

/// A probability: finite and within 0..=1.
pub(crate) fn check_rate(setting: &str, rate: f64) -> Result<(), InvalidSetting> {
    if rate.is_finite() && (0.0..=1.0).contains(&rate) {
        Ok(())
    } else {
        Err(InvalidSetting::new(
            setting,
            format!("{rate} is not a probability between 0 and 1"),
        ))
    }
}

/// A duration within `min..=max`.
pub(crate) fn check_duration(
    setting: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), InvalidSetting> {
    if value < min || value > max {
        return Err(InvalidSetting::new(
            setting,
            format!("{value:?} is outside {min:?}..={max:?}"),
        ));
    }
    Ok(())
}

/// A base URL the services call: `http://host[:port][/path]`, without a trailing slash
/// (the HTTP client is built without TLS). Returns it normalised.
pub(crate) fn check_base_url(setting: &str, url: &str) -> Result<String, InvalidSetting> {
    let bad = |reason: &str| InvalidSetting::new(setting, format!("{url:?}: {reason}"));
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("expected an http:// URL such as http://127.0.0.1:9000"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    if url.contains(|c: char| c.is_whitespace() || c.is_control()) || url.contains(['?', '#']) {
        return Err(bad("must be a base URL without spaces, query or fragment"));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("missing host"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Reads one variable through `lookup`; unset and empty both mean "not given" (compose
/// files often write `NAME=` to leave a value at its default).
pub(crate) fn env_value(lookup: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    lookup(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Parses a whole number within `min..=max` from an environment variable.
pub(crate) fn env_number(
    lookup: &dyn Fn(&str) -> Option<String>,
    name: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, InvalidSetting> {
    let Some(raw) = env_value(lookup, name) else {
        return Ok(None);
    };
    match raw.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(InvalidSetting::new(
            name,
            format!("{raw:?} is not a whole number between {min} and {max}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_probabilities() {
        for ok in [0.0, 0.3, 1.0] {
            assert!(check_rate("r", ok).is_ok());
        }
        for bad in [-0.1, 1.01, f64::NAN, f64::INFINITY] {
            let err = check_rate("failure_rate", bad).unwrap_err();
            assert_eq!(err.setting, "failure_rate");
        }
    }

    #[test]
    fn base_urls_are_http_with_a_host() {
        assert_eq!(
            check_base_url("external", "http://127.0.0.1:9000/").unwrap(),
            "http://127.0.0.1:9000"
        );
        assert_eq!(
            check_base_url("external", "http://unstable.internal/api").unwrap(),
            "http://unstable.internal/api"
        );
        for bad in [
            "https://x",
            "127.0.0.1:9000",
            "http://",
            "http:///x",
            "http://a b",
            "http://h/?q=1",
        ] {
            let err = check_base_url("external", bad).unwrap_err();
            assert_eq!(err.setting, "external", "{bad}");
        }
    }

    #[test]
    fn env_numbers_are_bounded_and_empty_means_unset() {
        let vars = |name: &str| match name {
            "A" => Some("12".to_owned()),
            "EMPTY" => Some("  ".to_owned()),
            "BAD" => Some("1.5".to_owned()),
            "BIG" => Some("100".to_owned()),
            _ => None,
        };
        assert_eq!(env_number(&vars, "A", 1, 60).unwrap(), Some(12));
        assert_eq!(env_number(&vars, "EMPTY", 1, 60).unwrap(), None);
        assert_eq!(env_number(&vars, "UNSET", 1, 60).unwrap(), None);
        assert_eq!(env_number(&vars, "BAD", 1, 60).unwrap_err().setting, "BAD");
        let err = env_number(&vars, "BIG", 1, 60).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid BIG: \"100\" is not a whole number between 1 and 60"
        );
    }
}
