//! Reads of the running system that several scenarios share: the gateway's breakers,
//! endpoints and event stream (`/admin/...`), the registry's listings, unstable's
//! chaos settings, and which instance answered a request (the decision trace).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};

use super::Ctx;

/// The gateway's breaker state of `service` (`CLOSED`, `OPEN`, `HALF_OPEN`), or `None`
/// while the gateway has not used the service yet.
pub(crate) async fn breaker_state(cx: &Ctx, service: &str) -> anyhow::Result<Option<String>> {
    Ok(gateway_service(cx, service)
        .await?
        .and_then(|s| s["breaker"]["state"].as_str().map(str::to_owned)))
}

/// The gateway's view of `service` from `GET /admin/services`.
async fn gateway_service(cx: &Ctx, service: &str) -> anyhow::Result<Option<Value>> {
    let r = cx.get(&cx.gw("/admin/services")).await?;
    anyhow::ensure!(r.status == 200, "GET /admin/services: {}", r.brief());
    Ok(r.json["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["service"] == service))
        .cloned())
}

/// The state (`healthy`, `ejected`, `probing`) of each of `service`'s endpoints in the
/// gateway, by instance id.
pub(crate) async fn endpoint_states(
    cx: &Ctx,
    service: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let Some(s) = gateway_service(cx, service).await? else {
        return Ok(BTreeMap::new());
    };
    Ok(s["instances"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|i| {
                    Some((
                        i["id"].as_str()?.to_owned(),
                        i["state"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The events the gateway's `/admin/events` stream shows a new subscriber (its recent
/// ones), read until the stream has been quiet for half a second.
pub(crate) async fn gateway_events(cx: &Ctx) -> anyhow::Result<Vec<Value>> {
    let url = cx.gw("/admin/events");
    let mut res = cx
        .http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    anyhow::ensure!(res.status().is_success(), "GET {url}: {}", res.status());
    let mut text = String::new();
    while let Ok(chunk) = tokio::time::timeout(Duration::from_millis(500), res.chunk()).await {
        match chunk.with_context(|| format!("reading {url}"))? {
            Some(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
            None => break,
        }
    }
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|json| serde_json::from_str(json).ok())
        .collect())
}

/// The breaker transitions of `service` in `after` that are not in `before`, as
/// `(from, to)`.
pub(crate) fn new_transitions(
    before: &[Value],
    after: &[Value],
    service: &str,
) -> Vec<(String, String)> {
    after
        .iter()
        .filter(|e| e["kind"] == "breaker" && e["service"] == service && !before.contains(e))
        .map(|e| {
            let state = |k: &str| e["detail"][k].as_str().unwrap_or_default().to_owned();
            (state("from"), state("to"))
        })
        .collect()
}

/// The instances the registry lists under `service`.
pub(crate) async fn registry_instances(cx: &Ctx, service: &str) -> anyhow::Result<Vec<Value>> {
    let r = cx
        .get(&format!("{}/services/{service}", cx.registry))
        .await?;
    anyhow::ensure!(r.status == 200, "GET /services/{service}: {}", r.brief());
    Ok(r.json["services"].as_array().cloned().unwrap_or_default())
}

/// The ports the registry lists under `service`.
pub(crate) async fn registry_ports(cx: &Ctx, service: &str) -> anyhow::Result<Vec<u16>> {
    Ok(registry_instances(cx, service)
        .await?
        .iter()
        .filter_map(|i| u16::try_from(i["port"].as_u64()?).ok())
        .collect())
}

/// Base URLs of `service`'s instances, from the registry.
pub(crate) async fn instance_urls(cx: &Ctx, service: &str) -> anyhow::Result<Vec<String>> {
    let urls: Vec<String> = registry_instances(cx, service)
        .await?
        .iter()
        .filter_map(|i| {
            Some(format!(
                "http://{}:{}",
                i["host"].as_str()?,
                i["port"].as_u64()?
            ))
        })
        .collect();
    anyhow::ensure!(!urls.is_empty(), "the registry lists no {service} instance");
    Ok(urls)
}

/// The instance that gave the final answer to a request sent with
/// `x-breakwater-trace: 1`, from the gateway's trace header (`...; try2=<id> 200 1.2ms`).
pub(crate) fn answering_instance(trace: &str) -> Option<String> {
    trace
        .split("; ")
        .filter(|entry| entry.starts_with("try"))
        .last()
        .and_then(|entry| entry.split_once('='))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(str::to_owned)
}

/// Unstable's chaos settings, per instance, so they can be put back.
#[derive(Debug, Clone)]
pub(crate) struct SavedChaos(Vec<(String, Value)>);

/// Reads every unstable instance's chaos settings.
pub(crate) async fn save_chaos(cx: &Ctx) -> anyhow::Result<SavedChaos> {
    let mut saved = Vec::new();
    for url in instance_urls(cx, "unstable-service").await? {
        let r = cx.get(&format!("{url}/chaos")).await?;
        anyhow::ensure!(r.status == 200, "GET {url}/chaos: {}", r.brief());
        saved.push((url, r.json));
    }
    let saved = SavedChaos(saved);
    cx.undo().chaos = Some(saved.clone());
    Ok(saved)
}

/// Sets chaos (`{failureRate?, delayRate?, delayMs?}`) on every saved instance.
pub(crate) async fn set_chaos(cx: &Ctx, saved: &SavedChaos, body: &Value) -> anyhow::Result<()> {
    for (url, _) in &saved.0 {
        let r = cx
            .send(cx.http.put(format!("{url}/chaos")).json(body))
            .await?;
        anyhow::ensure!(r.status == 200, "PUT {url}/chaos {body}: {}", r.brief());
    }
    Ok(())
}

/// Puts every instance's saved settings back.
pub(crate) async fn restore_chaos(cx: &Ctx, saved: SavedChaos) -> anyhow::Result<()> {
    for (url, before) in &saved.0 {
        let body = json!({
            "failureRate": before["failureRate"],
            "delayRate": before["delayRate"],
            "delayMs": before["delayMs"],
        });
        let r = cx
            .send(cx.http.put(format!("{url}/chaos")).json(&body))
            .await?;
        anyhow::ensure!(r.status == 200, "PUT {url}/chaos {body}: {}", r.brief());
    }
    cx.undo().chaos = None;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_try_names_the_answering_instance() {
        let trace = "route=/users; try1=user-service-127.0.0.1-4000 connect-error 0.3ms; \
                     try2=user-service-127.0.0.1-4001 200 1.2ms; breaker=closed; budget=ok";
        assert_eq!(
            answering_instance(trace).as_deref(),
            Some("user-service-127.0.0.1-4001")
        );
        assert_eq!(answering_instance("route=/users"), None);
    }

    #[test]
    fn transitions_seen_before_are_left_out() {
        let old = json!({"kind":"breaker","service":"s","detail":{"from":"CLOSED","to":"OPEN"},"at_unix_ms":1});
        let new = json!({"kind":"breaker","service":"s","detail":{"from":"OPEN","to":"HALF_OPEN"},"at_unix_ms":2});
        let other = json!({"kind":"breaker","service":"t","detail":{"from":"CLOSED","to":"OPEN"},"at_unix_ms":3});
        let after = [old.clone(), new, other];
        let found = new_transitions(std::slice::from_ref(&old), &after, "s");
        assert_eq!(found, [("OPEN".to_owned(), "HALF_OPEN".to_owned())]);
    }
}
