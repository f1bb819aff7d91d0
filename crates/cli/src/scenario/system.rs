//! The system the scenarios drive: `breakwater up` started by this process on free
//! ports in a temporary directory ([`System::start`]), or a running system reached
//! through its gateway ([`System::attach`]).
//!
//! A started system is stopped with SIGTERM (SIGKILL past a grace period) and its
//! directory removed; `up` stops its own children. It runs in its own process group,
//! so a Ctrl-C reaches this process, which then stops `up` in order.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use breakwater_runtime::CancellationToken;
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::control::Control;
use crate::component::UsageError;

/// Every port flag of `up`, each given 0 (a free port).
const FREE_PORTS: [&str; 8] = [
    "--registry-port",
    "--gateway-port",
    "--users-port",
    "--orders-port",
    "--analytics-port",
    "--data-port",
    "--unstable-port",
    "--control-port",
];

/// How long `up` may take to be ready (a debug build on a busy machine is slow).
const READY_WITHIN: Duration = Duration::from_secs(180);
/// How long `up` may take to stop before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// `--fast`: analytics' breaker stays open 2 s (CIRCUIT_RESET_TIMEOUT, seconds).
pub(crate) const FAST_ANALYTICS_RESET_SECS: u64 = 2;
/// `--fast`: analytics' rate-limit window (RATE_LIMIT_WINDOW, seconds).
pub(crate) const FAST_RATE_LIMIT_WINDOW_SECS: u64 = 3;

/// The environment variables that change a started system's behaviour; each is set
/// by this module or removed, so a started system is the documented one.
const TUNING_ENV: [&str; 6] = [
    "RATE_LIMIT_WINDOW",
    "RATE_LIMIT_MAX",
    "CIRCUIT_FAILURE_THRESHOLD",
    "CIRCUIT_RESET_TIMEOUT",
    "BREAKWATER_CONFIG",
    "BREAKWATER_ADMIN_TOKEN",
];

