//! Seed 003's failure scenarios: a service down behind the gateway's breaker (#4), one
//! service down while the other stays up (#5), and the recovery through half-open (#6).
//!
//! Each stops instances through `up`'s control API and starts them again before it
//! ends, then waits until the gateway serves live data with the breaker CLOSED and every
//! endpoint healthy, so the next scenario finds the system as this one did.

use std::cell::{Cell, RefCell};
use std::time::Duration;

use super::{Ctx, probe};

const USERS: &str = "user-service";
const ORDERS: &str = "order-service";

/// How long a recovery may take: the breaker's open time, an ejection, a probe.
fn recovery_time(cx: &Ctx) -> Duration {
    if cx.own_system && cx.fast {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(120)
    }
}

/// #4: every users instance stops; the composed endpoints answer the seed's fallback
/// data and the users breaker opens.
pub(crate) async fn circuit_breaker(cx: &Ctx) -> anyhow::Result<()> {
    let before = probe::gateway_events(cx).await?;
    let names = take_down(cx, USERS).await?;
    let outcome = async {
        open_breaker(cx, USERS, "/users").await?;
        cx.step("Ask /users-with-orders while the breaker is open");
        let r = cx.get(&cx.gw("/users-with-orders")).await?;
        cx.check(
            r.status == 200
                && r.is_fallback()
                && r.json["users"][0]["name"] == "Fallback User"
                && r.json["meta"]["fallbackReason"]
                    .as_str()
                    .is_some_and(|s| s.contains("breaker")),
            format!(
                "200 with the fallback users (meta.source {}, meta.fallbackReason {})",
                r.json["meta"]["source"], r.json["meta"]["fallbackReason"]
            ),
        );
        let after = probe::gateway_events(cx).await?;
        let moves = probe::new_transitions(&before, &after, USERS);
        cx.check(
            moves
                .iter()
                .any(|(from, to)| from == "CLOSED" && to == "OPEN"),
            format!("/admin/events shows the transition CLOSED -> OPEN ({moves:?})"),
        );
        anyhow::Ok(())
    }
    .await;
    restore(cx, USERS, &names, "/users").await?;
    outcome
}

/// #5: the orders service stops; users are still live, orders fall back.
pub(crate) async fn partial_failure(cx: &Ctx) -> anyhow::Result<()> {
    let names = take_down(cx, ORDERS).await?;
    let outcome = async {
        cx.step("Ask the dashboard's sections with orders down");
        cx.look(format!(
            "{}/ -> \"All Users\" stays live; \"User Orders\" shows fallback data",
            cx.gateway
        ));
        let r = cx.get(&cx.gw("/users")).await?;
        cx.check(
            r.status == 200 && !r.is_fallback() && r.json["users"][0]["name"] != "Fallback User",
            format!(
                "/users: live users (meta.source {})",
                r.json["meta"]["source"]
            ),
        );
        let r = cx.get(&cx.gw("/orders/user/1")).await?;
        let orders = r.json["orders"].as_array().cloned().unwrap_or_default();
        cx.check(
            r.status == 200
                && r.is_fallback()
                && !orders.is_empty()
                && orders
                    .iter()
                    .all(|o| o["userId"] == 1 && o["products"][0] == "Fallback Product"),
            format!(
                "/orders/user/1: 200 with the fallback orders of user 1 (meta.source {})",
                r.json["meta"]["source"]
            ),
        );
        let r = cx.get(&cx.gw("/users-with-orders")).await?;
        cx.check(
            r.status == 200 && r.is_fallback() && r.json["users"][0]["name"] != "Fallback User",
            format!(
                "/users-with-orders: live users with fallback orders (meta.source {})",
                r.json["meta"]["source"]
            ),
        );
        anyhow::Ok(())
    }
    .await;
    restore(cx, ORDERS, &names, "/orders/user/1").await?;
    outcome
}

/// #6: users come back; the breaker lets a probe through (HALF_OPEN) once its open
/// time is over, the probe succeeds (CLOSED) and live data returns.
pub(crate) async fn recovery(cx: &Ctx) -> anyhow::Result<()> {
    let names = take_down(cx, USERS).await?;
    let outcome = async {
        open_breaker(cx, USERS, "/users").await?;
        let before = probe::gateway_events(cx).await?;
        restart(cx, USERS, &names).await?;
        cx.step("Call /users every 200 ms until the data is live again");
        cx.look(format!(
            "{}/ -> \"Services\": user-service's breaker goes HALF_OPEN, then CLOSED; \"Events\"",
            cx.gateway
        ));
        let live = until_live(cx, USERS, "/users").await?;
        cx.check(
            live,
            "/users answers live data, the breaker CLOSED, every endpoint healthy",
        );
        let after = probe::gateway_events(cx).await?;
        let moves = probe::new_transitions(&before, &after, USERS);
        cx.note(format!("breaker transitions: {moves:?}"));
        let half_open = moves
            .iter()
            .position(|(from, to)| from == "OPEN" && to == "HALF_OPEN");
        let closed = moves
            .iter()
            .rposition(|(from, to)| from == "HALF_OPEN" && to == "CLOSED");
        cx.check(
            matches!((half_open, closed), (Some(h), Some(c)) if h < c),
            "OPEN -> HALF_OPEN (the probe), then HALF_OPEN -> CLOSED",
        );
        anyhow::Ok(live)
    }
    .await;
    // Put back only what the steps above did not already restore.
    if !matches!(outcome, Ok(true)) {
        restore(cx, USERS, &names, "/users").await?;
    }
    outcome.map(drop)
}

