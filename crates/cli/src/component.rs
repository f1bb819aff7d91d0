//! Running one component per process: bind, wire the shutdown token, call the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use breakwater_registry::store::StoreChoice;
use breakwater_runtime::CancellationToken;
use breakwater_runtime::otlp::{self, ExportConfig, Exporter};
use tokio::net::TcpListener;

use breakwater_services::analytics::{AnalyticsOverrides, AnalyticsSettings};
use breakwater_services::data::DataSettings;
use breakwater_services::outbox::EventsToken;
use breakwater_services::unstable::UnstableSettings;
use breakwater_services::{EventSettings, ServiceError, ServiceKind, ServiceOptions};

use crate::cli::{
    GatewayArgs, Listen, PublisherArgs, RegistryArgs, ServiceArgs, ServiceCommand, ServiceCommon,
};

/// A flag or configuration value that cannot work; exits with code 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Environment variable `breakwater up` sets on its children (and `breakwater scenario`
/// on the `up` it starts): they stop when their stdin (a pipe from the supervisor)
/// closes, so no process outlives a killed supervisor.
pub const SUPERVISED_ENV: &str = "BREAKWATER_SUPERVISED";

/// The shutdown token of a long-running command: SIGINT/SIGTERM, and stdin closing when
/// [`SUPERVISED_ENV`] is set.
pub(crate) fn shutdown_token() -> anyhow::Result<CancellationToken> {
    let token = breakwater_runtime::shutdown::on_signal().context("installing signal handlers")?;
    if std::env::var_os(SUPERVISED_ENV).is_some() {
        breakwater_runtime::shutdown::cancel_on_stdin_eof(token.clone())
            .context("watching stdin")?;
    }
    Ok(token)
}

async fn bind(listen: &Listen) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::new(listen.bind, listen.port);
    TcpListener::bind(addr).await.map_err(|e| {
        UsageError(format!(
            "--port {}: cannot listen on {addr}: {e}",
            listen.port
        ))
        .into()
    })
}

fn port_of(listener: &TcpListener) -> anyhow::Result<u16> {
    Ok(listener
        .local_addr()
        .context("reading the bound address")?
        .port())
}

/// OTLP trace export as the `OTEL_*` variables ask (`None`: off), for component
/// `service`; a bad endpoint is a usage error naming the variable.
fn otlp_config(service: &str) -> Result<Option<ExportConfig>, UsageError> {
    ExportConfig::from_env(service, service).map_err(|e| UsageError(e.to_string()))
}

/// Starts the exporter and makes its tracer the process's. Runs before the component
/// builds its routers, which pick the tracer up once.
fn start_export(
    config: Option<ExportConfig>,
    instance: String,
    shutdown: &CancellationToken,
) -> Option<Exporter> {
    let config = ExportConfig {
        instance,
        ..config?
    };
    tracing::info!(endpoint = %config.endpoint, service = %config.service_name, "exporting traces over OTLP");
    let (tracer, exporter) = otlp::start(config, shutdown.clone());
    otlp::install(tracer);
    Some(exporter)
}

/// Sends the spans of the last (drained) requests before the process exits.
async fn finish_export(exporter: Option<Exporter>) {
    if let Some(exporter) = exporter {
        exporter.finish().await;
    }
}

/// `breakwater registry`.
pub async fn registry(args: RegistryArgs) -> anyhow::Result<()> {
    let choice = match args.redis {
        Some(url) => {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(UsageError(format!("--redis {url:?}: expected a redis:// URL")).into());
            }
            StoreChoice::Redis {
                url,
                prefix: args.redis_prefix,
            }
        }
        None => StoreChoice::Memory,
    };
    let store = match choice {
        StoreChoice::Memory => "memory",
        StoreChoice::Redis { .. } => "redis",
    };
    let otlp = otlp_config(breakwater_registry::server::REGISTRY_COMPONENT)?;
    let shutdown = shutdown_token()?;
    let listener = bind(&args.listen).await?;
    let port = port_of(&listener)?;
    tracing::info!(port, store, "registry listening");
    let exporter = start_export(otlp, format!("registry-{port}"), &shutdown);
    let served = breakwater_registry::server::run_with(listener, choice, shutdown)
        .await
        .context("registry server");
    finish_export(exporter).await;
    served
}

