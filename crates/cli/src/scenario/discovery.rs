//! The registry restarts: the gateway keeps routing from its discovery cache while the
//! registry is down, and every instance registers again (by heartbeat) once it is back.

use std::collections::BTreeSet;
use std::time::Duration;

use super::Ctx;

/// Stops the registry, uses the system, starts the registry, and checks that it fills
/// itself back up.
pub(crate) async fn registry_restart(cx: &Ctx) -> anyhow::Result<()> {
    let control = cx.control()?;
    let registry = control
        .processes()
        .await?
        .into_iter()
        .find(|p| p.role == "registry")
        .ok_or_else(|| anyhow::anyhow!("the control API lists no registry process"))?;
    let before = listed(cx).await?;
    cx.note(format!("the registry lists {} instances", before.len()));

    cx.step(format!("Stop the registry ({})", registry.name));
    cx.look(format!(
        "{}/ -> \"Health & Cache\": service discovery disconnected, the cache still holds the instances",
        cx.gateway
    ));
    let p = cx.stop_process(&registry.name).await?;
    cx.check(
        p.state == "stopped",
        format!("{} is {}", registry.name, p.state),
    );
    let down = cx.http.get(format!("{}/health", cx.registry)).send().await;
    cx.check(down.is_err(), "the registry no longer answers");

    let outcome = async {
        let span = cx.pace(Duration::from_secs(10), Duration::from_secs(4));
        cx.step(format!(
            "Use the system for {} s without the registry",
            span.as_secs()
        ));
        let mut calls = 0_u32;
        let mut bad: Vec<String> = Vec::new();
        let until = tokio::time::Instant::now() + span;
        while tokio::time::Instant::now() < until {
            for path in ["/users", "/orders/user/1", "/users/1"] {
                let r = cx.get(&cx.gw(path)).await?;
                calls += 1;
                if r.status != 200 || r.is_fallback() {
                    bad.push(format!("{path}: {}", r.brief()));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cx.check(
            bad.is_empty(),
            format!(
                "all {calls} calls answered live data from the cached instances{}",
                bad.first()
                    .map(|b| format!("; not: {b}"))
                    .unwrap_or_default()
            ),
        );
        let h = cx.get(&cx.gw("/health")).await?;
        cx.note(format!(
            "the gateway's health says service discovery is {}",
            h.json["serviceDiscovery"]["status"]
        ));
        anyhow::Ok(())
    }
    .await;

    cx.step(format!("Start the registry ({}) again", registry.name));
    cx.look(format!(
        "{}/ -> the registry dashboard fills up again within a heartbeat interval",
        cx.registry
    ));
    cx.start_process(&registry.name).await?;
    let back = cx
        .poll(Duration::from_secs(60), || async {
            let Ok(now) = listed(cx).await else {
                return Ok(None);
            };
            Ok(before.is_subset(&now).then_some(now.len()))
        })
        .await?;
    cx.check(
        back.is_some(),
        format!(
            "every instance registered again by its heartbeat ({} of {})",
            back.unwrap_or(0),
            before.len()
        ),
    );
    let connected = cx
        .poll(Duration::from_secs(60), || async {
            let h = cx.get(&cx.gw("/health")).await?;
            Ok((h.json["serviceDiscovery"]["status"] == "connected").then_some(()))
        })
        .await?;
    cx.check(
        connected.is_some(),
        "the gateway reports service discovery connected again",
    );
    outcome
}

/// Every `(service, port)` the registry lists.
async fn listed(cx: &Ctx) -> anyhow::Result<BTreeSet<(String, u64)>> {
    let r = cx.get(&format!("{}/services", cx.registry)).await?;
    anyhow::ensure!(r.status == 200, "GET /services: {}", r.brief());
    let mut out = BTreeSet::new();
    if let Some(map) = r.json.as_object() {
        for (service, list) in map {
            for i in list.as_array().into_iter().flatten() {
                if let Some(port) = i["port"].as_u64() {
                    out.insert((service.clone(), port));
                }
            }
        }
    }
    Ok(out)
}
