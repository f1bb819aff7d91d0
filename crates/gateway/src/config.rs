//! What a gateway process is told at start: where it listens, where the registry is, and
//! how long one try at an upstream may take.

use std::time::Duration;

/// Port the gateway listens on unless told otherwise (seed 003).
pub const DEFAULT_PORT: u16 = 8000;
/// Registry address unless told otherwise (seed 003).
pub const DEFAULT_REGISTRY_URL: &str = "http://127.0.0.1:3000";
/// How often the gateway heartbeats to the registry unless told otherwise.
pub const DEFAULT_HEARTBEAT_INTERVAL_SECS: u64 = 10;
/// How long one try at one instance may take until its response head arrives.
pub const DEFAULT_TRY_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway's settings, already validated by [`GatewayConfig::validate`] when the
/// gateway starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Port to report in `/health` and to register with (the listener's real port wins
    /// when they differ, see [`crate::run`]).
    pub port: u16,
    /// Base URL of the registry API, e.g. `http://127.0.0.1:3000`.
    pub registry_url: String,
    /// This gateway's instance name, `api-gateway-<port>` by default.
    pub instance: String,
    /// Seconds between heartbeats to the registry.
    pub heartbeat_interval_secs: u64,
    /// Deadline for one try at one upstream instance, up to its response head.
    pub try_timeout: Duration,
    /// Where the dashboard's "Service Discovery Dashboard" link points; it can differ
    /// from `registry_url` when browsers see the registry under another address.
    pub registry_dashboard_url: String,
}

impl GatewayConfig {
    /// Defaults for everything but the port and the registry: instance
    /// `api-gateway-<port>`, heartbeat every 10 s, 10 s per try, and the registry's own
    /// dashboard at the registry URL.
    pub fn new(port: u16, registry_url: impl Into<String>) -> Self {
        let registry_url = registry_url.into().trim_end_matches('/').to_owned();
        Self {
            port,
            instance: instance_name(port),
            heartbeat_interval_secs: DEFAULT_HEARTBEAT_INTERVAL_SECS,
            try_timeout: DEFAULT_TRY_TIMEOUT,
            registry_dashboard_url: format!("{registry_url}/"),
            registry_url,
        }
    }

    /// Checks the values a typo could break, naming the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_http_url("registry_url", &self.registry_url)?;
        check_http_url("registry_dashboard_url", &self.registry_dashboard_url)?;
        if self.instance.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "instance",
                reason: "must not be empty".into(),
            });
        }
        if self.heartbeat_interval_secs == 0 {
            return Err(ConfigError::Invalid {
                key: "heartbeat_interval_secs",
                reason: "must be at least 1".into(),
            });
        }
        if self.try_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                key: "try_timeout",
                reason: "must be longer than zero".into(),
            });
        }
        Ok(())
    }

    /// Moves the config to the port the listener really got (port 0 binds pick one),
    /// renaming the instance too unless it was named explicitly.
    pub(crate) fn adopt_port(&mut self, port: u16) {
        if self.port == port {
            return;
        }
        if self.instance == instance_name(self.port) {
            self.instance = instance_name(port);
        }
        self.port = port;
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self::new(DEFAULT_PORT, DEFAULT_REGISTRY_URL)
    }
}

/// The default instance name for a port.
fn instance_name(port: u16) -> String {
    format!("api-gateway-{port}")
}

fn check_http_url(key: &'static str, value: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = value.parse().map_err(|e| ConfigError::Invalid {
        key,
        reason: format!("{value:?} is not a URL: {e}"),
    })?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(ConfigError::Invalid {
            key,
            reason: format!("{value:?} must look like http://host:port"),
        });
    }
    Ok(())
}

/// A setting the gateway cannot start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `key` has a value that cannot work, for `reason`.
    #[error("invalid {key}: {reason}")]
    Invalid {
        /// The setting's name.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_seed() {
        let c = GatewayConfig::default();
        assert_eq!(c.port, 8000);
        assert_eq!(c.instance, "api-gateway-8000");
        assert_eq!(c.registry_url, "http://127.0.0.1:3000");
        assert_eq!(c.registry_dashboard_url, "http://127.0.0.1:3000/");
        assert_eq!(c.try_timeout, Duration::from_secs(10));
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn trailing_slash_is_dropped_from_the_registry_url() {
        let c = GatewayConfig::new(1, "http://reg:3000/");
        assert_eq!(c.registry_url, "http://reg:3000");
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut c = GatewayConfig::new(8000, "localhost:3000");
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("registry_url")
        );
        c = GatewayConfig::new(8000, "https://reg:3000");
        assert!(
            c.validate().is_err(),
            "no TLS client yet, so https must be refused"
        );
        c = GatewayConfig::default();
        c.try_timeout = Duration::ZERO;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("try_timeout")
        );
        c = GatewayConfig::default();
        c.heartbeat_interval_secs = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("heartbeat_interval_secs")
        );
    }

    #[test]
    fn adopting_the_real_port_renames_only_a_default_instance() {
        let mut c = GatewayConfig::new(0, DEFAULT_REGISTRY_URL);
        c.adopt_port(41000);
        assert_eq!((c.port, c.instance.as_str()), (41000, "api-gateway-41000"));
        let mut named = GatewayConfig::new(0, DEFAULT_REGISTRY_URL);
        named.instance = "edge-a".into();
        named.adopt_port(41001);
        assert_eq!((named.port, named.instance.as_str()), (41001, "edge-a"));
    }
}
