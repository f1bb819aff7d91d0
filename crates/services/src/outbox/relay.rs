//! The relay: a background task in each users and orders instance that moves outbox
//! rows to their subscribers.
//!
//! Each pass claims available rows of routed topics under a lease (so relays sharing
//! the database never deliver one row concurrently), delivers them in parallel through
//! a [`Transport`], marks each delivered on success, and on failure makes it available
//! again after a full-jitter [`Backoff`] counted from its attempts, unless the failure
//! is permanent ([`DeliveryError::is_permanent`]: the consumer answered a 4xx other than
//! 408, 425 and 429, so it will never accept the event): then the row is marked dead
//! with the consumer's answer, logged once, counted in [`RelayStats`] and never claimed
//! again. A relay that dies
//! mid-delivery loses nothing: its lease runs out and another relay claims the row.
//! So delivery is at least once, in no promised order; consumers deduplicate by event
//! id. Every relay on a database file delivers every routed topic in it (users and
//! orders share one file, so a users instance may deliver an `order.created`).
//!
//! [`Transport`] is the seam for the broker: [`HttpTransport`] POSTs to `/events` of a
//! subscriber instance found through discovery (with the row's `traceparent` header,
//! and `Authorization: Bearer` with the [`EventsToken`] when it has one);
//! [`super::stream::StreamTransport`] appends to a Redis stream when Redis is
//! configured.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use breakwater_registry::client::Discovery;
use breakwater_resilience::retry::Backoff;
use breakwater_runtime::CancellationToken;
use breakwater_runtime::clock::now_millis;
use breakwater_runtime::observe::TRACEPARENT;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;

use super::{Claimed, EventsToken, ORDER_CREATED, OutboxStore, millis};
use crate::analytics;
use crate::settings::{InvalidSetting, check_duration};
use crate::storage::StorageError;

/// Which service consumes which topic. Static: a topic is routed when the code that
/// consumes it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routes(&'static [(&'static str, &'static str)]);

impl Routes {
    /// The system's table: `order.created` → "analytics-service". `user.created` has
    /// no consumer yet, so it stays in the outbox until pruned.
    pub const SYSTEM: Self = Self(&[(ORDER_CREATED, analytics::SERVICE_NAME)]);

    /// A table of `(topic, subscriber service)` pairs.
    pub const fn new(routes: &'static [(&'static str, &'static str)]) -> Self {
        Self(routes)
    }

    /// The service consuming `topic`, if any.
    pub fn subscriber(&self, topic: &str) -> Option<&'static str> {
        self.0.iter().find(|(t, _)| *t == topic).map(|(_, s)| *s)
    }

    /// Every routed topic.
    pub fn topics(&self) -> Vec<&'static str> {
        self.0.iter().map(|(t, _)| *t).collect()
    }
}

/// Most of a refusing consumer's answer kept for the log and the row's `last_error`.
const MAX_ERROR_BODY: usize = 512;

/// Why one delivery failed: the row is retried later, or, when
/// [`DeliveryError::is_permanent`], marked dead.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// No instance of the subscriber could be found.
    #[error("no instance of {service} to deliver to: {reason}")]
    NoSubscriber {
        /// The subscriber service.
        service: String,
        /// What discovery said.
        reason: String,
    },
    /// No answer: refused, reset, timed out.
    #[error("delivery to {url} failed: {reason}")]
    Transport {
        /// Where it was sent.
        url: String,
        /// What the client said.
        reason: String,
    },
    /// The subscriber answered with a non-2xx status.
    #[error("{url} answered {status}: {body}")]
    Rejected {
        /// Where it was sent.
        url: String,
        /// The status.
        status: u16,
        /// The start of its answer (at most 512 bytes), for the log and the row.
        body: String,
    },
}

impl DeliveryError {
    /// Whether the consumer will never accept this event: a 4xx other than 408
    /// (timeout), 425 (too early) and 429 (too many requests), which say "later".
    /// 5xx, no answer and no instance are transient.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Rejected { status, .. } => {
                (400..500).contains(status) && !matches!(status, 408 | 425 | 429)
            }
            Self::NoSubscriber { .. } | Self::Transport { .. } => false,
        }
    }
}

