//! Which processes `up` runs, with which arguments, on which ports.

use std::collections::HashSet;
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;

use breakwater_runtime::telemetry::LogFormat;
use breakwater_services::outbox::EVENTS_TOKEN_ENV;

use crate::cli::UpArgs;
use crate::component::UsageError;

/// A component's role, which fixes its place in the start and stop order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Registry,
    Service,
    Gateway,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registry => "registry",
            Self::Service => "service",
            Self::Gateway => "gateway",
        }
    }
}

/// Everything needed to start (and restart) one child process. Its `Debug` names the
/// environment variables but not their values (they may be secrets).
#[derive(Clone)]
pub struct ChildSpec {
    /// Display name, unique: `registry`, `users-1`, `orders-3`, `gateway`.
    pub name: String,
    pub role: Role,
    pub port: u16,
    /// Host to reach it on (the bind address, or loopback for a wildcard bind).
    pub host: IpAddr,
    /// Service name in the registry, for roles that register.
    pub registry_name: Option<&'static str>,
    /// Arguments after the executable.
    pub args: Vec<OsString>,
    /// Environment variables set for it: secrets go here rather than in `args`,
    /// which any local user can read with `ps`.
    pub env: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env: Vec<String> = self
            .env
            .iter()
            .map(|(name, _)| format!("{name}=<hidden>"))
            .collect();
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("port", &self.port)
            .field("host", &self.host)
            .field("registry_name", &self.registry_name)
            .field("args", &self.args)
            .field("env", &env)
            .finish()
    }
}

impl ChildSpec {
    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}", SocketAddr::new(self.host, self.port))
    }
}

/// The whole system's processes.
#[derive(Debug)]
pub struct Plan {
    pub children: Vec<ChildSpec>,
    pub registry_url: String,
    pub gateway_url: String,
    /// Where `up`'s control API listens (on the bind address).
    pub control: SocketAddr,
    /// `http://host:port` of the control API, as the gateway reaches it.
    pub control_url: String,
    /// Things the user should hear about, such as a port that moved.
    pub notes: Vec<String>,
}

impl Plan {
    pub fn new(args: &UpArgs, data_dir: &Path, log_format: LogFormat) -> Result<Self, UsageError> {
        let host = if args.bind.is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            args.bind
        };
        let mut ports = PortPicker {
            bind: args.bind,
            taken: HashSet::new(),
            notes: Vec::new(),
        };
        let log = match log_format {
            LogFormat::Pretty => "pretty",
            LogFormat::Json => "json",
        };
        let bind = args.bind.to_string();
        let common = |sub: &[&str], port: u16| -> Vec<OsString> {
            let mut v: Vec<OsString> = vec!["--log-format".into(), log.into()];
            v.extend(sub.iter().map(OsString::from));
            v.extend([
                "--port".into(),
                port.to_string().into(),
                "--bind".into(),
                bind.clone().into(),
            ]);
            v
        };

        // One per run: the publishers' relays send it, analytics' `POST /events` requires
        // it, so nothing else that reaches analytics can inject events.
        let events_token: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();

        let registry_port = ports.pick("--registry-port", args.registry_port)?;
        let registry_url = format!("http://{}", SocketAddr::new(host, registry_port));
        let control_port = ports.pick("--control-port", args.control_port)?;
        let control_url = format!("http://{}", SocketAddr::new(host, control_port));
        let discovery = |v: &mut Vec<OsString>| {
            v.extend([
                "--registry".into(),
                registry_url.clone().into(),
                "--heartbeat-interval".into(),
                args.heartbeat_interval.to_string().into(),
                "--advertise-host".into(),
                host.to_string().into(),
            ]);
        };

        // `--redis URL --redis-prefix <prefix>:<component>` for a component that keeps
        // state in Redis, when `up` has Redis.
        let redis = |v: &mut Vec<OsString>, component: &str| {
            if let Some(url) = &args.redis {
                v.extend([
                    "--redis".into(),
                    url.into(),
                    "--redis-prefix".into(),
                    format!("{}:{component}", args.redis_prefix).into(),
                ]);
            }
        };

