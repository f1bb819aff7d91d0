//! Seed 004's "Testing the System": the summary cache, the per-client rate limit and
//! the breaker around the external dependency.
//!
//! Posts carry an `X-Forwarded-For` address of their own (analytics trusts it from the
//! gateway on loopback), so each scenario gets a fresh rate-limit window whatever else
//! has posted.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Ctx, Reply, probe, system};

/// A client address no one else uses: 198.18.0.0/15 is reserved for benchmarks.
fn fresh_client() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("198.18.{}.{}", (n >> 8) % 256, n % 254 + 1)
}

async fn post_metric(cx: &Ctx, client: &str, kind: &str, value: f64) -> anyhow::Result<Reply> {
    let body = json!({
        "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "value": value,
        "type": kind,
    });
    cx.send(
        cx.http
            .post(cx.gw("/api/metrics"))
            .header("x-forwarded-for", client)
            .json(&body),
    )
    .await
}

/// Caching: summary MISS, then HIT; a new metric makes the next read a MISS again.
pub(crate) async fn caching(cx: &Ctx) -> anyhow::Result<()> {
    let client = fresh_client();
    let kind = format!(
        "scenario-{}-{}",
        std::process::id(),
        fresh_client().replace('.', "-")
    );
    cx.step(format!(
        "Store a metric of a new type ({kind}) with POST /api/metrics"
    ));
    cx.look(format!(
        "{}/ -> \"Traffic\", route /api/metrics (the gateway proxies it to analytics)",
        cx.gateway
    ));
    let r = post_metric(cx, &client, &kind, 42.0).await?;
    cx.check(
        r.status == 201 && r.json["message"] == "Metric stored successfully",
        format!("POST /api/metrics: {}", r.brief()),
    );

    let summary = cx.gw(&format!("/api/metrics/summary?type={kind}"));
    cx.step("Ask its summary twice (seed: \"Call summary once -> computes and caches; call again -> served from the cache\")");
    let first = cx.get(&summary).await?;
    cx.check(
        first.status == 200
            && first.json["count"] == 1
            && first.json["average_value"].as_f64() == Some(42.0),
        format!("first summary: {}", first.brief()),
    );
    cx.check(
        first.header("x-cache") == "MISS",
        format!(
            "the first read is computed: X-Cache {:?}",
            first.header("x-cache")
        ),
    );
    let second = cx.get(&summary).await?;
    cx.check(
        second.header("x-cache") == "HIT" && second.json == first.json,
        format!(
            "the second read is served from the cache: X-Cache {:?}, same body",
            second.header("x-cache")
        ),
    );

    cx.step("Store another metric of that type, and ask again");
    let r = post_metric(cx, &client, &kind, 58.0).await?;
    cx.check(r.status == 201, format!("POST /api/metrics: {}", r.status));
    let third = cx.get(&summary).await?;
    cx.check(
        third.header("x-cache") == "MISS"
            && third.json["count"] == 2
            && third.json["average_value"].as_f64() == Some(50.0),
        format!(
            "the write invalidated the cached summary: X-Cache {:?}, {}",
            third.header("x-cache"),
            third.brief()
        ),
    );

    cx.step("Ask without a type, and for a type with no metric");
    let r = cx.get(&cx.gw("/api/metrics/summary")).await?;
    cx.check(
        r.status == 400 && r.json["error"] == "Query parameter 'type' is required",
        format!("no type: {}", r.brief()),
    );
    let r = cx
        .get(&cx.gw(&format!("/api/metrics/summary?type={kind}-none")))
        .await?;
    cx.check(
        r.status == 404 && r.json["message"] == "No metrics found",
        format!("unknown type: {}", r.brief()),
    );
    Ok(())
}

/// Rate limiting: exactly the window's remaining posts are admitted, then 429 with
/// Retry-After; after that wait, posts are admitted again.
pub(crate) async fn rate_limit(cx: &Ctx) -> anyhow::Result<()> {
    let client = fresh_client();
    let kind = format!("scenario-rate-{}", std::process::id());
    cx.step(format!(
        "POST /api/metrics quickly from one client ({client}) until it is refused (seed: the 6th returns 429)"
    ));
    cx.look(format!(
        "{}/ -> \"Traffic\": the /api/metrics route's 4xx",
        cx.gateway
    ));
    let mut admitted = 0_u32;
    let mut first: Option<Reply> = None;
    let refused = loop {
        let r = post_metric(cx, &client, &kind, 1.0).await?;
        match r.status {
            201 => {
                admitted += 1;
                first.get_or_insert(r);
            }
            429 => break r,
            _ => {
                cx.check(false, format!("an unexpected answer: {}", r.brief()));
                return Ok(());
            }
        }
        if admitted > 1000 {
            cx.check(false, "no 429 after 1000 posts");
            return Ok(());
        }
    };
    let Some(first) = first else {
        cx.check(
            false,
            "the first post was refused: the window was not fresh",
        );
        return Ok(());
    };
    let limit: Option<u32> = first.header("x-ratelimit-limit").parse().ok();
    let remaining: Option<u32> = first.header("x-ratelimit-remaining").parse().ok();
    cx.note(format!(
        "{admitted} admitted (X-RateLimit-Limit {limit:?}, X-RateLimit-Remaining after the first {remaining:?})"
    ));
    cx.check(
        remaining.map(|r| r + 1) == Some(admitted),
        format!("exactly the window's allowance was admitted: {admitted}"),
    );
    if cx.own_system {
        cx.check(
            admitted == 5,
            format!("that is RATE_LIMIT_MAX (default 5): {admitted}"),
        );
    }
    let retry_after: u64 = refused.header("retry-after").parse().unwrap_or(0);
    cx.check(
        refused.json["error"] == "Too many requests. Try again later." && retry_after >= 1,
        format!(
            "429 {} with Retry-After: {retry_after}",
            refused.json["error"]
        ),
    );

    if !cx.fast && !cx.own_system && retry_after > 60 {
        cx.note("Retry-After is past a minute: not waiting for the window to end");
        return Ok(());
    }
    cx.step(format!("Wait Retry-After ({retry_after} s) and post again"));
    tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(200)).await;
    let r = post_metric(cx, &client, &kind, 1.0).await?;
    cx.check(
        r.status == 201,
        format!("a new window admits the client again: {}", r.status),
    );
    Ok(())
}

