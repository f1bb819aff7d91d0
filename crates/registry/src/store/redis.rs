//! The instance table in Redis, so several registry replicas serve one state.
//!
//! Layout under a key prefix `P` (hash-tagged as `{P}` so every key lands in one cluster
//! slot and the scripts stay legal on a cluster):
//!
//! - `{P}:instance:<id>`: a hash with the instance's fields (`metadata` as JSON);
//! - `{P}:lease:<id>`: a key that exists while the instance is alive; every register and
//!   heartbeat sets it with `PX = 1.5 x heartbeatInterval`, so Redis's own clock decides
//!   expiry and all replicas agree on it;
//! - `{P}:service:<name>`: the set of ids registered under a name;
//! - `{P}:services`: the set of names.
//!
//! - `{P}:version:<name>`: the version of a service's instances, `INCR`ed by the script
//!   that registers, removes or sweeps one of them (not by a renewal), which also
//!   `PUBLISH`es the name on `{P}:changes`; `{P}:versioned` is the set of such names.
//!   Every replica subscribes to that channel ([`RedisStore::listen`]) so its watchers
//!   hear of changes made through the others.
//!
//! Every operation is one Lua script, so a write either happens whole or not at all and
//! a read never sees half of one. Reads check each lease, so an expired instance is never
//! returned even before [`RedisStore::reap_expired`] has cleaned the indexes.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, Client, Script};
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::changes::{self, Changes};
use super::{DEFAULT_HEARTBEAT_INTERVAL, HEALTHY, Recorded, Registration, RemoveError, StoreError};
use crate::wire::Instance;

/// Extra life of an instance hash past its lease, so a table without any running
/// registry (no reaper) still empties itself.
const HASH_GRACE_MS: u64 = 60_000;

/// Field order shared by every script's HMGET and [`parse_instance`].
const FIELDS: &str = "'id', 'name', 'host', 'port', 'heartbeatInterval', 'registeredAt', \
                      'lastHeartbeat', 'metadata'";

/// Prepended to every script: records a change of a service's instances.
const CHANGED: &str = r"
local function changed(base, name)
  redis.call('INCR', base .. ':version:' .. name)
  redis.call('SADD', base .. ':versioned', name)
  redis.call('PUBLISH', base .. ':changes', name)
end
";

const WRITE: &str = r"
local base, mode, id, name = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local inst = base .. ':instance:' .. id
local lease = base .. ':lease:' .. id
local renewed = 0
if mode == 'heartbeat' and redis.call('EXISTS', lease) == 1 and redis.call('EXISTS', inst) == 1 then
  renewed = 1
  if ARGV[7] ~= '' then redis.call('HSET', inst, 'heartbeatInterval', ARGV[7]) end
  if ARGV[9] ~= '' then redis.call('HSET', inst, 'metadata', ARGV[9]) end
  redis.call('HSET', inst, 'lastHeartbeat', ARGV[8])
else
  local interval = ARGV[7]
  if interval == '' then interval = ARGV[10] end
  local metadata = ARGV[9]
  if metadata == '' then metadata = '{}' end
  redis.call('DEL', inst)
  redis.call('HSET', inst, 'id', id, 'name', name, 'host', ARGV[5], 'port', ARGV[6],
    'heartbeatInterval', interval, 'registeredAt', ARGV[8], 'lastHeartbeat', ARGV[8],
    'metadata', metadata)
end
local life = tonumber(redis.call('HGET', inst, 'heartbeatInterval')) * 1500
redis.call('SET', lease, '1', 'PX', life)
redis.call('PEXPIRE', inst, life + tonumber(ARGV[11]))
redis.call('SADD', base .. ':service:' .. name, id)
redis.call('SADD', base .. ':services', name)
if renewed == 0 then changed(base, name) end
return {renewed, redis.call('HMGET', inst, FIELDS)}
";

const LIST: &str = r"
local base = ARGV[1]
local names
if ARGV[2] ~= '' then names = {ARGV[2]} else names = redis.call('SMEMBERS', base .. ':services') end
local out = {}
for _, name in ipairs(names) do
  for _, id in ipairs(redis.call('SMEMBERS', base .. ':service:' .. name)) do
    if redis.call('EXISTS', base .. ':lease:' .. id) == 1 then
      local f = redis.call('HMGET', base .. ':instance:' .. id, FIELDS)
      if f[1] then table.insert(out, f) end
    end
  end
end
return out
";

