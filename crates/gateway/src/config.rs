//! What a gateway process is told at start ([`GatewayConfig`]: where it listens, where
//! the registry is, which config file it routes by) and that file, `breakwater.toml`
//! ([`file`]: routes and per-route policies, validated into [`FileConfig`]).
//!
//! The file is read at start and again on every reload; [`EMBEDDED_CONFIG`] stands in
//! when no path is given. Every validation error names its key path, e.g.
//! `routes[2].policy.retries.max_attempts: must be >= 1 and <= 10 (got 0)`.

pub mod file;

use std::path::PathBuf;
use std::time::Duration;

pub use file::{FileConfig, RouteSpec};

/// Port the gateway listens on unless told otherwise (seed 003).
pub const DEFAULT_PORT: u16 = 8000;
/// Registry address unless told otherwise (seed 003).
pub const DEFAULT_REGISTRY_URL: &str = "http://127.0.0.1:3000";
/// How often the gateway heartbeats to the registry unless told otherwise.
pub const DEFAULT_HEARTBEAT_INTERVAL_SECS: u64 = 10;
/// Key prefix in Redis unless told otherwise: gateways that share it share their rate
/// limits and cached responses.
pub const DEFAULT_REDIS_PREFIX: &str = "breakwater:gateway";
/// Bound on one Redis call of the request path (rate-limit decision, cache read or
/// write) unless told otherwise; past it the gateway decides without Redis.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(100);
/// The routes and policies used when no config file is given (CONTRACTS.md's gateway
/// table with the default policies).
pub const EMBEDDED_CONFIG: &str = include_str!("../breakwater.toml");

/// The gateway's process settings, checked by [`GatewayConfig::validate`] when the
/// gateway starts. Routes and policies live in the config file ([`FileConfig`]).
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
    /// Replaces `[defaults.timeout] per_try` of the config file when set (routes that
    /// set their own keep it): the `--try-timeout` flag.
    pub try_timeout: Option<Duration>,
    /// Where the dashboard's "Service Discovery Dashboard" link points; it can differ
    /// from `registry_url` when browsers see the registry under another address.
    pub registry_dashboard_url: String,
    /// `breakwater.toml` to route by, re-read on every reload; `None`: the embedded
    /// default ([`EMBEDDED_CONFIG`]).
    pub config_path: Option<PathBuf>,
    /// Bearer token for `/admin` (e.g. from `BREAKWATER_ADMIN_TOKEN`); wins over the
    /// file's `admin.token`.
    pub admin_token: Option<String>,
    /// Whether the listener is bound to a loopback address only, so `/admin` needs no
    /// token. [`crate::run`] sets it from the listener; off by default, the safe side.
    pub listener_loopback: bool,
    /// Base URL of `breakwater up`'s control API, which `/admin/control` forwards to;
    /// `None` when the gateway does not run under `up`.
    pub control_url: Option<String>,
    /// Redis (`redis://host:port/db`) for rate limits shared by every gateway and a
    /// shared second level of the response cache; `None`: both stay local.
    pub redis_url: Option<String>,
    /// Key prefix in Redis ([`DEFAULT_REDIS_PREFIX`]).
    pub redis_prefix: String,
    /// Bound on one Redis call ([`DEFAULT_REDIS_TIMEOUT`]).
    pub redis_timeout: Duration,
    /// The host the gateway registers under; `None` lets the registry use the address
    /// it sees the registration come from.
    pub advertise_host: Option<String>,
}

impl GatewayConfig {
    /// Defaults for everything but the port and the registry: instance
    /// `api-gateway-<port>`, heartbeat every 10 s, the embedded routes, no admin token,
    /// and the registry's own dashboard at the registry URL.
    pub fn new(port: u16, registry_url: impl Into<String>) -> Self {
        let registry_url = registry_url.into().trim_end_matches('/').to_owned();
        Self {
            port,
            instance: instance_name(port),
            heartbeat_interval_secs: DEFAULT_HEARTBEAT_INTERVAL_SECS,
            try_timeout: None,
            registry_dashboard_url: format!("{registry_url}/"),
            registry_url,
            config_path: None,
            admin_token: None,
            listener_loopback: false,
            control_url: None,
            redis_url: None,
            redis_prefix: DEFAULT_REDIS_PREFIX.to_owned(),
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            advertise_host: None,
        }
    }

