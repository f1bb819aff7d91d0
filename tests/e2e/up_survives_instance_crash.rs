//! Against the real `breakwater` binary: `up` brings the system up on free
//! ports, the CONTRACTS.md requests for registry, gateway, users and orders answer as
//! written, a users instance killed with SIGKILL under load costs no client request and
//! comes back registered, and Ctrl-C leaves no process behind and every port free.

use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::system::{System, pids, port_of, url_of};

pub(crate) async fn call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http.request(method.parse().unwrap(), url);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let res = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub(crate) async fn check_contracts(http: &reqwest::Client, gw: &str, registry: &str) {
    // Gateway.
    let (s, health) = call(http, "GET", &format!("{gw}/health"), None).await;
    assert_eq!(s, 200, "{health}");
    assert_eq!(health["service"], "api-gateway");
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["serviceDiscovery"]["status"], "connected");
    assert!(health["timestamp"].as_str().unwrap().ends_with('Z'));

    let (s, users) = call(http, "GET", &format!("{gw}/users"), None).await;
    assert_eq!(s, 200, "{users}");
    let list = users["users"].as_array().unwrap();
    assert_eq!(list.len(), 3, "{users}");
    assert_eq!(
        list[0],
        json!({"id":1,"name":"John Doe","email":"john@example.com","age":30})
    );
    assert!(
        !users["meta"]["source"]
            .as_str()
            .unwrap()
            .contains("fallback"),
        "{users}"
    );

    let (s, orders) = call(http, "GET", &format!("{gw}/orders/user/1"), None).await;
    assert_eq!(s, 200, "{orders}");
    assert_eq!(
        orders["orders"],
        json!([
            {"id":1,"userId":1,"products":["Laptop"]},
            {"id":2,"userId":1,"products":["Mouse"]}
        ])
    );
    assert_eq!(orders["meta"]["userId"], 1);
    let (s, bad) = call(http, "GET", &format!("{gw}/orders/user/abc"), None).await;
    assert_eq!((s, bad), (400, json!({"error":"Invalid user ID"})));

    let (s, uwo) = call(http, "GET", &format!("{gw}/users-with-orders"), None).await;
    assert_eq!(s, 200, "{uwo}");
    assert_eq!(uwo["meta"]["totalUsers"], 3);
    assert_eq!(uwo["meta"]["totalOrders"], 5);
    assert_eq!(
        uwo["users"][2]["orders"][0]["products"],
        json!(["Headphones"])
    );

    let (s, page) = call(http, "GET", &format!("{gw}/"), None).await;
    assert_eq!(s, 200);
    assert!(
        page.as_str().unwrap().contains("<html"),
        "gateway dashboard is HTML"
    );

    // Users CRUD through the gateway's proxy.
    let new = json!({"name":"Ada Lovelace","email":"ada@example.com","age":36});
    let (s, created) = call(http, "POST", &format!("{gw}/users"), Some(new)).await;
    assert_eq!(s, 201, "{created}");
    let id = created["id"].as_i64().unwrap();
    assert_eq!(created["name"], "Ada Lovelace");
    let (s, got) = call(http, "GET", &format!("{gw}/users/{id}"), None).await;
    assert_eq!((s, &got), (200, &created));
    let put = json!({"name":"Ada King","email":"ada@example.com","age":37});
    let (s, updated) = call(http, "PUT", &format!("{gw}/users/{id}"), Some(put)).await;
    assert_eq!(s, 200, "{updated}");
    assert_eq!(updated["name"], "Ada King");
    let (s, err) = call(
        http,
        "POST",
        &format!("{gw}/users"),
        Some(json!({"email":"x@y.z"})),
    )
    .await;
    assert_eq!(s, 400, "{err}");
    assert!(err["error"].as_str().unwrap().contains("name"), "{err}");
    let (s, err) = call(http, "GET", &format!("{gw}/users/999999"), None).await;
    assert_eq!((s, err), (404, json!({"error":"User not found"})));

    // Orders: create checks the user through discovery.
    let (s, order) = call(
        http,
        "POST",
        &format!("{gw}/orders"),
        Some(json!({"userId": id, "products": ["Desk"]})),
    )
    .await;
    assert_eq!(s, 201, "{order}");
    assert_eq!(order["userId"], id);
    let oid = order["id"].as_i64().unwrap();
    let (s, got) = call(http, "GET", &format!("{gw}/orders/{oid}"), None).await;
    assert_eq!((s, &got), (200, &order));
    let (s, err) = call(
        http,
        "POST",
        &format!("{gw}/orders"),
        Some(json!({"userId": 999999, "products": ["Desk"]})),
    )
    .await;
    assert_eq!(s, 422, "{err}");

    let (s, _) = call(http, "DELETE", &format!("{gw}/users/{id}"), None).await;
    assert_eq!(s, 200);
    let (s, _) = call(http, "DELETE", &format!("{gw}/users/{id}"), None).await;
    assert_eq!(s, 404);
    let (s, err) = call(http, "GET", &format!("{gw}/no/such/path"), None).await;
    assert_eq!(s, 404);
    assert!(err["error"].is_string());

    // Registry.
    let (s, list) = call(
        http,
        "GET",
        &format!("{registry}/services/user-service"),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(list["services"].as_array().unwrap().len(), 3, "{list}");
    let (s, all) = call(http, "GET", &format!("{registry}/services"), None).await;
    assert_eq!(s, 200);
    assert_eq!(all["order-service"].as_array().unwrap().len(), 3, "{all}");
    let (s, err) = call(
        http,
        "POST",
        &format!("{registry}/register"),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (s, err),
        (400, json!({"error":"Name and port are required"}))
    );
    let (s, err) = call(http, "DELETE", &format!("{registry}/services/nope/1"), None).await;
    assert_eq!((s, err), (404, json!({"error":"Service not found"})));
    let (s, unknown) = call(http, "GET", &format!("{registry}/services/nope"), None).await;
    assert_eq!((s, unknown), (200, json!({"services": []})));
}

