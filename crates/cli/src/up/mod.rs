//! `breakwater up`: the supervisor that runs the whole system on one machine.
//!
//! Order of life (CONTRACTS.md "One command"): the registry starts and must answer
//! `/health`; then every service instance starts and must answer `/health` and appear in
//! the registry; then the gateway. A table of processes is printed and `up.json` in the
//! data directory describes them for tools and tests. A child that exits on its own is
//! restarted with exponential backoff. On SIGINT/SIGTERM the gateway stops first
//! (draining), then the services (deregistering), then the registry.
//!
//! - [`plan`]: which processes, on which ports (a taken port moves to a free one).
//! - [`child`]: one supervised child process: spawn, prefix its output, restart, stop;
//!   stop, start and kill on command.
//! - [`control`]: the control API (processes and unstable's chaos), served from the
//!   start on `--control-port`; the gateway forwards `/admin/control` to it.
//! - [`state`]: the `up.json` state file.

mod child;
mod control;
mod plan;
mod state;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use breakwater_runtime::CancellationToken;
use breakwater_runtime::telemetry::LogFormat;
use tokio::time::Instant;

use crate::cli::UpArgs;
use child::Supervised;
use plan::{ChildSpec, Role};
use state::StateFile;

/// Runs `breakwater up` until SIGINT or SIGTERM.
pub async fn run(args: UpArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let shutdown = crate::component::shutdown_token()?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(crate::component::default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let exe = std::env::current_exe().context("finding the breakwater executable")?;
    let plan = plan::Plan::new(&args, &data_dir, log_format)?;
    for note in &plan.notes {
        tracing::warn!("{note}");
    }
    let state = Arc::new(StateFile::new(data_dir.join("up.json"), &data_dir));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .context("building the readiness HTTP client")?;
    let control = control::Control::new().context("building the control API's HTTP client")?;
    let control_listener = tokio::net::TcpListener::bind(plan.control)
        .await
        .map_err(|e| {
            crate::component::UsageError(format!(
                "--control-port {}: cannot listen on {}: {e}",
                plan.control.port(),
                plan.control
            ))
        })?;
    state.set_control(plan.control_url.clone());
    // Stops with `up` (the same token), before the children are stopped.
    let control_server = tokio::spawn(breakwater_runtime::serve::serve(
        control_listener,
        control::app(control.clone()),
        shutdown.clone(),
        CONTROL_DRAIN,
    ));
    let ready = Readiness {
        http,
        registry_url: plan.registry_url.clone(),
        deadline: args.ready_timeout,
    };

    let mut stages: Vec<Vec<Supervised>> = Vec::new();
    let outcome = async {
        for stage in [Role::Registry, Role::Service, Role::Gateway] {
            let children: Vec<Supervised> = plan
                .children
                .iter()
                .filter(|c| c.role == stage)
                .map(|spec| Supervised::start(exe.clone(), spec.clone(), Arc::clone(&state)))
                .collect();
            for child in &children {
                control.add(child.handle());
            }
            // The children of a stage are already running side by side; waiting for
            // them one after another costs only the slowest one's start-up time.
            let specs: Vec<ChildSpec> = children.iter().map(|c| c.spec().clone()).collect();
            stages.push(children);
            for spec in &specs {
                ready.wait(spec, &shutdown).await?;
            }
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;

    if let Err(e) = outcome {
        tracing::error!("{e:#}; stopping what was started");
        shutdown.cancel();
        stop_in_order(stages).await;
        let _ = control_server.await;
        state.remove();
        return Err(e);
    }

    state.set_ready(true);
    print_table(&plan, &state);
    shutdown.cancelled().await;
    tracing::info!("stopping: gateway first, then services, then the registry");
    stop_in_order(stages).await;
    match control_server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "control API server failed"),
        Err(e) => tracing::warn!(error = %e, "control API task failed"),
    }
    state.remove();
    tracing::info!("all processes stopped");
    Ok(())
}

/// Stops the last-started stage first: gateway, then services, then registry. Within
/// a stage every child is signalled at once, then each is awaited.
async fn stop_in_order(mut stages: Vec<Vec<Supervised>>) {
    while let Some(stage) = stages.pop() {
        for child in &stage {
            child.request_stop();
        }
        for child in stage {
            child.join().await;
        }
    }
}

/// How long a control request in flight (a stop waits for its process) may finish once
/// `up` stops; the children are stopped in order regardless.
const CONTROL_DRAIN: Duration = Duration::from_secs(2);

struct Readiness {
    http: reqwest::Client,
    registry_url: String,
    deadline: Duration,
}

impl Readiness {
    /// Polls until `spec` answers `/health` and, for registered roles, is listed in the
    /// registry under its service name and port.
    async fn wait(&self, spec: &ChildSpec, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let until = Instant::now() + self.deadline;
        loop {
            let last = match self.check(spec).await {
                Ok(()) => {
                    tracing::info!(component = %spec.name, port = spec.port, "ready");
                    return Ok(());
                }
                Err(why) => why,
            };
            if Instant::now() >= until {
                anyhow::bail!(
                    "{} did not become ready within {:?} ({last})",
                    spec.name,
                    self.deadline
                );
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = shutdown.cancelled() => anyhow::bail!("interrupted while starting {}", spec.name),
            }
        }
    }

    async fn check(&self, spec: &ChildSpec) -> Result<(), String> {
        let health = format!("{}/health", spec.url());
        let res = self
            .http
            .get(&health)
            .send()
            .await
            .map_err(|e| format!("{health}: {e}"))?;
        if !res.status().is_success() {
            return Err(format!("{health} answered {}", res.status()));
        }
        let Some(service) = spec.registry_name else {
            return Ok(());
        };
        let list = format!("{}/services/{service}", self.registry_url);
        let body: serde_json::Value = self
            .http
            .get(&list)
            .send()
            .await
            .map_err(|e| format!("{list}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("{list}: {e}"))?;
        let listed = body["services"].as_array().is_some_and(|a| {
            a.iter()
                .any(|i| i["port"].as_u64() == Some(u64::from(spec.port)))
        });
        if listed {
            Ok(())
        } else {
            Err(format!("not yet registered as {service}"))
        }
    }
}

fn print_table(plan: &plan::Plan, state: &StateFile) {
    use std::io::Write as _;
    let pids = state.pids();
    let mut out = String::new();
    out.push_str(&format!(
        "\nBreakwater is up. Data directory: {}\n\n",
        state.data_dir().display()
    ));
    out.push_str(&format!(
        "  {:<12} {:>6} {:>8}  {}\n",
        "PROCESS", "PORT", "PID", "URL"
    ));
    for c in &plan.children {
        let pid = pids
            .get(&c.name)
            .map_or_else(|| "-".to_owned(), u32::to_string);
        let what = match c.role {
            Role::Registry => "  (registry dashboard)",
            Role::Gateway => "  (gateway dashboard, API)",
            Role::Service => "",
        };
        out.push_str(&format!(
            "  {:<12} {:>6} {:>8}  {}/{what}\n",
            c.name,
            c.port,
            pid,
            c.url()
        ));
    }
    out.push_str(&format!(
        "  {:<12} {:>6} {:>8}  {}/processes  (control API)\n",
        "control",
        plan.control.port(),
        std::process::id(),
        plan.control_url
    ));
    out.push_str(&format!(
        "\nTry: curl {}/users-with-orders\nCtrl-C stops everything.\n\n",
        plan.gateway_url
    ));
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}