/// Hands one event to one subscriber service. Success means the subscriber has it
/// (durably, deduplicated by event id); the relay then marks the row delivered.
pub trait Transport: Send + Sync + 'static {
    /// Delivers `event` (its JSON is `event.payload`) to `subscriber`. No timeout of
    /// its own: the relay bounds each delivery.
    fn deliver(
        &self,
        subscriber: &str,
        event: &Claimed,
    ) -> impl Future<Output = Result<(), DeliveryError>> + Send;
}

/// [`Transport`] over HTTP: `POST /events` to a random live instance of the
/// subscriber (so a retry may reach another one), with the event's `traceparent` and,
/// when set, the events token.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    discovery: Discovery,
    http: reqwest::Client,
    token: Option<EventsToken>,
}

impl HttpTransport {
    /// Finds subscribers through `discovery`, calls them through `http` (shared, pooled).
    pub fn new(discovery: Discovery, http: reqwest::Client) -> Self {
        Self {
            discovery,
            http,
            token: None,
        }
    }

    /// Sends `Authorization: Bearer <token>` with every event when `token` is set.
    #[must_use]
    pub fn with_token(mut self, token: Option<EventsToken>) -> Self {
        self.token = token;
        self
    }
}

/// The first [`MAX_ERROR_BODY`] bytes of `response`'s body, read no further, as text.
async fn body_start(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < MAX_ERROR_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    bytes.truncate(MAX_ERROR_BODY);
    // A cut inside a UTF-8 sequence becomes one replacement character.
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Transport for HttpTransport {
    async fn deliver(&self, subscriber: &str, event: &Claimed) -> Result<(), DeliveryError> {
        let no_subscriber = |reason: String| DeliveryError::NoSubscriber {
            service: subscriber.to_owned(),
            reason,
        };
        let instances = self
            .discovery
            .resolve(subscriber)
            .await
            .map_err(|e| no_subscriber(e.to_string()))?;
        if instances.is_empty() {
            return Err(no_subscriber("none registered".to_owned()));
        }
        let instance = &instances[rand::random_range(0..instances.len())];
        let url = format!("{}/events", instance.base_url());
        let mut request = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(event.payload.clone());
        if let Some(traceparent) = &event.traceparent {
            request = request.header(TRACEPARENT, traceparent);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.expose());
        }
        let response = request.send().await.map_err(|e| DeliveryError::Transport {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Rejected {
                url,
                status: status.as_u16(),
                body: body_start(response).await,
            })
        }
    }
}

/// How a relay polls, leases, retries and prunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelaySettings {
    /// Pause after a pass that found nothing to deliver. 1 ms..=60 s; default 500 ms.
    pub poll_interval: Duration,
    /// How long a claim holds its rows; longer than `delivery_timeout`. Default 30 s.
    pub lease: Duration,
    /// Deadline of one delivery. 1 ms..=60 s; default 5 s.
    pub delivery_timeout: Duration,
    /// Delay before retrying a failed row: full jitter, `base * 2^(attempts - 1)`
    /// capped at `max`. Default 200 ms .. 30 s.
    pub backoff: Backoff,
    /// Age after which delivered and unrouted rows are deleted. Default 7 days.
    pub retention: Duration,
    /// Rows claimed per pass, 1..=1000. Default 32.
    pub batch: u32,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            lease: Duration::from_secs(30),
            delivery_timeout: Duration::from_secs(5),
            backoff: Backoff {
                base: Duration::from_millis(200),
                max: Duration::from_secs(30),
            },
            retention: Duration::from_secs(7 * 24 * 3600),
            batch: 32,
        }
    }
}

impl RelaySettings {
    /// Checks every value; the error names the setting (`outbox_*`).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let ms = Duration::from_millis(1);
        let minute = Duration::from_secs(60);
        let year = Duration::from_secs(365 * 24 * 3600);
        check_duration("outbox_poll_interval", self.poll_interval, ms, minute)?;
        check_duration("outbox_delivery_timeout", self.delivery_timeout, ms, minute)?;
        check_duration("outbox_lease", self.lease, ms, Duration::from_secs(3600))?;
        if self.lease <= self.delivery_timeout {
            return Err(InvalidSetting::new(
                "outbox_lease",
                format!(
                    "{:?} must be longer than outbox_delivery_timeout ({:?}), or a slow \
                     delivery could be sent twice at once",
                    self.lease, self.delivery_timeout
                ),
            ));
        }
        check_duration(
            "outbox_backoff_base",
            self.backoff.base,
            ms,
            self.backoff.max,
        )?;
        check_duration(
            "outbox_backoff_max",
            self.backoff.max,
            ms,
            Duration::from_secs(3600),
        )?;
        check_duration(
            "outbox_retention",
            self.retention,
            Duration::from_secs(1),
            year,
        )?;
        if !(1..=1000).contains(&self.batch) {
            return Err(InvalidSetting::new(
                "outbox_batch",
                format!("{} is outside 1..=1000", self.batch),
            ));
        }
        Ok(())
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows delivered and marked.
    pub delivered: usize,
    /// Rows that failed and were put back for later.
    pub failed: usize,
    /// Rows the consumer refused for good, marked dead.
    pub dead: usize,
}

