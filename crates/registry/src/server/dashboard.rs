//! The registry dashboard (`GET /`): one self-contained page (`dashboard.html`, inline
//! CSS and JS). The server fills in the current services so the page is useful at once
//! (and without JavaScript); the script then keeps it live from `/services` and
//! `/health`: counting heartbeat ages, counts and uptime, registering by hand
//! (`POST /register`) and removing (`DELETE /services/:name/:port?host=`). Every value
//! comes from registrants, so the server escapes it and the script only sets text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use crate::wire::Instance;

const TEMPLATE: &str = include_str!("dashboard.html");

/// Renders the page for `services` at wall-clock `now_ms`.
pub(super) fn render(
    services: &BTreeMap<String, Vec<Instance>>,
    now_ms: u64,
    uptime_secs: u64,
) -> String {
    let instances: usize = services.values().map(Vec::len).sum();
    // Registrant text goes in last, so a value that looks like a placeholder stays text.
    TEMPLATE
        .replace("{{SERVICES}}", &services.len().to_string())
        .replace("{{INSTANCES}}", &instances.to_string())
        .replace("{{UPTIME}}", &format!("{uptime_secs} s"))
        .replace(
            "{{SUMMARY}}",
            &format!(
                "{} services, {instances} instances, up {uptime_secs} s",
                services.len()
            ),
        )
        .replace("{{SERVICES_HTML}}", &tables(services, now_ms))
}

/// The services as plain tables, as the script would draw them.
fn tables(services: &BTreeMap<String, Vec<Instance>>, now_ms: u64) -> String {
    let mut html = String::with_capacity(2048);
    if services.is_empty() {
        html.push_str("<p class=\"muted\">No service is registered.</p>\n");
    }
    for (name, list) in services {
        let _ = writeln!(
            html,
            "<div data-service=\"{}\"><h3>{} ({})</h3>",
            escape(name),
            escape(name),
            list.len()
        );
        html.push_str(concat!(
            "<table><thead><tr><th>Instance</th><th>Address</th><th>Status</th>",
            "<th>Heartbeat</th><th>Interval</th><th>Registered</th><th>Metadata</th>",
            "</tr></thead><tbody>\n"
        ));
        for i in list {
            let ago = now_ms.saturating_sub(i.last_heartbeat) / 1000;
            let metadata = serde_json::Value::Object(i.metadata.clone()).to_string();
            let _ = writeln!(
                html,
                "<tr data-instance=\"{}\"><td>{}</td><td>{}</td>\
                 <td><span class=\"badge {}\">{}</span></td>\
                 <td data-heartbeat=\"{}\" data-interval=\"{}\">{} ({ago} s ago)</td>\
                 <td>{} s</td><td>{}</td><td><code>{}</code></td></tr>",
                escape(&i.id),
                escape(&i.id),
                escape(&i.base_url()),
                escape(&i.status),
                escape(&i.status),
                i.last_heartbeat,
                i.heartbeat_interval,
                iso(i.last_heartbeat),
                i.heartbeat_interval,
                iso(i.registered_at),
                escape(&metadata),
            );
        }
        html.push_str("</tbody></table></div>\n");
    }
    html
}

fn iso(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Escapes text for an HTML element or a quoted attribute.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_special_character() {
        assert_eq!(
            escape(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn lists_instances_with_escaped_metadata() {
        let mut metadata = serde_json::Map::new();
        metadata.insert("note".into(), "<script>alert(1)</script>".into());
        let inst = Instance {
            id: "svc-127.0.0.1-4000".into(),
            name: "svc".into(),
            host: "127.0.0.1".into(),
            port: 4000,
            heartbeat_interval: 30,
            registered_at: 0,
            last_heartbeat: 1_000,
            status: "healthy".into(),
            metadata,
        };
        let services = BTreeMap::from([("svc".to_owned(), vec![inst])]);
        let html = render(&services, 11_000, 5);
        assert!(html.contains("<h3>svc (1)</h3>"), "{html}");
        assert!(html.contains("http://127.0.0.1:4000"));
        assert!(html.contains("1970-01-01T00:00:01.000Z (10 s ago)"));
        assert!(html.contains("1 services, 1 instances, up 5 s"));
        assert!(!html.contains("<script>alert"));
        assert!(html.contains("&lt;script&gt;"));
        assert!(render(&BTreeMap::new(), 0, 0).contains("No service is registered."));
    }

    #[test]
    fn registrant_text_cannot_fill_a_placeholder_or_load_a_file() {
        let inst = Instance {
            id: "svc-h-1".into(),
            name: "svc".into(),
            host: "h".into(),
            port: 1,
            heartbeat_interval: 30,
            registered_at: 0,
            last_heartbeat: 0,
            status: "{{SUMMARY}}".into(),
            metadata: serde_json::Map::new(),
        };
        let html = render(&BTreeMap::from([("svc".to_owned(), vec![inst])]), 0, 0);
        assert!(html.contains(">{{SUMMARY}}</span>"), "left as text");
        for id in [
            "id=\"register-form\"",
            "id=\"services-body\"",
            "id=\"count-services\"",
            "id=\"count-instances\"",
            "id=\"uptime\"",
            "id=\"auto-refresh\"",
        ] {
            assert!(html.contains(id), "missing {id}");
        }
        assert!(!html.contains("<script src"), "self-contained");
        assert!(!html.contains("<link"), "self-contained");
    }
}
