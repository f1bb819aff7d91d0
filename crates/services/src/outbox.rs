//! Events between services: a transactional outbox, delivered at least once.
//!
//! - [`Event`]: the envelope every event travels in, `{id, type, occurredAt, data}`.
//! - [`OutboxStore`] and [`SqliteOutbox`]: the `outbox` table beside users and orders
//!   ([`crate::storage::PgOutbox`] on PostgreSQL, [`SharedOutbox`] for either).
//!   A row is written by [`append`] inside the transaction of the change it announces,
//!   so the change and its event commit or fail together.
//! - [`relay`]: the background task that claims rows under a lease, hands them to a
//!   [`relay::Transport`] and marks them delivered on success, or dead when the
//!   consumer refuses the event for good.
//! - [`stream`]: [`stream::StreamTransport`], delivery by `XADD` to a Redis stream per
//!   topic, for consumers reading with a consumer group.
//! - Trace context: [`with_traceparent`] (or the [`trace_scope`] middleware) makes the
//!   W3C `traceparent` of the request that causes a change travel with its event, in
//!   the row's `traceparent` column, so the consumer continues that trace.
//! - [`EventsToken`]: the shared secret the HTTP relay sends and analytics' `POST
//!   /events` requires, so only the system's own relays inject events.
//!
//! Retention: a row that was delivered, or whose topic has no subscriber in
//! [`relay::Routes`] (today `user.created`), is deleted once it is older than
//! [`relay::RelaySettings::retention`] (7 days by default). A routed row that was never
//! delivered is kept until it is: a consumer that is down gets its events when it
//! comes back. A dead row (`dead_at` set, with the consumer's answer in `last_error`)
//! is never claimed again and never pruned: it stays for an operator to look at.

pub mod relay;
pub mod stream;

use std::future::Future;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use breakwater_runtime::observe::TraceContext;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{Row, Sqlite, Transaction};

use breakwater_runtime::clock::{iso8601_now, now_millis};

use crate::settings::InvalidSetting;
use crate::storage::{Order, StorageError, User};

/// Topic of the event a new user emits.
pub const USER_CREATED: &str = "user.created";
/// Topic of the event a new order emits.
pub const ORDER_CREATED: &str = "order.created";

