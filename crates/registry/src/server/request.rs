//! Turning a register/heartbeat body into a [`Registration`]. The body is read as loose
//! JSON values so that a missing field gets the contract's message ("Name and port are
//! required") and every other problem a message naming the field.

use std::net::IpAddr;

use breakwater_runtime::http::ApiError;
use serde::Deserialize;
use serde_json::Value;

use crate::name::ServiceName;
use crate::store::{MAX_HEARTBEAT_INTERVAL, Registration};

/// Longest host name (DNS limit).
const MAX_HOST_LEN: usize = 253;

/// The body of `POST /register` and `POST /heartbeat` before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawRegistration {
    name: Option<Value>,
    port: Option<Value>,
    heartbeat_interval: Option<Value>,
    host: Option<Value>,
    metadata: Option<Value>,
}

impl RawRegistration {
    /// Validates every field; `caller` is the peer's address, the host's default.
    pub(super) fn validate(self, caller: Option<IpAddr>) -> Result<Registration, ApiError> {
        // The seed treated an empty name like a missing one.
        let name = self.name.filter(|v| v.as_str() != Some(""));
        let (Some(name), Some(port)) = (name, self.port) else {
            return Err(ApiError::bad_request("Name and port are required"));
        };
        let Value::String(name) = name else {
            return Err(ApiError::bad_request("Invalid name: must be a string"));
        };
        let name = ServiceName::parse(&name)
            .map_err(|e| ApiError::bad_request(format!("Invalid name: {e}")))?;
        let port = port_from_json(&port)?;
        let heartbeat_interval = self
            .heartbeat_interval
            .map(|v| interval_from_json(&v))
            .transpose()?;
        let host = match self.host {
            Some(Value::String(h)) => normalise_host(&h)
                .map_err(|reason| ApiError::bad_request(format!("Invalid host: {reason}")))?,
            Some(_) => return Err(ApiError::bad_request("Invalid host: must be a string")),
            None => match caller {
                Some(ip) => normalise_ip(ip).to_string(),
                None => {
                    return Err(ApiError::bad_request(
                        "Invalid host: not given and the caller's address is unknown",
                    ));
                }
            },
        };
        let metadata = match self.metadata {
            None => None,
            Some(Value::Object(map)) => Some(map),
            Some(_) => {
                return Err(ApiError::bad_request(
                    "Invalid metadata: must be a JSON object",
                ));
            }
        };
        Ok(Registration {
            name,
            host,
            port,
            heartbeat_interval,
            metadata,
        })
    }
}

fn port_from_json(v: &Value) -> Result<u16, ApiError> {
    let invalid = || {
        ApiError::bad_request(format!(
            "Invalid port: {v} is not an integer from 1 to 65535 (a JSON number)"
        ))
    };
    let n = v.as_u64().ok_or_else(invalid)?;
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(invalid)
}

