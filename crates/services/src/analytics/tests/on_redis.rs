//! Analytics with Redis: the rate limit and the summary cache shared by two instances
//! (on the real Redis of `REDIS_URL`), and the fallback when Redis is unreachable.

use super::*;
use crate::fixtures::dead_port;
use crate::redis_fixtures::{delete_keys, keys, prefix, redis_url};

/// An app on `store` whose limiter and cache live in the Redis at `url` under `prefix`.
fn redis_app(
    store: SqliteMetrics,
    url: &str,
    prefix: &str,
    settings: &AnalyticsSettings,
) -> Router {
    let settings = AnalyticsSettings {
        redis_url: Some(url.to_owned()),
        redis_prefix: prefix.to_owned(),
        ..settings.clone()
    };
    let (router, _) = configured_app(
        store,
        ScriptedUpstream::answering(),
        "analytics-service-6000",
        6000,
        &settings,
    )
    .unwrap();
    router
}

#[test]
fn redis_url_comes_from_the_environment_or_the_override() {
    let none = AnalyticsOverrides::default();
    let env = |name: &str| (name == "REDIS_URL").then(|| "redis://127.0.0.1:6379".to_owned());
    let from_env = AnalyticsSettings::from_lookup_and(&env, &none).unwrap();
    assert_eq!(
        from_env.redis_url.as_deref(),
        Some("redis://127.0.0.1:6379")
    );
    assert_eq!(from_env.redis_prefix, DEFAULT_REDIS_PREFIX);

    let flags = AnalyticsOverrides {
        redis_url: Some("redis://10.0.0.9:6380/2".into()),
        redis_prefix: Some("blue".into()),
        ..AnalyticsOverrides::default()
    };
    let both = AnalyticsSettings::from_lookup_and(&env, &flags).unwrap();
    assert_eq!(both.redis_url.as_deref(), Some("redis://10.0.0.9:6380/2"));
    assert_eq!(both.redis_prefix, "blue");

    let empty = |name: &str| (name == "REDIS_URL").then(String::new);
    let unset = AnalyticsSettings::from_lookup_and(&empty, &none).unwrap();
    assert_eq!(unset.redis_url, None);
    assert!(unset.redis_cache().unwrap().is_none());

    let bad = |name: &str| (name == "REDIS_URL").then(|| "not a url".to_owned());
    let err = AnalyticsSettings::from_lookup_and(&bad, &none).unwrap_err();
    assert_eq!(err.setting, "REDIS_URL");
    let no_prefix = AnalyticsOverrides {
        redis_prefix: Some(String::new()),
        ..AnalyticsOverrides::default()
    };
    let err = AnalyticsSettings::from_lookup_and(&env, &no_prefix).unwrap_err();
    assert_eq!(err.setting, "redis_prefix");
}

#[tokio::test]
async fn the_rate_limit_holds_across_two_instances_sharing_redis() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix("analytics-limit");
    let dir = TempDir::new("redis-limit");
    let store = SqliteMetrics::open(&dir.path().join(DATABASE_FILE))
        .await
        .unwrap();
    let settings = AnalyticsSettings::default();
    let max = settings.rate_limit_max;
    let a = redis_app(store.clone(), &url, &prefix, &settings);
    let b = redis_app(store.clone(), &url, &prefix, &settings);

    // Twice the limit from one client, alternating between the instances, at once.
    let requests = (0..2 * max).map(|n| {
        let app = if n % 2 == 0 { a.clone() } else { b.clone() };
        async move { post_metric(&app, &metric("cpu", 1.0), "10.9.9.9:4000").await }
    });
    let answers = futures_join_all(requests).await;
    let accepted = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .count();
    let limited: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(accepted, max as usize);
    assert_eq!(limited.len(), max as usize);
    for answer in limited {
        assert_eq!(header(answer, "x-ratelimit-remaining"), "0");
        assert!(header(answer, "retry-after").parse::<u64>().unwrap() <= 60);
    }
    // Another client has its own window.
    let other = post_metric(&b, &metric("cpu", 1.0), "10.9.9.10:4000").await;
    assert_eq!(other.status, StatusCode::CREATED);
    assert_eq!(
        store.summary("cpu").await.unwrap().unwrap().count,
        u64::from(max) + 1
    );
    assert!(
        !keys(&url, &prefix).await.is_empty(),
        "counters are in Redis"
    );

    delete_keys(&url, &prefix).await;
    store.close().await;
}