/// Migration step adding the outbox to the users/orders database. `available_at` is
/// when the row may next be claimed: a claim pushes it a lease ahead, a failed
/// delivery a backoff ahead. `claim` names the claim that holds the row.
pub(crate) const SCHEMA_STEP: &str = r#"
CREATE TABLE IF NOT EXISTS outbox (
    id           TEXT    PRIMARY KEY NOT NULL,
    topic        TEXT    NOT NULL,
    payload      TEXT    NOT NULL CHECK (json_valid(payload)),
    created_at   INTEGER NOT NULL,
    delivered_at INTEGER NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    available_at INTEGER NOT NULL,
    claim        TEXT    NULL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (available_at) WHERE delivered_at IS NULL;
"#;

/// Migration step giving each outbox row the `traceparent` of the request that caused
/// it. Rows written before (and changes made outside any request) have none.
pub(crate) const TRACE_STEP: &str = "ALTER TABLE outbox ADD COLUMN traceparent TEXT NULL;";

/// Migration step for dead letters: `dead_at` is when the consumer refused the event
/// for good (a permanent 4xx), `last_error` what it said. Older rows have neither.
pub(crate) const DEAD_STEP: &str = r#"
ALTER TABLE outbox ADD COLUMN dead_at INTEGER NULL;
ALTER TABLE outbox ADD COLUMN last_error TEXT NULL;
"#;

/// The environment variable holding the [`EventsToken`] (`--events-token`).
pub const EVENTS_TOKEN_ENV: &str = "BREAKWATER_EVENTS_TOKEN";

/// The secret shared by the relays that send events over HTTP and the consumer that
/// receives them (`Authorization: Bearer <token>`). Its `Debug` hides the value;
/// equality is compared in constant time.
#[derive(Clone)]
pub struct EventsToken(std::sync::Arc<str>);

impl EventsToken {
    /// Longest token accepted.
    pub const MAX_CHARS: usize = 1024;

    /// `token`, if it can travel in a header: 1 to [`Self::MAX_CHARS`] visible ASCII
    /// characters. The error names `events_token` and not the value.
    pub fn new(token: &str) -> Result<Self, InvalidSetting> {
        if token.is_empty() || token.len() > Self::MAX_CHARS {
            return Err(InvalidSetting::new(
                "events_token",
                format!("must be 1 to {} characters", Self::MAX_CHARS),
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidSetting::new(
                "events_token",
                "must be visible ASCII characters only (no spaces)",
            ));
        }
        Ok(Self(token.into()))
    }

    /// The token itself, to send.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `offered` is the token, without an early exit, so the time an answer
    /// takes does not tell how much of a guess was right.
    pub fn matches(&self, offered: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), offered.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl PartialEq for EventsToken {
    fn eq(&self, other: &Self) -> bool {
        self.matches(&other.0)
    }
}

impl Eq for EventsToken {}

impl std::fmt::Debug for EventsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventsToken(<hidden>)")
    }
}

tokio::task_local! {
    /// The `traceparent` events appended in this task carry. A task-local rather than a
    /// parameter: the storage traits announce changes, and which request caused one is
    /// the caller's context, not part of the change.
    static TRACEPARENT: Option<String>;
}

/// Runs `work` so that every event it appends carries `traceparent` (a W3C value
/// naming the span of the causing request as the event's parent).
pub async fn with_traceparent<F: Future>(traceparent: Option<String>, work: F) -> F::Output {
    TRACEPARENT.scope(traceparent, work).await
}

/// The `traceparent` events appended now carry, if any.
pub(crate) fn current_traceparent() -> Option<String> {
    TRACEPARENT.try_with(Clone::clone).ok().flatten()
}

/// Middleware (inside [`breakwater_runtime::observe::layer`], which puts this hop's
/// [`TraceContext`] into the request) that runs the request under
/// [`with_traceparent`] with this hop's span as the events' parent.
pub async fn trace_scope(req: Request, next: Next) -> Response {
    let traceparent = req
        .extensions()
        .get::<TraceContext>()
        .map(TraceContext::header_value);
    with_traceparent(traceparent, next.run(req)).await
}

/// An event as it travels: `{id, type, occurredAt, data}`. Consumers deduplicate by `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Random 128-bit id in 32 lowercase hex digits.
    pub id: String,
    /// The topic, e.g. `order.created`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the change happened, ISO-8601 UTC with milliseconds.
    pub occurred_at: String,
    /// The topic's fields (CONTRACTS.md).
    pub data: Value,
}

impl Event {
    /// An event of topic `kind` with a fresh id, that happened at `occurred_at`.
    pub fn new(kind: &str, occurred_at: String, data: Value) -> Self {
        Self {
            id: format!("{:032x}", rand::random::<u128>()),
            kind: kind.to_owned(),
            occurred_at,
            data,
        }
    }

    /// `user.created` with `{userId, email, timestamp}` (seed 002).
    pub fn user_created(user: &User) -> Self {
        let at = iso8601_now();
        let data = json!({"userId": user.id, "email": user.email, "timestamp": at});
        Self::new(USER_CREATED, at, data)
    }

    /// `order.created` with `{orderId, userId, products, timestamp}`.
    pub fn order_created(order: &Order) -> Self {
        let at = iso8601_now();
        let data = json!({
            "orderId": order.id,
            "userId": order.user_id,
            "products": order.products,
            "timestamp": at,
        });
        Self::new(ORDER_CREATED, at, data)
    }
}

