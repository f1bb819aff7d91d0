//! [`RedisShards`]: the data store in Redis, for instances on many machines.
//!
//! Two layouts, both with [`RecordId::shard`] (the jump hash) choosing the shard:
//!
//! - one URL: `shards` logical shards on that one server, each a key prefix;
//! - N >= 2 URLs: one shard per server, N shards (the `shards` count is not used).
//!
//! Keys are `<prefix>:of-<N>:shard-<i>:<id>`, one string of JSON per record (`SET NX`,
//! `GET`); the shard count is part of them, so a store with another N is another store,
//! as with the SQLite files. `totalSaved` is one shared counter,
//! `<prefix>:of-<N>:saved`, on the first shard's server, raised by each save.
//! Redis Cluster is not supported here: give the shards' URLs instead.

use std::fmt;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, Script};
use serde_json::Value;

use super::record::RecordId;
use super::store::{DataStore, MAX_SHARDS, MIN_SHARDS};
use crate::storage::StorageError;

/// Where data keys live in Redis unless told otherwise.
pub const DEFAULT_REDIS_PREFIX: &str = "breakwater:data";

/// Bound on connecting and on each reply, so a stalled server gives an error, not a
/// hung request.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Stores the record and counts it, both or neither, when the record and the counter
/// are on one server.
const SAVE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('INCR', KEYS[2])
  return 1
end
return 0
";

/// Records in Redis by [`RecordId::shard`] (see the module docs for the layouts).
#[derive(Clone)]
pub struct RedisShards {
    /// One connection per shard; in the one-server layout all are the same connection.
    shards: Vec<ConnectionManager>,
    one_server: bool,
    base: String,
    save: Script,
}

impl fmt::Debug for RedisShards {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisShards")
            .field("shards", &self.shards.len())
            .field("one_server", &self.one_server)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// A Redis failure as the storage error the handlers turn into a 500.
fn failure(shard: usize, err: &RedisError) -> StorageError {
    StorageError::Database(sqlx::Error::Io(std::io::Error::other(format!(
        "Redis shard {shard}: {err}"
    ))))
}

impl RedisShards {
    /// Connects to `urls` (one URL: `shards` logical shards on it; several: one shard
    /// each) and keeps keys under `prefix`. Fails if a URL is invalid, a server does
    /// not answer, or the shard count is outside [`MIN_SHARDS`]..=[`MAX_SHARDS`].
    pub async fn open(urls: &[String], shards: u32, prefix: &str) -> Result<Self, StorageError> {
        let count = match urls.len() {
            1 => shards,
            n => u32::try_from(n).unwrap_or(u32::MAX),
        };
        if !(MIN_SHARDS..=MAX_SHARDS).contains(&count) {
            return Err(StorageError::Database(sqlx::Error::Configuration(
                format!("Redis data store: {count} shards is outside {MIN_SHARDS}..={MAX_SHARDS}")
                    .into(),
            )));
        }
        let mut connections = Vec::new();
        for (index, url) in urls.iter().enumerate() {
            let client = Client::open(url.as_str()).map_err(|e| {
                StorageError::Database(sqlx::Error::Configuration(
                    format!("Redis shard {index}: invalid URL: {e}").into(),
                ))
            })?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(TIMEOUT))
                .set_response_timeout(Some(TIMEOUT))
                // A server that is down at start is reported at once; once running,
                // the manager reconnects on its own.
                .set_number_of_retries(1);
            let conn = ConnectionManager::new_with_config(client, config)
                .await
                .map_err(|e| failure(index, &e))?;
            connections.push(conn);
        }
        let one_server = connections.len() == 1;
        if one_server {
            let conn = connections.swap_remove(0);
            connections = vec![conn; count as usize];
        }
        Ok(Self {
            shards: connections,
            one_server,
            base: format!("{prefix}:of-{count}"),
            save: Script::new(SAVE),
        })
    }

    /// How many shards the store has.
    pub fn shard_count(&self) -> u32 {
        u32::try_from(self.shards.len()).unwrap_or(u32::MAX)
    }

