//! The orders service's synchronous call to the users service: does user N exist?

use std::time::Duration;

use breakwater_registry::client::Discovery;
use breakwater_registry::wire::Instance;
use breakwater_runtime::observe::{REQUEST_ID, TRACEPARENT, TraceContext};
use reqwest::StatusCode;

use crate::users;

/// Per-try deadline for one users instance.
const TRY_TIMEOUT: Duration = Duration::from_secs(2);
/// Instances tried before the users service counts as unavailable.
const MAX_TRIES: usize = 3;

/// What the users service said about a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UserLookup {
    /// An instance answered 200.
    Exists,
    /// An instance answered 404 "User not found".
    Missing,
    /// No instance, or none of those tried gave an answer.
    Unavailable,
}

/// Who is asking: the incoming request's context, passed on so the users service's log
/// line joins the same trace and request id.
#[derive(Debug, Clone, Default)]
pub(crate) struct Caller {
    /// This hop's trace context; each call goes out as a child span of it.
    pub(crate) trace: Option<TraceContext>,
    /// The incoming request's id.
    pub(crate) request_id: Option<String>,
}

/// Asks users instances found through `discovery` for user `id`, starting at a random
/// instance (so orders instances spread their calls) and moving to the next one when an
/// instance cannot answer.
pub(crate) async fn find(
    discovery: &Discovery,
    http: &reqwest::Client,
    id: i64,
    caller: &Caller,
) -> UserLookup {
    let instances = match discovery.resolve(users::SERVICE_NAME).await {
        Ok(instances) if !instances.is_empty() => instances,
        Ok(_) => {
            tracing::warn!(user_id = id, "no users instance to check the user with");
            return UserLookup::Unavailable;
        }
        Err(error) => {
            tracing::warn!(user_id = id, %error, "cannot resolve the users service");
            return UserLookup::Unavailable;
        }
    };
    let start = rand::random_range(0..instances.len());
    for attempt in 0..instances.len().min(MAX_TRIES) {
        let instance = &instances[(start + attempt) % instances.len()];
        match ask(http, instance, id, caller).await {
            Ok(answer) => return answer,
            Err(reason) => {
                tracing::warn!(
                    user_id = id,
                    instance = %instance.id,
                    %reason,
                    "users instance gave no answer; trying the next one"
                );
            }
        }
    }
    UserLookup::Unavailable
}

/// One instance's answer, or why it gave none.
async fn ask(
    http: &reqwest::Client,
    instance: &Instance,
    id: i64,
    caller: &Caller,
) -> Result<UserLookup, String> {
    let url = format!("{}/users/{id}", instance.base_url());
    let mut request = http.get(&url).timeout(TRY_TIMEOUT);
    if let Some(trace) = &caller.trace {
        request = request.header(TRACEPARENT, trace.child().header_value());
    }
    if let Some(request_id) = &caller.request_id {
        request = request.header(REQUEST_ID, request_id);
    }
    let response = request.send().await.map_err(|e| describe(&e))?;
    match response.status() {
        StatusCode::OK => Ok(UserLookup::Exists),
        StatusCode::NOT_FOUND => {
            // Only the users route's own 404 means "no such user"; any other 404 (a
            // different program on a recycled port) says nothing about the user.
            let body: serde_json::Value = response.json().await.map_err(|e| describe(&e))?;
            if body.get("error").and_then(serde_json::Value::as_str) == Some("User not found") {
                Ok(UserLookup::Missing)
            } else {
                Err(format!("unexpected 404 from {url}: {body}"))
            }
        }
        other => Err(format!("status {other} from {url}")),
    }
}

fn describe(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        format!("timed out after {TRY_TIMEOUT:?}")
    } else if err.is_connect() {
        format!("connect failed: {err}")
    } else {
        err.to_string()
    }
}
