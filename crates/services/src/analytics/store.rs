//! Where metrics live: the [`MetricStore`] trait the handlers see; [`SqliteMetrics`],
//! the embedded default (`analytics.db` in the data directory); [`PgMetrics`], the
//! PostgreSQL schema every analytics instance shares when `DATABASE_URL` is set; and
//! [`Metrics`], whichever of the two an instance was configured with.
//! A metric is stored when `record` returns: the commit is synchronous and durable.

use std::future::Future;
use std::path::Path;

use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::sqlite::SqlitePool;

use super::metric::{NewMetric, Summary, now_ms};
use crate::database::{self, Schema};
use crate::storage::StorageError;
use crate::storage::postgres::{migrated_pool, parse_url};

/// Metrics: record one, summarise a type.
pub trait MetricStore: Send + Sync {
    /// Stores `metric` durably. A failed record has stored nothing.
    fn record(&self, metric: &NewMetric) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Stores `metric` as the effect of event `event_id` of type `event_type`, unless
    /// that event was processed before: the dedup mark and the metric commit together.
    fn record_event(
        &self,
        event_id: &str,
        event_type: &str,
        metric: &NewMetric,
    ) -> impl Future<Output = Result<Applied, StorageError>> + Send;
    /// Count and mean value of the metrics of type `kind`; `None` when there are none.
    fn summary(
        &self,
        kind: &str,
    ) -> impl Future<Output = Result<Option<Summary>, StorageError>> + Send;
}

/// Whether an event's effect was applied by this call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// First delivery: the effect is stored.
    New,
    /// The event id was processed before; nothing changed.
    Duplicate,
}

