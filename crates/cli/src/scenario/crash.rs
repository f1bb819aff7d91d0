//! An instance crashes under load: a users instance is killed with SIGKILL while a load
//! runs through the gateway; no request fails (the gateway retries on another
//! instance), and `up` restarts it and it registers again.

use std::time::Duration;

use super::balancing::Load;
use super::{Ctx, breakers, probe};
use crate::loadgen::{self, BenchArgs};

/// Kills a users instance during a load on `/users/1`.
pub(crate) async fn instance_crash(cx: &Ctx) -> anyhow::Result<()> {
    let control = cx.control()?;
    let users = control.instances_of("user-service").await?;
    let victim = users
        .get(1)
        .or_else(|| users.first())
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no users instance"))?;
    let seconds = cx.pace(Duration::from_secs(8), Duration::from_secs(4));
    let url = cx.gw("/users/1");

    cx.step(format!(
        "Run a load on {url} (4 connections, {} s) and kill {} (pid {}) with SIGKILL after 1 s",
        seconds.as_secs(),
        victim.name,
        victim.pid.map_or_else(|| "-".to_owned(), |p| p.to_string())
    ));
    cx.look(format!(
        "{}/ -> \"Services\": the instance is ejected, then returns; \"Events\"; \"Traffic\": no errors",
        cx.gateway
    ));
    let args = BenchArgs::quiet_get(url, 4, seconds);
    let kill = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        control.kill(&victim.name).await
    };
    let (summary, killed) = tokio::join!(loadgen::measure_quietly(args), kill);
    let load = Load::from(summary?);
    cx.check(
        killed.is_ok(),
        format!(
            "{} was killed ({})",
            victim.name,
            killed
                .as_ref()
                .map_or_else(|e| format!("{e:#}"), |p| p.state.clone())
        ),
    );
    cx.note(&load.figures);
    cx.check(
        load.requests > 0 && load.ok == load.requests && load.errors_total == 0,
        format!(
            "no request failed: {} of {} answered 2xx (status codes {}), errors {}",
            load.ok, load.requests, load.status_codes, load.errors
        ),
    );

    cx.step(format!(
        "Wait for up to restart {} and for it to register",
        victim.name
    ));
    cx.look(format!(
        "{}/ -> the instance is back in the registry dashboard",
        cx.registry
    ));
    let restarted = cx
        .poll(Duration::from_secs(60), || async {
            let p = control.process(&victim.name).await?;
            let new_run =
                p.state == "running" && p.restarts > victim.restarts && p.pid != victim.pid;
            Ok(new_run.then_some(p))
        })
        .await?;
    cx.check(
        restarted.is_some(),
        format!(
            "{} runs again (restarts {} -> {}, pid {:?})",
            victim.name,
            victim.restarts,
            restarted.as_ref().map_or(victim.restarts, |p| p.restarts),
            restarted.as_ref().and_then(|p| p.pid)
        ),
    );
    let registered = cx
        .poll(Duration::from_secs(60), || async {
            let ports = probe::registry_ports(cx, "user-service").await?;
            Ok(ports.contains(&victim.port).then_some(()))
        })
        .await?;
    cx.check(
        registered.is_some(),
        format!("the registry lists port {} again", victim.port),
    );
    let live = breakers::until_live(cx, "user-service", "/users").await?;
    cx.check(
        live,
        "the gateway uses it again: every users endpoint healthy",
    );
    Ok(())
}
