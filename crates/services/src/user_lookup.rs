//! The orders service's synchronous call to the users service: does user N exist?

use std::time::Duration;

use breakwater_registry::client::Discovery;
use breakwater_registry::wire::Instance;
pub(crate) use breakwater_runtime::observe::Caller;
use breakwater_runtime::observe::{REQUEST_ID, TRACEPARENT};
use breakwater_runtime::otlp::Tracer;
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

/// One instance's answer, or why it gave none; a child span of `caller`'s (recorded as
/// a client span when export is on), so the users instance's request joins its trace.
async fn ask(
    http: &reqwest::Client,
    instance: &Instance,
    id: i64,
    caller: &Caller,
) -> Result<UserLookup, String> {
    let url = format!("{}/users/{id}", instance.base_url());
    let call = caller.start_call(Tracer::global());
    let mut request = http
        .get(&url)
        .timeout(TRY_TIMEOUT)
        .header(TRACEPARENT, call.traceparent());
    if let Some(request_id) = call.request_id() {
        request = request.header(REQUEST_ID, request_id);
    }
    let (status, answer) = match request.send().await {
        Ok(response) => {
            let status = response.status();
            (Some(status.as_u16()), read_answer(response, &url).await)
        }
        Err(e) => (None, Err(describe(&e))),
    };
    call.finish(
        "GET /users/{id}",
        &url,
        status,
        answer.as_ref().err().cloned(),
    );
    answer
}

async fn read_answer(response: reqwest::Response, url: &str) -> Result<UserLookup, String> {
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
