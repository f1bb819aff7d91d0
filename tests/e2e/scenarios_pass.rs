//! `breakwater scenario all --fast` starts its own system, runs every scenario in it,
//! passes, and removes what it started; an unknown scenario name or a bad `--target` is
//! a usage error (exit 64).

use std::process::Command;
use std::time::Duration;

/// Every scenario `breakwater scenario list` names.
fn scenario_names() -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["scenario", "list"])
        .output()
        .expect("run breakwater scenario list");
    assert!(out.status.success(), "{out:?}");
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "all")
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 17, "{names:?}");
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn every_scenario_passes_fast() {
    let names = scenario_names();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["scenario", "all", "--fast"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start breakwater scenario all --fast");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let read = |mut stream: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
        tokio::spawn(async move {
            let mut text = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut text).await;
            text
        })
    };
    let (out, err) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let status = match tokio::time::timeout(Duration::from_secs(420), child.wait()).await {
        Ok(status) => status.unwrap(),
        Err(_) => {
            // SIGTERM lets it stop the system it started before it exits.
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = tokio::time::timeout(Duration::from_secs(90), child.wait()).await;
            panic!("scenario all --fast took more than 7 minutes");
        }
    };
    let (out, err) = (out.await.unwrap(), err.await.unwrap());
    assert!(status.success(), "exit {status}\n{out}\n{err}");
    for name in &names {
        assert!(
            out.lines().any(|l| l.trim() == format!("✓ PASSED {name}")),
            "{name} is not reported as passed:\n{out}"
        );
    }
    assert!(
        out.contains(&format!(
            "{} scenarios, {} passed, 0 failed",
            names.len(),
            names.len()
        )),
        "{out}"
    );
    // The system it started is gone with its directory (up.json included).
    let dir = out
        .lines()
        .find_map(|l| l.split_once("started here, data in ")?.1.split_once(')'))
        .map(|(dir, _)| std::path::PathBuf::from(dir))
        .unwrap_or_else(|| panic!("no data directory named:\n{out}"));
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

#[test]
fn an_unknown_scenario_exits_64_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["scenario", "no-such-scenario"])
        .env("RUST_LOG", "error")
        .output()
        .expect("run breakwater scenario");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("no-such-scenario"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["scenario", "all", "--target", "localhost:8000"])
        .env("RUST_LOG", "error")
        .output()
        .expect("run breakwater scenario");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--target"), "{stderr}");
}