/// Analytics, data and unstable (CONTRACTS.md), through the gateway. Unstable's chaos is
/// turned off first so that the answers are deterministic.
pub(crate) async fn check_more_contracts(http: &reqwest::Client, gw: &str, unstable: &str) {
    let calm = json!({"failureRate": 0.0, "delayRate": 0.0});
    let res = http
        .put(format!("{unstable}/chaos"))
        .json(&calm)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Analytics.
    let metric = json!({"timestamp": "2024-01-15T10:30:00.000Z", "value": 42.5, "type": "cpu"});
    let (s, body) = call(http, "POST", &format!("{gw}/api/metrics"), Some(metric)).await;
    assert_eq!(
        (s, body),
        (201, json!({"message":"Metric stored successfully"}))
    );
    let bad = json!({"timestamp": "yesterday", "value": 1, "type": "cpu"});
    let (s, body) = call(http, "POST", &format!("{gw}/api/metrics"), Some(bad)).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"], "Invalid payload");
    let summary = format!("{gw}/api/metrics/summary?type=cpu");
    let res = http.get(&summary).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-cache"], "MISS");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body, json!({"type":"cpu","count":1,"average_value":42.5}));
    let res = http.get(&summary).send().await.unwrap();
    assert_eq!(res.headers()["x-cache"], "HIT");
    let (s, body) = call(http, "GET", &format!("{gw}/api/metrics/summary"), None).await;
    assert_eq!(
        (s, body),
        (400, json!({"error":"Query parameter 'type' is required"}))
    );
    let (s, body) = call(
        http,
        "GET",
        &format!("{gw}/api/metrics/summary?type=none"),
        None,
    )
    .await;
    assert_eq!((s, body), (404, json!({"message":"No metrics found"})));
    let (s, body) = call(http, "GET", &format!("{gw}/api/external-data"), None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["circuit_state"], "CLOSED");
    assert_eq!(body["data"], json!({"external_data":"success"}));

    // Data (seed 000's app) and its sharded store.
    let (s, saved) = call(http, "GET", &format!("{gw}/data"), None).await;
    assert_eq!(s, 200, "{saved}");
    let id = saved["id"].as_str().unwrap();
    assert!(saved["instance"].is_string());
    let (s, got) = call(http, "GET", &format!("{gw}/data/{id}"), None).await;
    assert_eq!(s, 200, "{got}");
    assert_eq!((&got["id"], &got["data"]), (&saved["id"], &saved["data"]));
    let (s, _) = call(http, "GET", &format!("{gw}/data/not-an-id"), None).await;
    assert_eq!(s, 400);
    let unknown = "0".repeat(32);
    let (s, body) = call(http, "GET", &format!("{gw}/data/{unknown}"), None).await;
    assert_eq!((s, body), (404, json!({"error":"Data not found"})));

    // Events: the order created in `check_contracts` reaches analytics through the
    // outbox and its relay, and is counted exactly once.
    let created = format!("{gw}/api/metrics/summary?type=orders_created");
    let mut summary = Value::Null;
    for _ in 0..100 {
        let (s, body) = call(http, "GET", &created, None).await;
        if s == 200 {
            summary = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        summary,
        json!({"type":"orders_created","count":1,"average_value":1.0})
    );

    // Unstable's CPU-bound endpoint (seed 001), on the right path of the right service.
    let (s, body) = call(http, "GET", &format!("{gw}/stress-test"), None).await;
    assert_eq!(s, 200, "{body}");
}

/// Requests in a loop until `stop`; counts every answer that is not a real 200 from the
/// users service (transport error, non-200, or the gateway's fallback data).
async fn load(
    http: reqwest::Client,
    gw: String,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<Mutex<Vec<String>>>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let url = if n.is_multiple_of(2) {
            format!("{gw}/users/1")
        } else {
            format!("{gw}/users")
        };
        match http.get(&url).send().await {
            Ok(res) => {
                let status = res.status();
                let body = res.text().await.unwrap_or_default();
                if status == 200 && !body.contains("fallback") {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed
                        .lock()
                        .unwrap()
                        .push(format!("GET {url}: {status} {body}"));
                }
            }
            Err(e) => failed.lock().unwrap().push(format!("GET {url}: {e}")),
        }
    }
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn process_exists(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_contracts_survives_a_crash_and_stops_clean() {
    let mut system = System::start();
    let state = system.wait_ready().await;
    let gw = url_of(&state, "gateway");
    let registry = url_of(&state, "registry");
    assert!(
        system.output().contains("Breakwater is up"),
        "table printed:\n{}",
        system.output()
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    check_contracts(&http, &gw, &registry).await;
    check_more_contracts(&http, &gw, &url_of(&state, "unstable-1")).await;

    // SIGKILL one users instance while requests flow.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(load(
                http.clone(),
                gw.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = pids(&state)["users-1"];
    let victim_port = port_of(&state, "users-1");
    let killed_at_ms = now_ms();
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();

    // Wait until it is restarted (new pid) and registered again after the kill.
    let mut restarted = None;
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(now) = system.state() else { continue };
        let Some(&pid) = pids(&now).get("users-1") else {
            continue;
        };
        if pid == victim {
            continue;
        }
        let (_, list) = call(
            &http,
            "GET",
            &format!("{registry}/services/user-service"),
            None,
        )
        .await;
        let back = list["services"].as_array().unwrap().iter().any(|i| {
            i["port"] == victim_port && i["registeredAt"].as_u64().unwrap() >= killed_at_ms
        });
        if back {
            restarted = Some(pid);
            break;
        }
    }
    let new_pid = restarted.unwrap_or_else(|| {
        panic!(
            "users-1 not restarted and re-registered:\n{}",
            system.output()
        )
    });
    assert!(!process_exists(victim) || new_pid != victim);
    // Keep the load on a little longer, across the restarted instance.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    let ok = ok.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:#?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(10)]
    );
    assert!(ok > 50, "only {ok} requests completed");

    // Ctrl-C: everything stops, in order, and nothing is left.
    let before = system.state().unwrap();
    let all_pids = pids(&before);
    // registry, 3 users, 3 orders, analytics, 2 data, unstable, gateway
    assert_eq!(all_pids.len(), 12, "{before}");
    let ports: Vec<u16> = before["processes"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| u16::try_from(p["port"].as_u64().unwrap()).unwrap())
        .collect();
    kill(
        Pid::from_raw(i32::try_from(system.up.id()).unwrap()),
        Signal::SIGINT,
    )
    .unwrap();
    let mut status = None;
    for _ in 0..600 {
        if let Some(s) = system.up.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status =
        status.unwrap_or_else(|| panic!("up did not exit after SIGINT:\n{}", system.output()));
    assert!(
        status.success(),
        "up exited with {status}:\n{}",
        system.output()
    );
    for (name, pid) in &all_pids {
        assert!(!process_exists(*pid), "{name} (pid {pid}) still running");
    }
    for port in ports {
        assert!(port_is_free(port), "port {port} still taken");
    }
    assert!(
        !Path::new(&system.data_dir.join("up.json")).exists(),
        "state file removed"
    );
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}
