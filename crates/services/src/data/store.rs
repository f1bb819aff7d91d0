//! Where data records live: the [`DataStore`] trait the handlers see, and
//! [`SqliteShards`], the embedded store of N SQLite files chosen by
//! [`RecordId::shard`]. Every instance on the machine opens the same files, so
//! `totalSaved` is the same wherever it is asked.

use std::future::Future;
use std::path::{Path, PathBuf};

use breakwater_runtime::clock::now_millis;
use serde_json::Value;
use sqlx::sqlite::SqlitePool;

use super::record::RecordId;
use crate::database::{self, Schema};
use crate::storage::StorageError;

/// The fewest shards a store may have: one shard is not sharding.
pub const MIN_SHARDS: u32 = 2;
/// The most shards a store may have; each is a file with its own connections.
pub const MAX_SHARDS: u32 = 64;

/// Records by id, spread over shards.
pub trait DataStore: Send + Sync {
    /// Stores `data` under the new id `id`. A failed save has stored nothing.
    fn save(
        &self,
        id: RecordId,
        data: &Value,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// The record stored under `id`, `None` if there is none.
    fn load(
        &self,
        id: RecordId,
    ) -> impl Future<Output = Result<Option<Value>, StorageError>> + Send;
    /// Records stored over all shards, by every instance.
    fn total(&self) -> impl Future<Output = Result<u64, StorageError>> + Send;
}

const SCHEMA: Schema = Schema {
    steps: &[r#"
CREATE TABLE IF NOT EXISTS records (
    id       TEXT    PRIMARY KEY NOT NULL,
    data     TEXT    NOT NULL CHECK (json_valid(data)),
    saved_at INTEGER NOT NULL
);
"#],
};

/// Connections per shard file; shards spread the load, so a few each suffice.
const CONNECTIONS_PER_SHARD: u32 = 4;

/// N SQLite files, `shard-<i>-of-<N>.db` in one directory. The count is part of the
/// file names: a store opened with another N is another store, never one that looks
/// for old records in the wrong shard.
#[derive(Debug, Clone)]
pub struct SqliteShards {
    shards: Vec<SqlitePool>,
}

impl SqliteShards {
    /// Opens (creating if missing) `shards` shard files (0 counts as 1) in the existing
    /// directory `dir`. Safe while other processes open the same files.
    pub async fn open(dir: &Path, shards: u32) -> Result<Self, StorageError> {
        let shards = shards.max(1);
        let mut pools = Vec::new();
        for index in 0..shards {
            match database::open(
                &Self::file(dir, index, shards),
                SCHEMA,
                CONNECTIONS_PER_SHARD,
            )
            .await
            {
                Ok(pool) => pools.push(pool),
                Err(err) => {
                    for pool in pools {
                        pool.close().await;
                    }
                    return Err(err);
                }
            }
        }
        Ok(Self { shards: pools })
    }

    /// The file of shard `index` of `shards` in `dir`.
    pub fn file(dir: &Path, index: u32, shards: u32) -> PathBuf {
        dir.join(format!("shard-{index}-of-{shards}.db"))
    }

    /// How many shards the store has.
    pub fn shard_count(&self) -> u32 {
        u32::try_from(self.shards.len()).unwrap_or(u32::MAX)
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        for pool in &self.shards {
            pool.close().await;
        }
    }

    fn pool(&self, id: RecordId) -> &SqlitePool {
        let index = id.shard(self.shard_count()) as usize;
        // `shard` is below the count by construction; the first shard stands in only
        // if that ever broke.
        self.shards.get(index).unwrap_or(&self.shards[0])
    }
}

impl DataStore for SqliteShards {
    async fn save(&self, id: RecordId, data: &Value) -> Result<(), StorageError> {
        sqlx::query("INSERT INTO records (id, data, saved_at) VALUES (?, ?, ?)")
            .bind(id.to_string())
            .bind(data.to_string())
            .bind(i64::try_from(now_millis()).unwrap_or(i64::MAX))
            .execute(self.pool(id))
            .await?;
        Ok(())
    }

    async fn load(&self, id: RecordId) -> Result<Option<Value>, StorageError> {
        let text: Option<String> = sqlx::query_scalar("SELECT data FROM records WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(self.pool(id))
            .await?;
        text.map(|text| {
            serde_json::from_str(&text).map_err(|e| StorageError::Corrupt {
                table: "records",
                id: id.to_string(),
                reason: e.to_string(),
            })
        })
        .transpose()
    }

    async fn total(&self) -> Result<u64, StorageError> {
        let mut total = 0u64;
        for pool in &self.shards {
            let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records")
                .fetch_one(pool)
                .await?;
            total += u64::try_from(rows).unwrap_or(0);
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::TempDir;
    use serde_json::json;

    async fn row_counts(store: &SqliteShards) -> Vec<i64> {
        let mut counts = Vec::new();
        for pool in &store.shards {
            counts.push(
                sqlx::query_scalar("SELECT COUNT(*) FROM records")
                    .fetch_one(pool)
                    .await
                    .unwrap(),
            );
        }
        counts
    }

    #[tokio::test]
    async fn saves_land_in_their_shard_and_read_back() {
        let dir = TempDir::new("shards");
        let store = SqliteShards::open(dir.path(), 4).await.unwrap();
        for index in 0..4 {
            assert!(SqliteShards::file(dir.path(), index, 4).exists());
        }
        let mut expected = vec![0i64; 4];
        let mut ids = Vec::new();
        for n in 0..40 {
            let id = RecordId::random();
            store.save(id, &json!({"n": n})).await.unwrap();
            expected[id.shard(4) as usize] += 1;
            ids.push(id);
        }
        assert_eq!(row_counts(&store).await, expected);
        assert_eq!(store.total().await.unwrap(), 40);
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(store.load(*id).await.unwrap(), Some(json!({"n": n})));
        }
        assert_eq!(store.load(RecordId::random()).await.unwrap(), None);
        store.close().await;
    }

    #[tokio::test]
    async fn two_instances_share_the_files() {
        let dir = TempDir::new("shared-shards");
        let (a, b) = tokio::join!(
            SqliteShards::open(dir.path(), 3),
            SqliteShards::open(dir.path(), 3)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let id = RecordId::random();
        a.save(id, &json!("x")).await.unwrap();
        b.save(RecordId::random(), &json!("y")).await.unwrap();
        assert_eq!(b.load(id).await.unwrap(), Some(json!("x")));
        assert_eq!(a.total().await.unwrap(), 2);
        assert_eq!(b.total().await.unwrap(), 2);
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    async fn a_duplicate_id_changes_nothing() {
        let dir = TempDir::new("dup-record");
        let store = SqliteShards::open(dir.path(), 2).await.unwrap();
        let id = RecordId::random();
        store.save(id, &json!(1)).await.unwrap();
        assert!(store.save(id, &json!(2)).await.is_err());
        assert_eq!(store.load(id).await.unwrap(), Some(json!(1)));
        assert_eq!(store.total().await.unwrap(), 1);
        store.close().await;
    }

    #[tokio::test]
    async fn an_unusable_directory_is_an_open_error() {
        let dir = TempDir::new("no-shard-dir");
        let err = SqliteShards::open(&dir.path().join("missing"), 2)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Open { .. }), "{err}");
    }
}
