//! One supervised child process: started, its output prefixed with its name, restarted
//! with backoff when it exits on its own, stopped with SIGTERM (then SIGKILL after a
//! grace period) when asked.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use breakwater_runtime::CancellationToken;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::plan::ChildSpec;
use super::state::StateFile;
use crate::component::SUPERVISED_ENV;

/// How long a child gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// A child that stayed up this long has its restart backoff reset.
const STABLE_AFTER: Duration = Duration::from_secs(30);
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Handle to one supervised child.
#[derive(Debug)]
pub struct Supervised {
    spec: ChildSpec,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Supervised {
    /// Starts supervising `spec` (the first start happens right away).
    pub fn start(exe: PathBuf, spec: ChildSpec, state: Arc<StateFile>) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(supervise(exe, spec.clone(), state, stop.clone()));
        Self { spec, stop, task }
    }

    pub fn spec(&self) -> &ChildSpec {
        &self.spec
    }

    /// Asks the child to stop (SIGTERM); [`Self::join`] waits until it has.
    pub fn request_stop(&self) {
        self.stop.cancel();
    }

    /// Waits until the child has exited and will not be restarted.
    pub async fn join(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(component = %self.spec.name, error = %e, "supervisor task failed");
        }
    }
}

/// Backoff before restart number `attempt` (0-based): 200 ms doubling, capped at 10 s.
fn backoff(attempt: u32) -> Duration {
    BACKOFF_FIRST
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX)
}

async fn supervise(exe: PathBuf, spec: ChildSpec, state: Arc<StateFile>, stop: CancellationToken) {
    let mut attempt: u32 = 0;
    let mut restarts: u32 = 0;
    loop {
        let started = Instant::now();
        let mut child = match spawn(&exe, &spec) {
            Ok(child) => child,
            Err(e) => {
                tracing::error!(component = %spec.name, error = %e, "cannot start");
                if wait_or_stop(backoff(attempt), &stop).await {
                    return;
                }
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        state.set_process(&spec.name, spec.port, spec.url(), child.id(), restarts);
        let pumps = pump_output(&mut child, &spec.name);
        // `Child::wait` closes the child's stdin; holding the pipe here keeps it open
        // for as long as this supervisor lives (see `spawn`).
        let _stdin = child.stdin.take();

        let exit = tokio::select! {
            status = child.wait() => Some(status),
            () = stop.cancelled() => None,
        };
        match exit {
            None => {
                terminate(&mut child, &spec.name).await;
                finish_pumps(pumps).await;
                state.set_process(&spec.name, spec.port, spec.url(), None, restarts);
                return;
            }
            Some(status) => {
                finish_pumps(pumps).await;
                state.set_process(&spec.name, spec.port, spec.url(), None, restarts);
                if started.elapsed() >= STABLE_AFTER {
                    attempt = 0;
                }
                let delay = backoff(attempt);
                tracing::warn!(
                    component = %spec.name,
                    status = %describe(status),
                    restart_in = ?delay,
                    "exited unexpectedly; restarting"
                );
                if wait_or_stop(delay, &stop).await {
                    return;
                }
                attempt = attempt.saturating_add(1);
                restarts = restarts.saturating_add(1);
            }
        }
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

/// Sleeps for `delay`; true if a stop was requested meanwhile.
async fn wait_or_stop(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = stop.cancelled() => true,
    }
}

fn spawn(exe: &PathBuf, spec: &ChildSpec) -> std::io::Result<Child> {
    Command::new(exe)
        .args(&spec.args)
        .env(SUPERVISED_ENV, "1")
        // `up` decides where shared state lives (its --redis flag, passed on as flags);
        // a REDIS_URL or DATABASE_URL in the caller's environment must not silently move
        // the children's state elsewhere.
        .env_remove("REDIS_URL")
        .env_remove("DATABASE_URL")
        // The child's stdin is a pipe we never write to: if this process dies, the pipe
        // closes and the child stops itself.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a terminal's Ctrl-C reaches only `up`, which then
        // stops the children in order.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

/// SIGTERM, then SIGKILL if the child has not exited within the grace period.
async fn terminate(child: &mut Child, name: &str) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok())
        && let Err(e) = kill(Pid::from_raw(pid), Signal::SIGTERM)
    {
        tracing::debug!(component = name, error = %e, "SIGTERM failed (already gone?)");
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(status) => tracing::info!(component = name, status = %describe(status), "stopped"),
        Err(_) => {
            tracing::warn!(component = name, grace = ?STOP_GRACE, "did not stop in time; killing");
            let _ = child.kill().await;
        }
    }
}

/// Copies the child's stdout and stderr line by line to ours, each line prefixed with
/// the child's name.
fn pump_output(child: &mut Child, name: &str) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(out) = child.stdout.take() {
        tasks.push(tokio::spawn(pump(out, name.to_owned(), false)));
    }
    if let Some(err) = child.stderr.take() {
        tasks.push(tokio::spawn(pump(err, name.to_owned(), true)));
    }
    tasks
}

async fn pump(stream: impl AsyncRead + Unpin, name: String, to_stderr: bool) {
    let mut lines = BufReader::new(stream).lines();
    let prefix = format!("{name:>10} | ");
    while let Ok(Some(line)) = lines.next_line().await {
        let text = format!("{prefix}{line}\n");
        let written = if to_stderr {
            tokio::io::stderr().write_all(text.as_bytes()).await
        } else {
            tokio::io::stdout().write_all(text.as_bytes()).await
        };
        if written.is_err() {
            // Our own output is gone (closed terminal); keep draining so the child
            // never blocks on a full pipe.
            continue;
        }
    }
}

async fn finish_pumps(pumps: Vec<JoinHandle<()>>) {
    for p in pumps {
        let _ = tokio::time::timeout(Duration::from_secs(1), p).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::from_millis(200));
        assert_eq!(backoff(1), Duration::from_millis(400));
        assert_eq!(backoff(5), Duration::from_millis(6400));
        assert_eq!(backoff(6), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
