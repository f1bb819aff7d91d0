//! Test support for the stores and caches on a real Redis: the URL (or a skip), a key
//! prefix of the test's own, and removal of its keys.

use redis::AsyncCommands;

fn required() -> bool {
    std::env::var("BREAKWATER_REQUIRE_SERVICES").as_deref() == Ok("1")
}

/// `REDIS_URL`, or `None` (having said `SKIPPED`) when the test should be skipped; a
/// missing URL fails the test when `BREAKWATER_REQUIRE_SERVICES=1`.
pub(crate) fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                !required(),
                "BREAKWATER_REQUIRE_SERVICES=1 but REDIS_URL is not set"
            );
            eprintln!("SKIPPED (no REDIS_URL)");
            None
        }
    }
}

/// A key prefix no other test run uses.
pub(crate) fn prefix(tag: &str) -> String {
    format!("bw-test-services-{tag}-{:016x}", rand::random::<u64>())
}

/// The keys under `prefix`.
pub(crate) async fn keys(url: &str, prefix: &str) -> Vec<String> {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut keys = Vec::new();
    let mut iter = conn
        .scan_match::<_, String>(format!("{prefix}:*"))
        .await
        .unwrap();
    while let Some(key) = iter.next_item().await {
        keys.push(key.unwrap());
    }
    keys
}

/// Deletes every key under `prefix`.
pub(crate) async fn delete_keys(url: &str, prefix: &str) {
    let keys = keys(url, prefix).await;
    if keys.is_empty() {
        return;
    }
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: u64 = conn.del(keys).await.unwrap();
}
