//! The running system under test: `breakwater up` on free ports in a temporary data
//! directory, its `up.json`, and cleanup that leaves no process or file behind.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Every port flag of `up`, each given 0 (a free port).
pub(crate) const FREE_PORTS: [&str; 8] = [
    "--registry-port",
    "--gateway-port",
    "--users-port",
    "--orders-port",
    "--analytics-port",
    "--data-port",
    "--unstable-port",
    "--control-port",
];

/// The running `up` process, its data directory and its captured output. Dropping it
/// kills whatever is still running, so a failing test leaves nothing behind.
pub(crate) struct System {
    /// The `up` process.
    pub(crate) up: Child,
    /// Its data directory (removed on drop).
    pub(crate) data_dir: PathBuf,
    output: Arc<Mutex<String>>,
}

impl System {
    /// Starts `up` on free ports in a fresh data directory.
    pub(crate) fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`System::start`] with more arguments for `up` (e.g. `--redis URL`).
    pub(crate) fn start_with(extra: &[String]) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// [`System::start_with`], with `env` set on `up` (its children inherit it).
    pub(crate) fn start_with_env(extra: &[String], env: &[(&str, &str)]) -> Self {
        let data_dir = std::env::temp_dir().join(format!(
            "breakwater-e2e-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&data_dir).unwrap();
        let mut up = Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .arg("up")
            .args(FREE_PORTS.iter().flat_map(|flag| [*flag, "0"]))
            .args(["--heartbeat-interval", "1", "--data-dir"])
            .arg(&data_dir)
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start breakwater up");
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(up.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(up.stderr.take().unwrap()),
        ] {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Self {
            up,
            data_dir,
            output,
        }
    }

    /// `up.json`, once `up` has written it.
    pub(crate) fn state(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.data_dir.join("up.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits (up to 120 s) until `up` says the system is ready; its `up.json`.
    pub(crate) async fn wait_ready(&mut self) -> Value {
        for _ in 0..1200 {
            if let Some(state) = self.state().filter(|s| s["ready"] == true) {
                return state;
            }
            if let Ok(Some(status)) = self.up.try_wait() {
                panic!("up exited early with {status}:\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("system not ready within 120 s:\n{}", self.output());
    }

    /// Everything `up` printed so far.
    pub(crate) fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

impl Drop for System {
    fn drop(&mut self) {
        if let Some(state) = self.state() {
            for pid in pids(&state).values() {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
        let _ = self.up.kill();
        let _ = self.up.wait();
        if std::thread::panicking() {
            eprintln!("---- breakwater up output ----\n{}", self.output());
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Process id by process name, from `up.json`.
pub(crate) fn pids(state: &Value) -> BTreeMap<String, i32> {
    state["processes"]
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(name, p)| Some((name.clone(), i32::try_from(p["pid"].as_u64()?).ok()?)))
        .collect()
}

/// A process's base URL, from `up.json`.
pub(crate) fn url_of(state: &Value, name: &str) -> String {
    state["processes"][name]["url"].as_str().unwrap().to_owned()
}

/// A process's port, from `up.json`.
pub(crate) fn port_of(state: &Value, name: &str) -> u16 {
    u16::try_from(state["processes"][name]["port"].as_u64().unwrap()).unwrap()
}