        let mut children = vec![ChildSpec {
            name: "registry".into(),
            role: Role::Registry,
            port: registry_port,
            host,
            registry_name: None,
            args: {
                let mut a = common(&["registry"], registry_port);
                redis(&mut a, "registry");
                a
            },
            env: Vec::new(),
        }];
        // Unstable first: data and analytics depend on it (they find it lazily, so this
        // only makes the start quieter).
        let services = [
            (
                "unstable",
                args.unstable_port,
                args.unstable,
                "unstable-service",
                "--unstable-port",
            ),
            (
                "users",
                args.users_port,
                args.users,
                "user-service",
                "--users-port",
            ),
            (
                "orders",
                args.orders_port,
                args.orders,
                "order-service",
                "--orders-port",
            ),
            (
                "analytics",
                args.analytics_port,
                args.analytics,
                "analytics-service",
                "--analytics-port",
            ),
            (
                "data",
                args.data_port,
                args.data,
                "data-service",
                "--data-port",
            ),
        ];
        for (label, base, count, registry_name, flag) in services {
            for i in 0..count {
                let wanted = if base == 0 {
                    0
                } else {
                    base.checked_add(i).ok_or_else(|| {
                        UsageError(format!(
                            "{flag} {base}: {count} instances do not fit below port 65536"
                        ))
                    })?
                };
                let port = ports.pick(flag, wanted)?;
                let mut a = common(&["service", label], port);
                discovery(&mut a);
                a.extend(["--data-dir".into(), data_dir.as_os_str().to_owned()]);
                if label == "data" && !args.redis_cluster.is_empty() {
                    a.extend([
                        "--redis-cluster".into(),
                        args.redis_cluster.join(",").into(),
                        "--redis-prefix".into(),
                        format!("{}:data", args.redis_prefix).into(),
                    ]);
                } else if matches!(label, "analytics" | "data") {
                    redis(&mut a, label);
                }
                // Events over Redis Streams: users and orders publish, analytics consumes,
                // all under one prefix.
                if let Some(url) = &args.redis
                    && matches!(label, "users" | "orders" | "analytics")
                {
                    if label != "analytics" {
                        a.extend(["--redis".into(), url.into()]);
                    }
                    a.extend(["--events-prefix".into(), args.redis_prefix.clone().into()]);
                }
                if let Some(url) = args
                    .database
                    .as_ref()
                    .filter(|_| matches!(label, "users" | "orders" | "analytics"))
                {
                    a.extend(["--database".into(), url.into()]);
                }
                let env = if matches!(label, "users" | "orders" | "analytics") {
                    vec![(EVENTS_TOKEN_ENV, events_token.clone())]
                } else {
                    Vec::new()
                };
                children.push(ChildSpec {
                    name: format!("{label}-{}", i + 1),
                    role: Role::Service,
                    port,
                    host,
                    registry_name: Some(registry_name),
                    args: a,
                    env,
                });
            }
        }
        let gateway_port = ports.pick("--gateway-port", args.gateway_port)?;
        let mut a = common(&["gateway"], gateway_port);
        discovery(&mut a);
        redis(&mut a, "gateway");
        a.extend([
            "--registry-dashboard".into(),
            format!("{registry_url}/").into(),
            "--control-url".into(),
            control_url.clone().into(),
        ]);
        children.push(ChildSpec {
            name: "gateway".into(),
            role: Role::Gateway,
            port: gateway_port,
            host,
            registry_name: Some("api-gateway"),
            args: a,
            env: Vec::new(),
        });
        let gateway_url = format!("http://{}", SocketAddr::new(host, gateway_port));
        Ok(Self {
            children,
            registry_url,
            gateway_url,
            control: SocketAddr::new(args.bind, control_port),
            control_url,
            notes: ports.notes,
        })
    }
}

