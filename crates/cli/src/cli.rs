//! The command line: every flag the `breakwater` binary takes.

use std::net::IpAddr;
use std::path::PathBuf;

use breakwater_runtime::telemetry::LogFormat;
use clap::{Args, Parser, Subcommand};

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
    /// Load-test an HTTP endpoint (autocannon-style; seed 001's stress test).
    Bench(crate::loadgen::BenchArgs),
    /// Run the learning and failure scenarios against a system (`list` names them).
    Scenario(crate::scenario::ScenarioArgs),
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
    /// Keep the registry's state in Redis (redis://host:port/db), so that several
    /// registry replicas serve the same instances. Default: in memory.
    #[arg(long, env = "REDIS_URL")]
    pub redis: Option<String>,
    /// Key prefix in Redis (replicas that share it share state).
    #[arg(long, default_value = "breakwater:registry")]
    pub redis_prefix: String,
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
    /// Routes and policies file (default: the embedded breakwater.toml). Re-read on
    /// SIGHUP and on `POST /admin/reload`.
    #[arg(long, env = "BREAKWATER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Per-try timeout for upstream calls (e.g. 10s, 500ms); replaces the config file's
    /// `[defaults.timeout] per_try`.
    #[arg(long, value_parser = humantime_duration)]
    pub try_timeout: Option<std::time::Duration>,
    /// Bearer token for `/admin` (required there unless the gateway listens on loopback).
    #[arg(long, env = "BREAKWATER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// URL of the registry dashboard the gateway dashboard links to (default: the
    /// registry URL).
    #[arg(long)]
    pub registry_dashboard: Option<String>,
    /// Base URL of `breakwater up`'s control API, served under `/admin/control` (so the
    /// dashboard can stop, start and kill processes). `up` sets it.
    #[arg(long)]
    pub control_url: Option<String>,
    /// Redis (redis://host:port/db) for rate limits shared by every gateway and a shared
    /// second level of the response cache. Default: both local.
    #[arg(long, env = "REDIS_URL")]
    pub redis: Option<String>,
    /// Key prefix in Redis (gateways that share it share limits and cached responses).
    #[arg(long, default_value = "breakwater:gateway")]
    pub redis_prefix: String,
    /// Bound on one Redis call of a request (past it the gateway decides without Redis).
    #[arg(long, default_value = "100ms", value_parser = humantime_duration)]
    pub redis_timeout: std::time::Duration,
}

/// `breakwater service <name>`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    #[command(subcommand)]
    pub service: ServiceCommand,
}

/// Which service to run, with its own settings.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// The users service (CRUD over users; default port 4000).
    Users(PublisherArgs),
    /// The orders service (orders by user, create; default port 5000).
    Orders(PublisherArgs),
    /// The analytics service (seed 004: metrics, summary cache, rate limit, breaker;
    /// default port 6000, or $PORT).
    Analytics(AnalyticsArgs),
    /// The data service (seed 000: retries, fallback, sharded store; default port 7000).
    Data(DataArgs),
    /// The unstable external dependency (fails and stalls on purpose; default port 9000).
    Unstable(UnstableArgs),
}

/// What every service takes.
#[derive(Debug, Args, Clone)]
pub struct ServiceCommon {
    /// Port to listen on (0 picks a free one; default: the service's contract port).
    #[arg(long)]
    pub port: Option<u16>,
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,
    #[command(flatten)]
    pub discovery: Discovery,
    /// Directory for the service's database files.
    #[arg(long, env = "BREAKWATER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL for users, orders and analytics (postgres://...), instead of the
    /// SQLite file.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database: Option<String>,
}