/// `breakwater gateway`.
pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let registry = args.discovery.registry.trim_end_matches('/').to_owned();
    check_url("--registry", &registry)?;
    let mut config = breakwater_gateway::GatewayConfig::new(args.listen.port, registry.clone());
    config.registry_dashboard_url = args
        .registry_dashboard
        .unwrap_or_else(|| format!("{registry}/"));
    config.heartbeat_interval_secs = args.discovery.heartbeat_interval;
    config.advertise_host = args.discovery.advertise_host;
    config.try_timeout = args.try_timeout;
    config.config_path = args.config;
    config.admin_token = args.admin_token;
    if let Some(url) = &args.control_url {
        check_url("--control-url", url)?;
    }
    config.control_url = args
        .control_url
        .map(|url| url.trim_end_matches('/').to_owned());
    if let Some(url) = &args.redis
        && !(url.starts_with("redis://") || url.starts_with("rediss://"))
    {
        return Err(UsageError(format!("--redis {url:?}: expected a redis:// URL")).into());
    }
    config.redis_url = args.redis;
    config.redis_prefix = args.redis_prefix;
    config.redis_timeout = args.redis_timeout;
    // Refuse a bad config file before taking the port.
    config
        .validate()
        .map_err(|e| UsageError(format!("--config: {e}")))?;
    config
        .load_file()
        .map_err(|e| UsageError(format!("--config: {e}")))?;

    let otlp = otlp_config("api-gateway")?;
    let shutdown = shutdown_token()?;
    let listener = bind(&args.listen).await?;
    let port = port_of(&listener)?;
    config.port = port;
    config.instance = format!("api-gateway-{port}");
    let exporter = start_export(otlp, config.instance.clone(), &shutdown);
    let served = breakwater_gateway::run(listener, config, shutdown).await;
    finish_export(exporter).await;
    match served {
        Ok(()) => Ok(()),
        Err(breakwater_gateway::RunError::Config(e)) => {
            Err(UsageError(format!("--config: {e}")).into())
        }
        Err(breakwater_gateway::RunError::Io(e)) => {
            Err(anyhow::Error::new(e).context("gateway server"))
        }
    }
}

/// `breakwater service <name>`.
pub async fn service(args: ServiceArgs) -> anyhow::Result<()> {
    let (kind, common, options) = service_options(args.service)?;
    let port = match (common.port, kind) {
        (Some(port), _) => port,
        // Seed 004's analytics honours PORT.
        (None, ServiceKind::Analytics) => breakwater_services::analytics::port_from_env()
            .map_err(|e| UsageError(e.to_string()))?
            .unwrap_or_else(|| default_port(kind)),
        (None, _) => default_port(kind),
    };
    let otlp = otlp_config(kind.service_name())?;
    let shutdown = shutdown_token()?;
    let listener = bind(&Listen {
        port,
        bind: common.bind,
    })
    .await?;
    let port = port_of(&listener)?;
    // The instance id the service registers under (`services::run` makes the same).
    let exporter = start_export(otlp, format!("{}-{port}", kind.service_name()), &shutdown);
    let registry = common.discovery.registry.trim_end_matches('/').to_owned();
    check_url("--registry", &registry)?;
    let config = breakwater_services::ServiceConfig {
        port,
        host: common.discovery.advertise_host,
        registry_url: registry,
        data_dir: common.data_dir.unwrap_or_else(default_data_dir),
        heartbeat_interval_secs: common.discovery.heartbeat_interval,
        options,
    };
    let served = breakwater_services::run(kind, listener, config, shutdown).await;
    finish_export(exporter).await;
    match served {
        Err(ServiceError::Setting(e)) => Err(UsageError(e.to_string()).into()),
        other => other.context("service"),
    }
}

/// The contract port of each service (CONTRACTS.md "Default ports").
fn default_port(kind: ServiceKind) -> u16 {
    match kind {
        ServiceKind::Users => 4000,
        ServiceKind::Orders => 5000,
        ServiceKind::Analytics => 6000,
        ServiceKind::Data => 7000,
        ServiceKind::Unstable => 9000,
    }
}

