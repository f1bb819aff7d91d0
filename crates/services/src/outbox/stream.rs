//! Events over Redis Streams: one stream per topic, `<prefix>:events:<topic>`.
//!
//! - [`StreamTransport`]: the relay's [`Transport`] when Redis is configured. It appends
//!   each outbox row with `XADD` (fields `id`, `type`, `event` = the event JSON, and
//!   `traceparent` when the row has one); the relay marks the row delivered only after
//!   the `XADD` returned, so a crash in between appends it again: at least once.
//! - [`StreamConsumer`]: a consumer group reader (`XREADGROUP ... BLOCK`, group = the
//!   consuming service, consumer = its instance id) that hands each entry to an
//!   [`EventHandler`] and `XACK`s it only after the handler committed. Entries left
//!   pending by a consumer that died are taken over with `XAUTOCLAIM` once idle for
//!   [`ConsumerSettings::reclaim_idle`]. An entry the handler refuses (not an event, a
//!   type not consumed) is copied to `<prefix>:events:dead` with the reason, counted and
//!   acked, so it is not retried forever; a handler that cannot commit (database down)
//!   leaves the entry pending, to be read again after a pause.
//!
//! The group is created at id `0` with `MKSTREAM`, so a consumer starting for the first
//! time also gets the events published before it existed.
//!
//! Streams stay bounded: at the reclaim cadence a consumer trims (`XTRIM MINID`) the
//! entries every group of the stream has read and acknowledged, up to the oldest one
//! some group still needs ([`trim_floor`]). A stream no group reads yet is left whole.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use breakwater_runtime::CancellationToken;
use breakwater_runtime::observe::TraceContext;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{
    StreamAutoClaimOptions, StreamId, StreamInfoGroupsReply, StreamPendingReply, StreamReadOptions,
    StreamReadReply, StreamTrimOptions, StreamTrimmingMode,
};
use redis::{AsyncCommands, AsyncConnectionConfig, Client, RedisResult};
use tokio::sync::OnceCell;

use super::Claimed;
use super::relay::{DeliveryError, Transport};

/// The default start of every event stream's key.
pub const DEFAULT_PREFIX: &str = "breakwater";

/// Entry field: the event id (consumers deduplicate by it).
pub const FIELD_ID: &str = "id";
/// Entry field: the topic.
pub const FIELD_TYPE: &str = "type";
/// Entry field: the event JSON, exactly as `POST /events` receives it.
pub const FIELD_EVENT: &str = "event";
/// Entry field: the W3C `traceparent` of the request that caused the event.
pub const FIELD_TRACEPARENT: &str = "traceparent";

/// Bound on one `XADD` and on connecting for it.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// The stream of `topic` under `prefix`.
pub fn stream_key(prefix: &str, topic: &str) -> String {
    format!("{prefix}:events:{topic}")
}

/// The dead-letter stream under `prefix`.
pub fn dead_letter_key(prefix: &str) -> String {
    format!("{prefix}:events:dead")
}

/// [`Transport`] appending to a Redis stream per topic. Connects lazily, so it can be
/// built while Redis is down; a failed `XADD` is a failed delivery, retried by the relay.
pub struct StreamTransport {
    client: Client,
    conn: OnceCell<ConnectionManager>,
    prefix: String,
}

impl fmt::Debug for StreamTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamTransport")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl StreamTransport {
    /// Streams in the Redis at `url` under `prefix`. Fails only on a URL redis-rs does
    /// not accept.
    pub fn new(url: &str, prefix: impl Into<String>) -> RedisResult<Self> {
        Ok(Self {
            client: Client::open(url)?,
            conn: OnceCell::new(),
            prefix: prefix.into(),
        })
    }

    async fn connection(&self) -> RedisResult<ConnectionManager> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(PUBLISH_TIMEOUT))
                    .set_response_timeout(Some(PUBLISH_TIMEOUT))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await?;
        Ok(conn.clone())
    }
}

