//! Watchers learn of changes without polling: a long poll on one registry replica
//! wakes for a registration made on another and for an expiry (real Redis, needs
//! `REDIS_URL`; skipped without it unless `BREAKWATER_REQUIRE_SERVICES=1`), and a
//! watching `Discovery` sees a new instance long before its cache entry would go stale.

#![expect(clippy::unwrap_used, reason = "helpers of a test fail it by panicking")]
#![expect(
    clippy::print_stderr,
    reason = "a skipped test says so, as DESIGN.md asks"
)]

use std::time::Duration;

use breakwater_registry::client::{CachePolicy, Discovery, RegistryClient};
use breakwater_registry::server::{run, run_with};
use breakwater_registry::store::StoreChoice;
use breakwater_registry::store::redis::RedisStore;
use breakwater_registry::wire::RegisterRequest;
use breakwater_runtime::CancellationToken;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The Redis URL, or `None` when the test should be skipped.
fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("BREAKWATER_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "BREAKWATER_REQUIRE_SERVICES=1 but REDIS_URL is not set"
            );
            eprintln!("SKIPPED (no REDIS_URL)");
            None
        }
    }
}

/// A registry replica on a free port over `choice`; its client and its task.
async fn replica(
    choice: Option<StoreChoice>,
    stop: &CancellationToken,
) -> (RegistryClient, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = stop.clone();
    let task = tokio::spawn(async move {
        match choice {
            Some(choice) => run_with(listener, choice, stop).await.unwrap(),
            None => run(listener, stop).await.unwrap(),
        }
    });
    (RegistryClient::new(url), task)
}

fn instance(port: u16, interval: u64) -> RegisterRequest {
    RegisterRequest {
        name: "watched".into(),
        port,
        heartbeat_interval: Some(interval),
        host: Some("127.0.0.1".into()),
        metadata: None,
    }
}

#[tokio::test]
async fn a_watcher_on_one_replica_wakes_for_changes_on_another() {
    let Some(url) = redis_url() else { return };
    let prefix = format!("bw-test-watch-{:016x}", rand::random::<u64>());
    let choice = StoreChoice::Redis {
        url: url.clone(),
        prefix: prefix.clone(),
    };
    let stop = CancellationToken::new();
    let (a, task_a) = replica(Some(choice.clone()), &stop).await;
    let (b, task_b) = replica(Some(choice), &stop).await;

    let first = b.watch("watched", None, Duration::ZERO).await.unwrap();
    assert!(first.instances.is_empty());
    // Let B's change listener subscribe before the change it must hear.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let waiting = tokio::spawn({
        let b = b.clone();
        let index = first.index;
        async move {
            let started = Instant::now();
            let answer = b
                .watch("watched", Some(index), Duration::from_secs(30))
                .await
                .unwrap();
            (answer, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "nothing changed yet");
    a.register(&instance(4100, 1)).await.unwrap();
    let (registered, took) = waiting.await.unwrap();
    assert_eq!(registered.instances.len(), 1);
    assert_eq!(registered.instances[0].port, 4100);
    assert!(registered.index > first.index);
    assert!(
        took < Duration::from_secs(5),
        "woken, not timed out: {took:?}"
    );

    // No more heartbeats: the lease ends at 1.5 s and a replica's sweep reports it.
    let started = Instant::now();
    let expired = b
        .watch("watched", Some(registered.index), Duration::from_secs(30))
        .await
        .unwrap();
    assert!(expired.instances.is_empty());
    assert!(expired.index > registered.index);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken by the expiry: {:?}",
        started.elapsed()
    );

    stop.cancel();
    task_a.await.unwrap();
    task_b.await.unwrap();
    RedisStore::connect(&url, &prefix)
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
}

/// Cache windows far longer than the test: only the watch can show the new instance.
const LONG: CachePolicy = CachePolicy {
    fresh_for: Duration::from_secs(600),
    stale_for: Duration::from_secs(600),
};

/// Resolves until `want` instances show, for at most 5 s; returns how long it took.
async fn until_resolved(discovery: &Discovery, want: usize) -> Duration {
    let started = Instant::now();
    loop {
        let found = discovery.resolve("watched").await.unwrap().len();
        if found == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still {found} instances, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_watching_discovery_sees_a_new_instance_before_its_ttl() {
    let stop = CancellationToken::new();
    let (registry, task) = replica(None, &stop).await;
    registry.register(&instance(4200, 30)).await.unwrap();
    let discovery = Discovery::watching(registry.clone(), LONG);
    assert_eq!(discovery.resolve("watched").await.unwrap().len(), 1);

    registry.register(&instance(4201, 30)).await.unwrap();
    until_resolved(&discovery, 2).await;
    registry.deregister("watched", 4200, None).await.unwrap();
    until_resolved(&discovery, 1).await;
    let left = discovery.resolve("watched").await.unwrap();
    assert_eq!(left[0].port, 4201);

    // Without the watch, the cached list stands for the whole TTL.
    let polling = Discovery::new(registry.clone(), LONG);
    assert_eq!(polling.resolve("watched").await.unwrap().len(), 1);
    registry.register(&instance(4202, 30)).await.unwrap();
    until_resolved(&discovery, 2).await;
    assert_eq!(polling.resolve("watched").await.unwrap().len(), 1);

    // The registry goes away: the watching cache keeps serving what it knew.
    stop.cancel();
    task.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(discovery.resolve("watched").await.unwrap().len(), 2);
}

#[tokio::test]
async fn watching_discoveries_across_redis_replicas_see_new_instances() {
    let Some(url) = redis_url() else { return };
    let prefix = format!("bw-test-watch-{:016x}", rand::random::<u64>());
    let choice = StoreChoice::Redis {
        url: url.clone(),
        prefix: prefix.clone(),
    };
    let stop = CancellationToken::new();
    let (a, task_a) = replica(Some(choice.clone()), &stop).await;
    let (b, task_b) = replica(Some(choice), &stop).await;
    a.register(&instance(4300, 30)).await.unwrap();
    let discovery = Discovery::watching(b, LONG);
    assert_eq!(discovery.resolve("watched").await.unwrap().len(), 1);
    a.register(&instance(4301, 30)).await.unwrap();
    until_resolved(&discovery, 2).await;

    stop.cancel();
    task_a.await.unwrap();
    task_b.await.unwrap();
    RedisStore::connect(&url, &prefix)
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
}
