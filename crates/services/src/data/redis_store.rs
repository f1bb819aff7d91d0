//! [`RedisShards`]: the data store in Redis, for instances on many machines.
//!
//! Three layouts, all with [`RecordId::shard`] (the jump hash) choosing the shard:
//!
//! - one URL: `shards` logical shards on that one server, each a key prefix;
//! - N >= 2 URLs: one shard per server, N shards (the `shards` count is not used);
//! - one Redis Cluster ([`RedisShards::open_cluster`], through redis-rs' cluster
//!   client): `shards` logical shards, each a hash tag (`{shard-<i>}`), so all of a
//!   shard's keys live in one slot and move between nodes together.
//!
//! Keys are `<prefix>:of-<N>:shard-<i>:<id>` (in a cluster
//! `<prefix>:of-<N>:{shard-<i>}:<id>`), one string of JSON per record (`SET NX`,
//! `GET`); the shard count is part of them, so a store with another N is another store,
//! as with the SQLite files. `totalSaved` is one shared counter, `<prefix>:of-<N>:saved`,
//! on the first shard's server (in a cluster: wherever its slot is), raised by each save.

use std::fmt;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, FromRedisValue, RedisError, RedisResult, Script};
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

/// The connections behind the shards.
#[derive(Clone)]
enum Backend {
    /// One connection per shard; in the one-server layout all are the same connection.
    Servers {
        shards: Vec<ConnectionManager>,
        one_server: bool,
    },
    /// One cluster connection, routing each key to its slot's node.
    Cluster(ClusterConnection),
}

/// Records in Redis by [`RecordId::shard`] (see the module docs for the layouts).
#[derive(Clone)]
pub struct RedisShards {
    backend: Backend,
    count: u32,
    base: String,
    save: Script,
}

impl fmt::Debug for RedisShards {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layout = match &self.backend {
            Backend::Servers {
                one_server: true, ..
            } => "one server",
            Backend::Servers { .. } => "a server per shard",
            Backend::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisShards")
            .field("shards", &self.count)
            .field("layout", &layout)
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

fn configuration(message: String) -> StorageError {
    StorageError::Database(sqlx::Error::Configuration(message.into()))
}

fn check_count(count: u32) -> Result<(), StorageError> {
    if (MIN_SHARDS..=MAX_SHARDS).contains(&count) {
        Ok(())
    } else {
        Err(configuration(format!(
            "Redis data store: {count} shards is outside {MIN_SHARDS}..={MAX_SHARDS}"
        )))
    }
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
        check_count(count)?;
        let mut connections = Vec::new();
        for (index, url) in urls.iter().enumerate() {
            let client = Client::open(url.as_str())
                .map_err(|e| configuration(format!("Redis shard {index}: invalid URL: {e}")))?;
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
            backend: Backend::Servers {
                shards: connections,
                one_server,
            },
            count,
            base: format!("{prefix}:of-{count}"),
            save: Script::new(SAVE),
        })
    }

    /// Connects to the Redis Cluster that `nodes` (any of its nodes, one is enough)
    /// belong to, and keeps `shards` logical shards in it under `prefix`. Fails if a
    /// URL is invalid, no node answers, or the shard count is outside
    /// [`MIN_SHARDS`]..=[`MAX_SHARDS`].
    pub async fn open_cluster(
        nodes: &[String],
        shards: u32,
        prefix: &str,
    ) -> Result<Self, StorageError> {
        check_count(shards)?;
        let client = ClusterClient::builder(nodes.iter().map(String::as_str))
            .connection_timeout(TIMEOUT)
            .response_timeout(TIMEOUT)
            .retries(1)
            .build()
            .map_err(|e| configuration(format!("Redis Cluster: invalid node URLs: {e}")))?;
        let conn = client.get_async_connection().await.map_err(|e| {
            StorageError::Database(sqlx::Error::Io(std::io::Error::other(format!(
                "Redis Cluster: {e}"
            ))))
        })?;
        Ok(Self {
            backend: Backend::Cluster(conn),
            count: shards,
            base: format!("{prefix}:of-{shards}"),
            save: Script::new(SAVE),
        })
    }

    /// How many shards the store has.
    pub fn shard_count(&self) -> u32 {
        self.count
    }

    /// The key of record `id` and the index of its shard.
    fn key(&self, id: RecordId) -> (String, usize) {
        let index = id.shard(self.count) as usize;
        let key = match self.backend {
            Backend::Cluster(_) => format!("{}:{{shard-{index}}}:{id}", self.base),
            Backend::Servers { .. } => format!("{}:shard-{index}:{id}", self.base),
        };
        (key, index)
    }

    fn counter(&self) -> String {
        format!("{}:saved", self.base)
    }

