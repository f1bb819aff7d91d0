//! Seed 003's dashboard scenarios: normal operation (#1), endpoint testing (#2), user
//! ids (#3), auto-refresh (#7), refresh rate (#8) and discovery integration (#9).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::{Ctx, balancing, probe};

/// #1: every endpoint answers through the gateway, with live data, from several
/// instances.
pub(crate) async fn normal_operation(cx: &Ctx) -> anyhow::Result<()> {
    cx.step("Ask the gateway's health");
    cx.look(format!("{}/ -> \"Health & Cache\"", cx.gateway));
    let h = cx.get(&cx.gw("/health")).await?;
    cx.check(
        h.status == 200 && h.json["status"] == "healthy",
        format!("GET /health answers healthy ({})", h.status),
    );
    cx.check(
        h.json["serviceDiscovery"]["status"] == "connected",
        format!(
            "the gateway is connected to the registry {}",
            h.json["serviceDiscovery"]["server"]
        ),
    );

    cx.step("Call every endpoint the dashboard shows, through the gateway");
    cx.look(format!(
        "{}/ -> \"All Users\", \"User Orders\", \"Users with Orders\" (Refresh All)",
        cx.gateway
    ));
    for path in ["/users", "/orders/user/1", "/users-with-orders"] {
        let r = cx.get(&cx.gw(path)).await?;
        cx.check(
            r.status == 200 && r.json["meta"]["source"].is_string() && !r.is_fallback(),
            format!(
                "GET {path}: {} with live data (meta.source {})",
                r.status, r.json["meta"]["source"]
            ),
        );
    }
    for (path, field) in [("/users/1", "id"), ("/orders/1", "id")] {
        let r = cx.get(&cx.gw(path)).await?;
        cx.check(
            r.status == 200 && r.json[field] == 1,
            format!("GET {path} (proxied to the service): {}", r.brief()),
        );
    }

    cx.step("Ask /users/1 fifteen times and see which users instance answered each");
    cx.look(format!(
        "{}/ -> \"Services\": user-service's instances and their request counts",
        cx.gateway
    ));
    let counts = balancing::spread(cx, "/users/1", 15, 1).await?;
    cx.note(format!("answers per instance: {counts:?}"));
    let registered = probe::registry_ports(cx, "user-service").await?.len();
    cx.check(
        counts.len() >= registered.min(2),
        format!(
            "the answers came from {} different users instances ({registered} registered)",
            counts.len()
        ),
    );
    Ok(())
}