const SCHEMA: Schema = Schema {
    steps: &[
        r#"
CREATE TABLE IF NOT EXISTS metrics (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    type         TEXT    NOT NULL,
    value        REAL    NOT NULL,
    timestamp    TEXT    NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    received_ms  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_by_type ON metrics (type);
"#,
        // Events consumed (by id), written in the transaction of their effect.
        r#"
CREATE TABLE IF NOT EXISTS processed_events (
    id          TEXT    PRIMARY KEY NOT NULL,
    type        TEXT    NOT NULL,
    received_ms INTEGER NOT NULL
);
"#,
    ],
};

/// Metrics in one SQLite file (WAL mode). Cheap to clone: clones share one pool.
#[derive(Debug, Clone)]
pub struct SqliteMetrics {
    pool: SqlitePool,
}

impl SqliteMetrics {
    /// Opens (creating if missing) the database at `path`. Safe while other processes
    /// open the same file.
    pub async fn open(path: &Path) -> Result<Self, StorageError> {
        Ok(Self {
            pool: database::open(path, SCHEMA, 8).await?,
        })
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

const INSERT_METRIC: &str = "INSERT INTO metrics (type, value, timestamp, timestamp_ms, \
     received_ms) VALUES (?, ?, ?, ?, ?)";

impl MetricStore for SqliteMetrics {
    async fn record(&self, metric: &NewMetric) -> Result<(), StorageError> {
        sqlx::query(INSERT_METRIC)
            .bind(&metric.kind)
            .bind(metric.value)
            .bind(&metric.timestamp)
            .bind(metric.timestamp_ms)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn record_event(
        &self,
        event_id: &str,
        event_type: &str,
        metric: &NewMetric,
    ) -> Result<Applied, StorageError> {
        // IMMEDIATE: two deliveries of one event serialise on the write lock, and the
        // second sees the first one's mark.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_ms();
        let marked = sqlx::query(
            "INSERT OR IGNORE INTO processed_events (id, type, received_ms) VALUES (?, ?, ?)",
        )
        .bind(event_id)
        .bind(event_type)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if marked.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(Applied::Duplicate);
        }
        sqlx::query(INSERT_METRIC)
            .bind(&metric.kind)
            .bind(metric.value)
            .bind(&metric.timestamp)
            .bind(metric.timestamp_ms)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Applied::New)
    }

    async fn summary(&self, kind: &str) -> Result<Option<Summary>, StorageError> {
        let (count, average): (i64, Option<f64>) =
            sqlx::query_as("SELECT COUNT(*), AVG(value) FROM metrics WHERE type = ?")
                .bind(kind)
                .fetch_one(&self.pool)
                .await?;
        let Some(average_value) = average.filter(|_| count > 0) else {
            return Ok(None);
        };
        Ok(Some(Summary {
            kind: kind.to_owned(),
            count: u64::try_from(count).unwrap_or(0),
            average_value,
        }))
    }
}

/// Metrics in a PostgreSQL schema (the one users and orders use, through the same
/// migrations). Cheap to clone: clones share one pool.
#[derive(Debug, Clone)]
pub struct PgMetrics {
    pool: PgPool,
}

impl PgMetrics {
    /// Connects to the database at `url` (`postgres://...`) and brings its schema up to
    /// date. Safe to call from several processes at the same time.
    pub async fn open(url: &str) -> Result<Self, StorageError> {
        Self::connect(parse_url(url)?).await
    }

    /// Like [`PgMetrics::open`] with options already parsed (e.g. with a `search_path`).
    pub async fn connect(options: PgConnectOptions) -> Result<Self, StorageError> {
        Ok(Self {
            pool: migrated_pool(options).await?,
        })
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

const PG_INSERT_METRIC: &str = "INSERT INTO metrics (type, value, timestamp, timestamp_ms, \
     received_ms) VALUES ($1, $2, $3, $4, $5)";

impl MetricStore for PgMetrics {
    async fn record(&self, metric: &NewMetric) -> Result<(), StorageError> {
        sqlx::query(PG_INSERT_METRIC)
            .bind(&metric.kind)
            .bind(metric.value)
            .bind(&metric.timestamp)
            .bind(metric.timestamp_ms)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn record_event(
        &self,
        event_id: &str,
        event_type: &str,
        metric: &NewMetric,
    ) -> Result<Applied, StorageError> {
        // A second delivery racing the first waits on the primary key's row lock until
        // the first commits, then inserts nothing: the mark and the metric are one unit.
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let marked = sqlx::query(
            "INSERT INTO processed_events (id, type, received_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(event_id)
        .bind(event_type)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if marked.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(Applied::Duplicate);
        }
        sqlx::query(PG_INSERT_METRIC)
            .bind(&metric.kind)
            .bind(metric.value)
            .bind(&metric.timestamp)
            .bind(metric.timestamp_ms)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Applied::New)
    }

    async fn summary(&self, kind: &str) -> Result<Option<Summary>, StorageError> {
        let (count, average): (i64, Option<f64>) =
            sqlx::query_as("SELECT COUNT(*), AVG(value) FROM metrics WHERE type = $1")
                .bind(kind)
                .fetch_one(&self.pool)
                .await?;
        let Some(average_value) = average.filter(|_| count > 0) else {
            return Ok(None);
        };
        Ok(Some(Summary {
            kind: kind.to_owned(),
            count: u64::try_from(count).unwrap_or(0),
            average_value,
        }))
    }
}

/// The metric store an instance was configured with: PostgreSQL when a database URL
/// is given, else the SQLite file. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Metrics {
    /// The machine-local file.
    Sqlite(SqliteMetrics),
    /// A PostgreSQL schema shared by every machine.
    Postgres(PgMetrics),
}

impl Metrics {
    /// Opens PostgreSQL at `database_url` when given (it must be `postgres://` or
    /// `postgresql://`), else the SQLite file at `sqlite_path`.
    pub async fn open(
        database_url: Option<&str>,
        sqlite_path: &Path,
    ) -> Result<Self, StorageError> {
        match database_url {
            Some(url) => Ok(Self::Postgres(PgMetrics::open(url).await?)),
            None => Ok(Self::Sqlite(SqliteMetrics::open(sqlite_path).await?)),
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

impl MetricStore for Metrics {
    async fn record(&self, metric: &NewMetric) -> Result<(), StorageError> {
        match self {
            Self::Sqlite(s) => s.record(metric).await,
            Self::Postgres(s) => s.record(metric).await,
        }
    }

    async fn record_event(
        &self,
        event_id: &str,
        event_type: &str,
        metric: &NewMetric,
    ) -> Result<Applied, StorageError> {
        match self {
            Self::Sqlite(s) => s.record_event(event_id, event_type, metric).await,
            Self::Postgres(s) => s.record_event(event_id, event_type, metric).await,
        }
    }

    async fn summary(&self, kind: &str) -> Result<Option<Summary>, StorageError> {
        match self {
            Self::Sqlite(s) => s.summary(kind).await,
            Self::Postgres(s) => s.summary(kind).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::TempDir;

    fn metric(kind: &str, value: f64) -> NewMetric {
        NewMetric {
            timestamp: "2026-02-15T10:00:00Z".into(),
            timestamp_ms: 1_771_149_600_000,
            value,
            kind: kind.into(),
        }
    }

    #[tokio::test]
    async fn summaries_count_and_average_one_type() {
        let dir = TempDir::new("metrics");
        let store = SqliteMetrics::open(&dir.path().join("analytics.db"))
            .await
            .unwrap();
        assert_eq!(store.summary("cpu").await.unwrap(), None);
        for (kind, value) in [("cpu", 75.0), ("cpu", 85.0), ("mem", 1.0)] {
            store.record(&metric(kind, value)).await.unwrap();
        }
        assert_eq!(
            store.summary("cpu").await.unwrap(),
            Some(Summary {
                kind: "cpu".into(),
                count: 2,
                average_value: 80.0
            })
        );
        assert_eq!(store.summary("CPU").await.unwrap(), None);
        store.close().await;
    }

    #[tokio::test]
    async fn recorded_metrics_survive_reopening() {
        let dir = TempDir::new("metrics-durable");
        let path = dir.path().join("analytics.db");
        let store = SqliteMetrics::open(&path).await.unwrap();
        store.record(&metric("disk", 3.0)).await.unwrap();
        store.close().await;
        let store = SqliteMetrics::open(&path).await.unwrap();
        assert_eq!(store.summary("disk").await.unwrap().unwrap().count, 1);
        store.close().await;
    }

    mod postgres {
        use axum::http::StatusCode;
        use serde_json::{Value, json};

        use super::*;
        use crate::fixtures::FakeRegistry;
        use crate::storage::PgStore;
        use crate::storage::postgres::tests::TestSchema;
        use crate::{ServiceConfig, ServiceKind, ServiceOptions};

        async fn store(schema: &TestSchema) -> PgMetrics {
            PgMetrics::connect(schema.options()).await.unwrap()
        }

        #[tokio::test]
        async fn summaries_count_and_average_one_type() {
            let Some(schema) = TestSchema::new().await else {
                return;
            };
            let store = store(&schema).await;
            assert_eq!(store.summary("cpu").await.unwrap(), None);
            for (kind, value) in [("cpu", 75.0), ("cpu", 85.0), ("mem", 1.0)] {
                store.record(&metric(kind, value)).await.unwrap();
            }
            assert_eq!(
                store.summary("cpu").await.unwrap(),
                Some(Summary {
                    kind: "cpu".into(),
                    count: 2,
                    average_value: 80.0
                })
            );
            assert_eq!(store.summary("CPU").await.unwrap(), None);
            store.close().await;
        }

        #[tokio::test]
        async fn metrics_and_users_share_one_schema_and_its_migrations() {
            let Some(schema) = TestSchema::new().await else {
                return;
            };
            // Both run the one migrator at once; neither may see the other's migrations
            // as unknown, and the seed users stay seeded once.
            let (metrics, users) = tokio::join!(
                PgMetrics::connect(schema.options()),
                PgStore::connect(schema.options())
            );
            let (metrics, users) = (metrics.unwrap(), users.unwrap());
            metrics.record(&metric("disk", 3.0)).await.unwrap();
            metrics.close().await;
            let reopened = store(&schema).await;
            assert_eq!(reopened.summary("disk").await.unwrap().unwrap().count, 1);
            assert_eq!(
                crate::storage::UserStore::list_users(&users)
                    .await
                    .unwrap()
                    .len(),
                3
            );
            reopened.close().await;
            users.close().await;
        }

        #[tokio::test]
        async fn an_event_is_applied_once_even_when_delivered_twice_at_once() {
            let Some(schema) = TestSchema::new().await else {
                return;
            };
            let (a, b) = tokio::join!(store(&schema), store(&schema));
            let m = metric(crate::analytics::ORDERS_CREATED, 1.0);
            let (first, second) = tokio::join!(
                a.record_event("evt-1", "order.created", &m),
                b.record_event("evt-1", "order.created", &m)
            );
            let mut applied = [first.unwrap(), second.unwrap()];
            applied.sort_by_key(|x| *x == Applied::Duplicate);
            assert_eq!(applied, [Applied::New, Applied::Duplicate]);
            assert_eq!(
                a.record_event("evt-1", "order.created", &m).await.unwrap(),
                Applied::Duplicate
            );
            assert_eq!(
                a.record_event("evt-2", "order.created", &m).await.unwrap(),
                Applied::New
            );
            let summary = a
                .summary(crate::analytics::ORDERS_CREATED)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(summary.count, 2);
            a.close().await;
            b.close().await;
        }

        #[tokio::test]
        async fn a_bad_database_url_is_refused_before_anything_opens() {
            let dir = TempDir::new("analytics-bad-url");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let config = ServiceConfig {
                port: 1,
                host: None,
                registry_url: "http://127.0.0.1:1".into(),
                data_dir: dir.path().join("never-created"),
                heartbeat_interval_secs: 30,
                options: ServiceOptions {
                    database_url: Some("mysql://db/analytics".into()),
                    ..ServiceOptions::default()
                },
            };
            let err = crate::run(
                ServiceKind::Analytics,
                listener,
                config,
                breakwater_runtime::CancellationToken::new(),
            )
            .await
            .unwrap_err();
            assert!(err.to_string().contains("DATABASE_URL"), "{err}");
            assert!(!dir.path().join("never-created").exists());
        }

        async fn run_analytics(
            schema: &TestSchema,
            dir: &std::path::Path,
            registry_url: &str,
        ) -> (
            u16,
            breakwater_runtime::CancellationToken,
            tokio::task::JoinHandle<Result<(), crate::ServiceError>>,
        ) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let config = ServiceConfig {
                port,
                host: Some("127.0.0.1".into()),
                registry_url: registry_url.to_owned(),
                data_dir: dir.to_path_buf(),
                heartbeat_interval_secs: 30,
                options: ServiceOptions {
                    database_url: Some(schema.url()),
                    ..ServiceOptions::default()
                },
            };
            let shutdown = breakwater_runtime::CancellationToken::new();
            let running = tokio::spawn(crate::run(
                ServiceKind::Analytics,
                listener,
                config,
                shutdown.clone(),
            ));
            (port, shutdown, running)
        }

        #[tokio::test]
        async fn a_created_metric_survives_a_restart_of_analytics_on_postgres() {
            let Some(schema) = TestSchema::new().await else {
                return;
            };
            let dir = TempDir::new("pg-analytics-run");
            let (registry_url, _events) = FakeRegistry::start(vec![]).await;
            let http = reqwest::Client::new();

            let (port, shutdown, running) = run_analytics(&schema, dir.path(), &registry_url).await;
            let res = http
                .post(format!("http://127.0.0.1:{port}/api/metrics"))
                .json(&json!({"timestamp": "2026-02-15T10:00:00Z", "value": 42, "type": "pg"}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::CREATED);
            shutdown.cancel();
            running.await.unwrap().unwrap();

            let (port, shutdown, running) = run_analytics(&schema, dir.path(), &registry_url).await;
            let res = http
                .get(format!(
                    "http://127.0.0.1:{port}/api/metrics/summary?type=pg"
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            let body: Value = res.json().await.unwrap();
            assert_eq!(body["count"], 1, "{body}");
            assert_eq!(body["average_value"], 42.0, "{body}");
            shutdown.cancel();
            running.await.unwrap().unwrap();
            assert!(
                !dir.path().join(crate::analytics::DATABASE_FILE).exists(),
                "no SQLite file beside PostgreSQL"
            );
        }
    }
}