/// What a relay did so far; shown on the service's `GET /metrics`
/// ([`RelayStats::register`]).
#[derive(Debug, Default)]
pub struct RelayStats {
    delivered: Counter,
    retried: Counter,
    dead: Counter,
}

impl RelayStats {
    /// Events delivered.
    pub fn delivered(&self) -> u64 {
        self.delivered.get()
    }
    /// Failed deliveries put back for a retry.
    pub fn retried(&self) -> u64 {
        self.retried.get()
    }
    /// Events the consumer refused for good, marked dead.
    pub fn dead(&self) -> u64 {
        self.dead.get()
    }

    /// Adds the counters to `registry` as `breakwater_outbox_*_total`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("breakwater_outbox");
        sub.register(
            "delivered",
            "Outbox events delivered to their consumer",
            self.delivered.clone(),
        );
        sub.register(
            "retried",
            "Outbox deliveries that failed and were put back for a retry",
            self.retried.clone(),
        );
        sub.register(
            "dead",
            "Outbox events their consumer refused for good (a permanent 4xx), kept as dead rows",
            self.dead.clone(),
        );
    }
}

/// How one claimed row ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Delivered,
    Retry,
    Dead,
}

/// How often a relay deletes old rows.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Moves outbox rows to their subscribers; see the module docs.
#[derive(Debug)]
pub struct Relay<O, T> {
    outbox: O,
    transport: Arc<T>,
    routes: Routes,
    settings: RelaySettings,
    instance: String,
    stats: Arc<RelayStats>,
}

impl<O, T> Relay<O, T>
where
    O: OutboxStore + Clone + 'static,
    T: Transport,
{
    /// A relay over `outbox` sending through `transport` as `routes` say; `instance`
    /// names it in logs.
    pub fn new(
        outbox: O,
        transport: T,
        routes: Routes,
        settings: RelaySettings,
        instance: impl Into<String>,
    ) -> Self {
        Self {
            outbox,
            transport: Arc::new(transport),
            routes,
            settings,
            instance: instance.into(),
            stats: Arc::new(RelayStats::default()),
        }
    }

    /// Its counters, for `GET /metrics`.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// Runs passes until `shutdown` fires, pruning at start and hourly. A pass cut
    /// short by shutdown leaves its rows leased; they are claimable again when the
    /// lease ends.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut next_prune = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_prune {
                self.prune().await;
                next_prune = tokio::time::Instant::now() + PRUNE_EVERY;
            }
            let pass = tokio::select! {
                () = shutdown.cancelled() => return,
                pass = self.pass() => pass,
            };
            let idle = match pass {
                Ok(report) => report.claimed == 0,
                Err(error) => {
                    tracing::warn!(instance = %self.instance, %error, "outbox pass failed");
                    true
                }
            };
            if idle {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(self.settings.poll_interval) => {}
                }
            }
        }
    }

    /// Claims one batch and delivers it, in parallel; returns what happened.
    pub async fn pass(&self) -> Result<PassReport, StorageError> {
        let topics = self.routes.topics();
        let lease = millis(u64::try_from(self.settings.lease.as_millis()).unwrap_or(u64::MAX));
        let claimed = self
            .outbox
            .claim(&topics, millis(now_millis()), lease, self.settings.batch)
            .await?;
        let mut report = PassReport {
            claimed: claimed.len(),
            ..PassReport::default()
        };
        let mut deliveries = JoinSet::new();
        for row in claimed {
            let outbox = self.outbox.clone();
            let transport = Arc::clone(&self.transport);
            let subscriber = self.routes.subscriber(&row.topic);
            let settings = self.settings;
            let instance = self.instance.clone();
            let stats = Arc::clone(&self.stats);
            deliveries.spawn(async move {
                let outcome =
                    deliver_one(&outbox, &*transport, subscriber, row, settings, &instance).await;
                let counter = match outcome {
                    Ok(Outcome::Delivered) => Some(&stats.delivered),
                    Ok(Outcome::Retry) => Some(&stats.retried),
                    Ok(Outcome::Dead) => Some(&stats.dead),
                    Err(_) => None,
                };
                if let Some(counter) = counter {
                    counter.inc();
                }
                outcome
            });
        }
        while let Some(done) = deliveries.join_next().await {
            match done {
                Ok(Ok(Outcome::Delivered)) => report.delivered += 1,
                Ok(Ok(Outcome::Retry)) => report.failed += 1,
                Ok(Ok(Outcome::Dead)) => report.dead += 1,
                Ok(Err(error)) => {
                    report.failed += 1;
                    tracing::warn!(instance = %self.instance, %error, "outbox update failed");
                }
                Err(error) => {
                    report.failed += 1;
                    tracing::error!(instance = %self.instance, %error, "delivery task failed");
                }
            }
        }
        Ok(report)
    }

    async fn prune(&self) {
        let retention = u64::try_from(self.settings.retention.as_millis()).unwrap_or(u64::MAX);
        let before = millis(now_millis().saturating_sub(retention));
        match self.outbox.prune(&self.routes.topics(), before).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(instance = %self.instance, pruned, "outbox pruned"),
            Err(error) => tracing::warn!(instance = %self.instance, %error, "outbox prune failed"),
        }
    }
}