/// The breaker around the external dependency, called on analytics directly (through
/// the gateway its 503s would be retried, and each retry would count as a failure).
pub(crate) async fn breaker(cx: &Ctx) -> anyhow::Result<()> {
    let saved = probe::save_chaos(cx).await?;
    let outcome = breaker_steps(cx, &saved).await;
    cx.note("Putting unstable's fault rates back");
    probe::restore_chaos(cx, saved).await?;
    outcome
}

async fn breaker_steps(cx: &Ctx, saved: &probe::SavedChaos) -> anyhow::Result<()> {
    let analytics = probe::instance_urls(cx, "analytics-service")
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no analytics instance"))?;
    let external = format!("{analytics}/api/external-data");
    let health = format!("{analytics}/health");
    let wait_for = if cx.own_system && cx.fast {
        Duration::from_secs(system::FAST_ANALYTICS_RESET_SECS + 10)
    } else {
        Duration::from_secs(120)
    };

    cx.step("Make unstable healthy and let analytics' breaker be CLOSED");
    probe::set_chaos(cx, saved, &json!({"failureRate": 0.0, "delayRate": 0.0})).await?;
    let closed = cx
        .poll(wait_for, || async {
            let r = cx.get(&external).await?;
            Ok((r.json["circuit_state"] == "CLOSED" && r.status == 200).then_some(()))
        })
        .await?;
    if !cx.check(
        closed.is_some(),
        "analytics answers external data, circuit CLOSED",
    ) {
        return Ok(());
    }

    cx.step(
        "Make unstable fail every call, and call GET /api/external-data until the circuit opens",
    );
    cx.look(format!("{health} -> circuit_state; analytics' log lines"));
    probe::set_chaos(cx, saved, &json!({"failureRate": 1.0, "delayRate": 0.0})).await?;
    let mut states: Vec<String> = Vec::new();
    let mut all_fallback = true;
    for _ in 0..20 {
        let r = cx.get(&external).await?;
        all_fallback &= r.status == 503
            && r.json["message"] == "Fallback response: External service unavailable";
        let state = r.json["circuit_state"].as_str().unwrap_or("?").to_owned();
        let open = state == "OPEN";
        states.push(state);
        if open {
            break;
        }
    }
    cx.note(format!(
        "circuit_state after each call: {}",
        states.join(", ")
    ));
    cx.check(
        all_fallback,
        "every call answered 503 \"Fallback response: External service unavailable\"",
    );
    let opened_after = states.iter().position(|s| s == "OPEN").map(|i| i + 1);
    cx.check(
        opened_after.is_some() && states.iter().rev().skip(1).all(|s| s == "CLOSED"),
        format!("CLOSED -> OPEN after {opened_after:?} consecutive failures"),
    );
    if cx.own_system {
        cx.check(
            opened_after == Some(3),
            "that is CIRCUIT_FAILURE_THRESHOLD (default 3)",
        );
    }
    let r = cx.get(&external).await?;
    cx.check(
        r.status == 503 && r.json["circuit_state"] == "OPEN" && !r.header("retry-after").is_empty(),
        format!(
            "while OPEN a call is answered at once with the fallback (Retry-After: {})",
            r.header("retry-after")
        ),
    );

    cx.step("Make unstable healthy again (each call takes 1 s), and wait for the reset timeout");
    probe::set_chaos(
        cx,
        saved,
        &json!({"failureRate": 0.0, "delayRate": 1.0, "delayMs": 1000}),
    )
    .await?;
    let half_open = cx
        .poll(wait_for, || async {
            let r = cx.get(&health).await?;
            Ok((r.json["circuit_state"] == "HALF_OPEN").then_some(()))
        })
        .await?;
    if !cx.check(
        half_open.is_some(),
        "after the reset timeout analytics reports HALF_OPEN",
    ) {
        return Ok(());
    }

    cx.step("Call three times at once: only one trial call goes through");
    let (a, b, c) = tokio::join!(cx.get(&external), cx.get(&external), cx.get(&external));
    let answers = [a?, b?, c?];
    let trials = answers.iter().filter(|r| r.status == 200).count();
    let rejected = answers
        .iter()
        .filter(|r| r.status == 503 && r.json["circuit_state"] == "HALF_OPEN")
        .count();
    cx.note(format!(
        "answers: {}",
        answers
            .iter()
            .map(|r| r.status.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    cx.check(
        trials == 1 && rejected == 2,
        format!("one trial succeeded ({trials}), the other two got the fallback while HALF_OPEN ({rejected})"),
    );
    let trial: Option<&Value> = answers.iter().find(|r| r.status == 200).map(|r| &r.json);
    cx.check(
        trial.is_some_and(|t| {
            t["circuit_state"] == "CLOSED" && t["data"]["external_data"] == "success"
        }),
        format!(
            "the trial's success closed the circuit: {}",
            trial.cloned().unwrap_or_default()
        ),
    );
    let r = cx.get(&health).await?;
    cx.check(
        r.json["circuit_state"] == "CLOSED",
        format!("analytics' health says {}", r.json["circuit_state"]),
    );
    Ok(())
}