/// Chooses ports: the wanted one when it is free, else a free one from the OS.
struct PortPicker {
    bind: IpAddr,
    taken: HashSet<u16>,
    notes: Vec<String>,
}

impl PortPicker {
    fn pick(&mut self, flag: &str, wanted: u16) -> Result<u16, UsageError> {
        if wanted != 0 && !self.taken.contains(&wanted) && self.free(wanted) {
            self.taken.insert(wanted);
            return Ok(wanted);
        }
        // The OS hands out a free ephemeral port; retry if it collides with one we chose.
        for _ in 0..32 {
            let port = TcpListener::bind(SocketAddr::new(self.bind, 0))
                .and_then(|l| l.local_addr())
                .map_err(|e| UsageError(format!("--bind {}: cannot bind: {e}", self.bind)))?
                .port();
            if self.taken.insert(port) {
                if wanted != 0 {
                    self.notes
                        .push(format!("{flag}: port {wanted} is taken; using {port}"));
                }
                return Ok(port);
            }
        }
        Err(UsageError(format!("{flag}: no free port found")))
    }

    fn free(&self, port: u16) -> bool {
        TcpListener::bind(SocketAddr::new(self.bind, port)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `up` with every port free (0) unless `args` says otherwise.
    fn up(args: &[&str]) -> UpArgs {
        let mut v = vec!["breakwater", "up"];
        for flag in [
            "--registry-port",
            "--gateway-port",
            "--users-port",
            "--orders-port",
            "--analytics-port",
            "--data-port",
            "--unstable-port",
            "--control-port",
        ] {
            if !args.contains(&flag) {
                v.extend([flag, "0"]);
            }
        }
        v.extend(args);
        match crate::cli::Cli::try_parse_from(v).unwrap().command {
            crate::cli::Command::Up(u) => u,
            _ => unreachable!(),
        }
    }

    #[test]
    fn plan_has_every_component_in_start_order() {
        let args = up(&[
            "--users",
            "2",
            "--orders",
            "1",
            "--analytics",
            "1",
            "--data",
            "1",
            "--unstable",
            "0",
        ]);
        let plan = Plan::new(&args, Path::new("/tmp/x"), LogFormat::Pretty).unwrap();
        let names: Vec<_> = plan.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "registry",
                "users-1",
                "users-2",
                "orders-1",
                "analytics-1",
                "data-1",
                "gateway"
            ]
        );
        let mut ports: HashSet<_> = plan.children.iter().map(|c| c.port).collect();
        assert!(
            ports.insert(plan.control.port()),
            "the control port is another one"
        );
        assert_eq!(ports.len(), 8, "ports are distinct");
        let gateway = plan.children.last().unwrap();
        let passed = gateway
            .args
            .windows(2)
            .find(|w| w[0] == "--control-url")
            .map(|w| w[1].clone());
        assert_eq!(passed, Some(plan.control_url.clone().into()));
        assert!(plan.notes.is_empty());
    }

