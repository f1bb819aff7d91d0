//! A flag or configuration error exits with code 64 and a message naming the flag.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run breakwater");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn bad_flags_exit_64_naming_the_flag() {
    for (args, flag) in [
        (&["up", "--users", "0"][..], "--users"),
        (&["registry", "--port", "70000"][..], "--port"),
        (
            &["gateway", "--port", "0", "--try-timeout", "soon"][..],
            "--try-timeout",
        ),
        (
            &[
                "service",
                "users",
                "--port",
                "0",
                "--registry",
                "localhost:3000",
            ][..],
            "--registry",
        ),
        (&["up", "--log-format", "xml"][..], "--log-format"),
    ] {
        let (code, stderr) = run(args);
        assert_eq!(code, 64, "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?} should name {flag}: {stderr}"
        );
    }
}

#[test]
fn a_port_in_use_exits_64_naming_the_port() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port().to_string();
    let (code, stderr) = run(&["registry", "--port", &port, "--bind", "127.0.0.1"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("--port") && stderr.contains(&port),
        "{stderr}"
    );
}

#[test]
fn help_exits_zero() {
    let (code, _) = run(&["--help"]);
    assert_eq!(code, 0);
}
