//! A metric as `POST /api/metrics` receives it: `{timestamp, value, type}`, checked
//! field by field so that a 400 names what is wrong.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest `type`, in characters.
pub const MAX_TYPE_CHARS: usize = 100;

/// A validated metric, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMetric {
    /// The `timestamp` as sent (kept verbatim for the record).
    pub timestamp: String,
    /// The `timestamp` as milliseconds since the Unix epoch, UTC.
    pub timestamp_ms: i64,
    /// A finite number.
    pub value: f64,
    /// Non-blank, at most [`MAX_TYPE_CHARS`] characters, no control characters.
    pub kind: String,
}

/// What `GET /api/metrics/summary` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The metric type asked for.
    #[serde(rename = "type")]
    pub kind: String,
    /// Metrics of that type stored.
    pub count: u64,
    /// Their mean value.
    pub average_value: f64,
}

/// Validates a `POST /api/metrics` body. The error is the `details` of the 400.
pub(crate) fn parse_metric(body: &Value) -> Result<NewMetric, String> {
    let fields: &Map<String, Value> = body
        .as_object()
        .ok_or_else(|| "Request body must be a JSON object".to_owned())?;
    let required = |key: &str| match fields.get(key) {
        None | Some(Value::Null) => Err(format!("Field '{key}' is required")),
        Some(value) => Ok(value),
    };

    let timestamp = required("timestamp")?;
    let bad_timestamp =
        || "Field 'timestamp' must be an ISO-8601 date-time string, e.g. 2026-02-15T10:00:00Z";
    let timestamp = timestamp
        .as_str()
        .ok_or_else(|| bad_timestamp().to_owned())?;
    let timestamp_ms = parse_timestamp(timestamp).ok_or_else(|| bad_timestamp().to_owned())?;

    let value = required("value")?
        .as_f64()
        .filter(|v| v.is_finite())
        .ok_or_else(|| "Field 'value' must be a number".to_owned())?;

    let bad_type = || {
        format!("Field 'type' must be a non-empty string of at most {MAX_TYPE_CHARS} characters")
    };
    let kind = required("type")?.as_str().ok_or_else(bad_type)?;
    if kind.trim().is_empty()
        || kind.chars().count() > MAX_TYPE_CHARS
        || kind.chars().any(char::is_control)
    {
        return Err(bad_type());
    }

    Ok(NewMetric {
        timestamp: timestamp.to_owned(),
        timestamp_ms,
        value,
        kind: kind.to_owned(),
    })
}

/// Milliseconds since the epoch (UTC) of an ISO-8601 date or date-time:
/// `YYYY-MM-DD`, or `YYYY-MM-DDTHH:MM[:SS[.fraction]]` followed by `Z`, `±HH:MM`,
/// `±HHMM` or nothing (UTC, as the seed's own example `2026-02-15T10:00:00` means).
pub(crate) fn parse_timestamp(raw: &str) -> Option<i64> {
    if !raw.is_ascii() || raw.len() < 10 {
        return None;
    }
    if raw.len() == 10 {
        return utc_millis(&format!("{raw}T00:00:00Z"));
    }
    let (local, offset_minutes) = split_offset(raw)?;
    let (date, time) = local.split_at(10);
    let time = time.strip_prefix(['T', 't'])?;
    // humantime wants seconds; ISO-8601 lets them be left out.
    let time = if time.len() == 5 {
        format!("{time}:00")
    } else {
        time.to_owned()
    };
    let millis = utc_millis(&format!("{date}T{time}Z"))?;
    millis.checked_sub(offset_minutes.checked_mul(60_000)?)
}

/// Splits a trailing zone designator off; the offset is in minutes east of UTC.
fn split_offset(raw: &str) -> Option<(&str, i64)> {
    if let Some(local) = raw.strip_suffix(['Z', 'z']) {
        return Some((local, 0));
    }
    let bytes = raw.as_bytes();
    for (len, colon) in [(6, true), (5, false)] {
        let Some(start) = raw.len().checked_sub(len) else {
            continue;
        };
        // The zone follows a time, never the date's own dashes.
        if start <= 10 || !matches!(bytes[start], b'+' | b'-') {
            continue;
        }
        let zone = &raw[start + 1..];
        let (hours, minutes) = if colon {
            zone.split_once(':')?
        } else {
            zone.split_at(2)
        };
        if hours.len() != 2 || minutes.len() != 2 {
            return None;
        }
        let hours: i64 = hours.parse().ok()?;
        let minutes: i64 = minutes.parse().ok()?;
        if hours > 23 || minutes > 59 {
            return None;
        }
        let sign = if bytes[start] == b'-' { -1 } else { 1 };
        return Some((&raw[..start], sign * (hours * 60 + minutes)));
    }
    Some((raw, 0))
}

