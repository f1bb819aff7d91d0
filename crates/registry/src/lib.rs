//! The Breakwater service registry: where every instance registers, heartbeats and
//! deregisters, and where the gateway and services discover each other.
//!
//! - [`wire`]: the JSON shapes of the registry API, shared by server and client.
//! - [`client`]: [`client::RegistryClient`] for single calls,
//!   [`client::spawn_registration`] to keep an instance registered, and
//!   [`client::Discovery`] to resolve names through a fresh/stale cache.
//! - [`name`]: [`name::ServiceName`], the validated service name.
//! - [`store`]: the instance table behind [`store::InstanceStore`]: in memory with exact
//!   expiry deadlines, or in Redis (leases as expiring keys) so replicas share it.
//! - [`server`]: the registry's HTTP API (`app`), its expiry reaper, and `run` /
//!   `run_with` (memory or Redis store).

pub mod client;
pub mod name;
pub mod server;
pub mod store;
pub mod wire;
