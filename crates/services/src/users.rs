//! The users service ("user-service"): health and CRUD over [`UserStore`].

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use breakwater_runtime::clock::iso8601_now;
use breakwater_runtime::http::{ApiError, Json, Path, method_not_allowed, not_found};
use serde_json::{Map, Value, json};
use tower_http::cors::CorsLayer;

use crate::id;
use crate::storage::{NewUser, SqliteStore, User, UserStore};

/// The name users instances register under.
pub const SERVICE_NAME: &str = "user-service";

const MAX_NAME_CHARS: usize = 200;
const MAX_EMAIL_BYTES: usize = 254;
const MAX_AGE: i64 = 150;

/// What the users handlers share.
#[derive(Debug)]
pub struct UsersState<S = SqliteStore> {
    /// Where users are kept.
    pub store: S,
    /// This instance's id, e.g. `user-service-4000`.
    pub instance: String,
    /// The port this instance advertises.
    pub port: u16,
}

/// The users service's routes: `GET /health`, `GET|POST /users`,
/// `GET|PUT|DELETE /users/{id}`, with JSON 404/405 fallbacks and permissive CORS.
pub fn app<S: UserStore + 'static>(state: UsersState<S>) -> Router {
    Router::new()
        .route("/health", get(health::<S>))
        .route("/users", get(list::<S>).post(create::<S>))
        .route(
            "/users/{id}",
            get(read::<S>).put(replace::<S>).delete(remove::<S>),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CorsLayer::permissive())
        .with_state(Arc::new(state))
}

type Shared<S> = State<Arc<UsersState<S>>>;

async fn health<S: UserStore>(State(state): Shared<S>) -> Json<Value> {
    Json(json!({
        "service": SERVICE_NAME,
        "instance": state.instance,
        "port": state.port,
        "status": "healthy",
        "timestamp": iso8601_now(),
    }))
}

async fn list<S: UserStore>(State(state): Shared<S>) -> Result<Json<Value>, ApiError> {
    let users = state.store.list_users().await?;
    Ok(Json(json!({ "users": users, "instance": state.instance })))
}

async fn read<S: UserStore>(
    State(state): Shared<S>,
    Path(raw): Path<String>,
) -> Result<Json<User>, ApiError> {
    let id = user_id(&raw)?;
    let user = state.store.user(id).await?.ok_or_else(user_not_found)?;
    Ok(Json(user))
}

async fn create<S: UserStore>(
    State(state): Shared<S>,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    let new = parse_user(&body)?;
    let user = state.store.create_user(&new).await?;
    tracing::info!(
        event = "user.created",
        user_id = user.id,
        email = %user.email,
        instance = %state.instance,
        "user created"
    );
    Ok((StatusCode::CREATED, Json(user)))
}

async fn replace<S: UserStore>(
    State(state): Shared<S>,
    Path(raw): Path<String>,
    Json(body): Json<Value>,
) -> Result<Json<User>, ApiError> {
    let id = user_id(&raw)?;
    let new = parse_user(&body)?;
    let user = state
        .store
        .replace_user(id, &new)
        .await?
        .ok_or_else(user_not_found)?;
    Ok(Json(user))
}

async fn remove<S: UserStore>(
    State(state): Shared<S>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = user_id(&raw)?;
    let user = state
        .store
        .delete_user(id)
        .await?
        .ok_or_else(user_not_found)?;
    Ok(Json(json!({ "message": "User deleted", "user": user })))
}

fn user_id(raw: &str) -> Result<i64, ApiError> {
    id::parse_positive(raw).ok_or_else(|| ApiError::bad_request("Invalid user ID"))
}

fn user_not_found() -> ApiError {
    ApiError::not_found("User not found")
}

/// Validates a create or replace body. Unknown fields are ignored; a missing or `null`
/// `age` means unknown.
pub(crate) fn parse_user(body: &Value) -> Result<NewUser, ApiError> {
    let fields = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("Request body must be a JSON object"))?;
    Ok(NewUser {
        name: name(fields)?,
        email: email(fields)?,
        age: age(fields)?,
    })
}