    /// Checks the values a typo could break, naming the offending key. The config file
    /// is checked by [`GatewayConfig::load_file`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_http_url("registry_url", &self.registry_url)?;
        check_http_url("registry_dashboard_url", &self.registry_dashboard_url)?;
        if let Some(url) = &self.control_url {
            check_http_url("control_url", url)?;
        }
        if self.instance.trim().is_empty() {
            return Err(ConfigError::invalid("instance", "must not be empty"));
        }
        if self.heartbeat_interval_secs == 0 {
            return Err(ConfigError::invalid(
                "heartbeat_interval_secs",
                "must be at least 1",
            ));
        }
        if self.try_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::invalid(
                "try_timeout",
                "must be longer than zero",
            ));
        }
        if let Some(token) = &self.admin_token
            && (token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ConfigError::invalid(
                "admin_token",
                "must be printable ASCII without spaces",
            ));
        }
        if let Some(url) = &self.redis_url {
            use redis::IntoConnectionInfo as _;
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError::invalid(
                    "redis_url",
                    format!("{url:?} must look like redis://host:port/db"),
                ));
            }
            url.as_str()
                .into_connection_info()
                .map_err(|e| ConfigError::invalid("redis_url", format!("{url:?}: {e}")))?;
        }
        if self.redis_prefix.is_empty() || !self.redis_prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ConfigError::invalid(
                "redis_prefix",
                "must be printable ASCII without spaces",
            ));
        }
        if self.redis_timeout.is_zero() || self.redis_timeout > Duration::from_secs(10) {
            return Err(ConfigError::invalid(
                "redis_timeout",
                "must be longer than zero and at most 10s",
            ));
        }
        Ok(())
    }

    /// Reads and validates the config file (or the embedded default), applying
    /// [`GatewayConfig::try_timeout`]. Blocking file I/O: call it off the async workers
    /// (start-up, or `spawn_blocking`).
    pub fn load_file(&self) -> Result<FileConfig, ConfigError> {
        match &self.config_path {
            None => self.parse_file(EMBEDDED_CONFIG, "embedded breakwater.toml"),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                    path: path.clone(),
                    cause: e.to_string(),
                })?;
                self.parse_file(&text, &path.display().to_string())
            }
        }
    }

    /// Validates `text` as a config file, applying [`GatewayConfig::try_timeout`];
    /// `origin` names it in syntax errors.
    pub fn parse_file(&self, text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
        file::parse(text, origin, self.try_timeout)
    }

    /// The admin token in force: this config's, else the file's.
    pub fn effective_admin_token<'a>(&'a self, file: &'a FileConfig) -> Option<&'a str> {
        self.admin_token.as_deref().or(file.admin_token.as_deref())
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
    let uri: http::Uri = value
        .parse()
        .map_err(|e| ConfigError::invalid(key, format!("{value:?} is not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(ConfigError::invalid(
            key,
            format!("{value:?} must look like http://host:port"),
        ));
    }
    Ok(())
}

/// A setting or config file the gateway cannot run with. The CLI exits 64 on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `key` (a dotted path such as `routes[2].policy.retries.max_attempts`) has a
    /// value that cannot work, for `reason`.
    #[error("{key}: {reason}")]
    Invalid {
        /// The setting's key path.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The config file could not be read.
    #[error("cannot read {}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: String,
    },
    /// The config file is not valid TOML or has a key the gateway does not know.
    #[error("{origin}: {message}")]
    Parse {
        /// The file (or "embedded breakwater.toml").
        origin: String,
        /// The parser's message, with line, column and the offending key.
        message: String,
    },
}

impl ConfigError {
    /// An [`ConfigError::Invalid`] for `key`.
    pub fn invalid(key: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
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
        assert_eq!(c.try_timeout, None);
        assert_eq!(c.config_path, None);
        assert!(
            !c.listener_loopback,
            "admin is locked until run() sees a loopback listener"
        );
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
        c.try_timeout = Some(Duration::ZERO);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("try_timeout")
        );
        c = GatewayConfig::default();
        c.redis_url = Some("localhost:6379".into());
        assert!(c.validate().unwrap_err().to_string().contains("redis_url"));
        c.redis_url = Some("redis://127.0.0.1:6379/0".into());
        assert_eq!(c.validate(), Ok(()));
        c.redis_prefix = "a b".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("redis_prefix")
        );
        c = GatewayConfig::default();
        c.redis_timeout = Duration::ZERO;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("redis_timeout")
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