impl Transport for StreamTransport {
    async fn deliver(&self, _subscriber: &str, event: &Claimed) -> Result<(), DeliveryError> {
        let key = stream_key(&self.prefix, &event.topic);
        let failed = |e: redis::RedisError| DeliveryError::Transport {
            url: key.clone(),
            reason: e.to_string(),
        };
        let mut conn = self.connection().await.map_err(failed)?;
        let mut fields = vec![
            (FIELD_ID, event.id.as_str()),
            (FIELD_TYPE, event.topic.as_str()),
            (FIELD_EVENT, event.payload.as_str()),
        ];
        if let Some(traceparent) = &event.traceparent {
            fields.push((FIELD_TRACEPARENT, traceparent.as_str()));
        }
        let _entry: Option<String> = conn.xadd(&key, "*", &fields).await.map_err(failed)?;
        Ok(())
    }
}

/// The id below which a stream's entries may go, given per group the oldest entry it
/// still needs (its oldest pending entry, else the last one delivered to it, which is
/// kept): the smallest of them. `None` (trim nothing) with no group, when a group has
/// read nothing yet (`0-0`), or when an id does not parse.
pub fn trim_floor(needs: &[String]) -> Option<String> {
    fn parse(id: &str) -> Option<(u64, u64)> {
        let (ms, seq) = id.split_once('-')?;
        Some((ms.parse().ok()?, seq.parse().ok()?))
    }
    let mut floor: Option<(u64, u64)> = None;
    for id in needs {
        let id = parse(id)?;
        floor = Some(floor.map_or(id, |f| f.min(id)));
    }
    floor
        .filter(|&f| f != (0, 0))
        .map(|(ms, seq)| format!("{ms}-{seq}"))
}

/// What a handler did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Its effect was committed now.
    Applied,
    /// It was applied before; nothing changed.
    Duplicate,
}

/// Why a handler did not apply an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// The entry is not an event this consumer takes; it will never be: dead-letter it.
    #[error("refused: {0}")]
    Refused(String),
    /// It could not be applied now (e.g. the database is down); try again later.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// A future a handler returns.
pub type HandleFuture<'a> = Pin<Box<dyn Future<Output = Result<Handled, HandleError>> + Send + 'a>>;

/// Applies one event, idempotently by its id, committing before it returns `Ok`.
pub trait EventHandler: Send + Sync + 'static {
    /// Applies the event JSON `event`; `trace` is the consumer's span of the trace that
    /// caused it, if the entry carried one.
    fn handle<'a>(&'a self, event: &'a [u8], trace: Option<TraceContext>) -> HandleFuture<'a>;
}

/// How a [`StreamConsumer`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSettings {
    /// Start of the stream keys (see [`stream_key`]).
    pub prefix: String,
    /// The consumer group: the consuming service's name.
    pub group: String,
    /// This consumer's name within the group: its instance id.
    pub consumer: String,
    /// The topics read.
    pub topics: Vec<String>,
    /// How long one `XREADGROUP` waits for new entries. Default 2 s.
    pub block: Duration,
    /// Entries per read, per stream. Default 32.
    pub batch: usize,
    /// How long an entry stays pending on another consumer before this one takes it
    /// over (`XAUTOCLAIM`). Default 30 s.
    pub reclaim_idle: Duration,
    /// Pause after an error (Redis or the handler unavailable), doubling up to 10x.
    /// Default 500 ms.
    pub pause: Duration,
}