fn required_string<'a>(fields: &'a Map<String, Value>, key: &str) -> Result<&'a str, ApiError> {
    match fields.get(key) {
        None | Some(Value::Null) => {
            Err(ApiError::bad_request(format!("Field '{key}' is required")))
        }
        Some(Value::String(s)) => Ok(s.trim()),
        Some(_) => Err(ApiError::bad_request(format!(
            "Field '{key}' must be a string"
        ))),
    }
}

fn name(fields: &Map<String, Value>) -> Result<String, ApiError> {
    let name = required_string(fields, "name")?;
    if name.is_empty() {
        return Err(ApiError::bad_request("Field 'name' must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::bad_request(format!(
            "Field 'name' must be at most {MAX_NAME_CHARS} characters"
        )));
    }
    Ok(name.to_owned())
}

fn email(fields: &Map<String, Value>) -> Result<String, ApiError> {
    let email = required_string(fields, "email")?;
    if email.len() > MAX_EMAIL_BYTES {
        return Err(ApiError::bad_request(format!(
            "Field 'email' must be at most {MAX_EMAIL_BYTES} characters"
        )));
    }
    if !plausible_email(email) {
        return Err(ApiError::bad_request(
            "Field 'email' must be a valid email address",
        ));
    }
    Ok(email.to_owned())
}

fn age(fields: &Map<String, Value>) -> Result<Option<u8>, ApiError> {
    match fields.get("age") {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_i64()
            .filter(|age| (0..=MAX_AGE).contains(age))
            .and_then(|age| u8::try_from(age).ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Field 'age' must be an integer between 0 and {MAX_AGE}"
                ))
            }),
    }
}

