//! SQLite files shared by several processes: opening one safely while other processes
//! open it at the same moment, and bringing its schema up to date exactly once.
//!
//! Switching a fresh file to WAL needs an exclusive lock that SQLite answers with
//! SQLITE_BUSY at once instead of waiting out the busy timeout, so concurrent openers
//! retry (with jitter, so they do not collide again) until the deadline a busy timeout
//! would give them. The schema's steps run in one `BEGIN IMMEDIATE` transaction guarded
//! by `PRAGMA user_version`, which makes later openers wait and then find the work done.
//! A file at version N gets only steps N.. (so seed data written by step 0 is never
//! written again into a file that already had it).

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::storage::StorageError;

/// How long a connection waits for another process's write lock before giving up.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A schema as migration steps: step `i` brings a file from `user_version` `i` to
/// `i + 1`. Steps are only ever appended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schema {
    /// Statements per step; a file at version `steps.len()` or later is left alone.
    pub(crate) steps: &'static [&'static str],
}

/// Opens (creating if missing) the database at `path` with a pool of up to
/// `max_connections`, switches it to WAL and applies `schema` once.
pub(crate) async fn open(
    path: &Path,
    schema: Schema,
    max_connections: u32,
) -> Result<SqlitePool, StorageError> {
    let deadline = tokio::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(5);
    loop {
        match try_open(path, schema, max_connections).await {
            Err(err) if err.is_busy() && tokio::time::Instant::now() < deadline => {
                let jittered = pause.mul_f64(rand::random_range(0.5..1.5));
                tokio::time::sleep(jittered).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            result => return result,
        }
    }
}

async fn try_open(
    path: &Path,
    schema: Schema,
    max_connections: u32,
) -> Result<SqlitePool, StorageError> {
    // No journal mode here: each pooled connection would try to switch it again.
    // WAL is a property of the file, set once below.
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(BUSY_TIMEOUT)
        // FULL (SQLite's default, made explicit): a commit that returned is on disk, so
        // a 201 is never lost, not even to a power cut.
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options)
        .await
        .map_err(|source| StorageError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    if let Err(e) = prepare(&pool, schema).await {
        pool.close().await;
        return Err(StorageError::Schema(e));
    }
    Ok(pool)
}

async fn prepare(pool: &SqlitePool, schema: Schema) -> Result<(), sqlx::Error> {
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode = WAL")
        .fetch_one(pool)
        .await?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(%mode, "SQLite refused WAL mode; readers will wait for writers");
    }
    // IMMEDIATE takes the write lock at once: a deferred transaction that first reads
    // the version and then writes could fail with SQLITE_BUSY without waiting.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut *tx)
        .await?;
    let done = usize::try_from(version).unwrap_or(0);
    for step in schema.steps.iter().skip(done) {
        // `sqlx::query` runs every statement of the step on SQLite. Not `raw_sql`:
        // its future is not `Send` for every lifetime, so `run` could not be spawned.
        sqlx::query(step).execute(&mut *tx).await?;
    }
    if done < schema.steps.len() {
        // PRAGMA takes no bound parameters; the number is ours, not input.
        let pragma = format!("PRAGMA user_version = {}", schema.steps.len());
        sqlx::query(&pragma).execute(&mut *tx).await?;
    }
    tx.commit().await
}

impl StorageError {
    /// Whether another connection held a lock SQLite would not wait for; worth retrying.
    fn is_busy(&self) -> bool {
        let source = match self {
            Self::Open { source, .. } | Self::Schema(source) | Self::Database(source) => source,
            Self::Connect { .. } | Self::EmailTaken | Self::Corrupt { .. } => return false,
        };
        let sqlx::Error::Database(db) = source else {
            return false;
        };
        // Primary result codes SQLITE_BUSY (5) and SQLITE_LOCKED (6), under any extended
        // code (e.g. SQLITE_BUSY_RECOVERY).
        db.code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6))
    }
}
