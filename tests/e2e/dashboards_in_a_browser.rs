//! Both dashboards in headless Chromium: `up` on free ports, then
//! `tests/browser/dashboards.mjs` (playwright-core) checks that every gateway section
//! loads data, that the slider changes the polling rate, that a hung users instance
//! shows as down or ejected with its service's breaker state, that clicking Stop on
//! another users instance in the processes panel (`up`'s control API) shows it stopped
//! and then down in the services section, that unstable's rates can be applied (and a
//! bad one is refused with unstable's message), and that the registry dashboard lists,
//! registers and removes. It saves screenshots of both dashboards.
//!
//! The instance is stopped with SIGSTOP, not killed: `up` would restart a killed one at
//! once, while a stopped one keeps its port open and answers nothing, which is the
//! failure the gateway has to notice (timeouts, ejection, then discovery dropping it).
//!
//! Needs node, /usr/bin/chromium and `tests/browser/node_modules` (`npm ci --prefix
//! tests/browser`); without them it prints `SKIPPED (...)` and passes, unless
//! `BREAKWATER_REQUIRE_BROWSER=1`. Screenshots go to a temporary directory that is
//! removed, or to `BREAKWATER_SCREENSHOT_DIR` when set (e.g. `docs`, to refresh the
//! README's pictures).

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::system::{System, pids, port_of, url_of};

const CHROMIUM: &str = "/usr/bin/chromium";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Why the browser test cannot run here, if it cannot.
fn missing_prerequisite(root: &Path) -> Option<String> {
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !node.is_ok_and(|s| s.success()) {
        return Some("no node".into());
    }
    if !Path::new(CHROMIUM).exists() {
        return Some(format!("no {CHROMIUM}"));
    }
    if !root
        .join("tests/browser/node_modules/playwright-core")
        .exists()
    {
        return Some("no tests/browser/node_modules: npm ci --prefix tests/browser".into());
    }
    None
}

/// Keeps the gateway busy (users, orders, and an unknown path for 404s) so the charts
/// and per-instance counts have something to show, until `stop` is set.
fn traffic(gw: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let paths = [
            "/users",
            "/orders/user/1",
            "/users-with-orders",
            "/no-such-path",
        ];
        let mut n = 0_usize;
        while !stop.load(Ordering::Relaxed) {
            let _ = http
                .get(format!("{gw}{}", paths[n % paths.len()]))
                .send()
                .await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// The registry name of the service that has an instance on `port`.
async fn service_on_port(http: &reqwest::Client, registry: &str, port: u16) -> String {
    let all: Value = http
        .get(format!("{registry}/services"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    all.as_object()
        .unwrap()
        .iter()
        .find(|(_, list)| {
            list.as_array()
                .unwrap()
                .iter()
                .any(|i| i["port"].as_u64() == Some(u64::from(port)))
        })
        .map(|(name, _)| name.clone())
        .unwrap_or_else(|| panic!("no service has an instance on port {port}: {all}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_show_the_system_and_a_stopped_instance() {
    let root = repo_root();
    if let Some(why) = missing_prerequisite(&root) {
        assert!(
            std::env::var("BREAKWATER_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "BREAKWATER_REQUIRE_BROWSER=1 but {why}"
        );
        eprintln!("SKIPPED ({why})");
        return;
    }
    let (shots, temporary) = match std::env::var_os("BREAKWATER_SCREENSHOT_DIR") {
        Some(dir) => (root.join(dir), false),
        None => (
            std::env::temp_dir().join(format!("breakwater-shots-{}", std::process::id())),
            true,
        ),
    };

    let mut system = System::start();
    let state = system.wait_ready().await;
    let gw = url_of(&state, "gateway");
    let registry = url_of(&state, "registry");
    let http = reqwest::Client::new();
    let victim_pid = Pid::from_raw(pids(&state)["users-1"]);
    let victim_port = port_of(&state, "users-1");
    let service = service_on_port(&http, &registry, victim_port).await;

    let stop_traffic = Arc::new(AtomicBool::new(false));
    let load = traffic(gw.clone(), Arc::clone(&stop_traffic));

    let mut node = Command::new("node")
        .arg(root.join("tests/browser/dashboards.mjs"))
        .arg(&gw)
        .arg(&registry)
        .arg(&shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start node");
    let mut to_node = node.stdin.take().unwrap();
    let from_node = BufReader::new(node.stdout.take().unwrap());

    // The script's output is read on a thread: the handshake line stops the instance.
    let stopper = std::thread::spawn(move || {
        let mut stopped = false;
        let mut transcript = String::new();
        for line in from_node.lines().map_while(Result::ok) {
            eprintln!("browser: {line}");
            transcript.push_str(&line);
            transcript.push('\n');
            if line.trim() == "READY_FOR_STOP" && !stopped {
                kill(victim_pid, Signal::SIGSTOP).unwrap();
                stopped = true;
                writeln!(to_node, "{service} {victim_port}").unwrap();
                to_node.flush().unwrap();
            }
        }
        (stopped, transcript)
    });

    let status = tokio::task::spawn_blocking(move || node.wait())
        .await
        .unwrap()
        .unwrap();
    let (stopped, transcript) = stopper.join().unwrap();
    stop_traffic.store(true, Ordering::Relaxed);
    let _ = load.await;
    // Let it run again so `up` can stop it cleanly (a stopped process ignores SIGTERM).
    let _ = kill(victim_pid, Signal::SIGCONT);

    let pictures_exist = ["gateway-dashboard.png", "registry-dashboard.png"]
        .iter()
        .all(|f| shots.join(f).is_file());
    if temporary {
        let _ = std::fs::remove_dir_all(&shots);
    }
    assert!(
        stopped,
        "the script never asked for the stop:\n{transcript}"
    );
    assert!(
        status.success(),
        "browser script failed ({status}):\n{transcript}"
    );
    assert!(transcript.contains("\nOK\n"), "{transcript}");
    assert!(pictures_exist, "screenshots missing in {}", shots.display());
    drop(system);
}
