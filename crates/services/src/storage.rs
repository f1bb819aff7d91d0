//! Where users and orders live. Handlers see only the [`UserStore`] and [`OrderStore`]
//! traits, so SQL stays here and another database can join beside [`SqliteStore`].
//!
//! The SQLite file is shared by every users and orders process on the machine; the
//! database module opens it safely when several processes do so at the same moment and
//! writes the schema and the seed data once per file, so a deleted seed user stays
//! deleted across restarts.
//!
//! [`PgStore`] keeps the same data in PostgreSQL, so instances on several machines
//! share it; [`SharedStore`] is whichever of the two an instance was configured with.
//!
//! [`StorageError`] is shared by every store of the crate (users, orders, analytics
//! metrics, data records).

use std::future::Future;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, sqlite::SqliteRow};

use crate::database::{self, Schema};
use crate::outbox::{self, Event, SharedOutbox, SqliteOutbox};

pub(crate) mod postgres;

pub use postgres::{DATABASE_URL, PgOutbox, PgStore, check_database_url, is_postgres_url};

/// A stored user, exactly the body the users contract returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Positive, assigned by the store.
    pub id: i64,
    /// Trimmed, non-empty.
    pub name: String,
    /// Unique (case-insensitively) across users.
    pub email: String,
    /// `null` on the wire when unknown.
    pub age: Option<u8>,
}

/// A validated user to create or to replace an existing one with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    /// Trimmed, non-empty, at most 200 characters.
    pub name: String,
    /// A plausible address, at most 254 characters.
    pub email: String,
    /// 0..=150 when given.
    pub age: Option<u8>,
}

/// A stored order, exactly the body the orders contract returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    /// Positive, assigned by the store.
    pub id: i64,
    /// The user the order belongs to.
    pub user_id: i64,
    /// Product names, in the order given.
    pub products: Vec<String>,
}

/// A validated order to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    /// A user that existed when the order was checked.
    pub user_id: i64,
    /// Non-empty list of non-empty product names.
    pub products: Vec<String>,
}

