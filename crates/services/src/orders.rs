//! The orders service ("order-service"): health, reads and order creation over
//! [`OrderStore`], checking with the users service that the ordering user exists.

use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use breakwater_registry::client::Discovery;
use breakwater_runtime::clock::iso8601_now;
use breakwater_runtime::http::{ApiError, Json, Path, method_not_allowed, not_found};
use breakwater_runtime::observe::{RequestId, TraceContext};
use serde_json::{Map, Value, json};
use tower_http::cors::CorsLayer;

use crate::id;
use crate::storage::{NewOrder, Order, OrderStore, SqliteStore};
use crate::user_lookup::{self, Caller, UserLookup};

/// The name orders instances register under.
pub const SERVICE_NAME: &str = "order-service";

const MAX_PRODUCTS: usize = 100;
const MAX_PRODUCT_CHARS: usize = 200;

/// What the orders handlers share.
#[derive(Debug)]
pub struct OrdersState<S = SqliteStore> {
    /// Where orders are kept.
    pub store: S,
    /// This instance's id, e.g. `order-service-5000`.
    pub instance: String,
    /// The port this instance advertises.
    pub port: u16,
    /// Finds users service instances through the registry.
    pub users: Discovery,
    /// Shared client for calls to the users service (per-call timeouts are set there).
    pub http: reqwest::Client,
}

/// The orders service's routes: `GET /health`, `GET /orders/user/{userId}`,
/// `GET /orders/{id}`, `POST /orders`, with JSON 404/405 fallbacks and permissive CORS.
pub fn app<S: OrderStore + 'static>(state: OrdersState<S>) -> Router {
    Router::new()
        .route("/health", get(health::<S>))
        .route("/orders", post(create::<S>))
        .route("/orders/user/{user_id}", get(for_user::<S>))
        .route("/orders/{id}", get(read::<S>))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CorsLayer::permissive())
        .with_state(Arc::new(state))
}

type Shared<S> = State<Arc<OrdersState<S>>>;

async fn health<S: OrderStore>(State(state): Shared<S>) -> Json<Value> {
    Json(json!({
        "service": SERVICE_NAME,
        "instance": state.instance,
        "port": state.port,
        "status": "healthy",
        "timestamp": iso8601_now(),
    }))
}

async fn for_user<S: OrderStore>(
    State(state): Shared<S>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let user_id =
        id::parse_positive(&raw).ok_or_else(|| ApiError::bad_request("Invalid user ID"))?;
    let orders = state.store.orders_for_user(user_id).await?;
    Ok(Json(json!({
        "orders": orders,
        "userId": user_id,
        "instance": state.instance,
        "totalOrders": orders.len(),
    })))
}

async fn read<S: OrderStore>(
    State(state): Shared<S>,
    Path(raw): Path<String>,
) -> Result<Json<Order>, ApiError> {
    let id = id::parse_positive(&raw).ok_or_else(|| ApiError::bad_request("Invalid order ID"))?;
    let order = state
        .store
        .order(id)
        .await?
        .ok_or_else(|| ApiError::not_found("Order not found"))?;
    Ok(Json(order))
}

async fn create<S: OrderStore>(
    State(state): Shared<S>,
    trace: Option<Extension<TraceContext>>,
    request_id: Option<Extension<RequestId>>,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    let new = parse_order(&body)?;
    let caller = Caller {
        trace: trace.map(|Extension(t)| t),
        request_id: request_id.map(|Extension(RequestId(id))| id),
    };
    match user_lookup::find(&state.users, &state.http, new.user_id, &caller).await {
        UserLookup::Exists => {}
        UserLookup::Missing => {
            return Err(ApiError::unprocessable(format!(
                "User {} does not exist",
                new.user_id
            )));
        }
        UserLookup::Unavailable => return Err(ApiError::unavailable("User service unavailable")),
    }
    let order = state.store.create_order(&new).await?;
    tracing::info!(
        event = "order.created",
        order_id = order.id,
        user_id = order.user_id,
        products = order.products.len(),
        instance = %state.instance,
        "order created"
    );
    Ok((StatusCode::CREATED, Json(order)))
}

/// Validates a create body. Unknown fields are ignored; product names are trimmed.
pub(crate) fn parse_order(body: &Value) -> Result<NewOrder, ApiError> {
    let fields = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("Request body must be a JSON object"))?;
    Ok(NewOrder {
        user_id: user_id(fields)?,
        products: products(fields)?,
    })
}

fn user_id(fields: &Map<String, Value>) -> Result<i64, ApiError> {
    match fields.get("userId") {
        None | Some(Value::Null) => Err(ApiError::bad_request("Field 'userId' is required")),
        Some(value) => value
            .as_i64()
            .filter(|&id| id > 0)
            .ok_or_else(|| ApiError::bad_request("Field 'userId' must be a positive integer")),
    }
}