/// #2: each dashboard section's endpoint answers on its own, in its documented shape.
pub(crate) async fn endpoint_testing(cx: &Ctx) -> anyhow::Result<()> {
    cx.step("\"All Users\" -> Test Endpoint: GET /users");
    cx.look(format!("{}/ -> \"All Users\" -> Test Endpoint", cx.gateway));
    let r = cx.get(&cx.gw("/users")).await?;
    let users = r.json["users"].as_array().cloned().unwrap_or_default();
    let shaped = !users.is_empty()
        && users.iter().all(|u| {
            u["id"].is_i64()
                && u["name"].is_string()
                && u["email"].is_string()
                && u["age"].is_number()
        });
    cx.check(
        r.status == 200 && shaped && meta_has(&r.json, &["source", "instance", "timestamp"]),
        format!(
            "200, {} users each with id, name, email, age; meta with source, instance, timestamp",
            users.len()
        ),
    );

    cx.step("\"User Orders\" -> Test Endpoint: GET /orders/user/2");
    cx.look(format!(
        "{}/ -> \"User Orders\" -> Test Endpoint",
        cx.gateway
    ));
    let r = cx.get(&cx.gw("/orders/user/2")).await?;
    let orders = r.json["orders"].as_array().cloned().unwrap_or_default();
    let shaped = orders
        .iter()
        .all(|o| o["id"].is_i64() && o["userId"] == 2 && o["products"].is_array());
    cx.check(
        r.status == 200 && shaped && r.json["meta"]["userId"] == 2,
        format!(
            "200, {} orders each with id, userId 2 and products; meta.userId 2",
            orders.len()
        ),
    );

    cx.step("\"Users with Orders\" -> Test Endpoint: GET /users-with-orders");
    cx.look(format!(
        "{}/ -> \"Users with Orders\" -> Test Endpoint",
        cx.gateway
    ));
    let r = cx.get(&cx.gw("/users-with-orders")).await?;
    let users = r.json["users"].as_array().cloned().unwrap_or_default();
    let total_orders: usize = users
        .iter()
        .map(|u| u["orders"].as_array().map_or(0, Vec::len))
        .sum();
    cx.check(
        r.status == 200
            && !users.is_empty()
            && users.iter().all(|u| u["orders"].is_array())
            && r.json["meta"]["totalUsers"] == users.len()
            && r.json["meta"]["totalOrders"] == total_orders,
        format!(
            "200, {} users each with orders; meta.totalUsers {} and meta.totalOrders {} add up",
            users.len(),
            r.json["meta"]["totalUsers"],
            r.json["meta"]["totalOrders"]
        ),
    );

    cx.step("\"Health & Cache\" -> Test Endpoint: GET /health");
    cx.look(format!(
        "{}/ -> \"Health & Cache\" -> Test Endpoint",
        cx.gateway
    ));
    let r = cx.get(&cx.gw("/health")).await?;
    let cached: Vec<String> = r.json["cache"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    cx.check(
        r.status == 200
            && r.json["service"] == "api-gateway"
            && r.json["timestamp"].is_string()
            && r.json["serviceDiscovery"]["server"].is_string()
            && r.json["cache"].is_object(),
        format!(
            "200 with service, timestamp, serviceDiscovery and cache (services cached: {cached:?})"
        ),
    );
    Ok(())
}

fn meta_has(body: &Value, fields: &[&str]) -> bool {
    fields.iter().all(|f| !body["meta"][f].is_null())
}

/// #3: orders for users 1, 2 and 3 differ and belong to them; a non-integer id is a
/// 400.
pub(crate) async fn user_ids(cx: &Ctx) -> anyhow::Result<()> {
    cx.step("Ask the orders of users 1, 2 and 3");
    cx.look(format!(
        "{}/ -> \"User Orders\": change the user ID to 1, 2, 3 and press Test Endpoint",
        cx.gateway
    ));
    let mut sets: Vec<BTreeSet<i64>> = Vec::new();
    for user in 1..=3_i64 {
        let r = cx.get(&cx.gw(&format!("/orders/user/{user}"))).await?;
        let orders = r.json["orders"].as_array().cloned().unwrap_or_default();
        let ids: BTreeSet<i64> = orders.iter().filter_map(|o| o["id"].as_i64()).collect();
        let products = Value::Array(orders.iter().map(|o| o["products"].clone()).collect());
        cx.check(
            r.status == 200
                && !r.is_fallback()
                && !orders.is_empty()
                && orders.iter().all(|o| o["userId"] == user)
                && r.json["meta"]["userId"] == user,
            format!(
                "user {user}: {} orders {ids:?} ({products}), every one with userId {user}",
                orders.len()
            ),
        );
        sets.push(ids);
    }
    let distinct = sets.iter().collect::<BTreeSet<_>>().len();
    cx.check(
        distinct == sets.len(),
        "the three users have different orders",
    );

    cx.step("Ask with ids that are not integers");
    for bad in ["abc", "1.5"] {
        let r = cx.get(&cx.gw(&format!("/orders/user/{bad}"))).await?;
        cx.check(
            r.status == 400 && r.json == json!({"error": "Invalid user ID"}),
            format!("/orders/user/{bad}: {}", r.brief()),
        );
    }
    Ok(())
}

/// #7: the page has the auto-refresh controls, and the health it polls moves on.
pub(crate) async fn auto_refresh(cx: &Ctx) -> anyhow::Result<()> {
    cx.step("Load the dashboard page");
    cx.look(format!(
        "{}/ -> the \"Auto-refresh\" button (it starts by itself after 5 s)",
        cx.gateway
    ));
    let page = cx.get(&cx.gw("/")).await?;
    cx.check(
        page.status == 200 && page.text.contains("<html"),
        format!(
            "GET / answers the dashboard page ({} bytes)",
            page.text.len()
        ),
    );
    for (id, what) in [
        ("id=\"auto-refresh\"", "an auto-refresh toggle"),
        ("id=\"refresh-all\"", "a Refresh All button"),
        ("id=\"next-refresh\"", "the time to the next refresh"),
    ] {
        cx.check(
            page.text.contains(id),
            format!("the page has {what} ({id})"),
        );
    }
    cx.check(
        page.text.contains("/health"),
        "the page's script polls /health",
    );

    let gap = cx.pace(Duration::from_secs(5), Duration::from_secs(1));
    cx.step(format!(
        "Read /health twice, {} s apart, as the page does every refresh",
        gap.as_secs()
    ));
    cx.look(format!(
        "{}/ -> \"Health & Cache\": its timestamp changes at every refresh",
        cx.gateway
    ));
    let first = health_time(cx).await?;
    tokio::time::sleep(gap).await;
    let second = health_time(cx).await?;
    let moved = second.duration_since(first).unwrap_or_default();
    cx.check(
        moved >= gap.mul_f64(0.8),
        format!(
            "the health timestamp moved on by {:.1} s",
            moved.as_secs_f64()
        ),
    );
    Ok(())
}

async fn health_time(cx: &Ctx) -> anyhow::Result<SystemTime> {
    let r = cx.get(&cx.gw("/health")).await?;
    let stamp = r.json["timestamp"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("/health has no timestamp: {}", r.brief()))?;
    humantime::parse_rfc3339_weak(stamp)
        .map_err(|e| anyhow::anyhow!("/health timestamp {stamp:?} is not ISO-8601: {e}"))
}

/// #8: the refresh-rate slider spans 1 to 10 seconds and starts at 5.
pub(crate) async fn refresh_rate(cx: &Ctx) -> anyhow::Result<()> {
    cx.step("Read the refresh-rate slider in the dashboard page");
    cx.look(format!(
        "{}/ -> the \"every N s\" slider next to Auto-refresh; move it and watch the countdown",
        cx.gateway
    ));
    let page = cx.get(&cx.gw("/")).await?;
    let Some(tag) = element(&page.text, "refresh-slider") else {
        cx.check(
            false,
            "the page has a refresh-rate slider (id=\"refresh-slider\")",
        );
        return Ok(());
    };
    cx.note(&tag);
    cx.check(
        attribute(&tag, "type").as_deref() == Some("range"),
        "it is a range input",
    );
    cx.check(
        attribute(&tag, "min").as_deref() == Some("1")
            && attribute(&tag, "max").as_deref() == Some("10"),
        format!(
            "it spans {}-{} s (seed: 1-10 s)",
            attribute(&tag, "min").unwrap_or_default(),
            attribute(&tag, "max").unwrap_or_default()
        ),
    );
    cx.check(
        attribute(&tag, "value").as_deref() == Some("5"),
        format!(
            "it starts at {} s (seed: 5 s)",
            attribute(&tag, "value").unwrap_or_default()
        ),
    );
    Ok(())
}

/// #9: the dashboard links to the registry dashboard, which answers.
pub(crate) async fn discovery_integration(cx: &Ctx) -> anyhow::Result<()> {
    cx.step("Find the \"Service Discovery Dashboard\" link in the gateway dashboard");
    cx.look(format!(
        "{}/ -> the Service Discovery Dashboard button (opens a new tab)",
        cx.gateway
    ));
    let page = cx.get(&cx.gw("/")).await?;
    let Some(tag) = element(&page.text, "registry-link") else {
        cx.check(false, "the page has a registry link (id=\"registry-link\")");
        return Ok(());
    };
    let href = attribute(&tag, "href").unwrap_or_default();
    cx.check(
        href.starts_with("http"),
        format!("the link points at {href}"),
    );
    cx.check(
        attribute(&tag, "target").as_deref() == Some("_blank"),
        "it opens in a new tab",
    );

    cx.step(format!("Follow it: GET {href}"));
    cx.look(format!("{href} -> the registry dashboard"));
    let r = cx.get(&href).await?;
    cx.check(
        r.status == 200
            && r.header("content-type").starts_with("text/html")
            && r.text.contains("<html"),
        format!("it answers an HTML page ({})", r.status),
    );

    cx.step("The registry behind that dashboard lists the system's services");
    let r = cx.get(&format!("{}/services", cx.registry)).await?;
    let names: Vec<String> = r
        .json
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v.as_array().is_some_and(|a| !a.is_empty()))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    for service in ["api-gateway", "user-service", "order-service"] {
        cx.check(
            names.iter().any(|n| n == service),
            format!("the registry lists {service}"),
        );
    }
    Ok(())
}

/// The start tag of the element with `id` in `html`.
fn element(html: &str, id: &str) -> Option<String> {
    let at = html.find(&format!("id=\"{id}\""))?;
    let start = html[..at].rfind('<')?;
    let end = at + html[at..].find('>')?;
    Some(html[start..=end].to_owned())
}

/// The value of `name="..."` in a start tag.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let (at, _) = tag
        .match_indices(&key)
        .find(|&(i, _)| tag[..i].ends_with(char::is_whitespace))?;
    let value = &tag[at + key.len()..];
    Some(value[..value.find('"')?].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_attributes_are_found_by_id() {
        let html = r#"<label>every <input id="refresh-slider" type="range" min="1" max="10" value="5"></label>"#;
        let tag = element(html, "refresh-slider").unwrap();
        assert!(tag.starts_with("<input") && tag.ends_with('>'), "{tag}");
        assert_eq!(attribute(&tag, "min").as_deref(), Some("1"));
        assert_eq!(attribute(&tag, "max").as_deref(), Some("10"));
        assert_eq!(attribute(&tag, "id").as_deref(), Some("refresh-slider"));
        assert_eq!(attribute(&tag, "step"), None);
        assert_eq!(element(html, "nope"), None);
    }
}