/// Runs the futures concurrently and keeps their order.
async fn futures_join_all<F: Future<Output = Answer> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<Answer> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut answers = Vec::new();
    for handle in handles {
        answers.push(handle.await.unwrap());
    }
    answers
}

#[tokio::test]
async fn an_unreachable_redis_limits_per_instance_and_never_fails() {
    // Nothing listens there, so every Redis call fails at once.
    let url = format!("redis://127.0.0.1:{}", dead_port().await);
    let dir = TempDir::new("redis-down");
    let store = SqliteMetrics::open(&dir.path().join(DATABASE_FILE))
        .await
        .unwrap();
    let settings = AnalyticsSettings {
        rate_limit_max: 3,
        ..AnalyticsSettings::default()
    };
    let app = redis_app(store.clone(), &url, "bw-unreachable", &settings);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(post_metric(&app, &metric("disk", 2.0), PEER).await.status);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::CREATED,
            StatusCode::CREATED,
            StatusCode::CREATED,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS,
        ]
    );
    // The cache is a miss every time, never an error.
    for _ in 0..2 {
        let a = get(&app, "/api/metrics/summary?type=disk").await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(header(&a, "x-cache"), "MISS");
        assert_eq!(a.body["count"], 3);
    }
    store.close().await;
}

#[tokio::test]
async fn the_summary_cache_in_redis_is_shared_and_invalidated_by_any_instance() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix("analytics-cache");
    let dir = TempDir::new("redis-cache");
    let store = SqliteMetrics::open(&dir.path().join(DATABASE_FILE))
        .await
        .unwrap();
    let settings = unlimited();
    let a = redis_app(store.clone(), &url, &prefix, &settings);
    let b = redis_app(store.clone(), &url, &prefix, &settings);

    let missing = get(&a, "/api/metrics/summary?type=mem").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(header(&missing, "x-cache"), "MISS");

    assert_eq!(
        post_metric(&a, &metric("mem", 10.0), PEER).await.status,
        StatusCode::CREATED
    );
    let first = get(&a, "/api/metrics/summary?type=mem").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(header(&first, "x-cache"), "MISS");
    let shared = get(&b, "/api/metrics/summary?type=mem").await;
    assert_eq!(header(&shared, "x-cache"), "HIT");
    assert_eq!(shared.body, first.body);
    assert_eq!(shared.body["count"], 1);

    // A write through B invalidates the entry A filled, for both.
    assert_eq!(
        post_metric(&b, &metric("mem", 20.0), PEER).await.status,
        StatusCode::CREATED
    );
    let after = get(&a, "/api/metrics/summary?type=mem").await;
    assert_eq!(header(&after, "x-cache"), "MISS");
    assert_eq!(after.body["count"], 2);
    assert_eq!(after.body["average_value"], 15.0);
    let again = get(&b, "/api/metrics/summary?type=mem").await;
    assert_eq!(header(&again, "x-cache"), "HIT");
    assert_eq!(again.body["count"], 2);

    delete_keys(&url, &prefix).await;
    store.close().await;
}

#[tokio::test]
async fn a_ticket_from_before_an_invalidation_writes_nothing_in_redis() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix("analytics-ticket");
    let ttl = Duration::from_secs(60);
    let a = RedisSummaryCache::new(&url, prefix.clone(), ttl).unwrap();
    let b = RedisSummaryCache::new(&url, prefix.clone(), ttl).unwrap();
    let summary = Summary {
        kind: "net".into(),
        count: 1,
        average_value: 3.0,
    };
    let Lookup::Miss(stale) = a.get("net").await else {
        panic!("expected a miss");
    };
    // Another instance stores a metric of the type while A reads the store.
    b.invalidate("net").await;
    a.put(&summary, stale).await;
    let Lookup::Miss(fresh) = b.get("net").await else {
        panic!("a stale summary was cached");
    };
    a.put(&summary, fresh).await;
    assert_eq!(b.get("net").await, Lookup::Hit(summary));

    delete_keys(&url, &prefix).await;
}