fn products(fields: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let items = match fields.get("products") {
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request("Field 'products' is required"));
        }
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(ApiError::bad_request(
                "Field 'products' must be an array of strings",
            ));
        }
    };
    if items.is_empty() {
        return Err(ApiError::bad_request("Field 'products' must not be empty"));
    }
    if items.len() > MAX_PRODUCTS {
        return Err(ApiError::bad_request(format!(
            "Field 'products' must have at most {MAX_PRODUCTS} items"
        )));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::String(name) = item else {
                return Err(ApiError::bad_request(format!(
                    "Field 'products[{i}]' must be a string"
                )));
            };
            let name = name.trim();
            if name.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "Field 'products[{i}]' must not be empty"
                )));
            }
            if name.chars().count() > MAX_PRODUCT_CHARS {
                return Err(ApiError::bad_request(format!(
                    "Field 'products[{i}]' must be at most {MAX_PRODUCT_CHARS} characters"
                )));
            }
            Ok(name.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{
        FakeRegistry, TempDir, call, dead_port, instance, spawn_server, temp_store,
    };
    use crate::users::{self, UsersState};
    use breakwater_registry::client::{CachePolicy, RegistryClient};
    use breakwater_registry::wire::Instance;

    struct World {
        _dir: TempDir,
        store: SqliteStore,
        app: Router,
    }

    /// An orders app over a temp store whose registry lists `users_instances`.
    async fn world(tag: &str, users_instances: Vec<Instance>) -> World {
        let (dir, store) = temp_store(tag).await;
        world_with(dir, store, users_instances).await
    }

    async fn world_with(dir: TempDir, store: SqliteStore, users_instances: Vec<Instance>) -> World {
        let (registry_url, _events) = FakeRegistry::start(users_instances).await;
        let users = Discovery::new(RegistryClient::new(registry_url), CachePolicy::default());
        let app = app(OrdersState {
            store: store.clone(),
            instance: "order-service-5000".into(),
            port: 5000,
            users,
            http: reqwest::Client::new(),
        });
        World {
            _dir: dir,
            store,
            app,
        }
    }

    /// A real users instance over `store`, listening on 127.0.0.1.
    async fn users_instance(store: &SqliteStore) -> Instance {
        let users_app = users::app(UsersState {
            store: store.clone(),
            instance: "user-service-test".into(),
            port: 0,
        });
        let addr = spawn_server(users_app).await;
        instance(users::SERVICE_NAME, "127.0.0.1", addr.port())
    }

    /// A world whose registry lists one live users instance sharing the orders store.
    async fn world_with_users(tag: &str) -> World {
        let (dir, store) = temp_store(tag).await;
        let live = users_instance(&store).await;
        world_with(dir, store, vec![live]).await
    }

    #[tokio::test]
    async fn health_names_the_instance() {
        let w = world("health", vec![]).await;
        let (status, body) = call(&w.app, "GET", "/health", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["service"], "order-service");
        assert_eq!(body["instance"], "order-service-5000");
        assert_eq!(body["port"], 5000);
        assert_eq!(body["status"], "healthy");
        assert!(body["timestamp"].is_string());
    }

    #[tokio::test]
    async fn lists_orders_of_a_user() {
        let w = world("by-user", vec![]).await;
        let (status, body) = call(&w.app, "GET", "/orders/user/1", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({
                "orders": [
                    {"id": 1, "userId": 1, "products": ["Laptop"]},
                    {"id": 2, "userId": 1, "products": ["Mouse"]},
                ],
                "userId": 1,
                "instance": "order-service-5000",
                "totalOrders": 2,
            })
        );
        let (status, body) = call(&w.app, "GET", "/orders/user/42", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["orders"], json!([]));
        assert_eq!(body["totalOrders"], 0);
        for bad in ["abc", "0", "-2", "1.0"] {
            let (status, body) = call(&w.app, "GET", &format!("/orders/user/{bad}"), None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(body, json!({"error": "Invalid user ID"}));
        }
    }

    #[tokio::test]
    async fn reads_one_order_or_says_why_not() {
        let w = world("read", vec![]).await;
        let (status, body) = call(&w.app, "GET", "/orders/3", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"id": 3, "userId": 2, "products": ["Keyboard"]})
        );
        let (status, body) = call(&w.app, "GET", "/orders/77", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, json!({"error": "Order not found"}));
        let (status, body) = call(&w.app, "GET", "/orders/x", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body, json!({"error": "Invalid order ID"}));
    }

    #[tokio::test]
    async fn the_user_lookup_carries_the_callers_trace_and_request_id() {
        use axum::http::HeaderMap;
        use breakwater_runtime::observe::{self, HttpMetrics};
        use std::sync::Mutex;

        const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        /// Each call's (traceparent, x-request-id).
        type Seen = Arc<Mutex<Vec<(Option<String>, Option<String>)>>>;
        let seen: Seen = Arc::default();
        let recorder = seen.clone();
        let users_app = Router::new().route(
            "/users/{id}",
            get(move |headers: HeaderMap| {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                recorder
                    .lock()
                    .unwrap()
                    .push((header("traceparent"), header("x-request-id")));
                async { axum::Json(json!({"id": 1, "name": "A", "email": "a@b.c", "age": 1})) }
            }),
        );
        let addr = spawn_server(users_app).await;
        let (dir, store) = temp_store("trace").await;
        let w = world_with(
            dir,
            store,
            vec![instance(users::SERVICE_NAME, "127.0.0.1", addr.port())],
        )
        .await;
        let app = w.app.clone().layer(observe::layer(
            SERVICE_NAME,
            "order-service-5000".into(),
            Arc::new(HttpMetrics::new()),
        ));
        let req = axum::http::Request::builder()
            .method("POST")
            .uri("/orders")
            .header("content-type", "application/json")
            .header("traceparent", PARENT)
            .header("x-request-id", "req-42")
            .body(axum::body::Body::from(r#"{"userId":1,"products":["Pen"]}"#))
            .unwrap();
        let res = tower::ServiceExt::oneshot(app, req).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);

        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        let (traceparent, request_id) = &seen[0];
        assert_eq!(request_id.as_deref(), Some("req-42"));
        let sent = TraceContext::parse(traceparent.as_deref().unwrap()).unwrap();
        let parent = TraceContext::parse(PARENT).unwrap();
        assert_eq!(sent.trace_id, parent.trace_id);
        assert_ne!(sent.span_id, parent.span_id);
    }

    #[tokio::test]
    async fn creates_an_order_for_a_known_user() {
        let w = world_with_users("create").await;
        let (status, body) = call(
            &w.app,
            "POST",
            "/orders",
            Some(r#"{"userId":3,"products":["Pen"," Ink "]}"#),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(
            body,
            json!({"id": 6, "userId": 3, "products": ["Pen", "Ink"]})
        );
        let (_, stored) = call(&w.app, "GET", "/orders/6", None).await;
        assert_eq!(stored, body);
        let (_, listed) = call(&w.app, "GET", "/orders/user/3", None).await;
        assert_eq!(listed["totalOrders"], 2);
    }

    #[tokio::test]
    async fn unknown_user_is_a_422_and_writes_nothing() {
        let w = world_with_users("unknown-user").await;
        let (status, body) = call(
            &w.app,
            "POST",
            "/orders",
            Some(r#"{"userId":42,"products":["Pen"]}"#),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body, json!({"error": "User 42 does not exist"}));
        assert_eq!(w.store.order(6).await.unwrap(), None);
        assert!(w.store.orders_for_user(42).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn invalid_bodies_are_400s_and_write_nothing() {
        let w = world_with_users("invalid").await;
        let cases = [
            (r#"{"products":["a"]}"#, "Field 'userId' is required"),
            (
                r#"{"userId":"1","products":["a"]}"#,
                "Field 'userId' must be a positive integer",
            ),
            (r#"{"userId":1}"#, "Field 'products' is required"),
            (
                r#"{"userId":1,"products":[]}"#,
                "Field 'products' must not be empty",
            ),
            (
                r#"{"userId":1,"products":[""]}"#,
                "Field 'products[0]' must not be empty",
            ),
            (
                r#"{"userId":1,"products":[1]}"#,
                "Field 'products[0]' must be a string",
            ),
        ];
        for (body, message) in cases {
            let (status, got) = call(&w.app, "POST", "/orders", Some(body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(got, json!({"error": message}), "{body}");
        }
        assert_eq!(w.store.order(6).await.unwrap(), None);
    }

    #[tokio::test]
    async fn users_instance_down_is_a_503_and_writes_nothing() {
        let down = instance(users::SERVICE_NAME, "127.0.0.1", dead_port().await);
        let w = world("users-down", vec![down]).await;
        let (status, body) = call(
            &w.app,
            "POST",
            "/orders",
            Some(r#"{"userId":1,"products":["Pen"]}"#),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, json!({"error": "User service unavailable"}));
        assert_eq!(w.store.order(6).await.unwrap(), None);
    }

    #[tokio::test]
    async fn no_users_instance_is_a_503() {
        let w = world("no-users", vec![]).await;
        let (status, body) = call(
            &w.app,
            "POST",
            "/orders",
            Some(r#"{"userId":1,"products":["Pen"]}"#),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, json!({"error": "User service unavailable"}));
    }

    #[tokio::test]
    async fn registry_unreachable_is_a_503() {
        let (dir, store) = temp_store("no-registry").await;
        let registry = format!("http://127.0.0.1:{}", dead_port().await);
        let app = app(OrdersState {
            store,
            instance: "order-service-5000".into(),
            port: 5000,
            users: Discovery::new(RegistryClient::new(registry), CachePolicy::default()),
            http: reqwest::Client::new(),
        });
        let (status, body) = call(
            &app,
            "POST",
            "/orders",
            Some(r#"{"userId":1,"products":["Pen"]}"#),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, json!({"error": "User service unavailable"}));
        drop(dir);
    }

    #[tokio::test]
    async fn fails_over_from_dead_and_foreign_instances() {
        let (dir, store) = temp_store("failover").await;
        let live = users_instance(&store).await;
        let dead = instance(users::SERVICE_NAME, "127.0.0.1", dead_port().await);
        // Something else on a recycled port: its 404 says nothing about users.
        let foreign_addr = spawn_server(Router::new().fallback(not_found)).await;
        let foreign = instance(users::SERVICE_NAME, "127.0.0.1", foreign_addr.port());
        let w = world_with(dir, store, vec![dead, foreign, live]).await;
        // Whatever instance the lookup starts at, three tries reach the live one.
        for _ in 0..5 {
            let (status, body) = call(
                &w.app,
                "POST",
                "/orders",
                Some(r#"{"userId":2,"products":["Pen"]}"#),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            let (status, _) = call(
                &w.app,
                "POST",
                "/orders",
                Some(r#"{"userId":99,"products":["Pen"]}"#),
            )
            .await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        }
    }

    #[tokio::test]
    async fn a_stalled_instance_times_out_and_the_next_answers() {
        let (dir, store) = temp_store("stalled").await;
        let live = users_instance(&store).await;
        // Accepts connections and never answers: only the per-try timeout ends the call.
        let stalled_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stalled_port = stalled_listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = stalled_listener.accept().await {
                held.push(conn);
            }
        });
        let stalled = instance(users::SERVICE_NAME, "127.0.0.1", stalled_port);
        let w = world_with(dir, store, vec![stalled, live]).await;
        let (status, body) = call(
            &w.app,
            "POST",
            "/orders",
            Some(r#"{"userId":1,"products":["Pen"]}"#),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    fn error_of(body: Value) -> String {
        parse_order(&body).unwrap_err().message
    }

    #[test]
    fn valid_body_is_trimmed() {
        let order = parse_order(&json!({"userId": 2, "products": [" Pen ", "Ink"], "x": 1}));
        assert_eq!(
            order.unwrap(),
            NewOrder {
                user_id: 2,
                products: vec!["Pen".into(), "Ink".into()]
            }
        );
    }

    #[test]
    fn each_field_error_names_the_field() {
        assert_eq!(error_of(json!("x")), "Request body must be a JSON object");
        assert_eq!(
            error_of(json!({"products": ["a"]})),
            "Field 'userId' is required"
        );
        for bad in [json!(0), json!(-3), json!(1.5), json!("1"), json!(true)] {
            assert_eq!(
                error_of(json!({"userId": bad, "products": ["a"]})),
                "Field 'userId' must be a positive integer"
            );
        }
        assert_eq!(
            error_of(json!({"userId": 1})),
            "Field 'products' is required"
        );
        assert_eq!(
            error_of(json!({"userId": 1, "products": "a"})),
            "Field 'products' must be an array of strings"
        );
        assert_eq!(
            error_of(json!({"userId": 1, "products": []})),
            "Field 'products' must not be empty"
        );
        let many: Vec<String> = (0..101).map(|i| format!("p{i}")).collect();
        assert_eq!(
            error_of(json!({"userId": 1, "products": many})),
            "Field 'products' must have at most 100 items"
        );
        assert_eq!(
            error_of(json!({"userId": 1, "products": ["a", 7]})),
            "Field 'products[1]' must be a string"
        );
        assert_eq!(
            error_of(json!({"userId": 1, "products": [" "]})),
            "Field 'products[0]' must not be empty"
        );
        assert_eq!(
            error_of(json!({"userId": 1, "products": ["x".repeat(201)]})),
            "Field 'products[0]' must be at most 200 characters"
        );
    }

    #[test]
    fn limits_are_inclusive() {
        let hundred: Vec<String> = (0..100).map(|_| "x".repeat(200)).collect();
        assert_eq!(
            parse_order(&json!({"userId": 1, "products": hundred}))
                .unwrap()
                .products
                .len(),
            100
        );
    }
}
