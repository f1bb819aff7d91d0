//! [`RedisSummaryCache`]: summaries kept in Redis, so every analytics instance sees the
//! same entries and a write through any instance invalidates them for all.
//!
//! The ticket rule of [`super::cache`] holds across instances: each type has an
//! invalidation counter beside its entry (`INCR` on invalidation), a miss hands out the
//! counter's value, and the put is a script that writes only while the counter still
//! has it. Redis trouble makes the cache a miss, never an error.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisResult, Script};
use tokio::sync::OnceCell;

use super::cache::{Lookup, SummaryCache, Ticket};
use super::metric::Summary;

/// Writes the summary only while the type's invalidation count is still the ticket's.
const PUT: &str = r"
local epoch = redis.call('GET', KEYS[2]) or '0'
if epoch ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

/// How long an invalidation counter outlives its last invalidation. Types are
/// client-chosen strings, so counters must expire; a ticket is used within one summary
/// read, far shorter than this.
const EPOCH_TTL_MS: u64 = 24 * 3600 * 1000;

/// A ticket no counter value matches: what a miss caused by a Redis error hands out, so
/// that the put that follows writes nothing.
const VOID_TICKET: u64 = u64::MAX;

/// Bound on one cache operation; a slow cache must not slow summaries down for long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

/// A [`SummaryCache`] in Redis: `GET`, `SET .. PX ttl`, invalidation by `DEL` (plus
/// the counter above). Connects lazily, so it can be built while Redis is down.
pub struct RedisSummaryCache {
    client: Client,
    conn: OnceCell<ConnectionManager>,
    prefix: String,
    ttl: Duration,
    timeout: Duration,
    put: Script,
    /// Whether the last operation failed, so an outage is logged when it starts and ends.
    down: AtomicBool,
}

impl fmt::Debug for RedisSummaryCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSummaryCache")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisSummaryCache {
    /// Summaries kept for `ttl` (zero: nothing is cached) in the Redis at `url`, under
    /// keys starting with `prefix`. Fails only on a URL redis-rs does not accept.
    pub fn new(url: &str, prefix: impl Into<String>, ttl: Duration) -> RedisResult<Self> {
        Ok(Self {
            client: Client::open(url)?,
            conn: OnceCell::new(),
            prefix: prefix.into(),
            ttl,
            timeout: DEFAULT_TIMEOUT,
            put: Script::new(PUT),
            down: AtomicBool::new(false),
        })
    }

    fn keys(&self, kind: &str) -> (String, String) {
        (
            format!("{}:summary:{kind}", self.prefix),
            format!("{}:epoch:{kind}", self.prefix),
        )
    }

    async fn connection(&self) -> RedisResult<ConnectionManager> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await?;
        Ok(conn.clone())
    }

    /// Runs `op` within the timeout; `None` (logged once per outage) if it failed.
    async fn attempt<T, F>(&self, what: &str, op: F) -> Option<T>
    where
        F: Future<Output = RedisResult<T>>,
    {
        let result = match tokio::time::timeout(self.timeout, op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("timed out".to_owned()),
        };
        match result {
            Ok(value) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(prefix = %self.prefix, "summary cache: Redis is back");
                }
                Some(value)
            }
            Err(reason) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        prefix = %self.prefix, operation = what, %reason,
                        "summary cache: Redis unavailable, reading the store"
                    );
                }
                None
            }
        }
    }
}

impl SummaryCache for RedisSummaryCache {
    async fn get(&self, kind: &str) -> Lookup {
        let (entry, epoch) = self.keys(kind);
        let found = self
            .attempt("get", async {
                let mut conn = self.connection().await?;
                redis::cmd("MGET")
                    .arg(&entry)
                    .arg(&epoch)
                    .query_async::<(Option<String>, Option<u64>)>(&mut conn)
                    .await
            })
            .await;
        let Some((cached, epoch)) = found else {
            return Lookup::Miss(Ticket::at(VOID_TICKET));
        };
        // An entry that does not parse (another version wrote it) is a miss; the put
        // that follows replaces it.
        match cached.and_then(|json| serde_json::from_str::<Summary>(&json).ok()) {
            Some(summary) if summary.kind == kind => Lookup::Hit(summary),
            _ => Lookup::Miss(Ticket::at(epoch.unwrap_or(0))),
        }
    }

    async fn put(&self, summary: &Summary, ticket: Ticket) {
        if self.ttl.is_zero() || ticket.epoch() == VOID_TICKET {
            return;
        }
        let Ok(json) = serde_json::to_string(summary) else {
            return;
        };
        let (entry, epoch) = self.keys(&summary.kind);
        let ttl_ms = u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.attempt("put", async {
            let mut conn = self.connection().await?;
            self.put
                .key(&entry)
                .key(&epoch)
                .arg(ticket.epoch())
                .arg(&json)
                .arg(ttl_ms)
                .invoke_async::<u8>(&mut conn)
                .await
        })
        .await;
    }

    async fn invalidate(&self, kind: &str) {
        let (entry, epoch) = self.keys(kind);
        self.attempt("invalidate", async {
            let mut conn = self.connection().await?;
            redis::pipe()
                .atomic()
                .incr(&epoch, 1)
                .ignore()
                .cmd("PEXPIRE")
                .arg(&epoch)
                .arg(EPOCH_TTL_MS)
                .ignore()
                .del(&entry)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
        })
        .await;
    }
}