/// Checks `--target`: an http(s) URL; returned without a trailing slash.
pub(crate) fn parse_target(raw: &str) -> Result<String, UsageError> {
    let url = reqwest::Url::parse(raw).map_err(|e| {
        UsageError(format!(
            "--target {raw:?}: {e} (expected the gateway's URL, e.g. http://127.0.0.1:8000)"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(UsageError(format!(
            "--target {raw:?}: expected an http:// or https:// URL with a host"
        )));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

/// The system under test.
pub(crate) struct System {
    /// Gateway base URL.
    pub(crate) gateway: String,
    /// Registry base URL.
    pub(crate) registry: String,
    /// The control API, or why there is none.
    pub(crate) control: Result<Control, String>,
    /// The `up` process and its directory, when this run started the system.
    own: Option<Started>,
}

struct Started {
    up: Child,
    dir: PathBuf,
}

impl System {
    /// Starts `breakwater up` on free ports and waits until it is ready (or until
    /// `shutdown`, which stops it again).
    pub(crate) async fn start(fast: bool, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "breakwater-scenario-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let started = spawn_up(&dir, fast);
        let mut started = match started {
            Ok(up) => Started { up, dir },
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        match wait_ready(&mut started, shutdown).await {
            Ok(state) => {
                let text = |v: &Value| v.as_str().map(str::to_owned);
                let urls = (
                    text(&state["processes"]["gateway"]["url"]),
                    text(&state["processes"]["registry"]["url"]),
                );
                let (Some(gateway), Some(registry)) = urls else {
                    stop_started(started, true).await;
                    anyhow::bail!("up.json names no gateway or registry URL: {state}");
                };
                let control = match text(&state["control"]) {
                    Some(url) => Control::new(url).map_err(|e| format!("{e:#}")),
                    None => Err("up.json names no control API".to_owned()),
                };
                Ok(Self {
                    gateway,
                    registry,
                    control,
                    own: Some(started),
                })
            }
            Err(e) => {
                stop_started(started, !shutdown.is_cancelled()).await;
                Err(e)
            }
        }
    }

    /// A running system: the registry from the gateway's `/health`, the control API
    /// through the gateway's `/admin/control`.
    pub(crate) async fn attach(gateway: String) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        let url = format!("{gateway}/health");
        let health: Value = http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("--target: GET {url}"))?
            .error_for_status()
            .with_context(|| format!("--target: GET {url}"))?
            .json()
            .await
            .with_context(|| format!("--target: GET {url} is not the gateway's health JSON"))?;
        let registry = health["serviceDiscovery"]["server"]
            .as_str()
            .map(|s| s.trim_end_matches('/').to_owned())
            .with_context(|| {
                format!("--target: {url} names no serviceDiscovery.server: {health}")
            })?;
        let control = Control::new(format!("{gateway}/admin/control"))?;
        let control = match control.processes().await {
            Ok(_) => Ok(control),
            Err(e) => Err(format!("{e:#}")),
        };
        Ok(Self {
            gateway,
            registry,
            control,
            own: None,
        })
    }

    /// Whether this run started the system.
    pub(crate) fn is_own(&self) -> bool {
        self.own.is_some()
    }

    /// One line on what is being driven.
    pub(crate) fn describe(&self) -> String {
        let control = match &self.control {
            Ok(c) => format!("control API {}", c.base()),
            Err(why) => format!("no control API ({why})"),
        };
        let whose = match &self.own {
            Some(s) => format!("started here, data in {}", s.dir.display()),
            None => "already running".to_owned(),
        };
        format!(
            "System ({whose}): gateway {}/ (dashboard), registry {}/ (dashboard), {control}",
            self.gateway, self.registry
        )
    }

    /// Stops a started system (a running one is left alone). With `show_log`, the end
    /// of `up`'s log is printed to stderr first, to explain a failure.
    pub(crate) async fn stop(self, show_log: bool) {
        if let Some(started) = self.own {
            stop_started(started, show_log).await;
        }
    }
}

fn spawn_up(dir: &Path, fast: bool) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding the breakwater executable")?;
    let log = std::fs::File::create(dir.join("up.log")).context("creating up.log")?;
    let log2 = log.try_clone().context("sharing up.log")?;
    let mut cmd = Command::new(exe);
    cmd.arg("up")
        .args(FREE_PORTS.iter().flat_map(|flag| [*flag, "0"]))
        .args([
            "--bind",
            "127.0.0.1",
            "--heartbeat-interval",
            "1",
            "--data-dir",
        ])
        .arg(dir)
        // A pipe this process never writes to: if the scenario dies without stopping
        // `up` (SIGKILL), the pipe closes and `up` stops everything it started.
        .stdin(Stdio::piped())
        .env(crate::component::SUPERVISED_ENV, "1")
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(true);
    for name in TUNING_ENV {
        cmd.env_remove(name);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    if fast {
        let config = dir.join("gateway-fast.toml");
        std::fs::write(&config, fast_gateway_config()?)
            .with_context(|| format!("writing {}", config.display()))?;
        cmd.env("BREAKWATER_CONFIG", &config)
            .env(
                "CIRCUIT_RESET_TIMEOUT",
                FAST_ANALYTICS_RESET_SECS.to_string(),
            )
            .env("RATE_LIMIT_WINDOW", FAST_RATE_LIMIT_WINDOW_SECS.to_string());
    }
    cmd.spawn().context("starting breakwater up")
}

/// The embedded gateway config with a breaker that stays open 3 s instead of 30 s and
/// ejections of 1-3 s instead of 10-300 s, so recoveries take seconds.
fn fast_gateway_config() -> anyhow::Result<String> {
    let mut text = breakwater_gateway::config::EMBEDDED_CONFIG.to_owned();
    for (from, to) in [
        ("open_for = \"30s\"", "open_for = \"3s\""),
        (
            "base_ejection_time = \"10s\"",
            "base_ejection_time = \"1s\"",
        ),
        ("max_ejection_time = \"300s\"", "max_ejection_time = \"3s\""),
    ] {
        anyhow::ensure!(
            text.contains(from),
            "the embedded gateway config no longer has `{from}`; update the --fast settings"
        );
        text = text.replacen(from, to, 1);
    }
    Ok(text)
}

async fn wait_ready(started: &mut Started, shutdown: &CancellationToken) -> anyhow::Result<Value> {
    let path = started.dir.join("up.json");
    let until = Instant::now() + READY_WITHIN;
    loop {
        let state = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok());
        if let Some(state) = state.filter(|s| s["ready"] == true) {
            return Ok(state);
        }
        if let Some(status) = started.up.try_wait().context("watching breakwater up")? {
            anyhow::bail!("breakwater up exited with {status} before it was ready");
        }
        if Instant::now() >= until {
            anyhow::bail!("breakwater up was not ready within {READY_WITHIN:?}");
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = shutdown.cancelled() => anyhow::bail!("interrupted while the system was starting"),
        }
    }
}

async fn stop_started(mut started: Started, show_log: bool) {
    if let Some(pid) = started.up.id().and_then(|p| i32::try_from(p).ok()) {
        // up stops the gateway, then the services, then the registry.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(STOP_GRACE, started.up.wait())
            .await
            .is_err()
        {
            // Its children see their stdin close when up dies and stop themselves.
            let _ = started.up.kill().await;
        }
    }
    if show_log {
        let log = std::fs::read_to_string(started.dir.join("up.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        let _ = super::write_out(
            &mut std::io::stderr(),
            &format!("---- the last lines of breakwater up's log ----\n{tail}\n----\n"),
        );
    }
    let _ = std::fs::remove_dir_all(&started.dir);
}