/// Stops every instance of `service`; their names.
async fn take_down(cx: &Ctx, service: &str) -> anyhow::Result<Vec<String>> {
    let control = cx.control()?;
    let processes = control.instances_of(service).await?;
    let names: Vec<String> = processes.iter().map(|p| p.name.clone()).collect();
    cx.step(format!(
        "Stop every {service} instance ({}) through up's control API (seed: Ctrl+C in their terminals)",
        names.join(", ")
    ));
    cx.look(format!(
        "{}/ -> \"Services\" ({service}) and \"Events\"; the registry dashboard {}/",
        cx.gateway, cx.registry
    ));
    for name in &names {
        let p = cx.stop_process(name).await?;
        cx.check(p.state == "stopped", format!("{name} is {}", p.state));
    }
    Ok(names)
}

/// Calls `path` until the gateway's breaker of `service` is OPEN, checking that every
/// answer is the fallback.
async fn open_breaker(cx: &Ctx, service: &str, path: &str) -> anyhow::Result<()> {
    cx.step(format!(
        "Call GET {path} until the gateway's {service} breaker opens (seed: fallback after failures, then the circuit opens)"
    ));
    cx.look(format!(
        "{}/ -> \"Services\": {service}'s breaker and failure rate",
        cx.gateway
    ));
    let calls = Cell::new(0_u32);
    let fallbacks = Cell::new(0_u32);
    let other: RefCell<Option<String>> = RefCell::new(None);
    let opened = cx
        .poll(recovery_time(cx), || async {
            for _ in 0..10 {
                let r = cx.get(&cx.gw(path)).await?;
                calls.set(calls.get() + 1);
                if r.status == 200 && r.is_fallback() {
                    fallbacks.set(fallbacks.get() + 1);
                } else {
                    other.borrow_mut().get_or_insert_with(|| r.brief());
                }
            }
            let state = probe::breaker_state(cx, service).await?;
            Ok((state.as_deref() == Some("OPEN")).then_some(()))
        })
        .await?;
    let (calls, fallbacks, other) = (calls.get(), fallbacks.get(), other.into_inner());
    cx.check(
        fallbacks == calls,
        format!(
            "all {calls} calls answered 200 with fallback data (meta.source \"fallback\"){}",
            other.map(|o| format!("; not: {o}")).unwrap_or_default()
        ),
    );
    cx.check(
        opened.is_some(),
        format!("the {service} breaker is OPEN after {calls} calls"),
    );
    Ok(())
}

/// Starts `names` again and waits until the registry lists them all.
async fn restart(cx: &Ctx, service: &str, names: &[String]) -> anyhow::Result<()> {
    let control = cx.control()?;
    cx.step(format!("Start {} again", names.join(", ")));
    let mut ports = Vec::new();
    for name in names {
        let p = control.process(name).await?;
        if p.state == "stopped" {
            cx.start_process(name).await?;
        }
        ports.push(p.port);
    }
    let registered = cx
        .poll(Duration::from_secs(60), || async {
            let listed = probe::registry_ports(cx, service).await?;
            Ok(ports.iter().all(|p| listed.contains(p)).then_some(()))
        })
        .await?;
    cx.check(
        registered.is_some(),
        format!("the registry lists every {service} instance again"),
    );
    Ok(())
}

/// Calls `path` until it answers live data with `service`'s breaker CLOSED and every
/// endpoint healthy; whether that happened in time.
pub(crate) async fn until_live(cx: &Ctx, service: &str, path: &str) -> anyhow::Result<bool> {
    let last = RefCell::new(String::new());
    let done = cx
        .poll(recovery_time(cx), || async {
            let r = cx.get(&cx.gw(path)).await?;
            let state = probe::breaker_state(cx, service).await?;
            let endpoints = probe::endpoint_states(cx, service).await?;
            let healthy = endpoints.values().all(|s| s == "healthy");
            *last.borrow_mut() = format!(
                "{path}: {} (meta.source {}), breaker {state:?}, endpoints {endpoints:?}",
                r.status, r.json["meta"]["source"]
            );
            let live = r.status == 200 && !r.is_fallback();
            Ok((live && state.as_deref() == Some("CLOSED") && healthy).then_some(()))
        })
        .await?;
    if done.is_none() {
        cx.note(format!("last seen: {}", last.borrow()));
    }
    Ok(done.is_some())
}

/// Puts `service` back as it was: its instances running and registered, the gateway
/// serving live data with the breaker CLOSED.
async fn restore(cx: &Ctx, service: &str, names: &[String], path: &str) -> anyhow::Result<()> {
    restart(cx, service, names).await?;
    cx.step(format!(
        "Wait until the gateway serves live {service} data again"
    ));
    let live = until_live(cx, service, path).await?;
    cx.check(
        live,
        format!("{path} is live, the {service} breaker CLOSED, every endpoint healthy"),
    );
    Ok(())
}