/// Writes `event` into the outbox inside `tx`, the transaction of the change it
/// announces. Claimable at once.
pub(crate) async fn append(
    tx: &mut Transaction<'_, Sqlite>,
    event: &Event,
) -> Result<(), StorageError> {
    let payload = serde_json::to_string(event).map_err(|e| StorageError::Corrupt {
        table: "outbox",
        id: event.id.clone(),
        reason: e.to_string(),
    })?;
    let now = millis(now_millis());
    sqlx::query(
        "INSERT INTO outbox (id, topic, payload, created_at, attempts, available_at, traceparent) \
         VALUES (?, ?, ?, ?, 0, ?, ?)",
    )
    .bind(&event.id)
    .bind(&event.kind)
    .bind(payload)
    .bind(now)
    .bind(now)
    .bind(current_traceparent())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Milliseconds as SQLite stores them.
pub(crate) fn millis(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// A row taken by one claim: deliver it, then report back with `claim`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The event id (the row's key).
    pub id: String,
    /// The event's topic.
    pub topic: String,
    /// The event JSON, exactly as the consumer receives it.
    pub payload: String,
    /// Delivery attempts including this one.
    pub attempts: u32,
    /// The claim holding the row; only it may put the row back.
    pub claim: String,
    /// The W3C `traceparent` of the request that caused the event, if it had one.
    pub traceparent: Option<String>,
}

/// A row as stored, for inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// The event id.
    pub id: String,
    /// The event's topic.
    pub topic: String,
    /// The event JSON.
    pub payload: String,
    /// Milliseconds since the epoch when written.
    pub created_at: i64,
    /// Milliseconds since the epoch when delivered, `None` while pending.
    pub delivered_at: Option<i64>,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// The `traceparent` of the request that caused the event, if any.
    pub traceparent: Option<String>,
    /// Milliseconds since the epoch when the consumer refused it for good, if it did.
    pub dead_at: Option<i64>,
    /// What the consumer answered when it refused the event for good.
    pub last_error: Option<String>,
}