/// Flags (and, for analytics, the seed's environment variables) to validated settings.
fn service_options(
    command: ServiceCommand,
) -> Result<(ServiceKind, ServiceCommon, ServiceOptions), UsageError> {
    let mut options = ServiceOptions::default();
    let (kind, common) = match command {
        ServiceCommand::Users(p) => (ServiceKind::Users, publisher(&mut options, p)?),
        ServiceCommand::Orders(p) => (ServiceKind::Orders, publisher(&mut options, p)?),
        ServiceCommand::Analytics(a) => {
            options.analytics = AnalyticsSettings::from_env_and(&AnalyticsOverrides {
                rate_limit_window: a.rate_limit_window,
                rate_limit_max: a.rate_limit_max,
                circuit_failure_threshold: a.circuit_failure_threshold,
                circuit_reset_timeout: a.circuit_reset_timeout,
                external: a.external,
                external_timeout: a.external_timeout,
                summary_ttl: a.summary_ttl,
                redis_url: a.redis,
                redis_prefix: a.redis_prefix,
            })
            .map_err(|e| UsageError(e.to_string()))?;
            // The consumer reads the streams in the Redis analytics already uses.
            options.events = EventSettings {
                redis_url: options.analytics.redis_url.clone(),
                prefix: a.events_prefix,
                token: events_token(a.events_token.as_deref())?,
            };
            (ServiceKind::Analytics, a.common)
        }
        ServiceCommand::Data(d) => {
            options.data = DataSettings {
                shards: d.shards,
                external: d.external,
                try_timeout: d.try_timeout,
                max_attempts: d.max_attempts,
                backoff_base: d.backoff_base,
                backoff_max: d.backoff_max,
                redis_urls: d.redis,
                redis_cluster: d.redis_cluster,
                redis_prefix: d.redis_prefix,
            };
            (ServiceKind::Data, d.common)
        }
        ServiceCommand::Unstable(u) => {
            options.unstable = UnstableSettings {
                failure_rate: u.failure_rate,
                delay_rate: u.delay_rate,
                delay: u.delay,
                seed: u.seed,
                stress_iterations: u.stress_iterations,
                ..UnstableSettings::default()
            };
            (ServiceKind::Unstable, u.common)
        }
    };
    if matches!(
        kind,
        ServiceKind::Users | ServiceKind::Orders | ServiceKind::Analytics
    ) {
        options.database_url = common.database.clone();
    }
    options
        .validate(kind)
        .map_err(|e| UsageError(e.to_string()))?;
    Ok((kind, common, options))
}

/// Where a users or orders instance publishes its events; returns its common flags.
fn publisher(
    options: &mut ServiceOptions,
    args: PublisherArgs,
) -> Result<ServiceCommon, UsageError> {
    options.events = EventSettings {
        redis_url: args.redis,
        prefix: args.events_prefix,
        token: events_token(args.events_token.as_deref())?,
    };
    Ok(args.common)
}

/// `--events-token` (or `BREAKWATER_EVENTS_TOKEN`) checked; the error never shows it.
fn events_token(token: Option<&str>) -> Result<Option<EventsToken>, UsageError> {
    token
        .map(|t| EventsToken::new(t).map_err(|e| UsageError(format!("--events-token: {e}"))))
        .transpose()
}

fn check_url(flag: &str, url: &str) -> Result<(), UsageError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        UsageError(format!(
            "{flag} {url:?}: expected an http:// URL such as http://127.0.0.1:3000"
        ))
    })?;
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(UsageError(format!(
            "{flag} {url:?}: missing or malformed host"
        )));
    }
    Ok(())
}

/// `$XDG_DATA_HOME/breakwater`, else `~/.local/share/breakwater`, else `./breakwater-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("breakwater");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/breakwater");
    }
    PathBuf::from("breakwater-data")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options_of(argv: &[&str]) -> Result<ServiceOptions, UsageError> {
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(argv).unwrap();
        let crate::cli::Command::Service(args) = cli.command else {
            panic!("not a service")
        };
        service_options(args.service).map(|(_, _, options)| options)
    }

    #[test]
    fn the_events_token_reaches_senders_and_analytics_and_is_checked() {
        let token = EventsToken::new("shared-secret").unwrap();
        for kind in ["users", "orders", "analytics"] {
            let options = options_of(&[
                "breakwater",
                "service",
                kind,
                "--events-token",
                "shared-secret",
            ])
            .unwrap();
            assert_eq!(options.events.token.as_ref(), Some(&token), "{kind}");
        }
        let err = options_of(&["breakwater", "service", "orders", "--events-token", "a b"])
            .unwrap_err()
            .0;
        assert!(err.starts_with("--events-token:"), "{err}");
        assert!(!err.contains("a b"), "the value is not echoed: {err}");
    }

    #[test]
    fn registry_url_must_be_http() {
        assert!(check_url("--registry", "http://127.0.0.1:3000").is_ok());
        assert!(check_url("--registry", "127.0.0.1:3000").is_err());
        assert!(check_url("--registry", "http://").is_err());
    }
}