    #[test]
    fn database_and_redis_reach_only_the_services_that_use_them() {
        let args = up(&[
            "--database",
            "postgres://pg@db/test",
            "--redis",
            "redis://cache:6379",
            "--users",
            "1",
            "--orders",
            "1",
            "--analytics",
            "1",
            "--data",
            "1",
            "--unstable",
            "1",
        ]);
        let plan = Plan::new(&args, Path::new("/tmp/x"), LogFormat::Pretty).unwrap();
        let passes = |child: &ChildSpec, flag: &str| child.args.iter().any(|a| a == flag);
        for child in &plan.children {
            let kind = child.name.split('-').next().unwrap();
            assert_eq!(
                passes(child, "--database"),
                matches!(kind, "users" | "orders" | "analytics"),
                "{}",
                child.name
            );
            let prefix = child
                .args
                .windows(2)
                .find(|w| w[0] == "--redis-prefix")
                .map(|w| w[1].to_string_lossy().into_owned());
            let expected = match kind {
                "registry" | "gateway" | "analytics" | "data" => Some(format!("breakwater:{kind}")),
                _ => None,
            };
            let publishes = matches!(kind, "users" | "orders");
            assert_eq!(
                passes(child, "--redis"),
                expected.is_some() || publishes,
                "{}",
                child.name
            );
            assert_eq!(
                prefix, expected,
                "{}: the component's default prefix",
                child.name
            );
            let events = child
                .args
                .windows(2)
                .find(|w| w[0] == "--events-prefix")
                .map(|w| w[1].to_string_lossy().into_owned());
            let expected = (publishes || kind == "analytics").then(|| "breakwater".to_owned());
            assert_eq!(events, expected, "{}: one event prefix", child.name);
        }
        let mut args = args;
        args.redis_cluster = vec!["redis://n1:7000".into(), "redis://n2:7000".into()];
        let plan = Plan::new(&args, Path::new("/tmp/x"), LogFormat::Pretty).unwrap();
        let data = plan.children.iter().find(|c| c.name == "data-1").unwrap();
        assert!(
            !passes(data, "--redis"),
            "the cluster replaces --redis for data"
        );
        assert!(
            data.args
                .windows(2)
                .any(|w| w[0] == "--redis-cluster" && w[1] == "redis://n1:7000,redis://n2:7000"),
            "{:?}",
            data.args
        );
        args.redis_prefix = "run-7".into();
        let plan = Plan::new(&args, Path::new("/tmp/x"), LogFormat::Pretty).unwrap();
        let gateway = plan.children.last().unwrap();
        assert!(
            gateway
                .args
                .windows(2)
                .any(|w| w[0] == "--redis-prefix" && w[1] == "run-7:gateway"),
            "{:?}",
            gateway.args
        );
    }

    #[test]
    fn one_events_token_per_run_reaches_publishers_and_analytics_by_env_only() {
        let args = up(&["--users", "2", "--orders", "1", "--data", "1"]);
        let plan = Plan::new(&args, Path::new("/tmp/x"), LogFormat::Pretty).unwrap();
        let mut tokens = HashSet::new();
        for child in &plan.children {
            let kind = child.name.split('-').next().unwrap();
            let token = child
                .env
                .iter()
                .find(|(k, _)| *k == EVENTS_TOKEN_ENV)
                .map(|(_, v)| v.clone());
            assert_eq!(
                token.is_some(),
                matches!(kind, "users" | "orders" | "analytics"),
                "{}",
                child.name
            );
            assert!(
                !child
                    .args
                    .iter()
                    .any(|a| a.to_string_lossy().contains("events-token")),
                "{}: never in argv",
                child.name
            );
            if let Some(token) = token {
                assert_eq!(token.len(), 64);
                assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
                assert!(!child.args.iter().any(|a| *a == *token));
                let shown = format!("{child:?}");
                assert!(!shown.contains(&token), "Debug hides it: {shown}");
                assert!(
                    shown.contains(&format!("{EVENTS_TOKEN_ENV}=<hidden>")),
                    "{shown}"
                );
                tokens.insert(token);
            }
        }
        assert_eq!(tokens.len(), 1, "one token shared by the run");
        let again = Plan::new(&args, Path::new("/tmp/x"), LogFormat::Pretty).unwrap();
        let other = again.children.iter().find_map(|c| c.env.first());
        assert!(
            !tokens.contains(&other.unwrap().1),
            "another run, another token"
        );
    }

    #[test]
    fn a_taken_port_moves_and_says_so() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port().to_string();
        let args = up(&["--registry-port", &port, "--users", "1", "--orders", "1"]);
        let plan = Plan::new(&args, Path::new("/tmp/x"), LogFormat::Pretty).unwrap();
        assert_ne!(plan.children[0].port.to_string(), port);
        assert!(
            plan.notes[0].contains("--registry-port"),
            "{:?}",
            plan.notes
        );
    }
}
