//! The services of Breakwater: users, orders, analytics, data and unstable.
//!
//! - [`users`]: the users service ("user-service"), `app(UsersState) -> Router`.
//! - [`orders`]: the orders service ("order-service"), `app(OrdersState) -> Router`; it
//!   checks users through discovery before writing an order.
//! - [`analytics`]: the analytics service ("analytics-service"): rate-limited metric
//!   ingestion into [`analytics::MetricStore`], cached summaries through
//!   [`analytics::SummaryCache`], and the external call behind a circuit breaker.
//! - [`data`]: the data service ("data-service"): retried calls to the dependency with a
//!   fallback, stored in the sharded [`data::DataStore`].
//! - [`unstable`]: the fault-injecting dependency ("unstable-service") and its
//!   CPU-bound stress endpoint.
//! - [`outbox`]: events between services: the transactional outbox beside users and
//!   orders, and the relay that delivers it at least once (analytics consumes
//!   `order.created` exactly once by event id).
//! - [`upstream`]: the dependency as analytics and data call it ([`upstream::Upstream`]).
//! - [`storage`]: the [`storage::UserStore`] and [`storage::OrderStore`] traits and
//!   [`storage::SqliteStore`], one SQLite file shared by every instance on a machine, or
//!   [`storage::PgStore`] on PostgreSQL when `DATABASE_URL` is set (both behind
//!   [`storage::SharedStore`]); also [`storage::StorageError`], shared by every store.
//! - [`settings`]: [`InvalidSetting`], the error a bad setting gives.
//! - [`run`]: one instance as a process part (settings, storage, serving, registration,
//!   shutdown), configured by [`ServiceKind`] and [`ServiceConfig`].

pub mod analytics;
pub mod data;
mod database;
mod errors;
#[cfg(test)]
mod fixtures;
mod id;
pub mod orders;
pub mod outbox;
#[cfg(test)]
mod redis_fixtures;
mod service;
pub mod settings;
pub mod storage;
pub mod unstable;
pub mod upstream;
mod user_lookup;
pub mod users;

pub use service::{
    DATA_SHARD_DIR, DATABASE_FILE, EventSettings, ServiceConfig, ServiceError, ServiceKind,
    ServiceOptions, UnknownServiceKind, run,
};
pub use settings::InvalidSetting;