/// Why a storage operation failed. A failed write has changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database could not be opened or created.
    #[error("cannot open database {path}: {source}")]
    Open {
        /// The file that was being opened.
        path: PathBuf,
        /// What the driver said.
        #[source]
        source: sqlx::Error,
    },
    /// The database server could not be reached or refused the connection.
    #[error("cannot connect to database {target}: {source}")]
    Connect {
        /// The database, as a URL without its password.
        target: String,
        /// What the driver said.
        #[source]
        source: sqlx::Error,
    },
    /// Creating the tables or the seed data failed.
    #[error("cannot prepare the database schema: {0}")]
    Schema(#[source] sqlx::Error),
    /// Another user already has this email address.
    #[error("email already in use")]
    EmailTaken,
    /// A stored row cannot be read back into its type (e.g. products that are not a
    /// JSON array of strings).
    #[error("stored {table} row {id} is corrupt: {reason}")]
    Corrupt {
        /// The table holding the row.
        table: &'static str,
        /// The row's id, as text (ids are integers or strings depending on the table).
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other database failure.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Users: list, read, create, replace, delete.
pub trait UserStore: Send + Sync {
    /// All users, by ascending id.
    fn list_users(&self) -> impl Future<Output = Result<Vec<User>, StorageError>> + Send;
    /// One user, `None` if there is none with this id.
    fn user(&self, id: i64) -> impl Future<Output = Result<Option<User>, StorageError>> + Send;
    /// Stores a new user under a fresh id, and its `user.created` event in the outbox in
    /// the same transaction (both or neither). [`StorageError::EmailTaken`] if the email
    /// is already used.
    fn create_user(
        &self,
        user: &NewUser,
    ) -> impl Future<Output = Result<User, StorageError>> + Send;
    /// Replaces every field of user `id`; `None` if there is no such user.
    /// [`StorageError::EmailTaken`] if another user has the email.
    fn replace_user(
        &self,
        id: i64,
        user: &NewUser,
    ) -> impl Future<Output = Result<Option<User>, StorageError>> + Send;
    /// Deletes user `id` and returns what was deleted; `None` if there was none.
    fn delete_user(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<Option<User>, StorageError>> + Send;
}

/// Orders: list by user, read, create.
pub trait OrderStore: Send + Sync {
    /// The orders of one user, by ascending id (empty for an unknown user).
    fn orders_for_user(
        &self,
        user_id: i64,
    ) -> impl Future<Output = Result<Vec<Order>, StorageError>> + Send;
    /// One order, `None` if there is none with this id.
    fn order(&self, id: i64) -> impl Future<Output = Result<Option<Order>, StorageError>> + Send;
    /// Stores a new order under a fresh id, and its `order.created` event in the outbox
    /// in the same transaction (both or neither).
    fn create_order(
        &self,
        order: &NewOrder,
    ) -> impl Future<Output = Result<Order, StorageError>> + Send;
}

/// Version 1: the tables and the contract's seed data. Orders carry no foreign key to
/// users on purpose: the two services own their data separately and may live in
/// different databases; the orders service checks users over HTTP instead.
const SCHEMA_V1: &str = r#"
CREATE TABLE IF NOT EXISTS users (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    name  TEXT    NOT NULL,
    email TEXT    NOT NULL UNIQUE COLLATE NOCASE,
    age   INTEGER NULL CHECK (age IS NULL OR (age BETWEEN 0 AND 150))
);
CREATE TABLE IF NOT EXISTS orders (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id  INTEGER NOT NULL,
    products TEXT    NOT NULL CHECK (json_valid(products))
);
CREATE INDEX IF NOT EXISTS orders_by_user ON orders (user_id, id);
INSERT OR IGNORE INTO users (id, name, email, age) VALUES
    (1, 'John Doe', 'john@example.com', 30),
    (2, 'Jane Smith', 'jane@example.com', 25),
    (3, 'Bob Johnson', 'bob@example.com', 35);
INSERT OR IGNORE INTO orders (id, user_id, products) VALUES
    (1, 1, '["Laptop"]'),
    (2, 1, '["Mouse"]'),
    (3, 2, '["Keyboard"]'),
    (4, 2, '["Monitor"]'),
    (5, 3, '["Headphones"]');
"#;

/// The schema this code writes; append a step to migrate.
const SCHEMA: Schema = Schema {
    steps: &[
        SCHEMA_V1,
        outbox::SCHEMA_STEP,
        outbox::TRACE_STEP,
        outbox::DEAD_STEP,
    ],
};

/// Users and orders in one SQLite file (WAL mode, so readers never wait for writers).
/// Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `path`, switches it to WAL, brings its
    /// schema up to date and seeds it once. Safe to call from several processes at the
    /// same time.
    pub async fn open(path: &Path) -> Result<Self, StorageError> {
        let pool = database::open(path, SCHEMA, 8).await?;
        Ok(Self { pool })
    }

    /// The outbox of this database: where `user.created` and `order.created` wait for
    /// the relay. Shares this store's pool.
    pub fn outbox(&self) -> SqliteOutbox {
        SqliteOutbox::new(self.pool.clone())
    }

    /// Closes every connection; later calls fail. Lets a process finish its writes
    /// before it exits.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The users/orders store an instance runs on: the SQLite file by default, PostgreSQL
/// when a database URL is configured. Cheap to clone.
#[derive(Debug, Clone)]
pub enum SharedStore {
    /// The machine-local file.
    Sqlite(SqliteStore),
    /// A PostgreSQL schema shared by every machine.
    Postgres(PgStore),
}

impl SharedStore {
    /// Opens PostgreSQL at `database_url` when given (it must be `postgres://` or
    /// `postgresql://`), else the SQLite file at `sqlite_path`.
    pub async fn open(
        database_url: Option<&str>,
        sqlite_path: &Path,
    ) -> Result<Self, StorageError> {
        match database_url {
            Some(url) => Ok(Self::Postgres(PgStore::open(url).await?)),
            None => Ok(Self::Sqlite(SqliteStore::open(sqlite_path).await?)),
        }
    }

    /// The outbox beside the users and orders, sharing the store's pool.
    pub fn outbox(&self) -> SharedOutbox {
        match self {
            Self::Sqlite(store) => SharedOutbox::Sqlite(store.outbox()),
            Self::Postgres(store) => SharedOutbox::Postgres(store.outbox()),
        }
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        match self {
            Self::Sqlite(store) => store.close().await,
            Self::Postgres(store) => store.close().await,
        }
    }
}

impl UserStore for SharedStore {
    async fn list_users(&self) -> Result<Vec<User>, StorageError> {
        match self {
            Self::Sqlite(s) => s.list_users().await,
            Self::Postgres(s) => s.list_users().await,
        }
    }

    async fn user(&self, id: i64) -> Result<Option<User>, StorageError> {
        match self {
            Self::Sqlite(s) => s.user(id).await,
            Self::Postgres(s) => s.user(id).await,
        }
    }

    async fn create_user(&self, user: &NewUser) -> Result<User, StorageError> {
        match self {
            Self::Sqlite(s) => s.create_user(user).await,
            Self::Postgres(s) => s.create_user(user).await,
        }
    }

    async fn replace_user(&self, id: i64, user: &NewUser) -> Result<Option<User>, StorageError> {
        match self {
            Self::Sqlite(s) => s.replace_user(id, user).await,
            Self::Postgres(s) => s.replace_user(id, user).await,
        }
    }

    async fn delete_user(&self, id: i64) -> Result<Option<User>, StorageError> {
        match self {
            Self::Sqlite(s) => s.delete_user(id).await,
            Self::Postgres(s) => s.delete_user(id).await,
        }
    }
}

impl OrderStore for SharedStore {
    async fn orders_for_user(&self, user_id: i64) -> Result<Vec<Order>, StorageError> {
        match self {
            Self::Sqlite(s) => s.orders_for_user(user_id).await,
            Self::Postgres(s) => s.orders_for_user(user_id).await,
        }
    }

    async fn order(&self, id: i64) -> Result<Option<Order>, StorageError> {
        match self {
            Self::Sqlite(s) => s.order(id).await,
            Self::Postgres(s) => s.order(id).await,
        }
    }

    async fn create_order(&self, order: &NewOrder) -> Result<Order, StorageError> {
        match self {
            Self::Sqlite(s) => s.create_order(order).await,
            Self::Postgres(s) => s.create_order(order).await,
        }
    }
}

const USER_COLUMNS: &str = "id, name, email, age";

fn user_from_row(row: &SqliteRow) -> Result<User, StorageError> {
    let id: i64 = row.try_get("id")?;
    let age: Option<i64> = row.try_get("age")?;
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

fn order_from_row(row: &SqliteRow) -> Result<Order, StorageError> {
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

/// The email UNIQUE constraint is the only one a valid write can break.
fn email_conflict(err: sqlx::Error) -> StorageError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => StorageError::EmailTaken,
        _ => StorageError::Database(err),
    }
}

impl UserStore for SqliteStore {
    async fn list_users(&self) -> Result<Vec<User>, StorageError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users ORDER BY id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(user_from_row).collect()
    }

    async fn user(&self, id: i64) -> Result<Option<User>, StorageError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn create_user(&self, user: &NewUser) -> Result<User, StorageError> {
        let sql = format!(
            "INSERT INTO users (name, email, age) VALUES (?, ?, ?) RETURNING {USER_COLUMNS}"
        );
        // IMMEDIATE: take the write lock before the first statement, so the insert and
        // the event wait for other writers together instead of failing half-way busy.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(&sql)
            .bind(&user.name)
            .bind(&user.email)
            .bind(user.age)
            .fetch_one(&mut *tx)
            .await
            .map_err(email_conflict)?;
        let created = user_from_row(&row)?;
        outbox::append(&mut tx, &Event::user_created(&created)).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn replace_user(&self, id: i64, user: &NewUser) -> Result<Option<User>, StorageError> {
        let sql = format!(
            "UPDATE users SET name = ?, email = ?, age = ? WHERE id = ? RETURNING {USER_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(&user.name)
            .bind(&user.email)
            .bind(user.age)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(email_conflict)?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn delete_user(&self, id: i64) -> Result<Option<User>, StorageError> {
        let sql = format!("DELETE FROM users WHERE id = ? RETURNING {USER_COLUMNS}");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }
}

impl OrderStore for SqliteStore {
    async fn orders_for_user(&self, user_id: i64) -> Result<Vec<Order>, StorageError> {
        let rows =
            sqlx::query("SELECT id, user_id, products FROM orders WHERE user_id = ? ORDER BY id")
                .bind(user_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(order_from_row).collect()
    }

    async fn order(&self, id: i64) -> Result<Option<Order>, StorageError> {
        let row = sqlx::query("SELECT id, user_id, products FROM orders WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(order_from_row).transpose()
    }

    async fn create_order(&self, order: &NewOrder) -> Result<Order, StorageError> {
        let products = serde_json::Value::from(order.products.clone()).to_string();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(
            "INSERT INTO orders (user_id, products) VALUES (?, ?) RETURNING id, user_id, products",
        )
        .bind(order.user_id)
        .bind(products)
        .fetch_one(&mut *tx)
        .await?;
        let created = order_from_row(&row)?;
        outbox::append(&mut tx, &Event::order_created(&created)).await?;
        tx.commit().await?;
        Ok(created)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{TempDir, temp_store};
    use crate::outbox::OutboxStore;

    fn ada() -> NewUser {
        NewUser {
            name: "Ada".into(),
            email: "ada@example.org".into(),
            age: Some(36),
        }
    }

    #[tokio::test]
    async fn three_concurrent_opens_succeed_and_seed_once() {
        let dir = TempDir::new("concurrent-open");
        let path = dir.db();
        let (a, b, c) = tokio::join!(
            SqliteStore::open(&path),
            SqliteStore::open(&path),
            SqliteStore::open(&path)
        );
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        for store in [&a, &b, &c] {
            let users = store.list_users().await.unwrap();
            assert_eq!(users.len(), 3);
        }
        let users = a.list_users().await.unwrap();
        assert_eq!(
            users[0],
            User {
                id: 1,
                name: "John Doe".into(),
                email: "john@example.com".into(),
                age: Some(30)
            }
        );
        assert_eq!(users[1].email, "jane@example.com");
        assert_eq!(users[2].name, "Bob Johnson");
        assert_eq!(a.orders_for_user(1).await.unwrap().len(), 2);
        assert_eq!(a.orders_for_user(2).await.unwrap().len(), 2);
        assert_eq!(
            a.orders_for_user(3).await.unwrap(),
            vec![Order {
                id: 5,
                user_id: 3,
                products: vec!["Headphones".into()]
            }]
        );
        for store in [a, b, c] {
            store.close().await;
        }
    }

    /// Set by [`three_processes_open_one_file_at_once`] for its child processes.
    const CHILD_DB_ENV: &str = "BREAKWATER_SERVICES_TEST_CHILD_DB";

    /// In a child process: open the database named by the parent. Otherwise a no-op.
    #[tokio::test]
    async fn child_process_opens_the_database() {
        let Some(path) = std::env::var_os(CHILD_DB_ENV) else {
            return;
        };
        let store = SqliteStore::open(Path::new(&path)).await.unwrap();
        assert_eq!(store.list_users().await.unwrap().len(), 3);
        store.close().await;
    }

    #[tokio::test]
    async fn three_processes_open_one_file_at_once() {
        let dir = TempDir::new("three-processes");
        let exe = std::env::current_exe().unwrap();
        let spawn = || {
            tokio::process::Command::new(&exe)
                .args([
                    "--exact",
                    "storage::tests::child_process_opens_the_database",
                ])
                .env(CHILD_DB_ENV, dir.db())
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
        };
        let (a, b, c) = tokio::join!(spawn(), spawn(), spawn());
        for status in [a, b, c] {
            assert!(status.unwrap().success());
        }
        let store = SqliteStore::open(&dir.db()).await.unwrap();
        assert_eq!(store.list_users().await.unwrap().len(), 3);
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        store.close().await;
    }

    #[tokio::test]
    async fn reopening_keeps_changes_and_does_not_reseed() {
        let dir = TempDir::new("reopen");
        let store = SqliteStore::open(&dir.db()).await.unwrap();
        assert!(store.delete_user(1).await.unwrap().is_some());
        let created = store.create_user(&ada()).await.unwrap();
        store.close().await;

        let store = SqliteStore::open(&dir.db()).await.unwrap();
        assert_eq!(
            store.user(1).await.unwrap(),
            None,
            "a deleted seed user stays deleted"
        );
        assert_eq!(store.user(created.id).await.unwrap(), Some(created));
        store.close().await;
    }

    #[tokio::test]
    async fn a_version_1_file_gains_the_outbox_and_keeps_its_data() {
        let dir = TempDir::new("migrate-v1");
        let v1 = Schema {
            steps: &[SCHEMA_V1],
        };
        let pool = database::open(&dir.db(), v1, 1).await.unwrap();
        sqlx::query("DELETE FROM users WHERE id = 1")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;

        let store = SqliteStore::open(&dir.db()).await.unwrap();
        assert_eq!(
            store.user(1).await.unwrap(),
            None,
            "step 1 is not run again"
        );
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(version, 4);
        store.create_user(&ada()).await.unwrap();
        assert_eq!(store.outbox().records().await.unwrap().len(), 1);
        store.close().await;
    }

    #[tokio::test]
    async fn a_version_2_outbox_gains_trace_context_and_its_rows_stay_valid() {
        let dir = TempDir::new("migrate-v2");
        let v2 = Schema {
            steps: &[SCHEMA_V1, outbox::SCHEMA_STEP],
        };
        let pool = database::open(&dir.db(), v2, 1).await.unwrap();
        sqlx::query(
            "INSERT INTO outbox (id, topic, payload, created_at, attempts, available_at) \
             VALUES ('old', 'order.created', '{}', 1, 0, 1)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = SqliteStore::open(&dir.db()).await.unwrap();
        let old = store.outbox().record("old").await.unwrap().unwrap();
        assert_eq!(old.traceparent, None);
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let order = NewOrder {
            user_id: 1,
            products: vec!["Pen".into()],
        };
        outbox::with_traceparent(Some(parent.into()), store.create_order(&order))
            .await
            .unwrap();
        store.create_order(&order).await.unwrap();
        let rows = store.outbox().records().await.unwrap();
        let mut traces: Vec<_> = rows.iter().map(|r| r.traceparent.as_deref()).collect();
        traces.sort_unstable();
        assert_eq!(traces, [None, None, Some(parent)]);
        store.close().await;
    }

    #[tokio::test]
    async fn a_version_3_outbox_gains_dead_letters_and_its_rows_stay_claimable() {
        let dir = TempDir::new("migrate-v3");
        let v3 = Schema {
            steps: &[SCHEMA_V1, outbox::SCHEMA_STEP, outbox::TRACE_STEP],
        };
        let pool = database::open(&dir.db(), v3, 1).await.unwrap();
        sqlx::query(
            "INSERT INTO outbox (id, topic, payload, created_at, attempts, available_at) \
             VALUES ('old', 'order.created', '{}', 1, 0, 1)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = SqliteStore::open(&dir.db()).await.unwrap();
        let old = store.outbox().record("old").await.unwrap().unwrap();
        assert_eq!((old.dead_at, old.last_error), (None, None));
        let claimed = store
            .outbox()
            .claim(&[outbox::ORDER_CREATED], 2, 1000, 10)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        assert!(
            store
                .outbox()
                .dead("old", &claimed[0].claim, 3, "answered 422")
                .await
                .unwrap()
        );
        let old = store.outbox().record("old").await.unwrap().unwrap();
        assert_eq!(old.dead_at, Some(3));
        assert_eq!(old.last_error.as_deref(), Some("answered 422"));
        store.close().await;
    }

    #[tokio::test]
    async fn new_ids_follow_the_seed() {
        let (_dir, store) = temp_store("ids").await;
        assert_eq!(store.create_user(&ada()).await.unwrap().id, 4);
        let order = store
            .create_order(&NewOrder {
                user_id: 4,
                products: vec!["Pen".into(), "Ink".into()],
            })
            .await
            .unwrap();
        assert_eq!(
            order,
            Order {
                id: 6,
                user_id: 4,
                products: vec!["Pen".into(), "Ink".into()]
            }
        );
        assert_eq!(store.order(6).await.unwrap(), Some(order));
        assert_eq!(store.order(7).await.unwrap(), None);
    }

    #[tokio::test]
    async fn duplicate_email_changes_nothing() {
        let (_dir, store) = temp_store("dup").await;
        let before = store.list_users().await.unwrap();
        let dup = NewUser {
            email: "JOHN@example.com".into(),
            ..ada()
        };
        assert!(matches!(
            store.create_user(&dup).await,
            Err(StorageError::EmailTaken)
        ));
        assert!(matches!(
            store.replace_user(2, &dup).await,
            Err(StorageError::EmailTaken)
        ));
        assert_eq!(store.list_users().await.unwrap(), before);
        // The failed insert did not burn an id either.
        assert_eq!(store.create_user(&ada()).await.unwrap().id, 4);
    }

    #[tokio::test]
    async fn replace_and_delete_report_missing_users() {
        let (_dir, store) = temp_store("missing").await;
        assert_eq!(store.replace_user(99, &ada()).await.unwrap(), None);
        assert_eq!(store.delete_user(99).await.unwrap(), None);
        let replaced = store
            .replace_user(2, &NewUser { age: None, ..ada() })
            .await
            .unwrap();
        assert_eq!(
            replaced,
            Some(User {
                id: 2,
                name: "Ada".into(),
                email: "ada@example.org".into(),
                age: None
            })
        );
        // A user may keep their own email on replace.
        assert!(store.replace_user(2, &ada()).await.unwrap().is_some());
        let deleted = store.delete_user(2).await.unwrap().unwrap();
        assert_eq!(deleted.email, "ada@example.org");
        assert_eq!(store.user(2).await.unwrap(), None);
    }

    #[tokio::test]
    async fn corrupt_products_are_reported_not_panicked_on() {
        let (_dir, store) = temp_store("corrupt").await;
        sqlx::query("UPDATE orders SET products = '{\"a\":1}' WHERE id = 1")
            .execute(&store.pool)
            .await
            .unwrap();
        assert!(matches!(
            store.order(1).await,
            Err(StorageError::Corrupt { table: "orders", ref id, .. }) if id == "1"
        ));
    }

    #[tokio::test]
    async fn open_fails_cleanly_on_an_unusable_path() {
        let dir = TempDir::new("bad-path");
        let err = SqliteStore::open(&dir.path().join("missing-dir").join("x.db"))
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Open { .. }), "{err}");
    }
}