fn interval_from_json(v: &Value) -> Result<u64, ApiError> {
    v.as_u64()
        .filter(|n| (1..=MAX_HEARTBEAT_INTERVAL).contains(n))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "Invalid heartbeatInterval: {v} is not a whole number of seconds from 1 to 3600"
            ))
        })
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket reports for
/// an IPv4 peer) becomes the IPv4 address it carries.
pub(super) fn normalise_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// An IP address (brackets allowed, mapped IPv4 unwrapped) or a DNS host name
/// (lowercased). The error says what is wrong.
pub(super) fn normalise_host(raw: &str) -> Result<String, String> {
    let bare = raw
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(raw);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(normalise_ip(ip).to_string());
    }
    if bare.is_empty() {
        return Err("must not be empty".into());
    }
    if bare.len() > MAX_HOST_LEN {
        return Err(format!(
            "{} characters long; at most {MAX_HOST_LEN} are allowed",
            bare.len()
        ));
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if bare.split('.').all(label_ok) {
        Ok(bare.to_ascii_lowercase())
    } else {
        Err(format!("{raw:?} is neither an IP address nor a host name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn validate(body: Value) -> Result<Registration, String> {
        let raw: RawRegistration = serde_json::from_value(body).unwrap();
        raw.validate(Some("10.1.2.3".parse().unwrap()))
            .map_err(|e| e.message)
    }

    #[test]
    fn missing_or_empty_name_or_port_is_the_contract_message() {
        for body in [
            json!({}),
            json!({"name": "svc"}),
            json!({"port": 4000}),
            json!({"name": "", "port": 4000}),
            json!({"name": null, "port": 4000}),
            json!({"name": "svc", "port": null}),
        ] {
            assert_eq!(
                validate(body.clone()).unwrap_err(),
                "Name and port are required",
                "{body}"
            );
        }
    }

    #[test]
    fn bad_values_get_precise_messages() {
        let cases = [
            (
                json!({"name": 5, "port": 1}),
                "Invalid name: must be a string",
            ),
            (json!({"name": "Svc", "port": 1}), "Invalid name"),
            (json!({"name": "a".repeat(64), "port": 1}), "Invalid name"),
            (json!({"name": "svc", "port": 0}), "Invalid port"),
            (json!({"name": "svc", "port": -1}), "Invalid port"),
            (json!({"name": "svc", "port": 65536}), "Invalid port"),
            (json!({"name": "svc", "port": "4000"}), "Invalid port"),
            (json!({"name": "svc", "port": 40.5}), "Invalid port"),
            (
                json!({"name": "svc", "port": 1, "heartbeatInterval": 0}),
                "Invalid heartbeatInterval",
            ),
            (
                json!({"name": "svc", "port": 1, "heartbeatInterval": 3601}),
                "Invalid heartbeatInterval",
            ),
            (
                json!({"name": "svc", "port": 1, "heartbeatInterval": "5"}),
                "Invalid heartbeatInterval",
            ),
            (
                json!({"name": "svc", "port": 1, "host": 7}),
                "Invalid host: must be a string",
            ),
            (
                json!({"name": "svc", "port": 1, "host": ""}),
                "Invalid host: must not be empty",
            ),
            (
                json!({"name": "svc", "port": 1, "host": "a b"}),
                "Invalid host",
            ),
            (
                json!({"name": "svc", "port": 1, "host": "a/b"}),
                "Invalid host",
            ),
            (
                json!({"name": "svc", "port": 1, "metadata": [1]}),
                "Invalid metadata",
            ),
        ];
        for (body, prefix) in cases {
            let err = validate(body.clone()).unwrap_err();
            assert!(err.starts_with(prefix), "{body}: {err}");
        }
    }

    #[test]
    fn valid_body_with_defaults() {
        let reg = validate(json!({"name": "user-service", "port": 65535})).unwrap();
        assert_eq!(reg.name.as_str(), "user-service");
        assert_eq!(reg.port, 65535);
        assert_eq!(reg.host, "10.1.2.3");
        assert_eq!(reg.heartbeat_interval, None);
        assert_eq!(reg.metadata, None);
        let reg = validate(json!({
            "name": "svc", "port": 1, "heartbeatInterval": 3600, "host": "Users.Local",
            "metadata": {"v": 2}
        }))
        .unwrap();
        assert_eq!(
            (reg.heartbeat_interval, reg.host.as_str()),
            (Some(3600), "users.local")
        );
        assert_eq!(reg.metadata.unwrap()["v"], 2);
    }

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(normalise_host("::ffff:127.0.0.1").unwrap(), "127.0.0.1");
        assert_eq!(normalise_host("[::1]").unwrap(), "::1");
        assert_eq!(normalise_host("::1").unwrap(), "::1");
        assert_eq!(normalise_host("10.0.0.1").unwrap(), "10.0.0.1");
        assert_eq!(
            normalise_host("my-host_1.example").unwrap(),
            "my-host_1.example"
        );
        assert!(normalise_host("-bad.example").is_err());
        assert!(normalise_host("a..b").is_err());
        assert!(normalise_host(&"a".repeat(254)).is_err());
        assert_eq!(
            normalise_ip("::ffff:1.2.3.4".parse().unwrap()).to_string(),
            "1.2.3.4"
        );
    }

    #[test]
    fn no_host_and_no_caller_is_rejected() {
        let raw: RawRegistration = serde_json::from_value(json!({"name": "s", "port": 1})).unwrap();
        assert!(
            raw.validate(None)
                .unwrap_err()
                .message
                .starts_with("Invalid host")
        );
    }
}
