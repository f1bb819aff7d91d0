//! The relay: a background task in each users and orders instance that moves outbox
//! rows to their subscribers.
//!
//! Each pass claims available rows of routed topics under a lease (so relays sharing
//! the database never deliver one row concurrently), delivers them in parallel through
//! a [`Transport`], marks each delivered on success, and on failure makes it available
//! again after a full-jitter [`Backoff`] counted from its attempts. A relay that dies
//! mid-delivery loses nothing: its lease runs out and another relay claims the row.
//! So delivery is at least once, in no promised order; consumers deduplicate by event
//! id. Every relay on a database file delivers every routed topic in it (users and
//! orders share one file, so a users instance may deliver an `order.created`).
//!
//! [`Transport`] is the seam for the broker: [`HttpTransport`] POSTs to `/events` of a
//! subscriber instance found through discovery (with the row's `traceparent` header);
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
use tokio::task::JoinSet;

use super::{Claimed, ORDER_CREATED, OutboxStore, millis};
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

/// Why one delivery failed; the row is retried later.
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
    #[error("{url} answered {status}")]
    Rejected {
        /// Where it was sent.
        url: String,
        /// The status.
        status: u16,
    },
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
/// subscriber (so a retry may reach another one), with the event's `traceparent`.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    discovery: Discovery,
    http: reqwest::Client,
}

impl HttpTransport {
    /// Finds subscribers through `discovery`, calls them through `http` (shared, pooled).
    pub fn new(discovery: Discovery, http: reqwest::Client) -> Self {
        Self { discovery, http }
    }
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
        }
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
            deliveries.spawn(async move {
                deliver_one(&outbox, &*transport, subscriber, row, settings, &instance).await
            });
        }
        while let Some(done) = deliveries.join_next().await {
            match done {
                Ok(Ok(true)) => report.delivered += 1,
                Ok(Ok(false)) => report.failed += 1,
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

/// Delivers one claimed row and records the outcome; true when delivered.
async fn deliver_one<O: OutboxStore, T: Transport>(
    outbox: &O,
    transport: &T,
    subscriber: Option<&'static str>,
    row: Claimed,
    settings: RelaySettings,
    instance: &str,
) -> Result<bool, StorageError> {
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
            Ok(true)
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
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
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

    /// What the fake consumer saw: POSTs per event id, and how many to refuse first.
    #[derive(Debug, Default)]
    struct Seen {
        posts: HashMap<String, usize>,
        refuse: usize,
        /// The `traceparent` header of each event's last POST.
        traces: HashMap<String, Option<String>>,
    }

    type Consumer = Arc<Mutex<Seen>>;

    async fn consume(
        State(seen): State<Consumer>,
        headers: axum::http::HeaderMap,
        body: String,
    ) -> StatusCode {
        let event: Value = serde_json::from_str(&body).unwrap();
        let id = event["id"].as_str().unwrap().to_owned();
        let mut seen = seen.lock().unwrap();
        let trace = headers
            .get("traceparent")
            .map(|v| v.to_str().unwrap().to_owned());
        seen.traces.insert(id.clone(), trace);
        *seen.posts.entry(id).or_default() += 1;
        if seen.refuse > 0 {
            seen.refuse -= 1;
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        }
    }

    /// A consumer registered as "analytics-service" in a fake registry; returns it and
    /// a transport that finds it.
    async fn consumer(refuse: usize) -> (Consumer, HttpTransport) {
        let seen: Consumer = Arc::new(Mutex::new(Seen {
            refuse,
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

    fn quick() -> RelaySettings {
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
