//! Where metrics live: the [`MetricStore`] trait the handlers see, and
//! [`SqliteMetrics`], the embedded default (`analytics.db` in the data directory).
//! A metric is stored when `record` returns: the commit is synchronous and durable.

use std::future::Future;
use std::path::Path;

use sqlx::sqlite::SqlitePool;

use super::metric::{NewMetric, Summary, now_ms};
use crate::database::{self, Schema};
use crate::storage::StorageError;

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
}
