//! `breakwater scenario <name>|all|list`: guided scenarios that drive a running system,
//! say what to look at in the dashboards, and check what the system does.
//!
//! Parts:
//! - this module: the registry of scenarios ([`SCENARIOS`]), the runner (one system for
//!   every selected scenario, a summary, exit 0 only if every check held) and the
//!   narration ([`Ctx`]: numbered steps, "look at" hints, a ✓/✗ line per check).
//! - [`system`]: the system under test: `breakwater up` started on free ports in a
//!   temporary directory (shorter timings with `--fast`), or a running one (`--target`).
//! - [`control`]: the client of `up`'s control API (stop, start, kill a process).
//! - [`probe`]: reads of the system's state: gateway breakers, endpoints and events,
//!   registry listings, unstable's chaos, which instance answered a request.
//! - the scenarios, one module per domain: [`dashboard`] (seed 003's dashboard
//!   scenarios), [`breakers`] (service failures, fallbacks, recovery), [`balancing`]
//!   (load balancing, the stress test), [`analytics`] (seed 004: cache, rate limit,
//!   breaker), [`data`] (seed 000: retries and fallback), [`discovery`] (registry
//!   restart) and [`crash`] (an instance killed under load).

mod analytics;
mod balancing;
mod breakers;
mod control;
mod crash;
mod dashboard;
mod data;
mod discovery;
mod probe;
mod system;

use std::collections::BTreeSet;
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::component::UsageError;
use control::Control;
use system::System;

/// `breakwater scenario`.
#[derive(clap::Args, Debug)]
pub struct ScenarioArgs {
    /// A scenario's name, `all` for every one in order, or `list` to print them.
    pub name: String,
    /// Shorter timings: the started system gets short breaker and rate-limit windows,
    /// and the scenarios' own waits shrink (with --target only the latter).
    #[arg(long)]
    pub fast: bool,
    /// Drive a running system through its gateway (e.g. http://127.0.0.1:8000) instead
    /// of starting one. Scenarios that stop or kill processes need it to be run by
    /// `breakwater up` (its control API, reached through the gateway).
    #[arg(long, value_name = "GATEWAY_URL")]
    pub target: Option<String>,
    /// Print one JSON object with every scenario's checks on stdout (the narration
    /// goes to stderr).
    #[arg(long)]
    pub json: bool,
}

type Outcome<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

/// One scenario: its name on the command line, what it shows, where it comes from.
pub(crate) struct Scenario {
    name: &'static str,
    about: &'static str,
    run: for<'a> fn(&'a Ctx) -> Outcome<'a>,
}

/// Every scenario, in the order `all` runs them. The ones that stop processes come
/// last, so that a failure to restore the system spoils as little as possible.
const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "normal-operation",
        about: "seed 003 #1: every endpoint answers through the gateway, from several instances",
        run: |cx| Box::pin(dashboard::normal_operation(cx)),
    },
    Scenario {
        name: "endpoint-testing",
        about: "seed 003 #2: each dashboard section's endpoint answers on its own",
        run: |cx| Box::pin(dashboard::endpoint_testing(cx)),
    },
    Scenario {
        name: "user-ids",
        about: "seed 003 #3: orders differ by user id; a non-integer id is refused",
        run: |cx| Box::pin(dashboard::user_ids(cx)),
    },
    Scenario {
        name: "auto-refresh",
        about: "seed 003 #7: the dashboard refreshes itself; health moves on between reads",
        run: |cx| Box::pin(dashboard::auto_refresh(cx)),
    },
    Scenario {
        name: "refresh-rate",
        about: "seed 003 #8: the refresh-rate slider spans 1-10 s, 5 s by default",
        run: |cx| Box::pin(dashboard::refresh_rate(cx)),
    },
    Scenario {
        name: "discovery-integration",
        about: "seed 003 #9: the gateway dashboard links to the registry dashboard",
        run: |cx| Box::pin(dashboard::discovery_integration(cx)),
    },
    Scenario {
        name: "load-balancing",
        about: "seed 003 #10: requests are spread over every users instance",
        run: |cx| Box::pin(balancing::load_balancing(cx)),
    },
    Scenario {
        name: "analytics-caching",
        about: "seed 004: a summary is computed (MISS), then served from the cache (HIT)",
        run: |cx| Box::pin(analytics::caching(cx)),
    },
    Scenario {
        name: "analytics-rate-limit",
        about: "seed 004: RATE_LIMIT_MAX posts per window, then 429 with Retry-After",
        run: |cx| Box::pin(analytics::rate_limit(cx)),
    },
    Scenario {
        name: "analytics-breaker",
        about: "seed 004: CLOSED -> OPEN after failures, one HALF_OPEN trial, CLOSED again",
        run: |cx| Box::pin(analytics::breaker(cx)),
    },
    Scenario {
        name: "data-retry-fallback",
        about: "seed 000: the data service retries, then falls back; records read back",
        run: |cx| Box::pin(data::retry_fallback(cx)),
    },
    Scenario {
        name: "stress-test",
        about: "seed 001: a load on /stress-test through the gateway, without errors",
        run: |cx| Box::pin(balancing::stress_test(cx)),
    },
    Scenario {
        name: "circuit-breaker",
        about: "seed 003 #4: users down -> fallback data, the users breaker opens",
        run: |cx| Box::pin(breakers::circuit_breaker(cx)),
    },
    Scenario {
        name: "partial-failure",
        about: "seed 003 #5: orders down -> users still live, orders fall back",
        run: |cx| Box::pin(breakers::partial_failure(cx)),
    },
    Scenario {
        name: "recovery",
        about: "seed 003 #6: users back -> breaker HALF_OPEN, then CLOSED, live data",
        run: |cx| Box::pin(breakers::recovery(cx)),
    },
    Scenario {
        name: "registry-restart",
        about: "the registry stops: routing goes on from the cache; back, all re-register",
        run: |cx| Box::pin(discovery::registry_restart(cx)),
    },
    Scenario {
        name: "instance-crash",
        about: "a users instance is killed under load: no failed request, it comes back",
        run: |cx| Box::pin(crash::instance_crash(cx)),
    },
];

