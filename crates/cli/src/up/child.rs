//! One supervised child process: started, its output prefixed with its name, restarted
//! with backoff when it exits on its own, stopped with SIGTERM (then SIGKILL after a
//! grace period) when `up` stops.
//!
//! - [`Supervised`]: the owner's handle (start, stop for good, join).
//! - [`Handle`]: what the control API holds: the child's [`Status`] (a watch channel the
//!   supervise task keeps current) and [`Command`]s (stop, start, kill) answered once done.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use breakwater_runtime::CancellationToken;
use breakwater_services::outbox::EVENTS_TOKEN_ENV;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command as Process};
use tokio::sync::{mpsc, oneshot, watch};
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

/// Whether a child runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    /// Stopped on request (or not started yet); stays so until started.
    Stopped,
    /// Exited on its own (or was killed); waiting out its backoff before the next start.
    Restarting,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Restarting => "restarting",
        }
    }
}

/// A child's state as the control API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub state: RunState,
    pub pid: Option<u32>,
    /// Restarts after the child exited on its own or was killed (not manual starts).
    pub restarts: u32,
}

/// What the control API asks of a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// SIGTERM, the grace period, SIGKILL; no restart until [`Command::Start`].
    Stop,
    /// Start a stopped child (or one waiting to restart) now.
    Start,
    /// SIGKILL, handled as a crash: restarted with the usual backoff.
    Kill,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The command does not apply in the child's state (e.g. kill while stopped).
    #[error("{name} is {}", state.as_str())]
    Conflict { name: String, state: RunState },
    /// `up` is shutting down; the supervisor takes no more commands.
    #[error("{0} is shutting down with breakwater up")]
    ShuttingDown(String),
}

type Reply = oneshot::Sender<Result<Status, Refused>>;

/// The control side of a supervised child: cheap to clone.
#[derive(Debug, Clone)]
pub struct Handle {
    spec: ChildSpec,
    status: watch::Receiver<Status>,
    commands: mpsc::Sender<(Command, Reply)>,
}

impl Handle {
    pub fn spec(&self) -> &ChildSpec {
        &self.spec
    }

    pub fn status(&self) -> Status {
        *self.status.borrow()
    }