/// `breakwater service users|orders`: services whose changes emit events.
#[derive(Debug, Args)]
pub struct PublisherArgs {
    #[command(flatten)]
    pub common: ServiceCommon,
    /// Publish events to Redis Streams (`<events-prefix>:events:<type>`) instead of
    /// POSTing them to their consumer found through discovery.
    #[arg(long, env = "REDIS_URL")]
    pub redis: Option<String>,
    /// Start of the event streams' keys (publishers and consumers must agree).
    #[arg(long, default_value = "breakwater")]
    pub events_prefix: String,
    /// Secret sent as `Authorization: Bearer` with every event POSTed to its consumer
    /// (analytics' --events-token). Prefer the environment variable: argv shows in `ps`.
    #[arg(long, env = "BREAKWATER_EVENTS_TOKEN", hide_env_values = true)]
    pub events_token: Option<String>,
}

/// `breakwater service analytics`. Flags override the seed's environment variables
/// (RATE_LIMIT_WINDOW, RATE_LIMIT_MAX, CIRCUIT_FAILURE_THRESHOLD, CIRCUIT_RESET_TIMEOUT).
#[derive(Debug, Args)]
pub struct AnalyticsArgs {
    #[command(flatten)]
    pub common: ServiceCommon,
    /// Rate-limit window (overrides RATE_LIMIT_WINDOW, in seconds there).
    #[arg(long, value_parser = humantime_duration)]
    pub rate_limit_window: Option<std::time::Duration>,
    /// Requests per client IP per window (overrides RATE_LIMIT_MAX).
    #[arg(long)]
    pub rate_limit_max: Option<u32>,
    /// Consecutive failures that open the breaker (overrides CIRCUIT_FAILURE_THRESHOLD).
    #[arg(long)]
    pub circuit_failure_threshold: Option<u32>,
    /// Time the breaker stays open before one trial (overrides CIRCUIT_RESET_TIMEOUT).
    #[arg(long, value_parser = humantime_duration)]
    pub circuit_reset_timeout: Option<std::time::Duration>,
    /// Base URL of the external dependency (default: unstable-service via discovery).
    #[arg(long)]
    pub external: Option<String>,
    /// Timeout of one external call.
    #[arg(long, value_parser = humantime_duration)]
    pub external_timeout: Option<std::time::Duration>,
    /// Time a summary stays cached (0s turns the cache off).
    #[arg(long, value_parser = humantime_duration)]
    pub summary_ttl: Option<std::time::Duration>,
    /// Redis for the rate limit (shared by every instance) and the summary cache
    /// (overrides REDIS_URL).
    #[arg(long)]
    pub redis: Option<String>,
    /// Key prefix in Redis.
    #[arg(long)]
    pub redis_prefix: Option<String>,
    /// Start of the event streams' keys: with Redis, analytics consumes
    /// `<events-prefix>:events:order.created` with a consumer group.
    #[arg(long, default_value = "breakwater")]
    pub events_prefix: String,
    /// Secret `POST /events` requires as `Authorization: Bearer` (the publishers'
    /// --events-token); without it events are accepted from any caller. Prefer the
    /// environment variable: argv shows in `ps`.
    #[arg(long, env = "BREAKWATER_EVENTS_TOKEN", hide_env_values = true)]
    pub events_token: Option<String>,
}

/// `breakwater service data`.
#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(flatten)]
    pub common: ServiceCommon,
    /// Number of store shards (2..=64). Changing it moves keys: keep it fixed per data dir.
    #[arg(long, default_value_t = 4)]
    pub shards: u32,
    /// Base URL of the external dependency (default: unstable-service via discovery).
    #[arg(long)]
    pub external: Option<String>,
    /// Timeout of one try.
    #[arg(long, default_value = "2s", value_parser = humantime_duration)]
    pub try_timeout: std::time::Duration,
    /// Tries before the fallback (1..=10).
    #[arg(long, default_value_t = 4)]
    pub max_attempts: u32,
    /// First backoff ceiling (full jitter, doubling).
    #[arg(long, default_value = "100ms", value_parser = humantime_duration)]
    pub backoff_base: std::time::Duration,
    /// Largest backoff ceiling.
    #[arg(long, default_value = "1s", value_parser = humantime_duration)]
    pub backoff_max: std::time::Duration,
    /// Keep records in Redis: one URL (then --shards logical shards on it) or one URL per
    /// shard (comma-separated or repeated). Default: SQLite shard files.
    #[arg(long = "redis", env = "REDIS_URL", value_delimiter = ',')]
    pub redis: Vec<String>,
    /// Keep records in one Redis Cluster instead: the URL of one or more of its nodes
    /// (comma-separated or repeated), holding --shards logical shards, each in one slot.
    #[arg(long, value_delimiter = ',')]
    pub redis_cluster: Vec<String>,
    /// Key prefix in Redis.
    #[arg(long, default_value = "breakwater:data")]
    pub redis_prefix: String,
}