/// Runs `breakwater scenario`.
pub async fn run(args: ScenarioArgs) -> anyhow::Result<()> {
    if args.name == "list" {
        let mut text = String::new();
        for s in SCENARIOS {
            text.push_str(&format!("{:<22} {}\n", s.name, s.about));
        }
        text.push_str(&format!(
            "{:<22} every scenario above, in this order\n",
            "all"
        ));
        return write_out(&mut std::io::stdout(), &text);
    }
    let selected: Vec<&Scenario> = if args.name == "all" {
        SCENARIOS.iter().collect()
    } else {
        let found = SCENARIOS
            .iter()
            .find(|s| s.name == args.name)
            .ok_or_else(|| {
                UsageError(format!(
                    "unknown scenario '{}' (`breakwater scenario list` names them)",
                    args.name
                ))
            })?;
        vec![found]
    };
    let target = args
        .target
        .as_deref()
        .map(system::parse_target)
        .transpose()?;
    let shutdown =
        breakwater_runtime::shutdown::on_signal().context("installing signal handlers")?;
    let narrator = Narrator::new(args.json);

    let system = match target {
        Some(url) => System::attach(url).await?,
        None => {
            narrator.say("Starting the system (breakwater up on free ports)...");
            System::start(args.fast, &shutdown).await?
        }
    };
    narrator.say(&system.describe());
    let cx = match Ctx::new(&system, args.fast, narrator) {
        Ok(cx) => cx,
        Err(e) => {
            system.stop(true).await;
            return Err(e);
        }
    };

    let mut results: Vec<Value> = Vec::new();
    let mut interrupted = false;
    for (i, scenario) in selected.iter().enumerate() {
        cx.begin(i + 1, selected.len(), scenario);
        let started = Instant::now();
        let outcome = tokio::select! {
            r = (scenario.run)(&cx) => r,
            () = shutdown.cancelled() => {
                interrupted = true;
                Err(anyhow::anyhow!("interrupted"))
            }
        };
        if !(interrupted && cx.own_system) {
            cx.put_back().await;
        }
        results.push(cx.end(scenario, outcome, started.elapsed()));
        if interrupted {
            break;
        }
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| r["passed"] != true)
        .filter_map(|r| r["name"].as_str())
        .collect();
    cx.summary(&results);
    system.stop(!failed.is_empty() && !interrupted).await;
    if args.json {
        let report = json!({"passed": failed.is_empty(), "scenarios": results});
        write_out(&mut std::io::stdout(), &format!("{report:#}\n"))?;
    }
    if interrupted {
        anyhow::bail!("interrupted");
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "{} of {} scenarios failed: {}",
            failed.len(),
            results.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

fn write_out(out: &mut dyn std::io::Write, text: &str) -> anyhow::Result<()> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to the terminal")
}

/// Where the narration goes, and the current scenario's record.
struct Narrator {
    /// With `--json` the narration goes to stderr, so stdout is the JSON alone.
    to_stderr: bool,
    current: Mutex<Record>,
}

#[derive(Default)]
struct Record {
    step: u32,
    checks: Vec<Value>,
    failed: u32,
}

impl Narrator {
    fn new(to_stderr: bool) -> Self {
        Self {
            to_stderr,
            current: Mutex::default(),
        }
    }

    fn say(&self, line: &str) {
        let text = format!("{line}\n");
        // Narration is best effort: a closed terminal must not fail a scenario.
        let _ = if self.to_stderr {
            write_out(&mut std::io::stderr(), &text)
        } else {
            write_out(&mut std::io::stdout(), &text)
        };
    }

    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        // Plain counters and a list: a panic elsewhere cannot leave them inconsistent.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a scenario works with: the system's addresses, an HTTP client, the control
/// API when there is one, and the narration.
pub(crate) struct Ctx {
    pub(crate) http: reqwest::Client,
    /// Gateway base URL, without a trailing slash.
    pub(crate) gateway: String,
    /// Registry base URL, without a trailing slash.
    pub(crate) registry: String,
    control: Result<Control, String>,
    /// What the running scenario changed and has not put back yet.
    undo: Mutex<Undo>,
    /// `--fast`.
    pub(crate) fast: bool,
    /// Whether this run started the system (so its settings are known: analytics'
    /// threshold 3, the data service's 4 tries, `--fast`'s short windows).
    pub(crate) own_system: bool,
    narrator: Narrator,
}

/// Changes a scenario made to the system that it must undo before it ends: a scenario
/// undoes them itself, and the runner puts back whatever an interrupted or failed
/// scenario left.
#[derive(Debug, Default)]
pub(crate) struct Undo {
    /// Processes stopped and not started again.
    stopped: BTreeSet<String>,
    /// Unstable's chaos settings from before a change.
    pub(crate) chaos: Option<probe::SavedChaos>,
}

/// An HTTP answer, read whole.
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) text: String,
    /// The body as JSON (`Value::Null` when it is not JSON).
    pub(crate) json: Value,
}

