//! Users, orders and their outbox on PostgreSQL, with the same semantics as
//! [`super::SqliteStore`]: emails unique case-insensitively (a unique index on
//! `lower(email)`), each change and its event in one transaction, outbox claims under a
//! lease taken with `FOR UPDATE SKIP LOCKED` so concurrent relays never take the same
//! row. The schema (and the seed data, once) comes from `migrations/postgres`, run at
//! open under sqlx's advisory lock, so several instances may start at once.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use breakwater_runtime::clock::now_millis;

use super::{NewOrder, NewUser, Order, OrderStore, StorageError, User, UserStore};
use crate::outbox::{
    Claimed, Event, OutboxRecord, OutboxStore, claimed_from_rows, millis, record_from_row,
};
use crate::settings::InvalidSetting;

/// The migrations every PostgreSQL store runs at open.
pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The setting a database URL is given under.
pub const DATABASE_URL: &str = "DATABASE_URL";

/// Whether `url` names a PostgreSQL database (`postgres://` or `postgresql://`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Checks a `DATABASE_URL`: a PostgreSQL URL the driver can parse. The error names
/// `DATABASE_URL` and never repeats a password.
pub fn check_database_url(url: &str) -> Result<(), InvalidSetting> {
    if !is_postgres_url(url) {
        return Err(InvalidSetting::new(
            DATABASE_URL,
            format!(
                "{:?} is not a postgres:// or postgresql:// URL",
                redact(url)
            ),
        ));
    }
    PgConnectOptions::from_str(url)
        .map(|_| ())
        .map_err(|e| InvalidSetting::new(DATABASE_URL, format!("{:?}: {e}", redact(url))))
}

/// Users and orders in one PostgreSQL schema. Cheap to clone: clones share one pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://...`), brings its schema up to
    /// date and seeds it once. Safe to call from several processes at the same time.
    pub async fn open(url: &str) -> Result<Self, StorageError> {
        Self::connect(parse_url(url)?).await
    }

    /// Like [`PgStore::open`] with options already parsed (e.g. with a `search_path`).
    pub async fn connect(options: PgConnectOptions) -> Result<Self, StorageError> {
        Ok(Self {
            pool: migrated_pool(options).await?,
        })
    }

    /// The outbox of this database. Shares this store's pool.
    pub fn outbox(&self) -> PgOutbox {
        PgOutbox {
            pool: self.pool.clone(),
        }
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Parses a `postgres://` URL; the error names it without its password.
pub(crate) fn parse_url(url: &str) -> Result<PgConnectOptions, StorageError> {
    PgConnectOptions::from_str(url).map_err(|source| StorageError::Connect {
        target: redact(url),
        source,
    })
}

/// A pool on `options` with every migration applied (users, orders, outbox and
/// analytics share one migration history). Safe from several processes at once: the
/// migrator takes an advisory lock.
pub(crate) async fn migrated_pool(options: PgConnectOptions) -> Result<PgPool, StorageError> {
    let target = format!(
        "postgres://{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or_default()
    );
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .map_err(|source| StorageError::Connect { target, source })?;
    if let Err(e) = MIGRATOR.run(&pool).await {
        pool.close().await;
        return Err(StorageError::Schema(e.into()));
    }
    Ok(pool)
}

/// The URL without its password, fit for an error message.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

const USER_COLUMNS: &str = "id, name, email, age";
const ORDER_COLUMNS: &str = "id, user_id, products::text AS products";

fn user_from_row(row: &PgRow) -> Result<User, StorageError> {
    let id: i64 = row.try_get("id")?;
    let age: Option<i16> = row.try_get("age")?;
    let age = age
        .map(u8::try_from)
        .transpose()
        .map_err(|_| StorageError::Corrupt {
            table: "users",
            id: id.to_string(),
            reason: "age out of range".into(),
        })?;
    Ok(User {
        id,
        name: row.try_get("name")?,
        email: row.try_get("email")?,
        age,
    })
}

fn order_from_row(row: &PgRow) -> Result<Order, StorageError> {
    let id: i64 = row.try_get("id")?;
    let products: String = row.try_get("products")?;
    let products =
        serde_json::from_str::<Vec<String>>(&products).map_err(|e| StorageError::Corrupt {
            table: "orders",
            id: id.to_string(),
            reason: format!("products: {e}"),
        })?;
    Ok(Order {
        id,
        user_id: row.try_get("user_id")?,
        products,
    })
}

/// The lower(email) unique index is the only one a valid write can break.
fn email_conflict(err: sqlx::Error) -> StorageError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => StorageError::EmailTaken,
        _ => StorageError::Database(err),
    }
}

