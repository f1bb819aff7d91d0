//! Keeping one instance registered: register (with backoff while the registry is
//! down), heartbeat on its interval, register again when the registry forgot the
//! instance, and deregister on shutdown.

use std::time::Duration;

use rand::Rng;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::RegistryClient;
use crate::wire::RegisterRequest;

/// First retry delay after a failed call.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest retry delay.
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How long shutdown waits for the deregistration.
const DEREGISTER_BOUND: Duration = Duration::from_secs(1);

/// Keeps one instance registered until `shutdown` fires: registers (retrying with
/// backoff while the registry is down), heartbeats every heartbeatInterval (a
/// heartbeat re-registers an instance the registry forgot, e.g. after its restart;
/// if the registry answers 404 the task registers again), and on shutdown
/// deregisters (best effort, bounded by a short timeout) before the task ends.
pub fn spawn_registration(
    client: RegistryClient,
    req: RegisterRequest,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut host = req.host.clone();
        keep_registered(&client, &req, &mut host, &shutdown).await;
        deregister(&client, &req, host.as_deref()).await;
    })
}

/// Exponential backoff with jitter: each delay is drawn from the upper half of the
/// current step, so that instances restarted together do not retry in lockstep while
/// the wait still grows.
#[derive(Debug)]
struct Backoff {
    step: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            step: BACKOFF_START,
        }
    }

    fn reset(&mut self) {
        self.step = BACKOFF_START;
    }

    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(BACKOFF_CAP);
        let half = step / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

/// Whether the registry is answering, so that each change is logged once rather than
/// every failed try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Unknown,
    Up,
    Down,
}

/// The host the registry recorded, read back from the instance id
/// `"<name>-<host>-<port>"`.
fn host_in_id<'a>(id: &'a str, req: &RegisterRequest) -> Option<&'a str> {
    id.strip_prefix(req.name.as_str())?
        .strip_prefix('-')?
        .strip_suffix(req.port.to_string().as_str())?
        .strip_suffix('-')
        .filter(|h| !h.is_empty())
}

/// Runs until `shutdown` fires. When the request leaves the host to the registry,
/// `host` learns the one it recorded, so that deregistration removes this instance
/// only and not every instance of the service on the same port.
async fn keep_registered(
    client: &RegistryClient,
    req: &RegisterRequest,
    host: &mut Option<String>,
    shutdown: &CancellationToken,
) {
    let mut backoff = Backoff::new();
    let mut link = Link::Unknown;
    'register: loop {
        // Register until it succeeds; the registry answers with the interval it applies.
        let mut interval = loop {
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                r = client.register(req) => r,
            };
            match result {
                Ok(resp) => {
                    tracing::info!(
                        service = %req.name, instance = %resp.id,
                        heartbeat_interval = resp.heartbeat_interval,
                        registry = client.base_url(), "registered"
                    );
                    if req.host.is_none() {
                        *host = host_in_id(&resp.id, req).map(str::to_owned);
                    }
                    link = Link::Up;
                    backoff.reset();
                    break Duration::from_secs(resp.heartbeat_interval.max(1));
                }
                Err(err) => {
                    if link != Link::Down {
                        tracing::warn!(
                            service = %req.name, port = req.port, error = %err,
                            "registration failed; retrying with backoff"
                        );
                        link = Link::Down;
                    }
                    if sleep_or_cancel(backoff.next_delay(), shutdown)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        };

        // Heartbeat on schedule; after a failure retry sooner, but never later than the
        // regular schedule, so that a short registry outage costs the instance nothing.
        let mut next = Instant::now() + interval;
        loop {
            if sleep_until_or_cancel(next, shutdown).await.is_err() {
                return;
            }
            let sent = Instant::now();
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                r = client.heartbeat(req) => r,
            };
            match result {
                Ok(resp) => {
                    if link != Link::Up {
                        tracing::info!(service = %req.name, port = req.port, "registry reachable again");
                        link = Link::Up;
                    }
                    backoff.reset();
                    let secs = if resp.next_heartbeat_in > 0 {
                        resp.next_heartbeat_in
                    } else {
                        interval.as_secs()
                    };
                    interval = Duration::from_secs(secs.max(1));
                    next = sent + interval;
                }
                Err(err) if err.is_not_found() => {
                    tracing::info!(
                        service = %req.name, port = req.port,
                        "registry does not know this instance; registering again"
                    );
                    continue 'register;
                }
                Err(err) => {
                    if link != Link::Down {
                        tracing::warn!(
                            service = %req.name, port = req.port, error = %err,
                            "heartbeat failed; retrying"
                        );
                        link = Link::Down;
                    }
                    next = Instant::now() + backoff.next_delay().min(interval);
                }
            }
        }
    }
}

/// Best effort: the registry may be gone too, and a stopping process must not hang.
async fn deregister(client: &RegistryClient, req: &RegisterRequest, host: Option<&str>) {
    let call = client.deregister(&req.name, req.port, host);
    match tokio::time::timeout(DEREGISTER_BOUND, call).await {
        Ok(Ok(())) => {
            tracing::info!(service = %req.name, port = req.port, "deregistered");
        }
        Ok(Err(err)) if err.is_not_found() => {
            tracing::debug!(service = %req.name, port = req.port, "already deregistered");
        }
        Ok(Err(err)) => {
            tracing::warn!(service = %req.name, port = req.port, error = %err, "deregistration failed");
        }
        Err(_) => {
            tracing::warn!(service = %req.name, port = req.port, "deregistration timed out");
        }
    }
}

/// `Err` when shutdown fired first.
async fn sleep_or_cancel(delay: Duration, shutdown: &CancellationToken) -> Result<(), ()> {
    sleep_until_or_cancel(Instant::now() + delay, shutdown).await
}

/// `Err` when shutdown fired first.
async fn sleep_until_or_cancel(deadline: Instant, shutdown: &CancellationToken) -> Result<(), ()> {
    tokio::select! {
        () = shutdown.cancelled() => Err(()),
        () = tokio::time::sleep_until(deadline) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new();
        let mut steps = Vec::new();
        for _ in 0..10 {
            steps.push(b.step);
            let d = b.next_delay();
            let step = *steps.last().unwrap();
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
        }
        assert_eq!(steps[0], Duration::from_millis(100));
        assert_eq!(steps[1], Duration::from_millis(200));
        assert_eq!(*steps.last().unwrap(), BACKOFF_CAP);
        b.reset();
        assert_eq!(b.step, BACKOFF_START);
    }

    #[test]
    fn host_is_read_back_from_the_id() {
        let req = RegisterRequest::new("user-service", 4000);
        assert_eq!(
            host_in_id("user-service-10.0.0.5-4000", &req),
            Some("10.0.0.5")
        );
        assert_eq!(host_in_id("user-service-::1-4000", &req), Some("::1"));
        assert_eq!(host_in_id("user-service-a-b-4000", &req), Some("a-b"));
        assert_eq!(host_in_id("user-service--4000", &req), None);
        assert_eq!(host_in_id("other-10.0.0.5-4000", &req), None);
        assert_eq!(host_in_id("user-service-10.0.0.5-4001", &req), None);
    }
}