impl ConsumerSettings {
    /// Settings for `consumer` of `group` reading `topics` under `prefix`, defaults
    /// otherwise.
    pub fn new(
        prefix: impl Into<String>,
        group: impl Into<String>,
        consumer: impl Into<String>,
        topics: &[&str],
    ) -> Self {
        Self {
            prefix: prefix.into(),
            group: group.into(),
            consumer: consumer.into(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            block: Duration::from_secs(2),
            batch: 32,
            reclaim_idle: Duration::from_secs(30),
            pause: Duration::from_millis(500),
        }
    }
}

/// What a consumer did so far; also shown on the service's `GET /metrics`
/// ([`ConsumerStats::register`]).
#[derive(Debug, Default)]
pub struct ConsumerStats {
    applied: Counter,
    duplicates: Counter,
    dead_lettered: Counter,
    reclaimed: Counter,
    errors: Counter,
}

impl ConsumerStats {
    /// Events applied.
    pub fn applied(&self) -> u64 {
        self.applied.get()
    }
    /// Entries whose event had been applied before.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.get()
    }
    /// Entries refused and moved to the dead-letter stream.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered.get()
    }
    /// Entries taken over from other consumers.
    pub fn reclaimed(&self) -> u64 {
        self.reclaimed.get()
    }
    /// Redis errors and unavailable handlers.
    pub fn errors(&self) -> u64 {
        self.errors.get()
    }

    /// Adds the counters to `registry` as `breakwater_events_*_total`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("breakwater_events");
        sub.register(
            "applied",
            "Stream entries whose event was applied",
            self.applied.clone(),
        );
        sub.register(
            "duplicates",
            "Stream entries whose event had been applied before",
            self.duplicates.clone(),
        );
        sub.register(
            "dead_lettered",
            "Stream entries refused and moved to the dead-letter stream",
            self.dead_lettered.clone(),
        );
        sub.register(
            "reclaimed",
            "Pending stream entries taken over from other consumers",
            self.reclaimed.clone(),
        );
        sub.register(
            "consumer_errors",
            "Rounds of the stream consumer cut short by Redis or the database",
            self.errors.clone(),
        );
    }
}

/// Why one round of reading stopped early.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("handler {0}")]
    Handler(HandleError),
}

/// Reads the topics' streams as one consumer of a group; see the module docs.
pub struct StreamConsumer {
    client: Client,
    handler: Arc<dyn EventHandler>,
    settings: ConsumerSettings,
    stats: Arc<ConsumerStats>,
}