/// Whether another user than `except` has `email`. Checked before writing so that a
/// duplicate does not burn an identity value; the unique index still decides races.
async fn email_used(
    tx: &mut Transaction<'_, Postgres>,
    email: &str,
    except: Option<i64>,
) -> Result<bool, StorageError> {
    let used: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM users WHERE lower(email) = lower($1) \
         AND ($2::bigint IS NULL OR id <> $2))",
    )
    .bind(email)
    .bind(except)
    .fetch_one(&mut **tx)
    .await?;
    Ok(used)
}

/// Writes `event` into the outbox inside `tx`, the transaction of its change.
async fn append(tx: &mut Transaction<'_, Postgres>, event: &Event) -> Result<(), StorageError> {
    let payload = serde_json::to_string(event).map_err(|e| StorageError::Corrupt {
        table: "outbox",
        id: event.id.clone(),
        reason: e.to_string(),
    })?;
    let now = millis(now_millis());
    sqlx::query(
        "INSERT INTO outbox (id, topic, payload, created_at, attempts, available_at, traceparent) \
         VALUES ($1, $2, $3, $4, 0, $4, $5)",
    )
    .bind(&event.id)
    .bind(&event.kind)
    .bind(payload)
    .bind(now)
    .bind(crate::outbox::current_traceparent())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl UserStore for PgStore {
    async fn list_users(&self) -> Result<Vec<User>, StorageError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users ORDER BY id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(user_from_row).collect()
    }

    async fn user(&self, id: i64) -> Result<Option<User>, StorageError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn create_user(&self, user: &NewUser) -> Result<User, StorageError> {
        let sql = format!(
            "INSERT INTO users (name, email, age) VALUES ($1, $2, $3) RETURNING {USER_COLUMNS}"
        );
        let mut tx = self.pool.begin().await?;
        if email_used(&mut tx, &user.email, None).await? {
            return Err(StorageError::EmailTaken);
        }
        let row = sqlx::query(&sql)
            .bind(&user.name)
            .bind(&user.email)
            .bind(user.age.map(i16::from))
            .fetch_one(&mut *tx)
            .await
            .map_err(email_conflict)?;
        let created = user_from_row(&row)?;
        append(&mut tx, &Event::user_created(&created)).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn replace_user(&self, id: i64, user: &NewUser) -> Result<Option<User>, StorageError> {
        let sql = format!(
            "UPDATE users SET name = $1, email = $2, age = $3 WHERE id = $4 \
             RETURNING {USER_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(&user.name)
            .bind(&user.email)
            .bind(user.age.map(i16::from))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(email_conflict)?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn delete_user(&self, id: i64) -> Result<Option<User>, StorageError> {
        let sql = format!("DELETE FROM users WHERE id = $1 RETURNING {USER_COLUMNS}");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }
}

impl OrderStore for PgStore {
    async fn orders_for_user(&self, user_id: i64) -> Result<Vec<Order>, StorageError> {
        let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = $1 ORDER BY id");
        let rows = sqlx::query(&sql)
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(order_from_row).collect()
    }

    async fn order(&self, id: i64) -> Result<Option<Order>, StorageError> {
        let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(order_from_row).transpose()
    }

    async fn create_order(&self, order: &NewOrder) -> Result<Order, StorageError> {
        let products = serde_json::Value::from(order.products.clone()).to_string();
        let sql = format!(
            "INSERT INTO orders (user_id, products) VALUES ($1, $2::jsonb) \
             RETURNING {ORDER_COLUMNS}"
        );
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&sql)
            .bind(order.user_id)
            .bind(products)
            .fetch_one(&mut *tx)
            .await?;
        let created = order_from_row(&row)?;
        append(&mut tx, &Event::order_created(&created)).await?;
        tx.commit().await?;
        Ok(created)
    }
}

/// [`OutboxStore`] over a [`PgStore`]'s schema. Cheap to clone: clones share one pool.
#[derive(Debug, Clone)]
pub struct PgOutbox {
    pool: PgPool,
}

impl PgOutbox {
    /// Every row, oldest first.
    pub async fn records(&self) -> Result<Vec<OutboxRecord>, StorageError> {
        let rows = sqlx::query(
            "SELECT id, topic, payload, created_at, delivered_at, attempts, traceparent, dead_at, \
             last_error FROM outbox ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record_from_row).collect()
    }
}

fn topic_list(topics: &[&str]) -> Vec<String> {
    topics.iter().map(|t| (*t).to_owned()).collect()
}

impl OutboxStore for PgOutbox {
    async fn claim(
        &self,
        topics: &[&str],
        now: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<Claimed>, StorageError> {
        let claim = format!("{:032x}", rand::random::<u128>());
        // SKIP LOCKED: a row another relay is claiming right now is passed over instead
        // of waited for; once that claim commits, the row's available_at keeps it out.
        let rows = sqlx::query(
            "WITH picked AS ( \
                 SELECT id FROM outbox \
                 WHERE delivered_at IS NULL AND dead_at IS NULL AND available_at <= $2 \
                   AND topic = ANY($4) \
                 ORDER BY created_at, id LIMIT $5 FOR UPDATE SKIP LOCKED) \
             UPDATE outbox o SET claim = $1, available_at = $2 + $3, attempts = o.attempts + 1 \
             FROM picked WHERE o.id = picked.id \
             RETURNING o.id, o.topic, o.payload, o.attempts, o.created_at, o.traceparent",
        )
        .bind(&claim)
        .bind(now)
        .bind(lease_ms)
        .bind(topic_list(topics))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        claimed_from_rows(&rows, &claim)
    }

    async fn delivered(&self, id: &str, now: i64) -> Result<bool, StorageError> {
        let done = sqlx::query(
            "UPDATE outbox SET delivered_at = $1, claim = NULL \
             WHERE id = $2 AND delivered_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn retry_at(&self, id: &str, claim: &str, at: i64) -> Result<bool, StorageError> {
        let done = sqlx::query(
            "UPDATE outbox SET available_at = $1, claim = NULL \
             WHERE id = $2 AND claim = $3 AND delivered_at IS NULL",
        )
        .bind(at)
        .bind(id)
        .bind(claim)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn dead(
        &self,
        id: &str,
        claim: &str,
        now: i64,
        error: &str,
    ) -> Result<bool, StorageError> {
        let done = sqlx::query(
            "UPDATE outbox SET dead_at = $1, last_error = $2, claim = NULL \
             WHERE id = $3 AND claim = $4 AND delivered_at IS NULL AND dead_at IS NULL",
        )
        .bind(now)
        .bind(error)
        .bind(id)
        .bind(claim)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn prune(&self, routed: &[&str], before: i64) -> Result<u64, StorageError> {
        let done = sqlx::query(
            "DELETE FROM outbox WHERE created_at < $1 AND dead_at IS NULL \
             AND (delivered_at IS NOT NULL OR NOT (topic = ANY($2)))",
        )
        .bind(before)
        .bind(topic_list(routed))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;

    use axum::http::StatusCode;
    use breakwater_registry::client::{CachePolicy, Discovery, RegistryClient};
    use serde_json::json;

    use super::*;
    use crate::fixtures::{FakeRegistry, call, instance, spawn_server};
    use crate::orders::{self, OrdersState};
    use crate::outbox::{Event, ORDER_CREATED, USER_CREATED};
    use crate::users::{self, UsersState};
    use crate::{ServiceKind, ServiceOptions};

    /// A schema of its own in the test database, dropped (with everything in it) on drop.
    pub(crate) struct TestSchema {
        url: String,
        name: String,
    }

    impl TestSchema {
        /// `None` (after saying so) when `DATABASE_URL` is unset, unless
        /// `BREAKWATER_REQUIRE_SERVICES=1` makes that a failure.
        pub(crate) async fn new() -> Option<Self> {
            let Ok(url) = std::env::var(DATABASE_URL) else {
                assert!(
                    std::env::var("BREAKWATER_REQUIRE_SERVICES").as_deref() != Ok("1"),
                    "BREAKWATER_REQUIRE_SERVICES=1 but DATABASE_URL is unset"
                );
                eprintln!("SKIPPED (no DATABASE_URL)");
                return None;
            };
            let name = format!("bw_test_{:016x}", rand::random::<u64>());
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                .await
                .unwrap();
            sqlx::query(&format!("CREATE SCHEMA {name}"))
                .execute(&mut conn)
                .await
                .unwrap();
            Some(Self { url, name })
        }

        pub(crate) fn options(&self) -> PgConnectOptions {
            PgConnectOptions::from_str(&self.url)
                .unwrap()
                .options([("search_path", self.name.as_str())])
        }

        /// The test database's URL, pointed at this schema.
        pub(crate) fn url(&self) -> String {
            let sep = if self.url.contains('?') { '&' } else { '?' };
            format!("{}{sep}options[search_path]={}", self.url, self.name)
        }

        async fn store(&self) -> PgStore {
            PgStore::connect(self.options()).await.unwrap()
        }
    }

    impl Drop for TestSchema {
        fn drop(&mut self) {
            // Async work cannot run in drop on the test's runtime; a thread with its own
            // runtime can, and also cleans up after a failed assertion.
            let url = self.url.clone();
            let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                        .await
                        .unwrap();
                    sqlx::query(&sql).execute(&mut conn).await.unwrap();
                });
            })
            .join();
            if dropped.is_err() && !std::thread::panicking() {
                panic!("could not drop test schema {}", self.name);
            }
        }
    }

    fn ada() -> NewUser {
        NewUser {
            name: "Ada".into(),
            email: "ada@example.org".into(),
            age: Some(36),
        }
    }

    fn pen_order() -> NewOrder {
        NewOrder {
            user_id: 2,
            products: vec!["Pen".into(), "Ink".into()],
        }
    }

    #[test]
    fn database_urls_are_checked_and_redacted() {
        assert!(check_database_url("postgres://u@127.0.0.1:5432/test").is_ok());
        assert!(check_database_url("postgresql://u:pw@db/test?sslmode=disable").is_ok());
        for bad in [
            "mysql://u:secret@db/x",
            "127.0.0.1:5432",
            "",
            "postgres://u@h:notaport/x",
        ] {
            let err = check_database_url(bad).unwrap_err();
            assert_eq!(err.setting, "DATABASE_URL", "{bad}");
            assert!(!err.reason.contains("secret"), "{err}");
        }
        assert_eq!(redact("postgres://u:pw@h:1/d"), "postgres://u@h:1/d");
        assert_eq!(redact("postgres://h/d"), "postgres://h/d");

        let options = ServiceOptions {
            database_url: Some("sqlite://x.db".into()),
            ..ServiceOptions::default()
        };
        for kind in [ServiceKind::Users, ServiceKind::Orders] {
            assert_eq!(options.validate(kind).unwrap_err().setting, "DATABASE_URL");
        }
    }

    // Paused: the pool retries a refused connection until its acquire timeout.
    #[tokio::test(start_paused = true)]
    async fn an_unreachable_server_is_a_connect_error() {
        // Port 1 on loopback refuses at once.
        let err = PgStore::open("postgres://u:secret@127.0.0.1:1/test")
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Connect { .. }), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[tokio::test]
    async fn three_stores_opening_one_schema_at_once_seed_once() {
        let Some(schema) = TestSchema::new().await else {
            return;
        };
        let (a, b, c) = tokio::join!(schema.store(), schema.store(), schema.store());
        for store in [&a, &b, &c] {
            assert_eq!(store.list_users().await.unwrap().len(), 3);
        }
        let migrations: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(&a.pool)
            .await
            .unwrap();
        // Each migration recorded once, however many stores ran the migrator at once.
        assert_eq!(migrations, i64::try_from(MIGRATOR.iter().count()).unwrap());
        assert_eq!(
            a.user(1).await.unwrap(),
            Some(User {
                id: 1,
                name: "John Doe".into(),
                email: "john@example.com".into(),
                age: Some(30)
            })
        );
        assert_eq!(
            a.orders_for_user(3).await.unwrap(),
            vec![Order {
                id: 5,
                user_id: 3,
                products: vec!["Headphones".into()]
            }]
        );
        // A deleted seed user stays deleted when another instance opens later.
        assert!(a.delete_user(1).await.unwrap().is_some());
        let d = schema.store().await;
        assert_eq!(d.user(1).await.unwrap(), None);
        assert_eq!(d.list_users().await.unwrap().len(), 2);
        // New ids follow the seed.
        assert_eq!(b.create_user(&ada()).await.unwrap().id, 4);
        assert_eq!(c.create_order(&pen_order()).await.unwrap().id, 6);
        for store in [a, b, c, d] {
            store.close().await;
        }
    }

    #[tokio::test]
    async fn the_users_contract_holds_on_postgres() {
        let Some(schema) = TestSchema::new().await else {
            return;
        };
        let store = schema.store().await;
        let app = users::app(UsersState {
            store: store.clone(),
            instance: "user-service-4000".into(),
            port: 4000,
        });
        let (status, body) = call(&app, "GET", "/users", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body["users"],
            json!([
                {"id": 1, "name": "John Doe", "email": "john@example.com", "age": 30},
                {"id": 2, "name": "Jane Smith", "email": "jane@example.com", "age": 25},
                {"id": 3, "name": "Bob Johnson", "email": "bob@example.com", "age": 35},
            ])
        );

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
        let (status, read) = call(&app, "GET", "/users/4", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(read, body);

        // Duplicate emails (any case) are 409s and change nothing, not even the next id.
        let (_, before) = call(&app, "GET", "/users", None).await;
        let dup = r#"{"name":"Other","email":"Jane@Example.com"}"#;
        for (method, uri) in [("POST", "/users"), ("PUT", "/users/1")] {
            let (status, body) = call(&app, method, uri, Some(dup)).await;
            assert_eq!(status, StatusCode::CONFLICT, "{method}");
            assert_eq!(body, json!({"error": "Email already in use"}));
        }
        let (_, after) = call(&app, "GET", "/users", None).await;
        assert_eq!(before, after);

        let (status, body) = call(
            &app,
            "PUT",
            "/users/2",
            Some(r#"{"name":"Janet","email":"JANE@example.com"}"#),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "a user may keep their own email");
        assert_eq!(
            body,
            json!({"id": 2, "name": "Janet", "email": "JANE@example.com", "age": null})
        );
        let (status, _) = call(&app, "PUT", "/users/99", Some(dup)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        let (status, body) = call(&app, "DELETE", "/users/3", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["user"]["email"], "bob@example.com");
        let (status, body) = call(&app, "DELETE", "/users/3", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, json!({"error": "User not found"}));

        let (status, body) = call(
            &app,
            "POST",
            "/users",
            Some(r#"{"name":"Al","email":"al@example.org"}"#),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(body["id"], 5);

        // Each created user left exactly one user.created event.
        let rows = store.outbox().records().await.unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.topic == USER_CREATED));
        store.close().await;
    }

    #[tokio::test]
    async fn the_orders_contract_holds_on_postgres() {
        let Some(schema) = TestSchema::new().await else {
            return;
        };
        let store = schema.store().await;
        let users_app = users::app(UsersState {
            store: store.clone(),
            instance: "user-service-test".into(),
            port: 0,
        });
        let addr = spawn_server(users_app).await;
        let live = instance(users::SERVICE_NAME, "127.0.0.1", addr.port());
        let (registry_url, _events) = FakeRegistry::start(vec![live]).await;
        let app = orders::app(OrdersState {
            store: store.clone(),
            instance: "order-service-5000".into(),
            port: 5000,
            users: Discovery::new(RegistryClient::new(registry_url), CachePolicy::default()),
            http: reqwest::Client::new(),
        });

        let (status, body) = call(&app, "GET", "/orders/user/1", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body["orders"],
            json!([
                {"id": 1, "userId": 1, "products": ["Laptop"]},
                {"id": 2, "userId": 1, "products": ["Mouse"]},
            ])
        );
        let (status, body) = call(&app, "GET", "/orders/3", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"id": 3, "userId": 2, "products": ["Keyboard"]})
        );
        let (status, _) = call(&app, "GET", "/orders/77", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        let (status, body) = call(
            &app,
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
        let (_, listed) = call(&app, "GET", "/orders/user/3", None).await;
        assert_eq!(listed["totalOrders"], 2);

        let (status, _) = call(
            &app,
            "POST",
            "/orders",
            Some(r#"{"userId":42,"products":["Pen"]}"#),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

        let rows = store.outbox().records().await.unwrap();
        assert_eq!(rows.len(), 1, "one event for the one order written");
        let event: Event = serde_json::from_str(&rows[0].payload).unwrap();
        assert_eq!(event.kind, ORDER_CREATED);
        assert_eq!(event.id, rows[0].id);
        assert_eq!(
            event.data,
            json!({"orderId": 6, "userId": 3, "products": ["Pen", "Ink"],
                   "timestamp": event.occurred_at})
        );
        store.close().await;
    }

    #[tokio::test]
    async fn a_failure_after_the_insert_leaves_neither_row_nor_event() {
        let Some(schema) = TestSchema::new().await else {
            return;
        };
        let store = schema.store().await;
        // The outbox write fails after the order or user row is already inserted.
        for sql in [
            "CREATE FUNCTION refuse_events() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$",
            "CREATE TRIGGER refuse_events BEFORE INSERT ON outbox \
             FOR EACH ROW EXECUTE FUNCTION refuse_events()",
        ] {
            sqlx::query(sql).execute(&store.pool).await.unwrap();
        }
        assert!(store.create_order(&pen_order()).await.is_err());
        assert_eq!(store.orders_for_user(2).await.unwrap().len(), 2);
        assert!(store.create_user(&ada()).await.is_err());
        assert_eq!(store.list_users().await.unwrap().len(), 3);
        assert!(store.outbox().records().await.unwrap().is_empty());

        sqlx::query("DROP TRIGGER refuse_events ON outbox")
            .execute(&store.pool)
            .await
            .unwrap();
        // Nothing half-written stands in the way: the same writes now succeed whole.
        let order = store.create_order(&pen_order()).await.unwrap();
        assert_eq!(store.order(order.id).await.unwrap(), Some(order));
        store.create_user(&ada()).await.unwrap();
        assert_eq!(store.outbox().records().await.unwrap().len(), 2);
        store.close().await;
    }

    #[tokio::test]
    async fn an_event_keeps_the_traceparent_of_its_request_through_a_claim() {
        let Some(schema) = TestSchema::new().await else {
            return;
        };
        let store = schema.store().await;
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        crate::outbox::with_traceparent(Some(parent.into()), store.create_order(&pen_order()))
            .await
            .unwrap();
        store.create_user(&ada()).await.unwrap();
        let rows = store.outbox().records().await.unwrap();
        let traced: Vec<_> = rows
            .iter()
            .map(|r| (r.topic.as_str(), r.traceparent.as_deref()))
            .collect();
        assert!(
            traced.contains(&(ORDER_CREATED, Some(parent))),
            "{traced:?}"
        );
        assert!(traced.contains(&(USER_CREATED, None)), "{traced:?}");
        let now = millis(now_millis());
        let claimed = store
            .outbox()
            .claim(&[ORDER_CREATED], now, 1000, 10)
            .await
            .unwrap();
        assert_eq!(claimed[0].traceparent.as_deref(), Some(parent));
        store.close().await;
    }

    #[tokio::test]
    async fn a_claim_holds_rows_for_its_lease_only() {
        let Some(schema) = TestSchema::new().await else {
            return;
        };
        let store = schema.store().await;
        let outbox = store.outbox();
        store.create_order(&pen_order()).await.unwrap();
        store.create_user(&ada()).await.unwrap();
        let now = millis(now_millis());
        let routed = [ORDER_CREATED];

        let first = outbox.claim(&routed, now, 1000, 10).await.unwrap();
        assert_eq!(first.len(), 1, "only routed topics are claimed");
        assert_eq!(first[0].attempts, 1);
        assert!(
            outbox
                .claim(&routed, now + 999, 1000, 10)
                .await
                .unwrap()
                .is_empty()
        );

        let second = outbox.claim(&routed, now + 1000, 1000, 10).await.unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].attempts, 2);
        assert!(
            !outbox
                .retry_at(&first[0].id, &first[0].claim, now)
                .await
                .unwrap(),
            "an expired claim cannot put the row back"
        );
        assert!(
            outbox
                .retry_at(&second[0].id, &second[0].claim, now + 1500)
                .await
                .unwrap()
        );
        assert!(
            outbox
                .claim(&routed, now + 1499, 1000, 10)
                .await
                .unwrap()
                .is_empty()
        );
        let third = outbox.claim(&routed, now + 1500, 1000, 10).await.unwrap();
        assert!(outbox.delivered(&third[0].id, now + 1600).await.unwrap());
        assert!(!outbox.delivered(&third[0].id, now + 1700).await.unwrap());
        assert!(
            outbox
                .claim(&routed, now + 99_999, 1000, 10)
                .await
                .unwrap()
                .is_empty()
        );

        // Past retention: the delivered order event and the unrouted user event go.
        assert_eq!(outbox.prune(&routed, now - 1000).await.unwrap(), 0);
        assert_eq!(outbox.prune(&routed, now + 100_000).await.unwrap(), 2);
        assert!(outbox.records().await.unwrap().is_empty());
        store.close().await;
    }

    #[tokio::test]
    async fn two_relays_claiming_at_once_never_take_the_same_row() {
        let Some(schema) = TestSchema::new().await else {
            return;
        };
        let (a, b) = tokio::join!(schema.store(), schema.store());
        for _ in 0..40 {
            a.create_order(&pen_order()).await.unwrap();
        }
        let now = millis(now_millis());
        // Both relays claim small batches as fast as they can within one lease window.
        let drain = |outbox: PgOutbox| async move {
            let mut taken = Vec::new();
            loop {
                let batch = outbox
                    .claim(&[ORDER_CREATED], now, 60_000, 3)
                    .await
                    .unwrap();
                if batch.is_empty() {
                    return taken;
                }
                taken.extend(batch.into_iter().map(|c| c.id));
            }
        };
        let (x, y) = tokio::join!(
            tokio::spawn(drain(a.outbox())),
            tokio::spawn(drain(b.outbox()))
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        let all: BTreeSet<_> = x.iter().chain(&y).cloned().collect();
        assert_eq!(x.len() + y.len(), 40, "every row claimed once");
        assert_eq!(all.len(), 40, "no row claimed twice");
        let records = a.outbox().records().await.unwrap();
        assert!(records.iter().all(|r| r.attempts == 1));
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    async fn a_permanent_refusal_marks_a_row_dead_and_a_503_leaves_it_for_retry() {
        use crate::outbox::relay::tests::{quick, refusing_consumer};
        use crate::outbox::relay::{PassReport, Relay, Routes};
        let Some(schema) = TestSchema::new().await else {
            return;
        };
        let store = schema.store().await;
        let outbox = store.outbox();
        let routed = [ORDER_CREATED];

        store.create_order(&pen_order()).await.unwrap();
        let (seen, transport) = refusing_consumer(usize::MAX, StatusCode::GONE).await;
        let relay = Relay::new(outbox.clone(), transport, Routes::SYSTEM, quick(), "relay");
        let report = relay.pass().await.unwrap();
        assert_eq!(
            report,
            PassReport {
                claimed: 1,
                dead: 1,
                ..PassReport::default()
            }
        );
        let dead = outbox.records().await.unwrap().remove(0);
        assert!(
            dead.dead_at.is_some() && dead.delivered_at.is_none(),
            "{dead:?}"
        );
        assert!(
            dead.last_error.as_deref().unwrap().contains("answered 410"),
            "{dead:?}"
        );
        let later = millis(now_millis()) + 3_600_000;
        assert!(
            outbox
                .claim(&routed, later, 1000, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(relay.pass().await.unwrap(), PassReport::default());
        assert_eq!(seen.lock().unwrap().posts.get(&dead.id), Some(&1));
        assert_eq!(relay.stats().dead(), 1);
        assert_eq!(
            outbox.prune(&routed, later).await.unwrap(),
            0,
            "dead rows are kept"
        );

        store.create_order(&pen_order()).await.unwrap();
        let (_seen, transport) = refusing_consumer(1, StatusCode::SERVICE_UNAVAILABLE).await;
        let relay = Relay::new(outbox.clone(), transport, Routes::SYSTEM, quick(), "relay");
        let report = relay.pass().await.unwrap();
        assert_eq!((report.claimed, report.failed, report.dead), (1, 1, 0));
        let records = outbox.records().await.unwrap();
        let pending = records.iter().find(|r| r.id != dead.id).unwrap();
        assert_eq!((pending.dead_at, pending.delivered_at), (None, None));
        let retried = outbox.claim(&routed, later, 1000, 10).await.unwrap();
        assert_eq!(retried.len(), 1, "only the 503'd row comes back");
        assert_eq!(retried[0].id, pending.id);
        assert_eq!(retried[0].attempts, 2);
        store.close().await;
    }

    #[tokio::test]
    async fn run_keeps_users_in_postgres_when_a_database_url_is_set() {
        let Some(schema) = TestSchema::new().await else {
            return;
        };
        let dir = crate::fixtures::TempDir::new("pg-run");
        let (registry_url, _events) = FakeRegistry::start(vec![]).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = crate::ServiceConfig {
            port,
            host: Some("127.0.0.1".into()),
            registry_url,
            data_dir: dir.path().to_path_buf(),
            heartbeat_interval_secs: 30,
            options: ServiceOptions {
                database_url: Some(schema.url()),
                ..ServiceOptions::default()
            },
        };
        let shutdown = breakwater_runtime::CancellationToken::new();
        let running = tokio::spawn(crate::run(
            ServiceKind::Users,
            listener,
            config,
            shutdown.clone(),
        ));
        let res = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/users"))
            .json(&json!({"name": "Ada", "email": "ada@example.org"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        shutdown.cancel();
        running.await.unwrap().unwrap();

        let store = schema.store().await;
        assert_eq!(
            store.user(4).await.unwrap().unwrap().email,
            "ada@example.org"
        );
        assert!(
            !dir.path().join(crate::DATABASE_FILE).exists(),
            "no SQLite file beside PostgreSQL"
        );
        store.close().await;
    }
}