/// `breakwater service unstable`.
#[derive(Debug, Args)]
pub struct UnstableArgs {
    #[command(flatten)]
    pub common: ServiceCommon,
    /// Probability that `GET /data` fails with a 500 (0..=1).
    #[arg(long, default_value_t = 0.3)]
    pub failure_rate: f64,
    /// Probability that `GET /data` stalls before answering (0..=1).
    #[arg(long, default_value_t = 0.3)]
    pub delay_rate: f64,
    /// How long a stall lasts (at most 60s).
    #[arg(long, default_value = "3s", value_parser = humantime_duration)]
    pub delay: std::time::Duration,
    /// Seed for a reproducible failure/stall sequence.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Default size of the `/stress-test` busy loop (iterations).
    #[arg(long, default_value_t = 10_000_000)]
    pub stress_iterations: u64,
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
    /// First analytics port.
    #[arg(long, default_value_t = 6000)]
    pub analytics_port: u16,
    /// Number of analytics instances (0 leaves it out).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=64))]
    pub analytics: u16,
    /// First data port.
    #[arg(long, default_value_t = 7000)]
    pub data_port: u16,
    /// Number of data instances (0 leaves it out).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(0..=64))]
    pub data: u16,
    /// Unstable (the fault-injecting external dependency) port.
    #[arg(long, default_value_t = 9000)]
    pub unstable_port: u16,
    /// Port of `up`'s control API (stop, start or kill a process; set unstable's chaos),
    /// on the --bind address.
    #[arg(long, default_value_t = 8001)]
    pub control_port: u16,
    /// Number of unstable instances (0 leaves it out).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=64))]
    pub unstable: u16,
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
    /// Shared state in Redis (redis://host:port/db): the registry's instances, the
    /// gateway's rate limits and response cache, analytics' rate limit and summary
    /// cache, the data service's records.
    #[arg(long)]
    pub redis: Option<String>,
    /// Key prefix in Redis: each component gets `<prefix>:<component>` (registry,
    /// gateway, analytics, data), so systems with different prefixes share one Redis.
    #[arg(long, default_value = "breakwater")]
    pub redis_prefix: String,
    /// Keep the data service's records in this Redis Cluster (node URLs, comma-separated)
    /// instead of `--redis` or the SQLite shard files.
    #[arg(long, value_delimiter = ',')]
    pub redis_cluster: Vec<String>,
    /// PostgreSQL for users, orders and analytics (postgres://user@host/db) instead of
    /// SQLite.
    #[arg(long)]
    pub database: Option<String>,
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
        assert_eq!(
            (up.analytics_port, up.data_port, up.unstable_port),
            (6000, 7000, 9000)
        );
        assert_eq!((up.analytics, up.data, up.unstable), (1, 2, 1));
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(Cli::try_parse_from(["breakwater", "up", "--users", "0"]).is_err());
        assert!(Cli::try_parse_from(["breakwater", "registry", "--port", "70000"]).is_err());
        assert!(Cli::try_parse_from(["breakwater", "service", "nope", "--port", "1"]).is_err());
        assert!(Cli::try_parse_from(["breakwater", "service", "data", "--shards", "x"]).is_err());
    }
}