    /// The key of record `id` and the index of its shard.
    fn key(&self, id: RecordId) -> (String, usize) {
        let index = id.shard(self.shard_count()) as usize;
        (format!("{}:shard-{index}:{id}", self.base), index)
    }

    fn counter(&self) -> String {
        format!("{}:saved", self.base)
    }

    fn connection(&self, index: usize) -> ConnectionManager {
        // `shard` is below the count by construction, and `open` made at least two.
        self.shards.get(index).unwrap_or(&self.shards[0]).clone()
    }

    fn duplicate(id: RecordId) -> StorageError {
        StorageError::Database(sqlx::Error::Protocol(format!(
            "record {id} is already stored"
        )))
    }
}

impl DataStore for RedisShards {
    async fn save(&self, id: RecordId, data: &Value) -> Result<(), StorageError> {
        let (key, index) = self.key(id);
        let json = data.to_string();
        let mut conn = self.connection(index);
        if self.one_server || index == 0 {
            let stored: u8 = self
                .save
                .key(&key)
                .key(self.counter())
                .arg(&json)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| failure(index, &e))?;
            return if stored == 1 {
                Ok(())
            } else {
                Err(Self::duplicate(id))
            };
        }
        // Record and counter on two servers: store, then count; if counting fails,
        // take the record back so the failed save leaves nothing.
        let stored: bool = redis::cmd("SET")
            .arg(&key)
            .arg(&json)
            .arg("NX")
            .query_async::<Option<String>>(&mut conn)
            .await
            .map_err(|e| failure(index, &e))?
            .is_some();
        if !stored {
            return Err(Self::duplicate(id));
        }
        let counted = redis::cmd("INCR")
            .arg(self.counter())
            .query_async::<u64>(&mut self.connection(0))
            .await;
        if let Err(err) = counted {
            if let Err(undo) = redis::cmd("DEL")
                .arg(&key)
                .query_async::<u64>(&mut conn)
                .await
            {
                tracing::warn!(%id, error = %undo, "could not remove an uncounted record");
            }
            return Err(failure(0, &err));
        }
        Ok(())
    }

    async fn load(&self, id: RecordId) -> Result<Option<Value>, StorageError> {
        let (key, index) = self.key(id);
        let text: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut self.connection(index))
            .await
            .map_err(|e| failure(index, &e))?;
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
        let saved: Option<u64> = redis::cmd("GET")
            .arg(self.counter())
            .query_async(&mut self.connection(0))
            .await
            .map_err(|e| failure(0, &e))?;
        Ok(saved.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DataSettings, DataState, app};
    use crate::fixtures::{ScriptedUpstream, call};
    use crate::redis_fixtures::{delete_keys, keys, prefix, redis_url};
    use axum::http::StatusCode;
    use serde_json::json;

    /// Records per shard, counted from the keys in Redis.
    async fn per_shard(url: &str, prefix: &str, shards: u32) -> Vec<usize> {
        let mut counts = vec![0; shards as usize];
        for key in keys(url, prefix).await {
            if let Some(index) = key
                .split(':')
                .find_map(|part| part.strip_prefix("shard-"))
                .and_then(|i| i.parse::<usize>().ok())
            {
                counts[index] += 1;
            }
        }
        counts
    }

    /// Saves through one store, reads through another, and checks the shard of each key.
    async fn shared_by_two_instances(urls: &[String], shards: u32, tag: &str) {
        let url = &urls[0];
        let prefix = prefix(tag);
        let a = RedisShards::open(urls, shards, &prefix).await.unwrap();
        let b = RedisShards::open(urls, shards, &prefix).await.unwrap();
        let count = a.shard_count();
        let mut expected = vec![0usize; count as usize];
        let mut ids = Vec::new();
        for n in 0..200 {
            let id = RecordId::random();
            let store = if n % 2 == 0 { &a } else { &b };
            store.save(id, &json!({"n": n})).await.unwrap();
            expected[id.shard(count) as usize] += 1;
            ids.push(id);
        }
        for (n, id) in ids.iter().enumerate() {
            let reader = if n % 2 == 0 { &b } else { &a };
            assert_eq!(reader.load(*id).await.unwrap(), Some(json!({"n": n})));
        }
        assert_eq!(b.load(RecordId::random()).await.unwrap(), None);
        assert_eq!(a.total().await.unwrap(), 200);
        assert_eq!(b.total().await.unwrap(), 200);
        let counts = per_shard(url, &prefix, count).await;
        assert_eq!(counts, expected);
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");

        // A duplicate id changes nothing, in whichever shard it falls.
        for id in &ids[..8] {
            assert!(a.save(*id, &json!("again")).await.is_err());
        }
        assert_eq!(b.total().await.unwrap(), 200);
        assert_eq!(b.load(ids[0]).await.unwrap(), Some(json!({"n": 0})));
        delete_keys(url, &prefix).await;
    }

    #[tokio::test]
    async fn logical_shards_on_one_server_are_shared_by_instances() {
        let Some(url) = redis_url() else { return };
        shared_by_two_instances(&[url], 4, "data-logical").await;
    }

    #[tokio::test]
    async fn one_shard_per_url_is_shared_by_instances() {
        let Some(url) = redis_url() else { return };
        // Three connections standing for three servers: the per-URL path (record and
        // counter on different connections) without needing three servers.
        shared_by_two_instances(&[url.clone(), url.clone(), url], 99, "data-per-url").await;
    }

    #[tokio::test]
    async fn records_written_through_one_app_are_read_through_another() {
        let Some(url) = redis_url() else { return };
        let prefix = prefix("data-app");
        let settings = DataSettings {
            redis_urls: vec![url.clone()],
            redis_prefix: prefix.clone(),
            ..DataSettings::default()
        };
        let open = || RedisShards::open(&settings.redis_urls, settings.shards, &prefix);
        let (one, two) = (open().await.unwrap(), open().await.unwrap());
        let one =
            app(DataState::new(one, ScriptedUpstream::answering(), "d-1", 1, &settings).unwrap());
        let two =
            app(DataState::new(two, ScriptedUpstream::answering(), "d-2", 2, &settings).unwrap());
        let (status, saved) = call(&one, "GET", "/data", None).await;
        assert_eq!(status, StatusCode::OK, "{saved}");
        let id = saved["id"].as_str().unwrap();
        let (status, read) = call(&two, "GET", &format!("/data/{id}"), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(read, json!({"id": id, "data": saved["data"]}));
        let (_, stats) = call(&two, "GET", "/stats", None).await;
        assert_eq!(stats["totalSaved"], 1);
        delete_keys(&url, &prefix).await;
    }

    #[tokio::test]
    async fn bad_layouts_and_unreachable_servers_are_open_errors() {
        let one = vec!["redis://127.0.0.1:1".to_owned()];
        for shards in [1, MAX_SHARDS + 1] {
            let err = RedisShards::open(&one, shards, "p").await.unwrap_err();
            assert!(err.to_string().contains("shards"), "{err}");
        }
        let bad = vec!["not a url".to_owned(), "redis://127.0.0.1:1".to_owned()];
        let err = RedisShards::open(&bad, 2, "p").await.unwrap_err();
        assert!(err.to_string().contains("invalid URL"), "{err}");
        let down = RedisShards::open(&one, 2, "p").await.unwrap_err();
        assert!(down.to_string().contains("Redis shard 0"), "{down}");
    }

    #[test]
    fn settings_check_the_redis_urls() {
        let ok = DataSettings {
            redis_urls: vec![
                "redis://127.0.0.1:6379".into(),
                "redis://10.0.0.2:6379/1".into(),
            ],
            ..DataSettings::default()
        };
        assert!(ok.validate().is_ok());
        let bad = DataSettings {
            redis_urls: vec!["nope".into()],
            ..DataSettings::default()
        };
        assert_eq!(bad.validate().unwrap_err().setting, "redis_urls");
        let no_prefix = DataSettings {
            redis_prefix: String::new(),
            ..DataSettings::default()
        };
        assert_eq!(no_prefix.validate().unwrap_err().setting, "redis_prefix");
    }
}