/// Delivers one claimed row and records the outcome.
async fn deliver_one<O: OutboxStore, T: Transport>(
    outbox: &O,
    transport: &T,
    subscriber: Option<&'static str>,
    row: Claimed,
    settings: RelaySettings,
    instance: &str,
) -> Result<Outcome, StorageError> {
    let outcome = match subscriber {
        Some(service) => {
            match tokio::time::timeout(settings.delivery_timeout, transport.deliver(service, &row))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(DeliveryError::Transport {
                    url: service.to_owned(),
                    reason: format!("timed out after {:?}", settings.delivery_timeout),
                }),
            }
        }
        // Claims only take routed topics; a row whose route vanished waits for pruning.
        None => Err(DeliveryError::NoSubscriber {
            service: String::new(),
            reason: format!("topic {} has no subscriber", row.topic),
        }),
    };
    match outcome {
        Ok(()) => {
            outbox.delivered(&row.id, millis(now_millis())).await?;
            tracing::debug!(instance, event = %row.id, topic = %row.topic, "event delivered");
            Ok(Outcome::Delivered)
        }
        Err(error) if error.is_permanent() => {
            let marked = outbox
                .dead(
                    &row.id,
                    &row.claim,
                    millis(now_millis()),
                    &error.to_string(),
                )
                .await?;
            if !marked {
                // The lease ran out meanwhile and another relay holds the row now; it
                // will meet the same answer and mark it.
                return Ok(Outcome::Retry);
            }
            let (status, body) = match &error {
                DeliveryError::Rejected { status, body, .. } => (*status, body.as_str()),
                _ => (0, ""),
            };
            tracing::warn!(
                instance,
                event = %row.id,
                topic = %row.topic,
                attempts = row.attempts,
                status,
                body,
                "consumer refused the event for good; marked dead, not retried"
            );
            Ok(Outcome::Dead)
        }
        Err(error) => {
            let delay = settings
                .backoff
                .delay(row.attempts.saturating_sub(1), &mut rand::rng());
            let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            let at = millis(now_millis().saturating_add(delay_ms));
            outbox.retry_at(&row.id, &row.claim, at).await?;
            tracing::warn!(
                instance,
                event = %row.id,
                topic = %row.topic,
                attempts = row.attempts,
                retry_in = ?delay,
                %error,
                "event delivery failed; will retry"
            );
            Ok(Outcome::Retry)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use axum::Router;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;
    use breakwater_registry::client::{CachePolicy, RegistryClient};
    use serde_json::Value;

    use super::*;
    use crate::fixtures::{FakeRegistry, TempDir, instance, spawn_server};
    use crate::outbox::{OutboxRecord, SqliteOutbox};
    use crate::storage::{NewOrder, OrderStore, SqliteStore};

    /// What the fake consumer saw: POSTs per event id, and how many to refuse first
    /// (with `refuse_with`, 503 unless set).
    #[derive(Debug, Default)]
    pub(crate) struct Seen {
        pub(crate) posts: HashMap<String, usize>,
        refuse: usize,
        refuse_with: Option<StatusCode>,
        /// The `traceparent` header of each event's last POST.
        traces: HashMap<String, Option<String>>,
        /// The `authorization` header of each event's last POST.
        auth: HashMap<String, Option<String>>,
    }

    pub(crate) type Consumer = Arc<Mutex<Seen>>;

    async fn consume(
        State(seen): State<Consumer>,
        headers: axum::http::HeaderMap,
        body: String,
    ) -> (StatusCode, String) {
        let event: Value = serde_json::from_str(&body).unwrap();
        let id = event["id"].as_str().unwrap().to_owned();
        let mut seen = seen.lock().unwrap();
        let trace = headers
            .get("traceparent")
            .map(|v| v.to_str().unwrap().to_owned());
        seen.traces.insert(id.clone(), trace);
        let auth = headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        seen.auth.insert(id.clone(), auth);
        *seen.posts.entry(id).or_default() += 1;
        if seen.refuse > 0 {
            seen.refuse -= 1;
            let status = seen.refuse_with.unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            (
                status,
                format!("{{\"error\":\"refused with {}\"}}", status.as_u16()),
            )
        } else {
            (StatusCode::OK, String::new())
        }
    }

    /// A consumer registered as "analytics-service" in a fake registry; returns it and
    /// a transport that finds it.
    async fn consumer(refuse: usize) -> (Consumer, HttpTransport) {
        refusing_consumer(refuse, StatusCode::SERVICE_UNAVAILABLE).await
    }

    /// [`consumer`] answering its first `refuse` POSTs with `status`.
    pub(crate) async fn refusing_consumer(
        refuse: usize,
        status: StatusCode,
    ) -> (Consumer, HttpTransport) {
        let seen: Consumer = Arc::new(Mutex::new(Seen {
            refuse,
            refuse_with: Some(status),
            ..Seen::default()
        }));
        let router = Router::new()
            .route("/events", post(consume))
            .with_state(Arc::clone(&seen));
        let addr = spawn_server(router).await;
        let (registry, _events) = FakeRegistry::start(vec![instance(
            analytics::SERVICE_NAME,
            "127.0.0.1",
            addr.port(),
        )])
        .await;
        let discovery = Discovery::new(RegistryClient::new(registry), CachePolicy::default());
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        (seen, HttpTransport::new(discovery, http))
    }

    pub(crate) fn quick() -> RelaySettings {
        RelaySettings {
            poll_interval: Duration::from_millis(5),
            backoff: Backoff {
                base: Duration::from_millis(10),
                max: Duration::from_millis(50),
            },
            batch: 4,
            ..RelaySettings::default()
        }
    }

    async fn create_orders(store: &SqliteStore, n: usize) {
        for i in 0..n {
            store
                .create_order(&NewOrder {
                    user_id: 1,
                    products: vec![format!("p{i}")],
                })
                .await
                .unwrap();
        }
    }

    /// Waits (up to 5 s) until every row is delivered; returns the rows.
    async fn all_delivered(outbox: &SqliteOutbox) -> Vec<OutboxRecord> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let rows = outbox.records().await.unwrap();
            if rows.iter().all(|r| r.delivered_at.is_some()) {
                return rows;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "undelivered: {rows:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn two_relays_on_one_file_deliver_each_event_once() {
        let dir = TempDir::new("two-relays");
        // Two stores (two pools) on one file, as two processes would have.
        let a = SqliteStore::open(&dir.db()).await.unwrap();
        let b = SqliteStore::open(&dir.db()).await.unwrap();
        create_orders(&a, 20).await;
        let (seen, transport) = consumer(0).await;
        let stop = CancellationToken::new();
        let relays = [&a, &b].map(|store| {
            let relay = Relay::new(
                store.outbox(),
                transport.clone(),
                Routes::SYSTEM,
                quick(),
                "relay",
            );
            tokio::spawn(relay.run(stop.clone()))
        });
        let rows = all_delivered(&a.outbox()).await;
        stop.cancel();
        for relay in relays {
            relay.await.unwrap();
        }
        assert_eq!(rows.len(), 20);
        let posts = seen.lock().unwrap().posts.clone();
        assert_eq!(posts.len(), 20);
        for row in &rows {
            assert_eq!(posts.get(&row.id), Some(&1), "event {}", row.id);
            assert_eq!(row.attempts, 1);
        }
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    async fn refused_deliveries_are_retried_until_accepted() {
        let dir = TempDir::new("relay-retry");
        let store = SqliteStore::open(&dir.db()).await.unwrap();
        create_orders(&store, 1).await;
        let (seen, transport) = consumer(2).await;
        let relay = Relay::new(store.outbox(), transport, Routes::SYSTEM, quick(), "relay");
        let stop = CancellationToken::new();
        let task = tokio::spawn(relay.run(stop.clone()));
        let rows = all_delivered(&store.outbox()).await;
        stop.cancel();
        task.await.unwrap();
        assert_eq!(rows[0].attempts, 3);
        assert_eq!(seen.lock().unwrap().posts.get(&rows[0].id), Some(&3));
        store.close().await;
    }

    #[tokio::test]
    async fn an_event_is_posted_with_the_traceparent_of_its_request() {
        let dir = TempDir::new("relay-trace");
        let store = SqliteStore::open(&dir.db()).await.unwrap();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let order = NewOrder {
            user_id: 1,
            products: vec!["Pen".into()],
        };
        crate::outbox::with_traceparent(Some(parent.into()), store.create_order(&order))
            .await
            .unwrap();
        create_orders(&store, 1).await;
        let (seen, transport) = consumer(0).await;
        let relay = Relay::new(store.outbox(), transport, Routes::SYSTEM, quick(), "relay");
        assert_eq!(relay.pass().await.unwrap().delivered, 2);
        let mut traces: Vec<_> = seen.lock().unwrap().traces.values().cloned().collect();
        traces.sort();
        assert_eq!(traces, [None, Some(parent.to_owned())]);
        store.close().await;
    }

    #[tokio::test]
    async fn a_permanent_refusal_marks_the_row_dead_after_one_try() {
        let dir = TempDir::new("relay-dead");
        let store = SqliteStore::open(&dir.db()).await.unwrap();
        create_orders(&store, 1).await;
        let (seen, transport) = refusing_consumer(usize::MAX, StatusCode::BAD_REQUEST).await;
        let relay = Relay::new(store.outbox(), transport, Routes::SYSTEM, quick(), "relay");
        let stats = relay.stats();
        let report = relay.pass().await.unwrap();
        assert_eq!(
            report,
            PassReport {
                claimed: 1,
                dead: 1,
                ..PassReport::default()
            }
        );
        let rows = store.outbox().records().await.unwrap();
        let row = &rows[0];
        assert!(row.dead_at.is_some(), "{row:?}");
        assert_eq!(row.delivered_at, None);
        let error = row.last_error.as_deref().unwrap();
        assert!(
            error.contains("answered 400") && error.contains("refused with 400"),
            "{error}"
        );
        // Never claimed again, not even long after any backoff or lease.
        let later = millis(now_millis()) + 3_600_000;
        assert!(
            store
                .outbox()
                .claim(&["order.created"], later, 1000, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(relay.pass().await.unwrap(), PassReport::default());
        assert_eq!(seen.lock().unwrap().posts.get(&row.id), Some(&1));
        assert_eq!(
            (stats.dead(), stats.retried(), stats.delivered()),
            (1, 0, 0)
        );
        // Kept past retention, unlike delivered rows.
        assert_eq!(
            store
                .outbox()
                .prune(&["order.created"], later)
                .await
                .unwrap(),
            0
        );
        let mut registry = Registry::default();
        stats.register(&mut registry);
        let mut page = String::new();
        prometheus_client::encoding::text::encode(&mut page, &registry).unwrap();
        assert!(page.contains("breakwater_outbox_dead_total 1"), "{page}");
        store.close().await;
    }

    #[tokio::test]
    async fn transient_refusals_leave_the_row_for_a_retry() {
        for status in [
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::REQUEST_TIMEOUT,
        ] {
            let dir = TempDir::new("relay-transient");
            let store = SqliteStore::open(&dir.db()).await.unwrap();
            create_orders(&store, 1).await;
            let (_seen, transport) = refusing_consumer(1, status).await;
            let relay = Relay::new(store.outbox(), transport, Routes::SYSTEM, quick(), "relay");
            let report = relay.pass().await.unwrap();
            assert_eq!((report.failed, report.dead), (1, 0), "{status}");
            let row = store.outbox().records().await.unwrap().remove(0);
            assert_eq!((row.dead_at, row.delivered_at), (None, None), "{status}");
            assert_eq!(relay.stats().retried(), 1);
            let rows = all_delivered_by(&relay, &store.outbox()).await;
            assert_eq!(rows[0].attempts, 2, "{status}");
            store.close().await;
        }
    }

    #[test]
    fn only_4xx_that_do_not_say_later_are_permanent() {
        let rejected = |status| DeliveryError::Rejected {
            url: "u".into(),
            status,
            body: String::new(),
        };
        for status in [400, 401, 403, 404, 410, 413, 422] {
            assert!(rejected(status).is_permanent(), "{status}");
        }
        for status in [408, 425, 429, 500, 502, 503, 504, 302] {
            assert!(!rejected(status).is_permanent(), "{status}");
        }
        let no_answer = DeliveryError::Transport {
            url: "u".into(),
            reason: "refused".into(),
        };
        assert!(!no_answer.is_permanent());
    }

    #[tokio::test]
    async fn the_events_token_is_sent_as_a_bearer_header() {
        let dir = TempDir::new("relay-token");
        let store = SqliteStore::open(&dir.db()).await.unwrap();
        create_orders(&store, 1).await;
        let (seen, transport) = consumer(0).await;
        let token = EventsToken::new("s3cret-token").unwrap();
        let relay = Relay::new(
            store.outbox(),
            transport.clone().with_token(Some(token)),
            Routes::SYSTEM,
            quick(),
            "relay",
        );
        assert_eq!(relay.pass().await.unwrap().delivered, 1);
        create_orders(&store, 1).await;
        let without = Relay::new(store.outbox(), transport, Routes::SYSTEM, quick(), "relay");
        assert_eq!(without.pass().await.unwrap().delivered, 1);
        let mut auth: Vec<_> = seen.lock().unwrap().auth.values().cloned().collect();
        auth.sort();
        assert_eq!(auth, [None, Some("Bearer s3cret-token".to_owned())]);
        store.close().await;
    }

    /// Runs passes of `relay` (up to 5 s) until every row is delivered.
    async fn all_delivered_by<T: Transport>(
        relay: &Relay<SqliteOutbox, T>,
        outbox: &SqliteOutbox,
    ) -> Vec<OutboxRecord> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            relay.pass().await.unwrap();
            let rows = outbox.records().await.unwrap();
            if rows.iter().all(|r| r.delivered_at.is_some()) {
                return rows;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "undelivered: {rows:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn unrouted_topics_are_never_sent() {
        let dir = TempDir::new("relay-unrouted");
        let store = SqliteStore::open(&dir.db()).await.unwrap();
        create_orders(&store, 1).await;
        let (seen, transport) = consumer(0).await;
        let relay = Relay::new(
            store.outbox(),
            transport,
            Routes::new(&[("user.created", "analytics-service")]),
            quick(),
            "relay",
        );
        let report = relay.pass().await.unwrap();
        assert_eq!(report, PassReport::default());
        assert!(seen.lock().unwrap().posts.is_empty());
        store.close().await;
    }

    #[test]
    fn routes_and_settings() {
        assert_eq!(
            Routes::SYSTEM.subscriber("order.created"),
            Some("analytics-service")
        );
        assert_eq!(Routes::SYSTEM.subscriber("user.created"), None);
        assert!(RelaySettings::default().validate().is_ok());
        let short_lease = RelaySettings {
            lease: Duration::from_secs(5),
            ..RelaySettings::default()
        };
        assert_eq!(short_lease.validate().unwrap_err().setting, "outbox_lease");
        let no_batch = RelaySettings {
            batch: 0,
            ..RelaySettings::default()
        };
        assert_eq!(no_batch.validate().unwrap_err().setting, "outbox_batch");
    }
}