fn utc_millis(rfc3339: &str) -> Option<i64> {
    let at = humantime::parse_rfc3339_weak(rfc3339).ok()?;
    match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).ok(),
        Err(before) => i64::try_from(before.duration().as_millis())
            .ok()
            .map(|ms| -ms),
    }
}

/// The current time in the same unit, for when a metric was received.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FEB_15_10H: i64 = 1_771_149_600_000;

    #[test]
    fn timestamps_in_the_forms_clients_send() {
        for (raw, ms) in [
            ("2026-02-15T10:00:00", FEB_15_10H),
            ("2026-02-15T10:00:00Z", FEB_15_10H),
            ("2026-02-15T10:00:00.250Z", FEB_15_10H + 250),
            ("2026-02-15T10:00Z", FEB_15_10H),
            ("2026-02-15t10:00:00z", FEB_15_10H),
            ("2026-02-15T12:00:00+02:00", FEB_15_10H),
            ("2026-02-15T05:30:00-0430", FEB_15_10H),
            ("2026-02-15", FEB_15_10H - 10 * 3_600_000),
        ] {
            assert_eq!(parse_timestamp(raw), Some(ms), "{raw}");
        }
    }

    #[test]
    fn non_timestamps_are_refused() {
        for raw in [
            "",
            "yesterday",
            "2026-02-15T25:00:00Z",
            "2026-02-30T10:00:00Z",
            "2026-13-01",
            "2026-02-15X10:00:00",
            "2026-02-15T10:00:00+24:00",
            "2026-02-15T10:00:00+2:00",
            "2026-02-15T10",
            "15/02/2026",
            "2026-02-15T10:00:00Zé",
            "1771149600000",
        ] {
            assert_eq!(parse_timestamp(raw), None, "{raw}");
        }
    }

    #[test]
    fn a_valid_metric_is_parsed() {
        let metric = parse_metric(
            &json!({"timestamp": "2026-02-15T10:00:00", "value": 75, "type": "cpu_usage"}),
        )
        .unwrap();
        assert_eq!(
            metric,
            NewMetric {
                timestamp: "2026-02-15T10:00:00".into(),
                timestamp_ms: FEB_15_10H,
                value: 75.0,
                kind: "cpu_usage".into(),
            }
        );
        let long = "t".repeat(MAX_TYPE_CHARS);
        assert!(
            parse_metric(&json!({"timestamp": "2026-02-15", "value": -0.5, "type": long})).is_ok()
        );
    }

    #[test]
    fn each_problem_names_its_field() {
        let ok_ts = "2026-02-15T10:00:00Z";
        let type_msg = "Field 'type' must be a non-empty string of at most 100 characters";
        let ts_msg =
            "Field 'timestamp' must be an ISO-8601 date-time string, e.g. 2026-02-15T10:00:00Z";
        let cases = [
            (json!([]), "Request body must be a JSON object"),
            (
                json!({"value": 1, "type": "a"}),
                "Field 'timestamp' is required",
            ),
            (
                json!({"timestamp": null, "value": 1, "type": "a"}),
                "Field 'timestamp' is required",
            ),
            (json!({"timestamp": 5, "value": 1, "type": "a"}), ts_msg),
            (
                json!({"timestamp": "soon", "value": 1, "type": "a"}),
                ts_msg,
            ),
            (
                json!({"timestamp": ok_ts, "type": "a"}),
                "Field 'value' is required",
            ),
            (
                json!({"timestamp": ok_ts, "value": "75", "type": "a"}),
                "Field 'value' must be a number",
            ),
            (
                json!({"timestamp": ok_ts, "value": true, "type": "a"}),
                "Field 'value' must be a number",
            ),
            (
                json!({"timestamp": ok_ts, "value": 1}),
                "Field 'type' is required",
            ),
            (
                json!({"timestamp": ok_ts, "value": 1, "type": ""}),
                type_msg,
            ),
            (
                json!({"timestamp": ok_ts, "value": 1, "type": "  "}),
                type_msg,
            ),
            (json!({"timestamp": ok_ts, "value": 1, "type": 3}), type_msg),
            (
                json!({"timestamp": ok_ts, "value": 1, "type": "a\nb"}),
                type_msg,
            ),
            (
                json!({"timestamp": ok_ts, "value": 1, "type": "x".repeat(101)}),
                type_msg,
            ),
        ];
        for (body, message) in cases {
            assert_eq!(parse_metric(&body).unwrap_err(), message, "{body}");
        }
    }
}
