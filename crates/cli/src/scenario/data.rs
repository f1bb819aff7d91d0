//! Seed 000: the data service calls the unstable dependency with retries and falls back
//! when every try fails; whatever it answered is stored and reads back by id.

use serde_json::json;

use super::{Ctx, probe};

/// Unstable failing every call: `/data` answers the fallback after its retries; healthy:
/// real data; each answer reads back from the sharded store.
pub(crate) async fn retry_fallback(cx: &Ctx) -> anyhow::Result<()> {
    let saved = probe::save_chaos(cx).await?;
    let outcome = steps(cx, &saved).await;
    cx.note("Putting unstable's fault rates back");
    probe::restore_chaos(cx, saved).await?;
    outcome
}

async fn steps(cx: &Ctx, saved: &probe::SavedChaos) -> anyhow::Result<()> {
    cx.step("Make unstable fail every call (PUT /chaos failureRate 1.0) and GET /data");
    cx.look(format!(
        "{}/ -> \"Traffic\", route /data; the data instances' /stats and /metrics",
        cx.gateway
    ));
    probe::set_chaos(cx, saved, &json!({"failureRate": 1.0, "delayRate": 0.0})).await?;
    let r = cx.get(&cx.gw("/data")).await?;
    cx.note(r.brief());
    cx.check(
        r.status == 200 && r.json["data"] == json!({"message": "Fallback response"}),
        "200 with the fallback {\"message\":\"Fallback response\"}",
    );
    let attempts = r.json["attempts"].as_u64().unwrap_or(0);
    cx.check(
        if cx.own_system {
            attempts == 4
        } else {
            attempts >= 2
        },
        format!("after {attempts} tries (seed: up to 4, with jittered backoff)"),
    );
    let fallback_id = r.json["id"].as_str().unwrap_or_default().to_owned();

    cx.step("Make unstable healthy (failureRate 0, no delay) and GET /data");
    probe::set_chaos(cx, saved, &json!({"failureRate": 0.0, "delayRate": 0.0})).await?;
    let r = cx.get(&cx.gw("/data")).await?;
    cx.note(r.brief());
    cx.check(
        r.status == 200
            && r.json["data"]["message"] == "External service OK"
            && r.json["attempts"] == 1,
        "200 with unstable's own answer, at the first try",
    );
    let live_id = r.json["id"].as_str().unwrap_or_default().to_owned();

    cx.step("Read both records back by id (the store is sharded by a hash of the id)");
    for (id, message) in [
        (&fallback_id, "Fallback response"),
        (&live_id, "External service OK"),
    ] {
        let r = cx.get(&cx.gw(&format!("/data/{id}"))).await?;
        cx.check(
            r.status == 200 && r.json["id"] == id.as_str() && r.json["data"]["message"] == message,
            format!("GET /data/{id}: {}", r.brief()),
        );
    }
    let unknown = "f".repeat(32);
    let r = cx.get(&cx.gw(&format!("/data/{unknown}"))).await?;
    cx.check(
        r.status == 404 && r.json == json!({"error": "Data not found"}),
        format!("an unknown id: {}", r.brief()),
    );
    let r = cx.get(&cx.gw("/data/not-an-id")).await?;
    cx.check(
        r.status == 400 && r.json["error"].is_string(),
        format!("a malformed id: {}", r.brief()),
    );
    Ok(())
}