/// Returns `{code, removed}`: code 0 removed, 1 no live instance of the service, 2 none
/// on that port (and host). Only matching instances are deleted, so an error code means
/// nothing changed.
const REMOVE: &str = r"
local base, name, port, host = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local set = base .. ':service:' .. name
local live, removed = 0, {}
for _, id in ipairs(redis.call('SMEMBERS', set)) do
  local inst = base .. ':instance:' .. id
  local lease = base .. ':lease:' .. id
  if redis.call('EXISTS', lease) == 1 then
    local f = redis.call('HMGET', inst, FIELDS)
    if f[1] then
      live = live + 1
      if f[4] == port and (host == '' or f[3] == host) then
        redis.call('DEL', inst, lease)
        redis.call('SREM', set, id)
        table.insert(removed, f)
      end
    end
  end
end
if redis.call('SCARD', set) == 0 then redis.call('SREM', base .. ':services', name) end
if live == 0 then return {1, {}} end
if #removed == 0 then return {2, {}} end
changed(base, name)
return {0, removed}
";

/// Removes every id whose lease is gone from the indexes (and its hash) and returns the
/// ones whose hash was still there. Atomic, so with several replicas sweeping, each
/// expiry is reported by exactly one.
const SWEEP: &str = r"
local base = ARGV[1]
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', base .. ':services')) do
  local set = base .. ':service:' .. name
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    if redis.call('EXISTS', base .. ':lease:' .. id) == 0 then
      local inst = base .. ':instance:' .. id
      local f = redis.call('HMGET', inst, FIELDS)
      if f[1] then table.insert(out, f) end
      redis.call('DEL', inst)
      redis.call('SREM', set, id)
      changed(base, name)
    end
  end
  if redis.call('SCARD', set) == 0 then redis.call('SREM', base .. ':services', name) end
end
return out
";

/// Deletes every key of the table (tests and tear-down).
const CLEAR: &str = r"
local base = ARGV[1]
local n = 0
for _, name in ipairs(redis.call('SMEMBERS', base .. ':services')) do
  local set = base .. ':service:' .. name
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    n = n + redis.call('DEL', base .. ':instance:' .. id, base .. ':lease:' .. id)
  end
  n = n + redis.call('DEL', set)
end
for _, name in ipairs(redis.call('SMEMBERS', base .. ':versioned')) do
  n = n + redis.call('DEL', base .. ':version:' .. name)
end
return n + redis.call('DEL', base .. ':services', base .. ':versioned')
";

fn script(body: &str) -> Script {
    Script::new(&format!("{CHANGED}{}", body.replace("FIELDS", FIELDS)))
}

#[derive(Debug)]
struct Scripts {
    write: Script,
    list: Script,
    remove: Script,
    sweep: Script,
    clear: Script,
}