impl fmt::Debug for StreamConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamConsumer")
            .field("settings", &self.settings)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl StreamConsumer {
    /// A consumer of the Redis at `url` applying entries through `handler`. Fails only
    /// on a URL redis-rs does not accept.
    pub fn new(
        url: &str,
        handler: Arc<dyn EventHandler>,
        settings: ConsumerSettings,
    ) -> RedisResult<Self> {
        Ok(Self {
            client: Client::open(url)?,
            handler,
            settings,
            stats: Arc::new(ConsumerStats::default()),
        })
    }

    /// Its counters, shared with the running consumer.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }

    fn keys(&self) -> Vec<String> {
        self.settings
            .topics
            .iter()
            .map(|t| stream_key(&self.settings.prefix, t))
            .collect()
    }

    /// Reads and applies until `shutdown` fires. Redis being away is waited out.
    pub async fn run(self, shutdown: CancellationToken) {
        let s = &self.settings;
        let mut pause = s.pause;
        let mut conn: Option<MultiplexedConnection> = None;
        let mut next_reclaim = tokio::time::Instant::now();
        tracing::info!(group = %s.group, consumer = %s.consumer, topics = ?s.topics, "event consumer started");
        while !shutdown.is_cancelled() {
            let round = tokio::select! {
                () = shutdown.cancelled() => break,
                round = self.round(&mut conn, &mut next_reclaim) => round,
            };
            match round {
                Ok(()) => pause = s.pause,
                Err(error) => {
                    self.stats.errors.inc();
                    if matches!(error, RoundError::Redis(_)) {
                        // A fresh connection (and groups, if the streams vanished).
                        conn = None;
                    }
                    tracing::warn!(consumer = %s.consumer, %error, retry_in = ?pause, "event consumer paused");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(s.pause * 10);
                }
            }
        }
        tracing::info!(consumer = %s.consumer, "event consumer stopped");
    }

    /// Connects and creates the groups when needed; then applies this consumer's own
    /// pending entries, or takes over idle ones from others, or waits for new ones.
    async fn round(
        &self,
        conn: &mut Option<MultiplexedConnection>,
        next_reclaim: &mut tokio::time::Instant,
    ) -> Result<(), RoundError> {
        let s = &self.settings;
        let conn = match conn {
            Some(conn) => conn,
            None => conn.insert(self.connect().await?),
        };
        let keys = self.keys();
        let own = StreamReadOptions::default()
            .group(&s.group, &s.consumer)
            .count(s.batch);
        let zeros = vec!["0"; keys.len()];
        let pending: Option<StreamReadReply> = conn.xread_options(&keys, &zeros, &own).await?;
        if self.apply_all(conn, pending).await? > 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= *next_reclaim {
            *next_reclaim = tokio::time::Instant::now() + (s.reclaim_idle / 2).max(s.block);
            if self.reclaim(conn, &keys).await? > 0 {
                // Now this consumer's own pending entries: the next round applies them.
                return Ok(());
            }
            self.trim(conn, &keys).await?;
        }
        let fresh = StreamReadOptions::default()
            .group(&s.group, &s.consumer)
            .count(s.batch)
            .block(usize::try_from(s.block.as_millis()).unwrap_or(usize::MAX));
        let news = vec![">"; keys.len()];
        let read: Option<StreamReadReply> = conn.xread_options(&keys, &news, &fresh).await?;
        self.apply_all(conn, read).await?;
        Ok(())
    }

    /// A dedicated connection (a blocking read holds it) and the groups.
    async fn connect(&self) -> Result<MultiplexedConnection, RoundError> {
        let s = &self.settings;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(s.block + Duration::from_secs(5)));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        for key in self.keys() {
            let created: RedisResult<()> = conn.xgroup_create_mkstream(&key, &s.group, "0").await;
            match created {
                Ok(()) => tracing::info!(stream = %key, group = %s.group, "consumer group created"),
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(conn)
    }

    /// Takes over entries idle on other consumers; returns how many.
    async fn reclaim(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &[String],
    ) -> Result<usize, RoundError> {
        let s = &self.settings;
        let idle = u64::try_from(s.reclaim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut taken = 0;
        for key in keys {
            let options = StreamAutoClaimOptions::default()
                .count(s.batch)
                .with_justid();
            let reply: redis::streams::StreamAutoClaimReply = conn
                .xautoclaim_options(key, &s.group, &s.consumer, idle, "0-0", options)
                .await?;
            if !reply.claimed.is_empty() {
                tracing::info!(stream = %key, consumer = %s.consumer, entries = reply.claimed.len(), "took over idle pending entries");
            }
            taken += reply.claimed.len();
        }
        self.stats
            .reclaimed
            .inc_by(u64::try_from(taken).unwrap_or(u64::MAX));
        Ok(taken)
    }

    /// Removes the entries every group has read and acknowledged; returns how many.
    async fn trim(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &[String],
    ) -> Result<usize, RoundError> {
        let mut trimmed = 0;
        for key in keys {
            let info: StreamInfoGroupsReply = conn.xinfo_groups(key).await?;
            let mut needs = Vec::with_capacity(info.groups.len());
            for group in &info.groups {
                let need = if group.pending == 0 {
                    group.last_delivered_id.clone()
                } else {
                    match conn.xpending(key, &group.name).await? {
                        StreamPendingReply::Data(data) => data.start_id,
                        // Pending entries whose ids this reply does not give: keep
                        // everything (`0-0` trims nothing).
                        _ => "0-0".to_owned(),
                    }
                };
                needs.push(need);
            }
            let Some(floor) = trim_floor(&needs) else {
                continue;
            };
            let options = StreamTrimOptions::minid(StreamTrimmingMode::Exact, floor);
            let removed: usize = conn.xtrim_options(key, &options).await?;
            if removed > 0 {
                tracing::debug!(stream = %key, removed, "trimmed entries every group acknowledged");
            }
            trimmed += removed;
        }
        Ok(trimmed)
    }

    /// Applies every entry of `reply` in order; returns how many were read. Stops at
    /// the first one the handler cannot apply now, leaving it (and those after) pending.
    async fn apply_all(
        &self,
        conn: &mut MultiplexedConnection,
        reply: Option<StreamReadReply>,
    ) -> Result<usize, RoundError> {
        let mut read = 0;
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in &stream.ids {
                read += 1;
                self.apply_one(conn, &stream.key, entry).await?;
            }
        }
        Ok(read)
    }

    async fn apply_one(
        &self,
        conn: &mut MultiplexedConnection,
        key: &str,
        entry: &StreamId,
    ) -> Result<(), RoundError> {
        let s = &self.settings;
        // A pending entry deleted from the stream reads back with no fields.
        if entry.map.is_empty() {
            let _: usize = conn.xack(key, &s.group, &[&entry.id]).await?;
            return Ok(());
        }
        let event: Option<Vec<u8>> = entry.get(FIELD_EVENT);
        let trace = entry
            .get::<String>(FIELD_TRACEPARENT)
            .and_then(|t| TraceContext::parse(&t))
            .map(|parent| parent.child());
        let outcome = match &event {
            Some(event) => self.handler.handle(event, trace).await,
            None => Err(HandleError::Refused(format!(
                "entry has no '{FIELD_EVENT}' field"
            ))),
        };
        match outcome {
            Ok(handled) => {
                let counter = match handled {
                    Handled::Applied => &self.stats.applied,
                    Handled::Duplicate => &self.stats.duplicates,
                };
                counter.inc();
                let _: usize = conn.xack(key, &s.group, &[&entry.id]).await?;
                Ok(())
            }
            Err(HandleError::Refused(reason)) => {
                tracing::warn!(stream = %key, entry = %entry.id, %reason, "event refused; moved to the dead-letter stream");
                self.dead_letter(conn, key, entry, &reason).await?;
                self.stats.dead_lettered.inc();
                Ok(())
            }
            Err(unavailable) => Err(RoundError::Handler(unavailable)),
        }
    }

    /// Copies `entry` to the dead-letter stream with why, then acks it: in that order,
    /// so a crash between them copies it twice rather than losing it.
    async fn dead_letter(
        &self,
        conn: &mut MultiplexedConnection,
        key: &str,
        entry: &StreamId,
        reason: &str,
    ) -> Result<(), RoundError> {
        let s = &self.settings;
        let mut fields: Vec<(String, Vec<u8>)> = vec![
            ("stream".to_owned(), key.as_bytes().to_vec()),
            ("entry".to_owned(), entry.id.as_bytes().to_vec()),
            ("group".to_owned(), s.group.as_bytes().to_vec()),
            ("reason".to_owned(), reason.as_bytes().to_vec()),
        ];
        let original: HashMap<String, Vec<u8>> = entry
            .map
            .keys()
            .filter_map(|k| entry.get::<Vec<u8>>(k).map(|v| (k.clone(), v)))
            .collect();
        let mut original: Vec<_> = original.into_iter().collect();
        original.sort();
        fields.extend(original.into_iter().map(|(k, v)| (format!("field:{k}"), v)));
        let _: Option<String> = conn.xadd(dead_letter_key(&s.prefix), "*", &fields).await?;
        let _: usize = conn.xack(key, &s.group, &[&entry.id]).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use redis::streams::StreamRangeReply;

    use super::*;
    use crate::analytics::{self, AnalyticsSettings, MetricStore, SqliteMetrics};
    use crate::fixtures::{ScriptedUpstream, TempDir, temp_store};
    use crate::outbox::relay::{Relay, RelaySettings, Routes};
    use crate::outbox::{ORDER_CREATED, with_traceparent};
    use crate::redis_fixtures::{delete_keys, prefix, redis_url};
    use crate::storage::{NewOrder, OrderStore};

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// Analytics' own event path, recording the trace each event came with.
    struct Recording {
        inner: Arc<dyn EventHandler>,
        traces: Mutex<Vec<Option<TraceContext>>>,
    }

    impl EventHandler for Recording {
        fn handle<'a>(&'a self, event: &'a [u8], trace: Option<TraceContext>) -> HandleFuture<'a> {
            if let Ok(mut traces) = self.traces.lock() {
                traces.push(trace);
            }
            self.inner.handle(event, trace)
        }
    }

    /// An analytics instance's store and event handler in `dir`.
    async fn analytics_in(dir: &TempDir) -> (SqliteMetrics, Arc<Recording>) {
        let store = SqliteMetrics::open(&dir.path().join(analytics::DATABASE_FILE))
            .await
            .unwrap();
        let built = analytics::configured(
            store.clone(),
            ScriptedUpstream::answering(),
            "analytics-service-6000",
            6000,
            &AnalyticsSettings::default(),
        )
        .unwrap();
        let recording = Arc::new(Recording {
            inner: built.events,
            traces: Mutex::new(Vec::new()),
        });
        (store, recording)
    }

    fn quick(prefix: &str, consumer: &str) -> ConsumerSettings {
        ConsumerSettings {
            block: Duration::from_millis(100),
            reclaim_idle: Duration::from_millis(300),
            pause: Duration::from_millis(20),
            ..ConsumerSettings::new(prefix, analytics::SERVICE_NAME, consumer, &[ORDER_CREATED])
        }
    }

    async fn connection(url: &str) -> MultiplexedConnection {
        Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn orders_created(store: &SqliteMetrics) -> u64 {
        store
            .summary(analytics::ORDERS_CREATED)
            .await
            .unwrap()
            .map_or(0, |s| s.count)
    }

    /// Waits (up to 5 s) until `check` holds.
    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Pending entries of the group on the order stream.
    async fn pending(conn: &mut MultiplexedConnection, prefix: &str) -> usize {
        let reply: redis::streams::StreamPendingReply = conn
            .xpending(stream_key(prefix, ORDER_CREATED), analytics::SERVICE_NAME)
            .await
            .unwrap();
        reply.count()
    }

    #[tokio::test]
    async fn an_event_published_while_analytics_was_down_is_applied_once_with_its_trace() {
        let Some(url) = redis_url() else { return };
        let prefix = prefix("stream-publish");
        let (_dir, orders) = temp_store("stream-orders").await;
        let order = NewOrder {
            user_id: 1,
            products: vec!["Lamp".into(), "Bulb".into()],
        };
        with_traceparent(Some(PARENT.to_owned()), orders.create_order(&order))
            .await
            .unwrap();

        // Published with no consumer (and no group) in existence.
        let transport = StreamTransport::new(&url, prefix.clone()).unwrap();
        let relay = Relay::new(
            orders.outbox(),
            transport,
            Routes::SYSTEM,
            RelaySettings::default(),
            "orders-test",
        );
        let report = relay.pass().await.unwrap();
        assert_eq!((report.claimed, report.delivered), (1, 1));
        let row = orders.outbox().records().await.unwrap().remove(0);
        assert!(row.delivered_at.is_some());
        let mut conn = connection(&url).await;
        let entries: StreamRangeReply = conn
            .xrange_all(stream_key(&prefix, ORDER_CREATED))
            .await
            .unwrap();
        assert_eq!(entries.ids.len(), 1);
        let entry = &entries.ids[0];
        assert_eq!(entry.get::<String>(FIELD_ID), Some(row.id.clone()));
        assert_eq!(
            entry.get::<String>(FIELD_TYPE).as_deref(),
            Some(ORDER_CREATED)
        );
        assert_eq!(entry.get::<String>(FIELD_EVENT), Some(row.payload.clone()));
        assert_eq!(
            entry.get::<String>(FIELD_TRACEPARENT).as_deref(),
            Some(PARENT)
        );

        // Analytics starts: the entry is applied once, in the order's trace.
        let dir = TempDir::new("stream-analytics");
        let (metrics, handler) = analytics_in(&dir).await;
        let consumer = StreamConsumer::new(
            &url,
            handler.clone(),
            quick(&prefix, "analytics-service-6000"),
        )
        .unwrap();
        let stats = consumer.stats();
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer.run(stop.clone()));
        until("the event applied", || stats.applied() == 1).await;
        assert_eq!(orders_created(&metrics).await, 1);
        let traces = handler.traces.lock().unwrap().clone();
        let trace = traces[0].unwrap();
        let parent = TraceContext::parse(PARENT).unwrap();
        assert_eq!(trace.trace_id, parent.trace_id);
        assert_ne!(trace.span_id, parent.span_id, "analytics' own span");

        // The same event again (as after a relay crashed before marking it delivered).
        let fields: Vec<(&str, String)> = [FIELD_ID, FIELD_TYPE, FIELD_EVENT]
            .iter()
            .map(|f| (*f, entry.get::<String>(f).unwrap()))
            .collect();
        let _: String = conn
            .xadd(stream_key(&prefix, ORDER_CREATED), "*", &fields)
            .await
            .unwrap();
        until("the duplicate seen", || stats.duplicates() == 1).await;
        assert_eq!(orders_created(&metrics).await, 1);
        assert_eq!(stats.applied(), 1);
        assert_eq!(handler.traces.lock().unwrap()[1], None);
        assert_eq!(pending(&mut conn, &prefix).await, 0, "both acked");

        stop.cancel();
        task.await.unwrap();
        metrics.close().await;
        orders.close().await;
        delete_keys(&url, &prefix).await;
    }

    /// Appends an `order.created` entry for order `order_id` to `key`, as the relay would.
    async fn add_order_created(conn: &mut MultiplexedConnection, key: &str, order_id: u64) {
        let event = crate::outbox::Event::new(
            ORDER_CREATED,
            "2026-02-15T10:00:00.000Z".into(),
            serde_json::json!({"orderId": order_id, "userId": 1, "products": ["Pen"],
                               "timestamp": "2026-02-15T10:00:00.000Z"}),
        );
        let payload = serde_json::to_string(&event).unwrap();
        let _: String = conn
            .xadd(
                key,
                "*",
                &[
                    (FIELD_ID, event.id.as_str()),
                    (FIELD_TYPE, ORDER_CREATED),
                    (FIELD_EVENT, payload.as_str()),
                ],
            )
            .await
            .unwrap();
    }

    #[test]
    fn the_trim_floor_is_the_oldest_entry_any_group_needs() {
        let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            trim_floor(&ids(&["1700-3", "1700-1", "1800-0"])).as_deref(),
            Some("1700-1")
        );
        assert_eq!(trim_floor(&ids(&["9-0", "10-0"])).as_deref(), Some("9-0"));
        // Numeric, not text, order.
        assert_eq!(trim_floor(&ids(&["10-0", "9-5"])).as_deref(), Some("9-5"));
        assert_eq!(trim_floor(&ids(&[])), None, "no group: keep everything");
        assert_eq!(
            trim_floor(&ids(&["1700-1", "0-0"])),
            None,
            "a group read nothing"
        );
        assert_eq!(trim_floor(&ids(&["1700-1", "junk"])), None);
    }

    #[tokio::test]
    async fn entries_every_group_acknowledged_are_trimmed_and_no_others() {
        let Some(url) = redis_url() else { return };
        let prefix = prefix("stream-trim");
        let key = stream_key(&prefix, ORDER_CREATED);
        let mut conn = connection(&url).await;
        for group in [analytics::SERVICE_NAME, "another-consumer"] {
            let () = conn.xgroup_create_mkstream(&key, group, "0").await.unwrap();
        }
        for order_id in 1..=3 {
            add_order_created(&mut conn, &key, order_id).await;
        }

        let dir = TempDir::new("stream-trim");
        let (metrics, handler) = analytics_in(&dir).await;
        let consumer =
            StreamConsumer::new(&url, handler, quick(&prefix, "analytics-trim")).unwrap();
        let stats = consumer.stats();
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer.run(stop.clone()));
        until("three applied", || stats.applied() == 3).await;
        // Several trim rounds pass (every 150 ms here): the other group has read
        // nothing, so every entry stays.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let len: usize = conn.xlen(&key).await.unwrap();
        assert_eq!(len, 3);

        // Without it, all but the last entry delivered go.
        let _: usize = conn.xgroup_destroy(&key, "another-consumer").await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let len: usize = conn.xlen(&key).await.unwrap();
            if len == 1 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still {len} entries"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.unwrap();
        assert_eq!(orders_created(&metrics).await, 3);
        metrics.close().await;
        delete_keys(&url, &prefix).await;
    }

    #[tokio::test]
    async fn an_entry_pending_on_a_dead_consumer_is_taken_over() {
        let Some(url) = redis_url() else { return };
        let prefix = prefix("stream-reclaim");
        let key = stream_key(&prefix, ORDER_CREATED);
        let mut conn = connection(&url).await;
        let () = conn
            .xgroup_create_mkstream(&key, analytics::SERVICE_NAME, "0")
            .await
            .unwrap();
        add_order_created(&mut conn, &key, 9).await;
        // A consumer reads it and dies before acknowledging.
        let read: Option<StreamReadReply> = conn
            .xread_options(
                &[&key],
                &[">"],
                &StreamReadOptions::default().group(analytics::SERVICE_NAME, "analytics-dead"),
            )
            .await
            .unwrap();
        assert_eq!(read.unwrap().keys[0].ids.len(), 1);
        assert_eq!(pending(&mut conn, &prefix).await, 1);

        let dir = TempDir::new("stream-reclaim");
        let (metrics, handler) = analytics_in(&dir).await;
        let consumer =
            StreamConsumer::new(&url, handler, quick(&prefix, "analytics-live")).unwrap();
        let stats = consumer.stats();
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer.run(stop.clone()));
        until("the entry taken over and applied", || stats.applied() == 1).await;
        assert_eq!(stats.reclaimed(), 1);
        assert_eq!(orders_created(&metrics).await, 1);
        assert_eq!(pending(&mut conn, &prefix).await, 0);
        stop.cancel();
        task.await.unwrap();
        metrics.close().await;
        delete_keys(&url, &prefix).await;
    }

    #[tokio::test]
    async fn a_malformed_entry_goes_to_the_dead_letter_stream_once() {
        let Some(url) = redis_url() else { return };
        let prefix = prefix("stream-dead");
        let key = stream_key(&prefix, ORDER_CREATED);
        let mut conn = connection(&url).await;
        let _: String = conn
            .xadd(&key, "*", &[(FIELD_ID, "x1"), (FIELD_EVENT, "{not json")])
            .await
            .unwrap();
        let _: String = conn.xadd(&key, "*", &[("junk", "1")]).await.unwrap();

        let dir = TempDir::new("stream-dead");
        let (metrics, handler) = analytics_in(&dir).await;
        let consumer = StreamConsumer::new(&url, handler, quick(&prefix, "analytics-a")).unwrap();
        let stats = consumer.stats();
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer.run(stop.clone()));
        until("both dead-lettered", || stats.dead_lettered() == 2).await;
        // Nothing is retried: a while later they are still counted once each.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(stats.dead_lettered(), 2);
        assert_eq!(stats.applied(), 0);
        assert_eq!(pending(&mut conn, &prefix).await, 0);
        let dead: StreamRangeReply = conn.xrange_all(dead_letter_key(&prefix)).await.unwrap();
        assert_eq!(dead.ids.len(), 2);
        let reason: String = dead.ids[0].get("reason").unwrap();
        assert!(reason.starts_with("Malformed JSON"), "{reason}");
        assert_eq!(dead.ids[0].get::<String>("stream"), Some(key.clone()));
        assert_eq!(
            dead.ids[0].get::<String>("field:event").as_deref(),
            Some("{not json")
        );
        let reason: String = dead.ids[1].get("reason").unwrap();
        assert!(reason.contains("no 'event' field"), "{reason}");
        stop.cancel();
        task.await.unwrap();
        metrics.close().await;
        delete_keys(&url, &prefix).await;
    }
}