/// `local@domain.tld`: one `@`, a non-empty local part of at most 64 bytes, a domain of
/// at least two non-empty dot-separated labels, no whitespace or control characters.
/// Deliberately loose: the only real check of an address is mailing it.
fn plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && !domain.contains('@')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && domain.split('.').count() >= 2
        && domain.split('.').all(|label| !label.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{TempDir, call, temp_store};

    async fn users_app(tag: &str) -> (TempDir, Router) {
        let (dir, store) = temp_store(tag).await;
        let app = app(UsersState {
            store,
            instance: "user-service-4000".into(),
            port: 4000,
        });
        (dir, app)
    }

    #[tokio::test]
    async fn health_names_the_instance() {
        let (_dir, app) = users_app("health").await;
        let (status, body) = call(&app, "GET", "/health", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["service"], "user-service");
        assert_eq!(body["instance"], "user-service-4000");
        assert_eq!(body["port"], 4000);
        assert_eq!(body["status"], "healthy");
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'), "{body}");
    }

    #[tokio::test]
    async fn lists_the_seed_users() {
        let (_dir, app) = users_app("list").await;
        let (status, body) = call(&app, "GET", "/users", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["instance"], "user-service-4000");
        assert_eq!(
            body["users"],
            json!([
                {"id": 1, "name": "John Doe", "email": "john@example.com", "age": 30},
                {"id": 2, "name": "Jane Smith", "email": "jane@example.com", "age": 25},
                {"id": 3, "name": "Bob Johnson", "email": "bob@example.com", "age": 35},
            ])
        );
    }

    #[tokio::test]
    async fn reads_one_user_or_says_why_not() {
        let (_dir, app) = users_app("read").await;
        let (status, body) = call(&app, "GET", "/users/2", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"id": 2, "name": "Jane Smith", "email": "jane@example.com", "age": 25})
        );

        let (status, body) = call(&app, "GET", "/users/99", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, json!({"error": "User not found"}));

        for bad in ["abc", "0", "-1", "1.5", "99999999999999999999"] {
            let (status, body) = call(&app, "GET", &format!("/users/{bad}"), None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(body, json!({"error": "Invalid user ID"}), "{bad}");
        }
    }

    #[tokio::test]
    async fn creates_a_user() {
        let (_dir, app) = users_app("create").await;
        let (status, body) = call(
            &app,
            "POST",
            "/users",
            Some(r#"{"name":" Ada ","email":"ada@example.org","age":36}"#),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(
            body,
            json!({"id": 4, "name": "Ada", "email": "ada@example.org", "age": 36})
        );
        let (status, body) = call(
            &app,
            "POST",
            "/users",
            Some(r#"{"name":"Al","email":"al@example.org"}"#),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(
            body,
            json!({"id": 5, "name": "Al", "email": "al@example.org", "age": null})
        );
        let (_, body) = call(&app, "GET", "/users/4", None).await;
        assert_eq!(body["name"], "Ada");
    }

    #[tokio::test]
    async fn invalid_bodies_are_400s_naming_the_problem_and_write_nothing() {
        let (_dir, app) = users_app("invalid").await;
        let cases = [
            (r#"{"email":"a@b.c"}"#, "Field 'name' is required"),
            (
                r#"{"name":1,"email":"a@b.c"}"#,
                "Field 'name' must be a string",
            ),
            (
                r#"{"name":"","email":"a@b.c"}"#,
                "Field 'name' must not be empty",
            ),
            (r#"{"name":"A"}"#, "Field 'email' is required"),
            (
                r#"{"name":"A","email":"bad"}"#,
                "Field 'email' must be a valid email address",
            ),
            (
                r#"{"name":"A","email":"a@b.c","age":200}"#,
                "Field 'age' must be an integer between 0 and 150",
            ),
            (r#"[]"#, "Request body must be a JSON object"),
        ];
        for (body, message) in cases {
            for (method, uri) in [("POST", "/users"), ("PUT", "/users/1")] {
                let (status, got) = call(&app, method, uri, Some(body)).await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {body}");
                assert_eq!(got, json!({"error": message}), "{method} {body}");
            }
        }
        let (status, got) = call(&app, "POST", "/users", Some("{")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            got["error"].as_str().unwrap().starts_with("Malformed JSON"),
            "{got}"
        );

        let (_, list) = call(&app, "GET", "/users", None).await;
        assert_eq!(list["users"].as_array().unwrap().len(), 3);
        assert_eq!(list["users"][0]["name"], "John Doe");
    }

    #[tokio::test]
    async fn duplicate_email_is_a_409_and_writes_nothing() {
        let (_dir, app) = users_app("conflict").await;
        let (_, before) = call(&app, "GET", "/users", None).await;
        let dup = r#"{"name":"Other","email":"Jane@Example.com"}"#;
        for (method, uri) in [("POST", "/users"), ("PUT", "/users/1")] {
            let (status, body) = call(&app, method, uri, Some(dup)).await;
            assert_eq!(status, StatusCode::CONFLICT, "{method}");
            assert_eq!(body, json!({"error": "Email already in use"}));
        }
        let (_, after) = call(&app, "GET", "/users", None).await;
        assert_eq!(before, after);
    }

    #[tokio::test]
    async fn replaces_a_user_wholly() {
        let (_dir, app) = users_app("replace").await;
        let (status, body) = call(
            &app,
            "PUT",
            "/users/1",
            Some(r#"{"name":"Johnny","email":"johnny@example.com"}"#),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"id": 1, "name": "Johnny", "email": "johnny@example.com", "age": null})
        );
        let (_, stored) = call(&app, "GET", "/users/1", None).await;
        assert_eq!(stored, body);

        let ok = Some(r#"{"name":"X","email":"x@y.z"}"#);
        let (status, body) = call(&app, "PUT", "/users/99", ok).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, json!({"error": "User not found"}));
        let (status, body) = call(&app, "PUT", "/users/x", ok).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body, json!({"error": "Invalid user ID"}));
    }

    #[tokio::test]
    async fn deletes_a_user_once() {
        let (_dir, app) = users_app("delete").await;
        let (status, body) = call(&app, "DELETE", "/users/3", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"message": "User deleted", "user": {"id": 3, "name": "Bob Johnson", "email": "bob@example.com", "age": 35}})
        );
        let (status, body) = call(&app, "DELETE", "/users/3", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, json!({"error": "User not found"}));
        let (status, _) = call(&app, "GET", "/users/3", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, body) = call(&app, "DELETE", "/users/0", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body, json!({"error": "Invalid user ID"}));
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_get_json_errors() {
        let (_dir, app) = users_app("fallback").await;
        let (status, body) = call(&app, "GET", "/nope", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["error"].is_string(), "{body}");
        let (status, body) = call(&app, "PATCH", "/users/1", None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(body["error"].is_string(), "{body}");
    }

    #[tokio::test]
    async fn storage_failure_is_a_500_without_details() {
        let (_dir, store) = temp_store("closed").await;
        store.close().await;
        let app = app(UsersState {
            store,
            instance: "user-service-4000".into(),
            port: 4000,
        });
        let (status, body) = call(&app, "GET", "/users", None).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body, json!({"error": "Internal storage error"}));
    }

    #[tokio::test]
    async fn cors_preflight_is_answered() {
        let (_dir, app) = users_app("cors").await;
        let req = axum::http::Request::builder()
            .method("OPTIONS")
            .uri("/users")
            .header("origin", "http://example.com")
            .header("access-control-request-method", "POST")
            .body(axum::body::Body::empty())
            .unwrap();
        let res = tower::ServiceExt::oneshot(app, req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.headers().contains_key("access-control-allow-origin"));
    }

    fn error_of(body: Value) -> String {
        parse_user(&body).unwrap_err().message
    }

    #[test]
    fn valid_body_is_trimmed_and_extra_fields_ignored() {
        let user = parse_user(&json!({
            "name": "  Ada Lovelace ", "email": " ada@example.org ", "age": 36, "role": "x"
        }))
        .unwrap();
        assert_eq!(
            user,
            NewUser {
                name: "Ada Lovelace".into(),
                email: "ada@example.org".into(),
                age: Some(36)
            }
        );
        let no_age = parse_user(&json!({"name": "A", "email": "a@b.c", "age": null})).unwrap();
        assert_eq!(no_age.age, None);
    }

    #[test]
    fn each_field_error_names_the_field() {
        assert_eq!(error_of(json!([1])), "Request body must be a JSON object");
        assert_eq!(
            error_of(json!({"email": "a@b.c"})),
            "Field 'name' is required"
        );
        assert_eq!(
            error_of(json!({"name": 5, "email": "a@b.c"})),
            "Field 'name' must be a string"
        );
        assert_eq!(
            error_of(json!({"name": "   ", "email": "a@b.c"})),
            "Field 'name' must not be empty"
        );
        assert_eq!(
            error_of(json!({"name": "x".repeat(201), "email": "a@b.c"})),
            "Field 'name' must be at most 200 characters"
        );
        assert_eq!(error_of(json!({"name": "A"})), "Field 'email' is required");
        assert_eq!(
            error_of(json!({"name": "A", "email": true})),
            "Field 'email' must be a string"
        );
        assert_eq!(
            error_of(json!({"name": "A", "email": "nope"})),
            "Field 'email' must be a valid email address"
        );
        let long = format!("{}@example.com", "a".repeat(250));
        assert_eq!(
            error_of(json!({"name": "A", "email": long})),
            "Field 'email' must be at most 254 characters"
        );
        for age in [json!(-1), json!(151), json!(30.5), json!("30")] {
            assert_eq!(
                error_of(json!({"name": "A", "email": "a@b.c", "age": age})),
                "Field 'age' must be an integer between 0 and 150"
            );
        }
    }

    #[test]
    fn name_limit_counts_characters_not_bytes() {
        let name = "é".repeat(200);
        assert!(parse_user(&json!({"name": name, "email": "a@b.c"})).is_ok());
    }

    #[test]
    fn email_plausibility() {
        for good in ["x@y.z", "first.last+tag@sub.example.co.uk"] {
            assert!(plausible_email(good), "{good}");
        }
        for bad in [
            "", "x", "@y.z", "x@", "x@y", "x@y.", "x@.z", "x@y..z", "x@@y.z", "a b@y.z",
        ] {
            assert!(!plausible_email(bad), "{bad}");
        }
        assert!(!plausible_email(&format!("{}@y.z", "a".repeat(65))));
    }
}