/// The instance table in Redis (see the module docs for the layout). Cheap to clone:
/// clones share one multiplexed, self-reconnecting connection.
#[derive(Clone)]
pub struct RedisStore {
    client: Client,
    conn: ConnectionManager,
    base: String,
    scripts: std::sync::Arc<Scripts>,
    changes: std::sync::Arc<Changes>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// One `Instance` row as the scripts return it (HMGET order of `FIELDS`).
type Row = Vec<Option<String>>;

impl RedisStore {
    /// Connects to `url` and keeps the table under `prefix`. Fails when Redis cannot be
    /// reached now; later outages are retried per call by the connection manager.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = Client::open(url).map_err(|e| StoreError::Config(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        Ok(Self {
            client,
            changes: std::sync::Arc::new(Changes::new()),
            conn,
            base: format!("{{{prefix}}}"),
            scripts: std::sync::Arc::new(Scripts {
                write: script(WRITE),
                list: script(LIST),
                remove: script(REMOVE),
                sweep: script(SWEEP),
                clear: script(CLEAR),
            }),
        })
    }

    async fn write(
        &self,
        mode: &str,
        reg: Registration,
        wall_ms: u64,
    ) -> Result<Recorded, StoreError> {
        let id = reg.id();
        let interval = reg
            .heartbeat_interval
            .map(|i| super::clamp_interval(i).to_string())
            .unwrap_or_default();
        let metadata = match &reg.metadata {
            Some(m) => serde_json::to_string(m).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            None => String::new(),
        };
        let (renewed, row): (u8, Row) = self
            .scripts
            .write
            .arg(&self.base)
            .arg(mode)
            .arg(&id)
            .arg(reg.name.as_str())
            .arg(&reg.host)
            .arg(reg.port)
            .arg(interval)
            .arg(wall_ms)
            .arg(metadata)
            .arg(DEFAULT_HEARTBEAT_INTERVAL)
            .arg(HASH_GRACE_MS)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if renewed == 0 {
            // This replica's watchers need not wait for the published message.
            self.changes.notify();
        }
        Ok(Recorded {
            instance: parse_instance(row)?,
            renewed: renewed == 1,
            // Expiry is Redis's job; the reaper only sweeps indexes on a fixed period.
            earliest_deadline: false,
        })
    }

    /// Records a new registration, replacing any instance with the same id.
    pub async fn register(&self, reg: Registration, wall_ms: u64) -> Result<Recorded, StoreError> {
        self.write("register", reg, wall_ms).await
    }

    /// Renews a live instance (keeping `registeredAt`), or registers it anew.
    pub async fn heartbeat(&self, reg: Registration, wall_ms: u64) -> Result<Recorded, StoreError> {
        self.write("heartbeat", reg, wall_ms).await
    }

    /// Removes the live instances of `name` on `port` (only the one on `host` when
    /// given) and returns them.
    pub async fn remove(
        &self,
        name: &str,
        port: u16,
        host: Option<&str>,
    ) -> Result<Vec<Instance>, RemoveError> {
        let (code, rows): (u8, Vec<Row>) = self
            .scripts
            .remove
            .arg(&self.base)
            .arg(name)
            .arg(port)
            .arg(host.unwrap_or(""))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| RemoveError::Store(e.into()))?;
        match code {
            0 => {
                self.changes.notify();
                rows.into_iter()
                    .map(parse_instance)
                    .collect::<Result<_, _>>()
                    .map_err(RemoveError::Store)
            }
            1 => Err(RemoveError::ServiceNotFound),
            _ => Err(RemoveError::InstanceNotFound),
        }
    }

    async fn rows(&self, script: &Script, name: &str) -> Result<Vec<Instance>, StoreError> {
        let rows: Vec<Row> = script
            .arg(&self.base)
            .arg(name)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let mut list = rows
            .into_iter()
            .map(parse_instance)
            .collect::<Result<Vec<_>, _>>()?;
        list.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        Ok(list)
    }

    /// The live instances of `name`, ordered by id; empty for an unknown name.
    pub async fn list(&self, name: &str) -> Result<Vec<Instance>, StoreError> {
        if name.is_empty() {
            // The script reads an empty name as "every service".
            return Ok(Vec::new());
        }
        self.rows(&self.scripts.list, name).await
    }

    /// Every service with at least one live instance.
    pub async fn list_all(&self) -> Result<BTreeMap<String, Vec<Instance>>, StoreError> {
        let mut all: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for inst in self.rows(&self.scripts.list, "").await? {
            all.entry(inst.name.clone()).or_default().push(inst);
        }
        Ok(all)
    }

    /// Drops expired instances from the indexes and returns them (each one to exactly
    /// one caller, however many replicas sweep).
    pub async fn reap_expired(&self) -> Result<Vec<Instance>, StoreError> {
        let expired = self.rows(&self.scripts.sweep, "").await?;
        if !expired.is_empty() {
            self.changes.notify();
        }
        Ok(expired)
    }

    /// The version of `name`'s instances (0 if they never changed).
    pub async fn version(&self, name: &str) -> Result<u64, StoreError> {
        let key = format!("{}:version:{name}", self.base);
        let version: Option<u64> = self.conn.clone().get(key).await?;
        Ok(version.unwrap_or(0))
    }

    /// A receiver woken whenever a change may have happened, here or through another
    /// replica (while [`RedisStore::listen`] runs).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Wakes this process's watchers on every change published by any replica, until
    /// `shutdown` fires.
    pub async fn listen(&self, shutdown: CancellationToken) {
        let channel = format!("{}:changes", self.base);
        changes::listen(
            self.client.clone(),
            channel,
            std::sync::Arc::clone(&self.changes),
            shutdown,
        )
        .await;
    }

    /// Deletes every key of this table; returns how many keys went.
    pub async fn clear(&self) -> Result<u64, StoreError> {
        Ok(self
            .scripts
            .clear
            .arg(&self.base)
            .invoke_async(&mut self.conn.clone())
            .await?)
    }
}

fn parse_instance(row: Row) -> Result<Instance, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("instance hash: {what}"));
    let mut fields = row.into_iter();
    let mut next = |name: &str| {
        fields
            .next()
            .flatten()
            .ok_or_else(|| corrupt(&format!("missing {name}")))
    };
    let id = next("id")?;
    let name = next("name")?;
    let host = next("host")?;
    let port = next("port")?;
    let interval = next("heartbeatInterval")?;
    let registered = next("registeredAt")?;
    let last = next("lastHeartbeat")?;
    let metadata = next("metadata")?;
    let metadata: Map<String, Value> =
        serde_json::from_str(&metadata).map_err(|e| corrupt(&format!("metadata: {e}")))?;
    Ok(Instance {
        id,
        name,
        host,
        port: port.parse().map_err(|_| corrupt("port"))?,
        heartbeat_interval: interval.parse().map_err(|_| corrupt("heartbeatInterval"))?,
        registered_at: registered.parse().map_err(|_| corrupt("registeredAt"))?,
        last_heartbeat: last.parse().map_err(|_| corrupt("lastHeartbeat"))?,
        status: HEALTHY.to_owned(),
        metadata,
    })
}
