//! `up.json`: what is running, for tools, tests and people. Rewritten atomically
//! (write then rename) whenever a process starts or is restarted; removed when `up`
//! stops, because it describes a running system.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use super::child::{RunState, Status};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Process {
    name: String,
    port: u16,
    url: String,
    pid: Option<u32>,
    state: RunState,
    restarts: u32,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Snapshot {
    ready: bool,
    supervisor_pid: u32,
    data_dir: PathBuf,
    /// Base URL of `up`'s control API.
    #[serde(skip_serializing_if = "Option::is_none")]
    control: Option<String>,
    processes: BTreeMap<String, Process>,
}

/// The state file and the in-memory state it mirrors.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    inner: Mutex<Snapshot>,
}

impl StateFile {
    pub fn new(path: PathBuf, data_dir: &Path) -> Self {
        let snapshot = Snapshot {
            supervisor_pid: std::process::id(),
            data_dir: data_dir.to_owned(),
            ..Snapshot::default()
        };
        Self {
            path,
            inner: Mutex::new(snapshot),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.lock().data_dir.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        // A panic while holding this lock cannot leave the snapshot half-written in a way
        // that matters (each update is a field assignment), so poisoning is ignored.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `name`'s status (its pid is None while it is down).
    pub fn set_process(&self, name: &str, port: u16, url: String, status: Status) {
        let mut s = self.lock();
        s.processes.insert(
            name.to_owned(),
            Process {
                name: name.to_owned(),
                port,
                url,
                pid: status.pid,
                state: status.state,
                restarts: status.restarts,
            },
        );
        self.write(&s);
    }

    /// Records where the control API listens.
    pub fn set_control(&self, url: String) {
        let mut s = self.lock();
        s.control = Some(url);
        self.write(&s);
    }

    pub fn set_ready(&self, ready: bool) {
        let mut s = self.lock();
        s.ready = ready;
        self.write(&s);
    }

    pub fn pids(&self) -> BTreeMap<String, u32> {
        self.lock()
            .processes
            .iter()
            .filter_map(|(k, p)| Some((k.clone(), p.pid?)))
            .collect()
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    fn write(&self, s: &Snapshot) {
        let tmp = self.path.with_extension("json.tmp");
        let result = serde_json::to_vec_pretty(s)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the state file");
        }
    }
}