impl Reply {
    /// A header as text ("" when absent).
    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// Whether a composed gateway answer is the seed's fallback data.
    pub(crate) fn is_fallback(&self) -> bool {
        self.json["meta"]["source"]
            .as_str()
            .is_some_and(|s| s.contains("fallback"))
    }

    /// `status` and the first 200 characters of the body, for check lines.
    pub(crate) fn brief(&self) -> String {
        let mut body: String = self.text.chars().take(200).collect();
        if body.len() < self.text.len() {
            body.push_str("...");
        }
        format!("{} {body}", self.status)
    }
}

impl Ctx {
    fn new(system: &System, fast: bool, narrator: Narrator) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            gateway: system.gateway.clone(),
            registry: system.registry.clone(),
            control: system.control.clone(),
            fast,
            own_system: system.is_own(),
            undo: Mutex::default(),
            narrator,
        })
    }

    /// The control API, or an error saying why there is none.
    pub(crate) fn control(&self) -> anyhow::Result<&Control> {
        self.control.as_ref().map_err(|why| {
            anyhow::anyhow!(
                "this scenario stops or kills processes and needs the control API of \
                 `breakwater up`: {why}"
            )
        })
    }

    /// What to undo (see [`Undo`]).
    pub(crate) fn undo(&self) -> std::sync::MutexGuard<'_, Undo> {
        // Plain fields set in one statement each: poisoning cannot leave them torn.
        self.undo.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops `name` through the control API and remembers it until it is started.
    pub(crate) async fn stop_process(&self, name: &str) -> anyhow::Result<control::Process> {
        let control = self.control()?;
        self.undo().stopped.insert(name.to_owned());
        control.stop(name).await
    }

    /// Starts `name` (stopped by [`Ctx::stop_process`]) through the control API.
    pub(crate) async fn start_process(&self, name: &str) -> anyhow::Result<control::Process> {
        let started = self.control()?.start(name).await?;
        self.undo().stopped.remove(name);
        Ok(started)
    }

    /// Puts back what a scenario that did not finish left changed: starts what it
    /// stopped (and waits until the registry lists it), restores unstable's chaos.
    async fn put_back(&self) {
        let (stopped, chaos) = {
            let mut undo = self.undo();
            (std::mem::take(&mut undo.stopped), undo.chaos.take())
        };
        for name in stopped {
            self.note(format!("putting back: starting {name}"));
            if let Err(e) = self.start_again(&name).await {
                self.check(false, format!("{name} could not be started again: {e:#}"));
            }
        }
        if let Some(saved) = chaos {
            self.note("putting back: unstable's fault rates");
            if let Err(e) = probe::restore_chaos(self, saved).await {
                self.check(
                    false,
                    format!("unstable's fault rates could not be put back: {e:#}"),
                );
            }
        }
    }

    async fn start_again(&self, name: &str) -> anyhow::Result<()> {
        let p = self.start_process(name).await?;
        if let Some(service) = p.service.as_deref() {
            let listed = self
                .poll(Duration::from_secs(60), || async {
                    let ports = probe::registry_ports(self, service).await?;
                    Ok(ports.contains(&p.port).then_some(()))
                })
                .await?;
            anyhow::ensure!(listed.is_some(), "it did not register within 60 s");
        }
        Ok(())
    }

    /// `normal`, or `fast` with `--fast`: for the scenario's own waits.
    pub(crate) fn pace(&self, normal: Duration, fast: Duration) -> Duration {
        if self.fast { fast } else { normal }
    }

    /// The gateway URL of `path`.
    pub(crate) fn gw(&self, path: &str) -> String {
        format!("{}{path}", self.gateway)
    }

    /// Sends `req` and reads the whole answer.
    pub(crate) async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Reply> {
        let req = req.build().context("building a request")?;
        let what = format!("{} {}", req.method(), req.url());
        let res = self.http.execute(req).await.with_context(|| what.clone())?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.with_context(|| what.clone())?;
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Reply {
            status,
            headers,
            text,
            json,
        })
    }

    /// `GET url`.
    pub(crate) async fn get(&self, url: &str) -> anyhow::Result<Reply> {
        self.send(self.http.get(url)).await
    }

    /// Polls `probe` every 200 ms until it yields a value or `within` has passed
    /// (then `None`). A probe error ends the wait with that error.
    pub(crate) async fn poll<T, F, Fut>(
        &self,
        within: Duration,
        mut probe: F,
    ) -> anyhow::Result<Option<T>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<Option<T>>>,
    {
        let until = Instant::now() + within;
        loop {
            if let Some(found) = probe().await? {
                return Ok(Some(found));
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn begin(&self, index: usize, total: usize, scenario: &Scenario) {
        *self.narrator.record() = Record::default();
        self.narrator.say(&format!(
            "\n━━ [{index}/{total}] {}: {}",
            scenario.name, scenario.about
        ));
    }

    /// Starts a numbered step.
    pub(crate) fn step(&self, text: impl Display) {
        let n = {
            let mut r = self.narrator.record();
            r.step += 1;
            r.step
        };
        self.narrator.say(&format!("  {n}. {text}"));
    }

    /// Where to look in a dashboard while this step runs.
    pub(crate) fn look(&self, text: impl Display) {
        self.narrator.say(&format!("     look at: {text}"));
    }

    /// A detail worth reading (not a check).
    pub(crate) fn note(&self, text: impl Display) {
        self.narrator.say(&format!("     {text}"));
    }

    /// Records and prints one check; returns `ok`.
    pub(crate) fn check(&self, ok: bool, what: impl Display) -> bool {
        let what = what.to_string();
        self.narrator
            .say(&format!("     {} {what}", if ok { "✓" } else { "✗" }));
        let mut r = self.narrator.record();
        if !ok {
            r.failed += 1;
        }
        r.checks.push(json!({"ok": ok, "check": what}));
        ok
    }

    fn end(&self, scenario: &Scenario, outcome: anyhow::Result<()>, took: Duration) -> Value {
        if let Err(e) = &outcome {
            self.check(false, format!("the scenario could not go on: {e:#}"));
        }
        let r = std::mem::take(&mut *self.narrator.record());
        let passed = r.failed == 0 && !r.checks.is_empty();
        if r.checks.is_empty() {
            self.narrator.say("     ✗ no check was made");
        }
        self.narrator.say(&format!(
            "  {} {} ({} checks, {} failed, {:.1} s)",
            if passed { "PASSED" } else { "FAILED" },
            scenario.name,
            r.checks.len(),
            r.failed,
            took.as_secs_f64()
        ));
        json!({
            "name": scenario.name,
            "passed": passed,
            "seconds": took.as_secs_f64(),
            "checks": r.checks,
        })
    }

    fn summary(&self, results: &[Value]) {
        let passed = results.iter().filter(|r| r["passed"] == true).count();
        let mut text = format!(
            "\nSummary: {} scenarios, {passed} passed, {} failed\n",
            results.len(),
            results.len() - passed
        );
        for r in results {
            let ok = r["passed"] == true;
            text.push_str(&format!(
                "  {} {}\n",
                if ok { "✓ PASSED" } else { "✗ FAILED" },
                r["name"].as_str().unwrap_or_default()
            ));
        }
        self.narrator.say(&text);
    }
}