    /// Sends `command` and waits until it is done: a stop until the child has exited, a
    /// start until it is spawned, a kill until its exit is seen.
    pub async fn send(&self, command: Command) -> Result<Status, Refused> {
        let gone = || Refused::ShuttingDown(self.spec.name.clone());
        let (reply, answer) = oneshot::channel();
        self.commands
            .send((command, reply))
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Handle to one supervised child.
#[derive(Debug)]
pub struct Supervised {
    handle: Handle,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Supervised {
    /// Starts supervising `spec` (the first start happens right away).
    pub fn start(exe: PathBuf, spec: ChildSpec, state: Arc<StateFile>) -> Self {
        let stop = CancellationToken::new();
        let (status_tx, status) = watch::channel(Status {
            state: RunState::Stopped,
            pid: None,
            restarts: 0,
        });
        // Commands are answered one at a time; a few may queue (e.g. two dashboards).
        let (commands, command_rx) = mpsc::channel(8);
        let supervisor = Supervisor {
            exe,
            spec: spec.clone(),
            state,
            stop: stop.clone(),
            commands: command_rx,
            status: status_tx,
            attempt: 0,
            restarts: 0,
        };
        let task = tokio::spawn(supervisor.run());
        Self {
            handle: Handle {
                spec,
                status,
                commands,
            },
            stop,
            task,
        }
    }

    pub fn spec(&self) -> &ChildSpec {
        &self.handle.spec
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Asks the child to stop (SIGTERM); [`Self::join`] waits until it has.
    pub fn request_stop(&self) {
        self.stop.cancel();
    }

    /// Waits until the child has exited and will not be restarted.
    pub async fn join(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(component = %self.handle.spec.name, error = %e, "supervisor task failed");
        }
    }
}

/// Backoff before restart number `attempt` (0-based): 200 ms doubling, capped at 10 s.
fn backoff(attempt: u32) -> Duration {
    BACKOFF_FIRST
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX)
}

/// What the supervise loop does next.
enum Next {
    /// Spawn the child; answer `reply` (a start command's) once spawned.
    Spawn(Option<Reply>),
    /// Wait out a restart backoff, then spawn.
    Backoff(Duration),
    /// Stay down until a start command.
    Idle,
    /// `up` is stopping: return.
    Exit,
}

/// The task that owns one child process.
struct Supervisor {
    exe: PathBuf,
    spec: ChildSpec,
    state: Arc<StateFile>,
    /// `up`'s stop: terminate the child and return.
    stop: CancellationToken,
    commands: mpsc::Receiver<(Command, Reply)>,
    status: watch::Sender<Status>,
    /// Restart attempts since the child last ran stably (sets the backoff).
    attempt: u32,
    restarts: u32,
}

impl Supervisor {
    async fn run(mut self) {
        let mut next = Next::Spawn(None);
        loop {
            next = match next {
                Next::Spawn(reply) => self.spawn_and_watch(reply).await,
                Next::Backoff(delay) => self.backoff(delay).await,
                Next::Idle => self.idle().await,
                Next::Exit => return,
            };
        }
    }

    fn publish(&self, state: RunState, pid: Option<u32>) -> Status {
        let status = Status {
            state,
            pid,
            restarts: self.restarts,
        };
        self.status.send_replace(status);
        self.state
            .set_process(&self.spec.name, self.spec.port, self.spec.url(), status);
        status
    }

    fn refuse(&self, reply: Reply, state: RunState) {
        let _ = reply.send(Err(Refused::Conflict {
            name: self.spec.name.clone(),
            state,
        }));
    }

    /// Stopped: waits for a start (or `up`'s stop); a stop is answered as done, a kill
    /// is refused.
    async fn idle(&mut self) -> Next {
        let status = self.publish(RunState::Stopped, None);
        loop {
            let (command, reply) = tokio::select! {
                () = self.stop.cancelled() => return Next::Exit,
                received = self.commands.recv() => match received {
                    Some(c) => c,
                    None => return Next::Exit,
                },
            };
            match command {
                Command::Start => {
                    self.attempt = 0;
                    return Next::Spawn(Some(reply));
                }
                Command::Stop => {
                    let _ = reply.send(Ok(status));
                }
                Command::Kill => self.refuse(reply, RunState::Stopped),
            }
        }
    }

    /// Waits out a restart backoff; a start skips the rest of it, a stop cancels it.
    async fn backoff(&mut self, delay: Duration) -> Next {
        self.publish(RunState::Restarting, None);
        let until = Instant::now() + delay;
        loop {
            let (command, reply) = tokio::select! {
                () = tokio::time::sleep_until(until) => {
                    self.restarts = self.restarts.saturating_add(1);
                    return Next::Spawn(None);
                }
                () = self.stop.cancelled() => return Next::Exit,
                received = self.commands.recv() => match received {
                    Some(c) => c,
                    None => return Next::Exit,
                },
            };
            match command {
                Command::Start => {
                    self.restarts = self.restarts.saturating_add(1);
                    return Next::Spawn(Some(reply));
                }
                Command::Stop => {
                    let status = self.publish(RunState::Stopped, None);
                    let _ = reply.send(Ok(status));
                    return Next::Idle;
                }
                Command::Kill => self.refuse(reply, RunState::Restarting),
            }
        }
    }

    /// Spawns the child and watches it until it exits, is stopped, or `up` stops.
    async fn spawn_and_watch(&mut self, start_reply: Option<Reply>) -> Next {
        let started = Instant::now();
        let mut child = match spawn(&self.exe, &self.spec) {
            Ok(child) => child,
            Err(e) => {
                tracing::error!(component = %self.spec.name, error = %e, "cannot start");
                let delay = backoff(self.attempt);
                self.attempt = self.attempt.saturating_add(1);
                if let Some(reply) = start_reply {
                    let status = self.publish(RunState::Restarting, None);
                    let _ = reply.send(Ok(status));
                }
                return Next::Backoff(delay);
            }
        };
        let status = self.publish(RunState::Running, child.id());
        if let Some(reply) = start_reply {
            let _ = reply.send(Ok(status));
        }
        let pumps = pump_output(&mut child, &self.spec.name);
        // `Child::wait` closes the child's stdin; holding the pipe here keeps it open
        // for as long as this supervisor lives (see `spawn`).
        let _stdin = child.stdin.take();
        // Kill commands' replies wait for the exit they cause.
        let mut kill_replies: Vec<Reply> = Vec::new();

        let exited = loop {
            let (command, reply) = tokio::select! {
                exited = child.wait() => break exited,
                () = self.stop.cancelled() => {
                    terminate(&mut child, &self.spec.name).await;
                    finish_pumps(pumps).await;
                    self.publish(RunState::Stopped, None);
                    return Next::Exit;
                }
                received = self.commands.recv() => match received {
                    Some(c) => c,
                    // Only `Supervised` drops the sender, and then `stop` fires too.
                    None => std::future::pending().await,
                },
            };
            match command {
                Command::Start => {
                    let _ = reply.send(Ok(status));
                }
                Command::Stop => {
                    tracing::info!(component = %self.spec.name, "stopping on request");
                    terminate(&mut child, &self.spec.name).await;
                    finish_pumps(pumps).await;
                    let stopped = self.publish(RunState::Stopped, None);
                    let _ = reply.send(Ok(stopped));
                    return Next::Idle;
                }
                Command::Kill => {
                    tracing::warn!(component = %self.spec.name, "killing on request (SIGKILL)");
                    if let Err(e) = child.start_kill() {
                        tracing::debug!(component = %self.spec.name, error = %e, "SIGKILL failed (already gone?)");
                    }
                    kill_replies.push(reply);
                }
            }
        };

        finish_pumps(pumps).await;
        if started.elapsed() >= STABLE_AFTER {
            self.attempt = 0;
        }
        let delay = backoff(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        tracing::warn!(
            component = %self.spec.name,
            status = %describe(exited),
            restart_in = ?delay,
            "exited unexpectedly; restarting"
        );
        let restarting = self.publish(RunState::Restarting, None);
        for reply in kill_replies {
            let _ = reply.send(Ok(restarting));
        }
        Next::Backoff(delay)
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

fn spawn(exe: &PathBuf, spec: &ChildSpec) -> std::io::Result<Child> {
    Process::new(exe)
        .args(&spec.args)
        .env(SUPERVISED_ENV, "1")
        // `up` decides where shared state lives (its --redis flag, passed on as flags);
        // a REDIS_URL or DATABASE_URL in the caller's environment must not silently move
        // the children's state elsewhere.
        .env_remove("REDIS_URL")
        .env_remove("DATABASE_URL")
        // Only the children `up` gives the events token to have one: the caller's is
        // not passed on.
        .env_remove(EVENTS_TOKEN_ENV)
        // Every child names itself in its spans (user-service, order-service, ...): one
        // OTEL_SERVICE_NAME for the whole system would label them all the same.
        .env_remove(breakwater_runtime::otlp::SERVICE_NAME_ENV)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
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
