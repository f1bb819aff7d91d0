//! The client of `breakwater up`'s control API (served by `up`, and forwarded by the
//! gateway under `/admin/control`): list processes, stop, start and kill one.

use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::Value;

/// One supervised process as the control API describes it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Process {
    /// `users-1`, `registry`, `gateway`, ...
    pub(crate) name: String,
    /// `registry`, `service` or `gateway`.
    pub(crate) role: String,
    /// Its registry name (`user-service`, ...), for services.
    pub(crate) service: Option<String>,
    pub(crate) port: u16,
    pub(crate) pid: Option<u32>,
    /// `running`, `stopped` or `restarting`.
    pub(crate) state: String,
    pub(crate) restarts: u32,
}

#[derive(Deserialize)]
struct List {
    processes: Vec<Process>,
}

/// The control API at one base URL.
#[derive(Debug, Clone)]
pub(crate) struct Control {
    http: reqwest::Client,
    base: String,
}

impl Control {
    pub(crate) fn new(base: String) -> anyhow::Result<Self> {
        // A stop waits for the process to exit (up's grace period before SIGKILL).
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the control API client")?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// Every supervised process.
    pub(crate) async fn processes(&self) -> anyhow::Result<Vec<Process>> {
        let list: List = self.call(reqwest::Method::GET, "/processes").await?;
        Ok(list.processes)
    }

    /// The processes of the service registered as `service`.
    pub(crate) async fn instances_of(&self, service: &str) -> anyhow::Result<Vec<Process>> {
        let all = self.processes().await?;
        let found: Vec<Process> = all
            .into_iter()
            .filter(|p| p.role == "service" && p.service.as_deref() == Some(service))
            .collect();
        anyhow::ensure!(
            !found.is_empty(),
            "the control API lists no {service} process"
        );
        Ok(found)
    }

    /// One process.
    pub(crate) async fn process(&self, name: &str) -> anyhow::Result<Process> {
        self.call(reqwest::Method::GET, &format!("/processes/{name}"))
            .await
    }

    /// Stops `name` gracefully; it stays stopped. Answers once it has exited.
    pub(crate) async fn stop(&self, name: &str) -> anyhow::Result<Process> {
        self.call(reqwest::Method::POST, &format!("/processes/{name}/stop"))
            .await
    }

    /// Starts a stopped `name`. Answers once it is spawned (not yet ready).
    pub(crate) async fn start(&self, name: &str) -> anyhow::Result<Process> {
        self.call(reqwest::Method::POST, &format!("/processes/{name}/start"))
            .await
    }

    /// Kills `name` with SIGKILL, as a crash: `up` restarts it with backoff.
    pub(crate) async fn kill(&self, name: &str) -> anyhow::Result<Process> {
        self.call(reqwest::Method::POST, &format!("/processes/{name}/kill"))
            .await
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let what = format!("{method} {url}");
        let res = self
            .http
            .request(method, &url)
            .send()
            .await
            .with_context(|| what.clone())?;
        let status = res.status();
        let text = res.text().await.with_context(|| what.clone())?;
        if !status.is_success() {
            let error = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(text);
            anyhow::bail!("{what} answered {status}: {error}");
        }
        serde_json::from_str(&text).with_context(|| format!("{what}: unexpected answer {text}"))
    }
}
