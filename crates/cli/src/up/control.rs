//! `up`'s control API: what the gateway dashboard's buttons and `breakwater scenario`
//! use to act on the running system.
//!
//! - `GET /processes`, `GET /processes/{name}`: every supervised process (plan order)
//!   with its role, port, pid, state (`running` / `stopped` / `restarting`) and restarts.
//! - `POST /processes/{name}/stop | start | kill`: a graceful stop that stays stopped, a
//!   start of a stopped process, a SIGKILL handled as a crash (restarted with backoff);
//!   each answered with the process once done ([`child::Command`]).
//! - `GET /chaos`, `PUT /chaos`: unstable's fault rates, read from and written to every
//!   running unstable instance. Unstable validates the body (one place): a refusal comes
//!   back with its status and body, and the other instances are then left unchanged.
//!
//! [`app`] builds the router over a [`Control`], the list of supervised processes that
//! `up` fills as it starts them.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use breakwater_runtime::http::{ApiError, Json, Path, method_not_allowed, not_found};
use serde_json::{Value, json};

use super::child::{Command, Handle, Refused, RunState, Status};

/// How long one call to an unstable instance may take.
const CHAOS_TIMEOUT: Duration = Duration::from_secs(5);

/// The processes the control API acts on, and the client it reaches unstable with.
#[derive(Debug, Clone)]
pub struct Control {
    processes: Arc<Mutex<Vec<Handle>>>,
    http: reqwest::Client,
}

impl Control {
    pub fn new() -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(CHAOS_TIMEOUT).build()?;
        Ok(Self {
            processes: Arc::default(),
            http,
        })
    }

    /// Adds a started process (in plan order: `up` starts them in that order).
    pub fn add(&self, handle: Handle) {
        self.lock().push(handle);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Handle>> {
        // Pushes and clones only: a panic elsewhere cannot leave the list half-changed.
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn all(&self) -> Vec<Handle> {
        self.lock().clone()
    }

    fn find(&self, name: &str) -> Result<Handle, ApiError> {
        self.lock()
            .iter()
            .find(|h| h.spec().name == name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no process named '{name}'")))
    }

    fn unstable(&self) -> Vec<Handle> {
        self.all()
            .into_iter()
            .filter(|h| h.spec().registry_name == Some(breakwater_services::unstable::SERVICE_NAME))
            .collect()
    }
}

/// The control API's routes, with JSON 404/405 fallbacks.
pub fn app(state: Control) -> Router {
    Router::new()
        .route("/processes", get(list))
        .route("/processes/{name}", get(one))
        .route("/processes/{name}/stop", post(stop))
        .route("/processes/{name}/start", post(start))
        .route("/processes/{name}/kill", post(kill))
        .route("/chaos", get(read_chaos).put(write_chaos))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

fn describe(handle: &Handle) -> Value {
    describe_as(handle, handle.status())
}

fn describe_as(handle: &Handle, status: Status) -> Value {
    let spec = handle.spec();
    json!({
        "name": spec.name,
        "role": spec.role.as_str(),
        "service": spec.registry_name,
        "port": spec.port,
        "url": spec.url(),
        "pid": status.pid,
        "state": status.state.as_str(),
        "restarts": status.restarts,
    })
}

/// `GET /processes`.
async fn list(State(control): State<Control>) -> Json<Value> {
    let processes: Vec<Value> = control.all().iter().map(describe).collect();
    Json(json!({ "processes": processes }))
}

/// `GET /processes/{name}`.
async fn one(
    State(control): State<Control>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(describe(&control.find(&name)?)))
}

async fn command(control: &Control, name: &str, command: Command) -> Result<Json<Value>, ApiError> {
    let handle = control.find(name)?;
    match handle.send(command).await {
        // The status the command ended in, not a later one (a killed process may be
        // running again by the time this is read).
        Ok(status) => Ok(Json(describe_as(&handle, status))),
        Err(refused @ Refused::Conflict { .. }) => {
            Err(ApiError::new(StatusCode::CONFLICT, refused.to_string()))
        }
        Err(refused @ Refused::ShuttingDown(_)) => Err(ApiError::unavailable(refused.to_string())),
    }
}

/// `POST /processes/{name}/stop`.
async fn stop(
    State(control): State<Control>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    command(&control, &name, Command::Stop).await
}

/// `POST /processes/{name}/start`.
async fn start(
    State(control): State<Control>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    command(&control, &name, Command::Start).await
}

/// `POST /processes/{name}/kill`.
async fn kill(
    State(control): State<Control>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    command(&control, &name, Command::Kill).await
}

/// One unstable instance's answer: its status and JSON body (a non-JSON body becomes
/// `{"error": text}`).
async fn call_unstable(
    http: &reqwest::Client,
    handle: &Handle,
    body: Option<&Value>,
) -> Result<(StatusCode, Value), String> {
    let url = format!("{}/chaos", handle.spec().url());
    let req = match body {
        Some(body) => http.put(&url).json(body),
        None => http.get(&url),
    };
    let res = req.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = res.status();
    let text = res.text().await.map_err(|e| format!("{url}: {e}"))?;
    let value = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "error": text }));
    Ok((status, value))
}

