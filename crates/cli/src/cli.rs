//! The command line: every flag the `breakwater` binary takes.

use std::net::IpAddr;
use std::path::PathBuf;

use breakwater_runtime::telemetry::LogFormat;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// A resilient microservice system in one binary.
#[derive(Debug, Parser)]
#[command(name = "breakwater", version, about, propagate_version = true)]
pub struct Cli {
    /// Log line format.
    #[arg(long, global = true, default_value = "pretty", value_parser = parse_log_format)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
}

/// What to run.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole system on this machine: registry, services, gateway.
    Up(UpArgs),
    /// Run the service registry (service discovery server).
    Registry(RegistryArgs),
    /// Run the API gateway.
    Gateway(GatewayArgs),
    /// Run one instance of a service.
    Service(ServiceArgs),
}

/// Where a component listens.
#[derive(Debug, Args, Clone)]
pub struct Listen {
    /// Port to listen on (0 picks a free one).
    #[arg(long)]
    pub port: u16,
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,
}

/// `breakwater registry`.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    #[command(flatten)]
    pub listen: Listen,
}

/// How a component finds and joins the registry.
#[derive(Debug, Args, Clone)]
pub struct Discovery {
    /// Base URL of the service registry.
    #[arg(long, env = "REGISTRY_URL", default_value = "http://127.0.0.1:3000")]
    pub registry: String,
    /// Seconds between heartbeats to the registry (the registry drops an instance after
    /// 1.5 intervals without one).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_interval: u64,
    /// Host to advertise in the registry (default: the address the registry sees).
    #[arg(long)]
    pub advertise_host: Option<String>,
}

/// `breakwater gateway`.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub listen: Listen,
    #[command(flatten)]
    pub discovery: Discovery,
    /// Per-try timeout for upstream calls (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = humantime_duration)]
    pub try_timeout: std::time::Duration,
    /// URL of the registry dashboard the gateway dashboard links to (default: the
    /// registry URL).
    #[arg(long)]
    pub registry_dashboard: Option<String>,
}

/// Which service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServiceName {
    Users,
    Orders,
}

/// `breakwater service <name>`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// The service to run.
    pub name: ServiceName,
    #[command(flatten)]
    pub listen: Listen,
    #[command(flatten)]
    pub discovery: Discovery,
    /// Directory for the service's database file.
    #[arg(long, env = "BREAKWATER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

/// `breakwater up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Registry port (0 picks a free one; a taken port moves to a free one).
    #[arg(long, default_value_t = 3000)]
    pub registry_port: u16,
    /// Gateway port.
    #[arg(long, default_value_t = 8000)]
    pub gateway_port: u16,
    /// First users port; instance i listens on this + i.
    #[arg(long, default_value_t = 4000)]
    pub users_port: u16,
    /// Number of users instances.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub users: u16,
    /// First orders port; instance i listens on this + i.
    #[arg(long, default_value_t = 5000)]
    pub orders_port: u16,
    /// Number of orders instances.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub orders: u16,
    /// Address every component binds and advertises.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Seconds between heartbeats to the registry.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_interval: u64,
    /// Directory for databases and the `up.json` state file (default:
    /// $XDG_DATA_HOME/breakwater or ~/.local/share/breakwater).
    #[arg(long, env = "BREAKWATER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// How long to wait for each component to become ready.
    #[arg(long, default_value = "60s", value_parser = humantime_duration)]
    pub ready_timeout: std::time::Duration,
}

fn humantime_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 10s, 500ms, 1m)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn up_defaults_match_the_contract_ports() {
        let cli = Cli::try_parse_from(["breakwater", "up"]).unwrap();
        let Command::Up(up) = cli.command else {
            panic!("not up")
        };
        assert_eq!(
            (
                up.registry_port,
                up.gateway_port,
                up.users_port,
                up.orders_port
            ),
            (3000, 8000, 4000, 5000)
        );
        assert_eq!((up.users, up.orders), (3, 3));
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(Cli::try_parse_from(["breakwater", "up", "--users", "0"]).is_err());
        assert!(Cli::try_parse_from(["breakwater", "registry", "--port", "70000"]).is_err());
        assert!(Cli::try_parse_from(["breakwater", "service", "nope", "--port", "1"]).is_err());
    }
}