    /// Whether the record of shard `index` and the counter are on one server, so one
    /// script can store and count.
    fn with_counter(&self, index: usize) -> bool {
        match self.backend {
            Backend::Servers { one_server, .. } => one_server || index == 0,
            // Different slots: possibly different nodes, and a script may not span them.
            Backend::Cluster(_) => false,
        }
    }

    /// Runs `cmd` on shard `index`'s server.
    async fn query<T: FromRedisValue>(&self, index: usize, cmd: &redis::Cmd) -> RedisResult<T> {
        match &self.backend {
            Backend::Servers { shards, .. } => {
                // `index` is below the count by construction, and there is a connection
                // per shard.
                let mut conn = shards.get(index).unwrap_or(&shards[0]).clone();
                cmd.query_async(&mut conn).await
            }
            Backend::Cluster(conn) => cmd.query_async(&mut conn.clone()).await,
        }
    }

    /// Runs the save script (record and counter together) on shard `index`'s server.
    async fn save_script(&self, index: usize, key: &str, json: &str) -> RedisResult<u8> {
        let mut invocation = self.save.key(key);
        invocation.key(self.counter()).arg(json);
        match &self.backend {
            Backend::Servers { shards, .. } => {
                let mut conn = shards.get(index).unwrap_or(&shards[0]).clone();
                invocation.invoke_async(&mut conn).await
            }
            Backend::Cluster(conn) => invocation.invoke_async(&mut conn.clone()).await,
        }
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
        if self.with_counter(index) {
            let stored = self
                .save_script(index, &key, &json)
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
        let stored: bool = self
            .query::<Option<String>>(index, redis::cmd("SET").arg(&key).arg(&json).arg("NX"))
            .await
            .map_err(|e| failure(index, &e))?
            .is_some();
        if !stored {
            return Err(Self::duplicate(id));
        }
        let counted = self
            .query::<u64>(0, redis::cmd("INCR").arg(self.counter()))
            .await;
        if let Err(err) = counted {
            if let Err(undo) = self.query::<u64>(index, redis::cmd("DEL").arg(&key)).await {
                tracing::warn!(%id, error = %undo, "could not remove an uncounted record");
            }
            return Err(failure(0, &err));
        }
        Ok(())
    }

    async fn load(&self, id: RecordId) -> Result<Option<Value>, StorageError> {
        let (key, index) = self.key(id);
        let text: Option<String> = self
            .query(index, redis::cmd("GET").arg(&key))
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
        let saved: Option<u64> = self
            .query(0, redis::cmd("GET").arg(self.counter()))
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

    /// A throwaway 3-master Redis Cluster on free ports in a temp dir; its servers are
    /// killed and the dir removed on drop (also when the test fails).
    struct LocalCluster {
        servers: Vec<std::process::Child>,
        ports: Vec<u16>,
        _dir: crate::fixtures::TempDir,
    }

    impl Drop for LocalCluster {
        fn drop(&mut self) {
            for server in &mut self.servers {
                let _ = server.kill();
                let _ = server.wait();
            }
        }
    }

    /// Whether `redis-server` and `redis-cli` can be run.
    fn redis_tools() -> bool {
        ["redis-server", "redis-cli"].iter().all(|tool| {
            std::process::Command::new(tool)
                .arg("--version")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    }

    /// Three ports that are free, each with its cluster bus port (+10000) free too.
    fn cluster_ports() -> Vec<u16> {
        use std::net::TcpListener;
        let mut held = Vec::new();
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let Some(bus) = port.checked_add(10_000) else {
                continue;
            };
            if let Ok(bus) = TcpListener::bind(("127.0.0.1", bus)) {
                held.push((listener, bus));
                ports.push(port);
            }
        }
        ports
    }

    fn cli(args: &[&str]) -> std::process::Output {
        std::process::Command::new("redis-cli")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    }

    async fn start_cluster() -> LocalCluster {
        let dir = crate::fixtures::TempDir::new("redis-cluster");
        let ports = cluster_ports();
        let mut cluster = LocalCluster {
            servers: Vec::new(),
            ports: ports.clone(),
            _dir: dir,
        };
        for port in &ports {
            let server = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(cluster._dir.path().join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(cluster._dir.path())
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            cluster.servers.push(server);
        }
        for port in &ports {
            let port = port.to_string();
            let mut up = false;
            for _ in 0..100 {
                if cli(&["-p", &port, "ping"]).stdout.starts_with(b"PONG") {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(up, "redis-server on {port} did not start");
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(nodes.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let created = cli(&create);
        assert!(
            created.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        for port in &ports {
            let port = port.to_string();
            let mut ok = false;
            for _ in 0..200 {
                let info = cli(&["-p", &port, "cluster", "info"]).stdout;
                if String::from_utf8_lossy(&info).contains("cluster_state:ok") {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(ok, "node {port} never saw cluster_state:ok");
        }
        cluster
    }

    #[tokio::test]
    async fn logical_shards_in_a_redis_cluster_are_shared_by_instances() {
        if !redis_tools() {
            assert!(
                std::env::var("BREAKWATER_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "BREAKWATER_REQUIRE_SERVICES=1 but redis-server is not on PATH"
            );
            eprintln!("SKIPPED (no redis-server)");
            return;
        }
        let cluster = start_cluster().await;
        let url = |i: usize| format!("redis://127.0.0.1:{}", cluster.ports[i]);
        let prefix = prefix("data-cluster");
        // Two instances, each told a different node: the client finds the rest.
        let a = RedisShards::open_cluster(&[url(0)], 4, &prefix)
            .await
            .unwrap();
        let b = RedisShards::open_cluster(&[url(1), url(2)], 4, &prefix)
            .await
            .unwrap();
        assert_eq!(a.shard_count(), 4);
        let mut expected = vec![0usize; 4];
        let mut ids = Vec::new();
        for n in 0..200 {
            let id = RecordId::random();
            let store = if n % 2 == 0 { &a } else { &b };
            store.save(id, &json!({"n": n})).await.unwrap();
            expected[id.shard(4) as usize] += 1;
            ids.push(id);
        }
        for (n, id) in ids.iter().enumerate() {
            let reader = if n % 2 == 0 { &b } else { &a };
            assert_eq!(reader.load(*id).await.unwrap(), Some(json!({"n": n})));
        }
        assert_eq!(a.load(RecordId::random()).await.unwrap(), None);
        assert_eq!(
            (a.total().await.unwrap(), b.total().await.unwrap()),
            (200, 200)
        );
        for id in &ids[..8] {
            assert!(b.save(*id, &json!("again")).await.is_err());
        }
        assert_eq!(a.total().await.unwrap(), 200, "a duplicate is not counted");

        // Each shard is one hash tag, so all its records sit on one node; together the
        // nodes hold exactly what was saved.
        let mut per_shard = vec![0usize; 4];
        let mut nodes_of_shard = vec![std::collections::BTreeSet::new(); 4];
        for (node, port) in cluster.ports.iter().enumerate() {
            let listed = cli(&[
                "-p",
                &port.to_string(),
                "--scan",
                "--pattern",
                &format!("{prefix}:*"),
            ]);
            for key in String::from_utf8_lossy(&listed.stdout).lines() {
                let Some(shard) = key
                    .split_once("{shard-")
                    .and_then(|(_, rest)| rest.split_once('}'))
                    .and_then(|(i, _)| i.parse::<usize>().ok())
                else {
                    assert_eq!(key, format!("{prefix}:of-4:saved"));
                    continue;
                };
                per_shard[shard] += 1;
                nodes_of_shard[shard].insert(node);
            }
        }
        assert_eq!(per_shard, expected);
        assert!(per_shard.iter().all(|&c| c > 0), "{per_shard:?}");
        assert!(
            nodes_of_shard.iter().all(|nodes| nodes.len() == 1),
            "{nodes_of_shard:?}"
        );

        // The service itself on the cluster: written through one app, read through another.
        let settings = DataSettings {
            redis_cluster: vec![url(0)],
            redis_prefix: format!("{prefix}-app"),
            ..DataSettings::default()
        };
        assert!(settings.validate().is_ok());
        let open = || {
            RedisShards::open_cluster(
                &settings.redis_cluster,
                settings.shards,
                &settings.redis_prefix,
            )
        };
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
    }

    #[tokio::test]
    async fn an_unreachable_cluster_is_an_open_error() {
        let err = RedisShards::open_cluster(&["redis://127.0.0.1:1".to_owned()], 4, "p")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("Redis Cluster"), "{err}");
        let err = RedisShards::open_cluster(&["redis://127.0.0.1:1".to_owned()], 1, "p")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("shards"), "{err}");
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
        let both = DataSettings {
            redis_urls: vec!["redis://127.0.0.1:6379".into()],
            redis_cluster: vec!["redis://127.0.0.1:7000".into()],
            ..DataSettings::default()
        };
        assert_eq!(both.validate().unwrap_err().setting, "redis_cluster");
        let bad_node = DataSettings {
            redis_cluster: vec!["nope".into()],
            ..DataSettings::default()
        };
        assert_eq!(bad_node.validate().unwrap_err().setting, "redis_cluster");
        let no_prefix = DataSettings {
            redis_prefix: String::new(),
            ..DataSettings::default()
        };
        assert_eq!(no_prefix.validate().unwrap_err().setting, "redis_prefix");
    }
}
