//! The users and orders services of Breakwater.
//!
//! - [`storage`]: the [`storage::UserStore`] and [`storage::OrderStore`] traits and
//!   [`storage::SqliteStore`], one SQLite file shared by every instance on a machine.
//! - [`users`]: the users service ("user-service"), `app(UsersState) -> Router`.
//! - [`orders`]: the orders service ("order-service"), `app(OrdersState) -> Router`; it
//!   checks users through discovery before writing an order.
//! - [`run`]: one instance as a process part (storage, serving, registration, shutdown),
//!   configured by [`ServiceKind`] and [`ServiceConfig`].

mod errors;
#[cfg(test)]
mod fixtures;
mod id;
pub mod orders;
mod service;
pub mod storage;
mod user_lookup;
pub mod users;

pub use service::{
    DATABASE_FILE, ServiceConfig, ServiceError, ServiceKind, UnknownServiceKind, run,
};