/// `GET /chaos`: every unstable instance, with its settings when it runs and answers.
async fn read_chaos(State(control): State<Control>) -> Json<Value> {
    let mut instances = Vec::new();
    for handle in control.unstable() {
        let state = handle.status().state;
        let mut entry = json!({
            "name": handle.spec().name,
            "state": state.as_str(),
            "chaos": null,
        });
        if state == RunState::Running {
            match call_unstable(&control.http, &handle, None).await {
                Ok((status, body)) if status.is_success() => entry["chaos"] = body,
                Ok((status, body)) => {
                    entry["error"] = json!(format!("answered {status}: {body}"));
                }
                Err(e) => entry["error"] = json!(e),
            }
        }
        instances.push(entry);
    }
    Json(json!({ "instances": instances }))
}

/// `PUT /chaos`: the body goes to the first running unstable instance; if it accepts,
/// to the others too.
async fn write_chaos(State(control): State<Control>, Json(body): Json<Value>) -> Response {
    let all = control.unstable();
    let running: Vec<Handle> = all
        .iter()
        .filter(|h| h.status().state == RunState::Running)
        .cloned()
        .collect();
    if running.is_empty() {
        let why = if all.is_empty() {
            "no unstable instance: breakwater up runs none (--unstable 0)".to_owned()
        } else {
            let states: Vec<String> = all
                .iter()
                .map(|h| format!("{} is {}", h.spec().name, h.status().state.as_str()))
                .collect();
            format!("no running unstable instance ({})", states.join(", "))
        };
        return ApiError::new(StatusCode::CONFLICT, why).into_response();
    }
    let mut instances = Vec::new();
    for (i, handle) in running.iter().enumerate() {
        let name = &handle.spec().name;
        match call_unstable(&control.http, handle, Some(&body)).await {
            Ok((status, answer)) if status.is_success() => {
                instances.push(json!({ "name": name, "chaos": answer }));
            }
            // The first instance's refusal is unstable's validation: pass it back as is.
            // The same body cannot then pass on another instance, so none changed.
            Ok((status, answer)) if i == 0 && status.is_client_error() => {
                return (status, axum::Json(answer)).into_response();
            }
            Ok((status, answer)) => {
                return bad_gateway(format!("{name} answered {status}: {answer}"), instances);
            }
            Err(e) => return bad_gateway(format!("{name} did not answer: {e}"), instances),
        }
    }
    Json(json!({ "instances": instances })).into_response()
}

