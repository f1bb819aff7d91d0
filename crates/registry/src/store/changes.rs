//! Change notification for watchers of the instance table.
//!
//! - [`Changes`]: per service, a version that grows whenever the service's set of
//!   instances changes (a registration, a removal, an expiry; not a heartbeat that only
//!   renews), and one wake-up signal for every watcher in this process. The memory
//!   store keeps the versions here; the Redis store keeps them in Redis and only uses
//!   the signal, fed by [`listen`].
//! - [`listen`]: subscribes to the Redis store's change channel and wakes this
//!   process's watchers on each message, so a watcher on one replica hears a change
//!   made (or an expiry found) by another.
//!
//! A watcher subscribes *before* reading the version it compares against, so a change
//! between the two still wakes it.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Versions per service name and the process-wide wake-up signal.
#[derive(Debug)]
pub struct Changes {
    versions: Mutex<HashMap<String, u64>>,
    tick: watch::Sender<u64>,
}

impl Default for Changes {
    fn default() -> Self {
        Self::new()
    }
}

impl Changes {
    /// No service changed yet: every version is 0.
    pub fn new() -> Self {
        Self {
            versions: Mutex::new(HashMap::new()),
            tick: watch::Sender::new(0),
        }
    }

    /// Records a change of `name`'s instances and wakes the watchers; returns its new
    /// version.
    pub fn bump(&self, name: &str) -> u64 {
        let version = {
            // Each update leaves the map valid, so a poisoned lock still guards it.
            let mut versions = self.versions.lock().unwrap_or_else(PoisonError::into_inner);
            let version = versions.entry(name.to_owned()).or_default();
            *version += 1;
            *version
        };
        self.notify();
        version
    }

    /// `name`'s version here (0 if it never changed).
    pub fn version(&self, name: &str) -> u64 {
        self.versions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// Wakes every watcher so it re-reads the version it waits on.
    pub fn notify(&self) {
        self.tick.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees every [`Changes::notify`] after this call.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tick.subscribe()
    }
}

/// Longest pause between attempts to (re)subscribe.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Wakes `changes`' watchers on every message of `channel` in the Redis at `client`
/// until `shutdown` fires; resubscribes (with a backoff) when the connection drops, and
/// wakes everyone after each (re)subscription, since messages may have been missed.
pub async fn listen(
    client: redis::Client,
    channel: String,
    changes: std::sync::Arc<Changes>,
    shutdown: CancellationToken,
) {
    let mut pause = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            () = shutdown.cancelled() => return,
            subscribed = subscribed => subscribed,
        };
        match pubsub {
            Ok(pubsub) => {
                tracing::debug!(%channel, "listening for registry changes");
                pause = Duration::from_millis(100);
                changes.notify();
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        message = messages.next() => match message {
                            Some(_) => changes.notify(),
                            None => break,
                        },
                    }
                }
                tracing::warn!(%channel, "registry change channel closed; resubscribing");
            }
            Err(error) => {
                tracing::warn!(%channel, %error, retry_in = ?pause, "cannot listen for registry changes");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_RETRY);
    }
}
