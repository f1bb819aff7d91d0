//! `/metrics` does not grow with every instance that ever existed: once discovery no
//! longer lists an instance, its per-instance series leave the exposition (after the
//! grace period, zero here), while those of the instances still listed stay.

#![expect(
    clippy::unwrap_used,
    reason = "test set-up: a failure should fail the test loudly"
)]

mod fixture;

use std::time::Duration;

use breakwater_gateway::{GatewayConfig, GatewayState, app};
use breakwater_registry::client::{CachePolicy, Discovery, RegistryClient};
use fixture::*;

const USERS: &str = "user-service";

/// A gateway whose discovery asks the registry on every request, so a change in the
/// listing reaches the next request.
fn gateway_state_without_cache(registry_url: &str) -> GatewayState {
    let mut config = GatewayConfig::new(8000, registry_url);
    config.listener_loopback = true;
    let file = config
        .parse_file(
            &users_route("[routes.policy]\nbalance = \"round-robin\""),
            "test config",
        )
        .unwrap();
    let discovery = Discovery::new(
        RegistryClient::new(registry_url),
        CachePolicy {
            fresh_for: Duration::ZERO,
            stale_for: Duration::ZERO,
        },
    );
    GatewayState::with_file(config, discovery, file)
}

fn attempts_of(metrics: &str, instance: &str) -> usize {
    let label = format!("instance=\"{instance}\"");
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("breakwater_gateway_upstream_attempts_total{") && l.contains(&label)
        })
        .count()
}

#[tokio::test]
async fn a_departed_instance_leaves_metrics_and_a_live_one_stays() {
    let registry = FakeRegistry::start().await;
    let (a, b) = (echo_service("users-a").await, echo_service("users-b").await);
    let (stays, leaves) = (instance(USERS, a.addr), instance(USERS, b.addr));
    registry.set(USERS, vec![stays.clone(), leaves.clone()]);
    let state = gateway_state_without_cache(&registry.url);
    state.metrics().set_departed_grace(Duration::ZERO);
    let gw = app(state);

    for _ in 0..4 {
        assert_eq!(get_json(&gw, "/users/1").await.status, 200);
    }
    let before = get_json(&gw, "/metrics").await.text;
    assert_eq!(attempts_of(&before, &stays.id), 1, "{before}");
    assert_eq!(attempts_of(&before, &leaves.id), 1, "{before}");

    registry.set(USERS, vec![stays.clone()]);
    let reply = get_json(&gw, "/users/1").await;
    assert_eq!(reply.json["instance"], "users-a");
    let after = get_json(&gw, "/metrics").await.text;
    assert_eq!(attempts_of(&after, &leaves.id), 0, "{after}");
    assert!(
        after.contains(&format!(
            "breakwater_gateway_upstream_attempts_total{{service=\"{USERS}\",instance=\"{}\",outcome=\"success\"}} 3",
            stays.id
        )),
        "{after}"
    );
}