/// The outbox as the relay sees it. Times are milliseconds since the epoch, passed in
/// so that leases are testable without waiting.
pub trait OutboxStore: Send + Sync {
    /// Takes up to `limit` undelivered, not dead rows of `topics` that are available at `now`,
    /// oldest first, under a fresh claim: they stay unavailable to every other claim
    /// until `now + lease_ms` unless put back. Counts an attempt on each.
    fn claim(
        &self,
        topics: &[&str],
        now: i64,
        lease_ms: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Claimed>, StorageError>> + Send;
    /// Marks row `id` delivered at `now` (whoever holds it: it was delivered). False
    /// when it was already delivered or is gone.
    fn delivered(
        &self,
        id: &str,
        now: i64,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;
    /// Puts a row back after a failed delivery, claimable from `at`. Only while
    /// `claim` still holds it; false otherwise.
    fn retry_at(
        &self,
        id: &str,
        claim: &str,
        at: i64,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;
    /// Marks row `id` dead at `now` with `error` (what the consumer said): never
    /// claimed again, never pruned. Only while `claim` still holds it; false otherwise.
    fn dead(
        &self,
        id: &str,
        claim: &str,
        now: i64,
        error: &str,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;
    /// Deletes rows created before `before` that were delivered or whose topic is not
    /// in `routed`, except dead ones; returns how many.
    fn prune(
        &self,
        routed: &[&str],
        before: i64,
    ) -> impl Future<Output = Result<u64, StorageError>> + Send;
}

/// [`OutboxStore`] over the users/orders SQLite file (see [`crate::storage::SqliteStore::outbox`]).
/// Cheap to clone: clones share one pool.
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
}

impl SqliteOutbox {
    pub(crate) fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// The row of event `id`, `None` if there is none.
    pub async fn record(&self, id: &str) -> Result<Option<OutboxRecord>, StorageError> {
        let row = sqlx::query(
            "SELECT id, topic, payload, created_at, delivered_at, attempts, traceparent, dead_at, \
             last_error FROM outbox WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record_from_row).transpose()
    }

    /// Every row, oldest first.
    pub async fn records(&self) -> Result<Vec<OutboxRecord>, StorageError> {
        let rows = sqlx::query(
            "SELECT id, topic, payload, created_at, delivered_at, attempts, traceparent, dead_at, \
             last_error FROM outbox ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record_from_row).collect()
    }
}

/// The outbox of a [`crate::storage::SharedStore`], whichever database it is on.
#[derive(Debug, Clone)]
pub enum SharedOutbox {
    /// Beside users and orders in the SQLite file.
    Sqlite(SqliteOutbox),
    /// Beside users and orders in PostgreSQL.
    Postgres(crate::storage::PgOutbox),
}

impl OutboxStore for SharedOutbox {
    async fn claim(
        &self,
        topics: &[&str],
        now: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<Claimed>, StorageError> {
        match self {
            Self::Sqlite(o) => o.claim(topics, now, lease_ms, limit).await,
            Self::Postgres(o) => o.claim(topics, now, lease_ms, limit).await,
        }
    }

    async fn delivered(&self, id: &str, now: i64) -> Result<bool, StorageError> {
        match self {
            Self::Sqlite(o) => o.delivered(id, now).await,
            Self::Postgres(o) => o.delivered(id, now).await,
        }
    }

    async fn retry_at(&self, id: &str, claim: &str, at: i64) -> Result<bool, StorageError> {
        match self {
            Self::Sqlite(o) => o.retry_at(id, claim, at).await,
            Self::Postgres(o) => o.retry_at(id, claim, at).await,
        }
    }

    async fn dead(
        &self,
        id: &str,
        claim: &str,
        now: i64,
        error: &str,
    ) -> Result<bool, StorageError> {
        match self {
            Self::Sqlite(o) => o.dead(id, claim, now, error).await,
            Self::Postgres(o) => o.dead(id, claim, now, error).await,
        }
    }

    async fn prune(&self, routed: &[&str], before: i64) -> Result<u64, StorageError> {
        match self {
            Self::Sqlite(o) => o.prune(routed, before).await,
            Self::Postgres(o) => o.prune(routed, before).await,
        }
    }
}

/// An outbox row as either database returns it. The two differ only in `attempts`
/// (SQLite's INTEGER is an `i64`, PostgreSQL's an `i32`), so the decoding of records and
/// claims below is written once for both.
pub(crate) trait OutboxRow: Row {
    /// The `attempts` column.
    fn attempts(&self) -> Result<i64, sqlx::Error>;
}

impl OutboxRow for SqliteRow {
    fn attempts(&self) -> Result<i64, sqlx::Error> {
        self.try_get("attempts")
    }
}

impl OutboxRow for sqlx::postgres::PgRow {
    fn attempts(&self) -> Result<i64, sqlx::Error> {
        self.try_get::<i32, _>("attempts").map(i64::from)
    }
}

fn attempts_of<R: OutboxRow>(row: &R, id: &str) -> Result<u32, StorageError> {
    let attempts = row.attempts()?;
    u32::try_from(attempts).map_err(|_| StorageError::Corrupt {
        table: "outbox",
        id: id.to_owned(),
        reason: format!("attempts {attempts}"),
    })
}

/// A whole row (`records`): every column.
pub(crate) fn record_from_row<R>(row: &R) -> Result<OutboxRecord, StorageError>
where
    R: OutboxRow,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id: String = row.try_get("id")?;
    Ok(OutboxRecord {
        attempts: attempts_of(row, &id)?,
        topic: row.try_get("topic")?,
        payload: row.try_get("payload")?,
        created_at: row.try_get("created_at")?,
        delivered_at: row.try_get("delivered_at")?,
        traceparent: row.try_get("traceparent")?,
        dead_at: row.try_get("dead_at")?,
        last_error: row.try_get("last_error")?,
        id,
    })
}

/// The rows a claim returned (`id, topic, payload, attempts, created_at, traceparent`),
/// oldest first: `RETURNING` promises no order.
pub(crate) fn claimed_from_rows<R>(rows: &[R], claim: &str) -> Result<Vec<Claimed>, StorageError>
where
    R: OutboxRow,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut claimed = rows
        .iter()
        .map(|row| {
            let id: String = row.try_get("id")?;
            let created_at: i64 = row.try_get("created_at")?;
            let claimed = Claimed {
                attempts: attempts_of(row, &id)?,
                topic: row.try_get("topic")?,
                payload: row.try_get("payload")?,
                claim: claim.to_owned(),
                traceparent: row.try_get("traceparent")?,
                id,
            };
            Ok((created_at, claimed))
        })
        .collect::<Result<Vec<_>, StorageError>>()?;
    claimed.sort_by(|(a, x), (b, y)| a.cmp(b).then_with(|| x.id.cmp(&y.id)));
    Ok(claimed.into_iter().map(|(_, c)| c).collect())
}

/// Topics as one JSON array parameter, read back with `json_each`.
fn topic_list(topics: &[&str]) -> String {
    Value::from(topics.to_vec()).to_string()
}

impl OutboxStore for SqliteOutbox {
    async fn claim(
        &self,
        topics: &[&str],
        now: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<Claimed>, StorageError> {
        let claim = format!("{:032x}", rand::random::<u128>());
        // IMMEDIATE: the selection and the update happen under the write lock, so two
        // relays (in this process or another one on the same file) never take the same
        // available row.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query(
            "UPDATE outbox SET claim = ?1, available_at = ?2 + ?3, attempts = attempts + 1 \
             WHERE id IN (SELECT id FROM outbox \
                 WHERE delivered_at IS NULL AND dead_at IS NULL AND available_at <= ?2 \
                   AND topic IN (SELECT value FROM json_each(?4)) \
                 ORDER BY created_at, id LIMIT ?5) \
             RETURNING id, topic, payload, attempts, created_at, traceparent",
        )
        .bind(&claim)
        .bind(now)
        .bind(lease_ms)
        .bind(topic_list(topics))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        claimed_from_rows(&rows, &claim)
    }

    async fn delivered(&self, id: &str, now: i64) -> Result<bool, StorageError> {
        let done = sqlx::query(
            "UPDATE outbox SET delivered_at = ?, claim = NULL WHERE id = ? AND delivered_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn retry_at(&self, id: &str, claim: &str, at: i64) -> Result<bool, StorageError> {
        let done = sqlx::query(
            "UPDATE outbox SET available_at = ?, claim = NULL \
             WHERE id = ? AND claim = ? AND delivered_at IS NULL",
        )
        .bind(at)
        .bind(id)
        .bind(claim)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn dead(
        &self,
        id: &str,
        claim: &str,
        now: i64,
        error: &str,
    ) -> Result<bool, StorageError> {
        let done = sqlx::query(
            "UPDATE outbox SET dead_at = ?, last_error = ?, claim = NULL \
             WHERE id = ? AND claim = ? AND delivered_at IS NULL AND dead_at IS NULL",
        )
        .bind(now)
        .bind(error)
        .bind(id)
        .bind(claim)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn prune(&self, routed: &[&str], before: i64) -> Result<u64, StorageError> {
        let done = sqlx::query(
            "DELETE FROM outbox WHERE created_at < ? AND dead_at IS NULL \
             AND (delivered_at IS NOT NULL OR topic NOT IN (SELECT value FROM json_each(?)))",
        )
        .bind(before)
        .bind(topic_list(routed))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::temp_store;
    use crate::storage::{NewOrder, NewUser, OrderStore, UserStore};

    fn pen_order() -> NewOrder {
        NewOrder {
            user_id: 2,
            products: vec!["Pen".into(), "Ink".into()],
        }
    }

    #[tokio::test]
    async fn an_order_and_its_event_commit_together() {
        let (_dir, store) = temp_store("outbox-order").await;
        let order = store.create_order(&pen_order()).await.unwrap();
        let rows = store.outbox().records().await.unwrap();
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(row.topic, ORDER_CREATED);
        assert_eq!(row.delivered_at, None);
        assert_eq!(row.attempts, 0);
        let event: Event = serde_json::from_str(&row.payload).unwrap();
        assert_eq!(event.id, row.id);
        assert_eq!(event.id.len(), 32);
        assert!(event.id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(event.kind, "order.created");
        assert_eq!(
            event.data,
            json!({"orderId": order.id, "userId": 2, "products": ["Pen", "Ink"],
                   "timestamp": event.occurred_at})
        );
        let wire: Value = serde_json::from_str(&row.payload).unwrap();
        assert!(
            wire["occurredAt"].is_string() && wire["type"].is_string(),
            "{wire}"
        );
    }

    #[tokio::test]
    async fn a_failure_after_the_insert_leaves_neither_order_nor_event() {
        let (_dir, store) = temp_store("outbox-atomic").await;
        // The outbox write fails after the order row is already inserted.
        sqlx::query(
            "CREATE TRIGGER refuse_events BEFORE INSERT ON outbox \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        )
        .execute(&store.outbox().pool)
        .await
        .unwrap();
        assert!(store.create_order(&pen_order()).await.is_err());
        assert_eq!(store.order(6).await.unwrap(), None);
        assert!(store.orders_for_user(2).await.unwrap().len() == 2);
        let user = NewUser {
            name: "Ada".into(),
            email: "ada@example.org".into(),
            age: None,
        };
        assert!(store.create_user(&user).await.is_err());
        assert_eq!(store.list_users().await.unwrap().len(), 3);
        assert!(store.outbox().records().await.unwrap().is_empty());

        sqlx::query("DROP TRIGGER refuse_events")
            .execute(&store.outbox().pool)
            .await
            .unwrap();
        // Nothing half-written stood in the way: the same writes now succeed whole.
        assert_eq!(store.create_order(&pen_order()).await.unwrap().id, 6);
        let created = store.create_user(&user).await.unwrap();
        let rows = store.outbox().records().await.unwrap();
        assert_eq!(rows.len(), 2);
        let user_event = rows.iter().find(|r| r.topic == USER_CREATED).unwrap();
        let event: Event = serde_json::from_str(&user_event.payload).unwrap();
        assert_eq!(
            event.data,
            json!({"userId": created.id, "email": "ada@example.org",
                   "timestamp": event.occurred_at})
        );
    }

    #[tokio::test]
    async fn a_claim_holds_rows_for_its_lease_only() {
        let (_dir, store) = temp_store("outbox-lease").await;
        let outbox = store.outbox();
        store.create_order(&pen_order()).await.unwrap();
        store
            .create_user(&NewUser {
                name: "Ada".into(),
                email: "ada@example.org".into(),
                age: None,
            })
            .await
            .unwrap();
        let now = millis(now_millis());
        let routed = [ORDER_CREATED];

        let first = outbox.claim(&routed, now, 1000, 10).await.unwrap();
        assert_eq!(first.len(), 1, "only routed topics are claimed");
        assert_eq!(first[0].attempts, 1);
        assert!(
            outbox
                .claim(&routed, now, 1000, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            outbox
                .claim(&routed, now + 999, 1000, 10)
                .await
                .unwrap()
                .is_empty()
        );

        // The lease ran out: another claim takes the row; the old one cannot put it back.
        let second = outbox.claim(&routed, now + 1000, 1000, 10).await.unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].attempts, 2);
        assert_ne!(second[0].claim, first[0].claim);
        assert!(
            !outbox
                .retry_at(&first[0].id, &first[0].claim, now)
                .await
                .unwrap()
        );
        assert!(
            outbox
                .retry_at(&second[0].id, &second[0].claim, now + 1500)
                .await
                .unwrap()
        );
        assert!(
            outbox
                .claim(&routed, now + 1499, 1000, 10)
                .await
                .unwrap()
                .is_empty()
        );
        let third = outbox.claim(&routed, now + 1500, 1000, 10).await.unwrap();
        assert_eq!(third.len(), 1);

        assert!(outbox.delivered(&third[0].id, now + 1600).await.unwrap());
        assert!(!outbox.delivered(&third[0].id, now + 1700).await.unwrap());
        assert!(
            outbox
                .claim(&routed, now + 99_999, 1000, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn an_events_token_travels_in_a_header_and_never_shows() {
        let token = EventsToken::new("0123abcd-secret").unwrap();
        assert!(token.matches("0123abcd-secret"));
        assert!(!token.matches("0123abcd-secreT"));
        assert!(!token.matches("0123abcd-secret2"));
        assert!(!token.matches(""));
        assert_eq!(token, EventsToken::new("0123abcd-secret").unwrap());
        assert!(!format!("{token:?}").contains("secret"));
        for bad in ["", "has space", "tab\there", "é", &"x".repeat(1025)] {
            let err = EventsToken::new(bad).unwrap_err();
            assert_eq!(err.setting, "events_token");
        }
    }

    #[tokio::test]
    async fn pruning_keeps_undelivered_routed_rows() {
        let (_dir, store) = temp_store("outbox-prune").await;
        let outbox = store.outbox();
        let delivered = store.create_order(&pen_order()).await.unwrap();
        store.create_order(&pen_order()).await.unwrap();
        store
            .create_user(&NewUser {
                name: "Ada".into(),
                email: "ada@example.org".into(),
                age: None,
            })
            .await
            .unwrap();
        let now = millis(now_millis());
        let rows = outbox.records().await.unwrap();
        let first = rows
            .iter()
            .find(|r| r.payload.contains(&format!("\"orderId\":{}", delivered.id)))
            .unwrap();
        outbox.delivered(&first.id, now).await.unwrap();

        // Nothing is old enough yet.
        assert_eq!(outbox.prune(&[ORDER_CREATED], now - 1000).await.unwrap(), 0);
        // Past retention: the delivered order event and the unrouted user event go.
        assert_eq!(outbox.prune(&[ORDER_CREATED], now + 1000).await.unwrap(), 2);
        let left = outbox.records().await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].topic, ORDER_CREATED);
        assert_eq!(left[0].delivered_at, None);
    }
}
