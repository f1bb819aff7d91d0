//! Running one component per process: bind, wire the shutdown token, call the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use breakwater_runtime::CancellationToken;
use tokio::net::TcpListener;

use crate::cli::{GatewayArgs, Listen, RegistryArgs, ServiceArgs, ServiceName};

/// A flag or configuration value that cannot work; exits with code 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Environment variable `breakwater up` sets on its children: they stop when their
/// stdin (a pipe from the supervisor) closes, so no child outlives a killed supervisor.
pub const SUPERVISED_ENV: &str = "BREAKWATER_SUPERVISED";

fn shutdown_token() -> anyhow::Result<CancellationToken> {
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

/// `breakwater registry`.
pub async fn registry(args: RegistryArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_token()?;
    let listener = bind(&args.listen).await?;
    tracing::info!(port = port_of(&listener)?, "registry listening");
    breakwater_registry::server::run(listener, shutdown)
        .await
        .context("registry server")
}

/// `breakwater gateway`.
pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_token()?;
    let listener = bind(&args.listen).await?;
    let port = port_of(&listener)?;
    let registry = args.discovery.registry.trim_end_matches('/').to_owned();
    check_url("--registry", &registry)?;
    let config = breakwater_gateway::GatewayConfig {
        port,
        registry_dashboard_url: args
            .registry_dashboard
            .unwrap_or_else(|| format!("{registry}/")),
        registry_url: registry,
        instance: format!("api-gateway-{port}"),
        heartbeat_interval_secs: args.discovery.heartbeat_interval,
        try_timeout: args.try_timeout,
    };
    tracing::info!(port, "gateway listening");
    breakwater_gateway::run(listener, config, shutdown)
        .await
        .context("gateway server")
}

/// `breakwater service <name>`.
pub async fn service(args: ServiceArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_token()?;
    let listener = bind(&args.listen).await?;
    let port = port_of(&listener)?;
    let registry = args.discovery.registry.trim_end_matches('/').to_owned();
    check_url("--registry", &registry)?;
    let kind = match args.name {
        ServiceName::Users => breakwater_services::ServiceKind::Users,
        ServiceName::Orders => breakwater_services::ServiceKind::Orders,
    };
    let config = breakwater_services::ServiceConfig {
        port,
        host: args.discovery.advertise_host,
        registry_url: registry,
        data_dir: args.data_dir.unwrap_or_else(default_data_dir),
        heartbeat_interval_secs: args.discovery.heartbeat_interval,
    };
    breakwater_services::run(kind, listener, config, shutdown)
        .await
        .context("service")
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

    #[test]
    fn registry_url_must_be_http() {
        assert!(check_url("--registry", "http://127.0.0.1:3000").is_ok());
        assert!(check_url("--registry", "127.0.0.1:3000").is_err());
        assert!(check_url("--registry", "http://").is_err());
    }
}
