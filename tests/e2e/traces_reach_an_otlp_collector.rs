//! OTLP export across processes: with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at an
//! in-process collector, a request through gateway -> orders -> users arrives as one
//! trace: the caller's span, the gateway's, orders' server span, its client call, and
//! users' server span, each the parent of the next, named by route and by the
//! `service.name` of its process.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// Every span received, each with its resource's `service.name` under `service`.
type Spans = Arc<Mutex<Vec<Value>>>;

/// An OTLP/HTTP JSON collector on a free port; its base URL.
async fn collector() -> (String, Spans) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let spans: Spans = Arc::default();
    let received = spans.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let received = received.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let received = received.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(req.headers()["content-type"], "application/json");
                        let body = req.into_body().collect().await?.to_bytes();
                        let body: Value = serde_json::from_slice(&body).unwrap();
                        for rs in body["resourceSpans"].as_array().unwrap() {
                            let service = rs["resource"]["attributes"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .find(|kv| kv["key"] == "service.name")
                                .map(|kv| kv["value"]["stringValue"].clone())
                                .unwrap();
                            for ss in rs["scopeSpans"].as_array().unwrap() {
                                for span in ss["spans"].as_array().unwrap() {
                                    let mut span = span.clone();
                                    span["service"] = service.clone();
                                    received.lock().unwrap().push(span);
                                }
                            }
                        }
                        Ok::<_, hyper::Error>(hyper::Response::new(String::from("{}")))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (base, spans)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The component processes, killed on drop so a failing test leaves none behind.
struct Processes {
    children: Vec<Child>,
    data_dir: PathBuf,
}

impl Processes {
    fn spawn(&mut self, collector: &str, args: &[&str]) {
        let child = Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .args(args)
            .args(["--bind", "127.0.0.1"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SERVICE_NAME")
            // Embedded storage: a REDIS_URL or DATABASE_URL meant for other tests must
            // not move these processes onto shared servers.
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL")
            .env("BREAKWATER_DATA_DIR", &self.data_dir)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start breakwater");
        self.children.push(child);
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.children {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

async fn wait_until(what: &str, mut ready: impl AsyncFnMut() -> bool) {
    for _ in 0..300 {
        if ready().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} not ready within 30 s");
}

fn span_id(span: &Value) -> &str {
    span["spanId"].as_str().unwrap()
}

#[tokio::test]
async fn a_request_through_gateway_orders_and_users_is_one_trace() {
    let (collector, spans) = collector().await;
    let data_dir = std::env::temp_dir().join(format!("breakwater-e2e-otlp-{}", std::process::id()));
    std::fs::create_dir_all(&data_dir).unwrap();
    let mut procs = Processes {
        children: Vec::new(),
        data_dir,
    };
    let (registry_port, users_port, orders_port) = (free_port(), free_port(), free_port());
    let gateway_port = free_port();
    let registry = format!("http://127.0.0.1:{registry_port}");
    procs.spawn(
        &collector,
        &["registry", "--port", &registry_port.to_string()],
    );
    let common = [
        "--registry",
        &registry,
        "--heartbeat-interval",
        "1",
        "--advertise-host",
        "127.0.0.1",
    ];
    let users_port_arg = users_port.to_string();
    let orders_port_arg = orders_port.to_string();
    let mut users = vec!["service", "users", "--port", &users_port_arg];
    users.extend(common);
    let mut orders = vec!["service", "orders", "--port", &orders_port_arg];
    orders.extend(common);
    procs.spawn(&collector, &users);
    procs.spawn(&collector, &orders);
    let gateway_port_arg = gateway_port.to_string();
    let mut gateway = vec!["gateway", "--port", &gateway_port_arg];
    gateway.extend(common);
    procs.spawn(&collector, &gateway);

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for service in ["user-service", "order-service"] {
        wait_until(service, async || {
            let listed = http
                .get(format!("{registry}/services/{service}"))
                .send()
                .await;
            match listed {
                Ok(res) if res.status().is_success() => res
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["services"].as_array().is_some_and(|a| !a.is_empty())),
                _ => false,
            }
        })
        .await;
    }
    let gateway_url = format!("http://127.0.0.1:{gateway_port}");
    wait_until("the gateway", async || {
        http.get(format!("{gateway_url}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let res = http
        .post(format!("{gateway_url}/orders"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .header("x-request-id", "e2e-otlp-1")
        .json(&json!({"userId": 1, "products": ["Desk"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());

    // The exporters send at least once a second.
    let mut trace = Vec::new();
    for _ in 0..100 {
        trace = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s["traceId"] == trace_id)
            .cloned()
            .collect();
        let users_seen = trace.iter().any(|s| s["service"] == "user-service");
        let gateway_seen = trace.iter().any(|s| s["service"] == "api-gateway");
        let orders_seen = trace
            .iter()
            .filter(|s| s["service"] == "order-service")
            .count();
        if users_seen && gateway_seen && orders_seen >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let find = |service: &str, kind: u64, name: &str| {
        let found: Vec<_> = trace
            .iter()
            .filter(|s| s["service"] == service && s["kind"] == kind && s["name"] == name)
            .collect();
        assert_eq!(found.len(), 1, "{service} {kind} {name}: {trace:#?}");
        found[0]
    };
    let gateway = find("api-gateway", 2, "POST /orders");
    let orders_server = find("order-service", 2, "POST /orders");
    let orders_client = find("order-service", 3, "GET /users/{id}");
    let users_server = find("user-service", 2, "GET /users/{id}");

    assert_eq!(gateway["parentSpanId"], caller_span);
    assert_eq!(orders_server["parentSpanId"], span_id(gateway));
    assert_eq!(orders_client["parentSpanId"], span_id(orders_server));
    assert_eq!(users_server["parentSpanId"], span_id(orders_client));
    let mut ids = [gateway, orders_server, orders_client, users_server].map(span_id);
    ids.sort_unstable();
    assert!(ids.windows(2).all(|w| w[0] != w[1]), "{ids:?}");
    for span in &trace {
        let start: u64 = span["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let end: u64 = span["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
        assert!(start > 0 && end >= start, "{span}");
    }

    // The exporter's own figures are on the process's metrics page.
    let page = http
        .get(format!("http://127.0.0.1:{users_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported = page
        .lines()
        .find_map(|l| l.strip_prefix("otlp_spans_exported_total "))
        .unwrap_or_else(|| panic!("{page}"));
    assert!(exported.parse::<u64>().unwrap() >= 1, "{page}");
    assert!(page.contains("otlp_spans_dropped_total 0"), "{page}");
    let page = http
        .get(format!("{gateway_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("breakwater_gateway_otlp_spans_exported_total"),
        "{page}"
    );
}

#[test]
fn an_unusable_otlp_endpoint_exits_64_naming_the_variable() {
    for endpoint in ["https://collector:4318", "collector:4318"] {
        let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .args(["registry", "--port", "0", "--bind", "127.0.0.1"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .output()
            .expect("run breakwater");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{endpoint}: {stderr}");
        assert!(
            stderr.contains("OTEL_EXPORTER_OTLP_ENDPOINT"),
            "{endpoint}: {stderr}"
        );
    }
}

#[tokio::test]
async fn under_up_every_process_keeps_its_own_service_name() {
    let (collector, spans) = collector().await;
    // One OTEL_SERVICE_NAME for the whole system would label every process the same;
    // `up` does not pass it on.
    let mut system = crate::system::System::start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector),
            ("OTEL_SERVICE_NAME", "one-name-for-all"),
        ],
    );
    let state = system.wait_ready().await;
    let gateway = crate::system::url_of(&state, "gateway");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let res = http.get(format!("{gateway}/users/1")).send().await.unwrap();
    assert_eq!(res.status(), 200);

    let names = || -> Vec<String> {
        let mut names: Vec<String> = spans
            .lock()
            .unwrap()
            .iter()
            .filter_map(|s| s["service"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        names
    };
    wait_until("spans from the gateway and users", async || {
        let seen = names();
        seen.iter().any(|n| n == "api-gateway") && seen.iter().any(|n| n == "user-service")
    })
    .await;
    assert!(
        !names().iter().any(|n| n == "one-name-for-all"),
        "{:?}",
        names()
    );
}
