//! Against the real `breakwater` binary, through the gateway's `/admin/control` (which
//! forwards to `up`'s control API): a users instance stopped there leaves the registry
//! and stays stopped, started again it registers again, a killed one is restarted under
//! a new pid, and unstable's failure rate set to 1 makes its `/data` fail until it is
//! set back.

use std::time::Duration;

use serde_json::{Value, json};

use crate::system::{System, port_of, url_of};
use crate::up_survives_instance_crash::call;

/// Ports the registry lists under `service`.
async fn registered_ports(http: &reqwest::Client, registry: &str, service: &str) -> Vec<u64> {
    let (_, body) = call(http, "GET", &format!("{registry}/services/{service}"), None).await;
    body["services"]
        .as_array()
        .map(|list| list.iter().filter_map(|i| i["port"].as_u64()).collect())
        .unwrap_or_default()
}

/// Polls `check` every 100 ms for up to `secs` seconds.
async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..secs * 10 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within {secs} s: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_controls_processes_and_chaos() {
    let mut system = System::start();
    let state = system.wait_ready().await;
    let gw = url_of(&state, "gateway");
    let registry = url_of(&state, "registry");
    let control = format!("{gw}/admin/control");
    assert!(
        state["control"]
            .as_str()
            .is_some_and(|u| u.starts_with("http://")),
        "up.json names the control API: {state}"
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()
        .unwrap();

    let (status, list) = call(&http, "GET", &format!("{control}/processes"), None).await;
    assert_eq!(status, 200, "{list}");
    let names: Vec<&str> = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.first(), Some(&"registry"), "{list}");
    assert_eq!(names.last(), Some(&"gateway"), "{list}");
    assert!(
        names.contains(&"users-1") && names.contains(&"unstable-1"),
        "{list}"
    );
    assert!(
        list["processes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] == "running" && p["pid"].is_u64()),
        "{list}"
    );
    let (status, body) = call(&http, "GET", &format!("{control}/processes/nope-1"), None).await;
    assert_eq!(
        (status, body),
        (404, json!({"error": "no process named 'nope-1'"}))
    );

    // Stop: deregistered, and not restarted.
    let users1 = u64::from(port_of(&state, "users-1"));
    let (status, stopped) = call(
        &http,
        "POST",
        &format!("{control}/processes/users-1/stop"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["pid"], Value::Null);
    eventually(5, "users-1 leaves the registry", || async {
        !registered_ports(&http, &registry, "user-service")
            .await
            .contains(&users1)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, still) = call(&http, "GET", &format!("{control}/processes/users-1"), None).await;
    assert_eq!(still["state"], "stopped", "{still}");
    assert_eq!(still["restarts"], 0, "{still}");
    assert!(
        !registered_ports(&http, &registry, "user-service")
            .await
            .contains(&users1),
        "a stopped instance stays out of the registry"
    );
    let (status, body) = call(
        &http,
        "POST",
        &format!("{control}/processes/users-1/kill"),
        None,
    )
    .await;
    assert_eq!(
        (status, body),
        (409, json!({"error": "users-1 is stopped"}))
    );

    // Start: registered again.
    let (status, started) = call(
        &http,
        "POST",
        &format!("{control}/processes/users-1/start"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(started["state"], "running");
    assert!(started["pid"].is_u64(), "{started}");
    eventually(20, "users-1 registers again", || async {
        registered_ports(&http, &registry, "user-service")
            .await
            .contains(&users1)
    })
    .await;

    // Kill: restarted with a new pid.
    let (_, before) = call(&http, "GET", &format!("{control}/processes/users-2"), None).await;
    let old_pid = before["pid"].as_u64().unwrap();
    let (status, killed) = call(
        &http,
        "POST",
        &format!("{control}/processes/users-2/kill"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{killed}");
    assert_eq!(killed["state"], "restarting", "{killed}");
    let mut after = Value::Null;
    for _ in 0..200 {
        (_, after) = call(&http, "GET", &format!("{control}/processes/users-2"), None).await;
        if after["state"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(after["state"], "running", "users-2 runs again within 20 s");
    assert!(
        after["pid"].as_u64().is_some_and(|p| p != old_pid),
        "{after}"
    );
    assert_eq!(after["restarts"], 1, "{after}");

    // Chaos: every /data fails at failure rate 1, none at 0.
    let unstable = url_of(&state, "unstable-1");
    let (status, original) = call(&http, "GET", &format!("{control}/chaos"), None).await;
    assert_eq!(status, 200, "{original}");
    assert_eq!(original["instances"][0]["name"], "unstable-1", "{original}");
    let original = original["instances"][0]["chaos"].clone();
    assert!(original["failureRate"].is_number(), "{original}");

    let (status, body) = call(
        &http,
        "PUT",
        &format!("{control}/chaos"),
        Some(json!({"failureRate": 1.0, "delayRate": 0.0})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["instances"][0]["chaos"]["failureRate"], 1.0, "{body}");
    for _ in 0..5 {
        let (status, body) = call(&http, "GET", &format!("{unstable}/data"), None).await;
        assert_eq!(status, 500, "{body}");
    }
    let (status, body) = call(
        &http,
        "PUT",
        &format!("{control}/chaos"),
        Some(json!({"failureRate": 2})),
    )
    .await;
    assert_eq!(status, 400, "unstable's own validation: {body}");
    assert!(
        body["error"].as_str().unwrap().contains("failureRate"),
        "{body}"
    );

    let (status, body) = call(
        &http,
        "PUT",
        &format!("{control}/chaos"),
        Some(json!({"failureRate": 0.0})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..5 {
        let (status, body) = call(&http, "GET", &format!("{unstable}/data"), None).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = call(&http, "PUT", &format!("{control}/chaos"), Some(original)).await;
    assert_eq!(status, 200, "{body}");
    drop(system);
}