/// 502 naming the instance that failed, with the ones already changed.
fn bad_gateway(error: String, changed: Vec<Value>) -> Response {
    (
        StatusCode::BAD_GATEWAY,
        axum::Json(json!({ "error": error, "instances": changed })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::path::PathBuf;

    use axum::body::Body;
    use tower::ServiceExt as _;

    use super::super::child::Supervised;
    use super::super::plan::{ChildSpec, Role};
    use super::super::state::StateFile;

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    /// A supervised `sleep` standing in for a component: real processes, real signals.
    fn sleeper(
        name: &str,
        registry_name: Option<&'static str>,
        dir: &std::path::Path,
    ) -> Supervised {
        let spec = ChildSpec {
            name: name.to_owned(),
            role: Role::Service,
            port: 1,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            registry_name,
            args: vec!["600".into()],
            env: Vec::new(),
        };
        let state = Arc::new(StateFile::new(dir.join("up.json"), dir));
        Supervised::start(PathBuf::from("sleep"), spec, state)
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("breakwater-control-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    async fn wait_for_state(app: &Router, name: &str, want: &str) -> Value {
        for _ in 0..100 {
            let (_, p) = call(app, "GET", &format!("/processes/{name}"), None).await;
            if p["state"] == want {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{name} never became {want}");
    }

    #[tokio::test]
    async fn unknown_names_paths_and_methods_are_json_errors() {
        let app = app(Control::new().unwrap());
        let (status, body) = call(&app, "GET", "/processes/users-9", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, json!({"error": "no process named 'users-9'"}));
        let (status, body) = call(&app, "POST", "/processes/users-9/stop", None).await;
        assert_eq!(
            (status, body["error"].as_str().unwrap()),
            (StatusCode::NOT_FOUND, "no process named 'users-9'")
        );
        let (status, body) = call(&app, "GET", "/nope", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["error"].as_str().unwrap().contains("/nope"), "{body}");
        let (status, body) = call(&app, "DELETE", "/processes", None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(body["error"].as_str().unwrap().contains("DELETE"), "{body}");
        let (status, _) = call(&app, "GET", "/processes/x/stop", None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn chaos_needs_a_json_body_and_a_running_unstable_instance() {
        let control = Control::new().unwrap();
        let app = app(control.clone());
        let (status, body) = call(&app, "PUT", "/chaos", Some("{")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("Malformed JSON"),
            "{body}"
        );
        let (status, body) = call(&app, "PUT", "/chaos", Some(r#"{"failureRate":1}"#)).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("no unstable instance"),
            "{body}"
        );

        let dir = temp_dir("chaos");
        let unstable = sleeper(
            "unstable-1",
            Some(breakwater_services::unstable::SERVICE_NAME),
            &dir,
        );
        control.add(unstable.handle());
        wait_for_state(&app, "unstable-1", "running").await;
        let (status, _) = call(&app, "POST", "/processes/unstable-1/stop", None).await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = call(&app, "PUT", "/chaos", Some(r#"{"failureRate":1}"#)).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(
            body,
            json!({"error": "no running unstable instance (unstable-1 is stopped)"})
        );
        let (status, body) = call(&app, "GET", "/chaos", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"instances": [{"name": "unstable-1", "state": "stopped", "chaos": null}]})
        );
        unstable.join().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn stop_start_and_kill_a_process() {
        let control = Control::new().unwrap();
        let app = app(control.clone());
        let dir = temp_dir("cycle");
        let child = sleeper("users-1", Some("user-service"), &dir);
        control.add(child.handle());
        let first = wait_for_state(&app, "users-1", "running").await;
        let (status, list) = call(&app, "GET", "/processes", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(list["processes"][0]["name"], "users-1");
        assert_eq!(list["processes"][0]["role"], "service");
        assert_eq!(list["processes"][0]["service"], "user-service");
        let pid = first["pid"].as_u64().unwrap();

        // Start while running: unchanged.
        let (status, same) = call(&app, "POST", "/processes/users-1/start", None).await;
        assert_eq!((status, same["pid"].as_u64()), (StatusCode::OK, Some(pid)));

        // Kill: restarted after its backoff with a new pid, counted as a restart.
        let (status, killed) = call(&app, "POST", "/processes/users-1/kill", None).await;
        assert_eq!(status, StatusCode::OK, "{killed}");
        assert_eq!(killed["state"], "restarting");
        assert_eq!(killed["pid"], Value::Null);
        let again = wait_for_state(&app, "users-1", "running").await;
        assert_ne!(again["pid"].as_u64().unwrap(), pid);
        assert_eq!(again["restarts"], 1);

        // Stop: gone, and it stays stopped.
        let (status, stopped) = call(&app, "POST", "/processes/users-1/stop", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (stopped["state"].as_str(), &stopped["pid"]),
            (Some("stopped"), &Value::Null)
        );
        let old = i32::try_from(again["pid"].as_u64().unwrap()).unwrap();
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), None).is_err(),
            "the process is gone"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        let (_, still) = call(&app, "GET", "/processes/users-1", None).await;
        assert_eq!(still["state"], "stopped", "no restart after a stop");
        let (status, _) = call(&app, "POST", "/processes/users-1/stop", None).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "stopping a stopped process is a no-op"
        );
        let (status, body) = call(&app, "POST", "/processes/users-1/kill", None).await;
        assert_eq!(
            (status, body),
            (StatusCode::CONFLICT, json!({"error": "users-1 is stopped"}))
        );

        // Start: running again under a new pid; a manual start is not a restart.
        let (status, started) = call(&app, "POST", "/processes/users-1/start", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(started["state"], "running");
        assert!(started["pid"].as_u64().is_some_and(|p| p != pid));
        assert_eq!(started["restarts"], 1);

        child.join().await;
        let (status, body) = call(&app, "POST", "/processes/users-1/start", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
