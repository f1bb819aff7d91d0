//! The registry's server-rendered HTML page: services and their live instances. Every
//! value comes from registrants, so every value is escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use crate::wire::Instance;

/// Renders the page for `services` at wall-clock `now_ms`.
pub(super) fn render(
    services: &BTreeMap<String, Vec<Instance>>,
    now_ms: u64,
    uptime_secs: u64,
) -> String {
    let instances: usize = services.values().map(Vec::len).sum();
    let mut html = String::with_capacity(2048);
    html.push_str(concat!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta http-equiv=\"refresh\" content=\"5\">",
        "<title>Service Registry</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2rem;color:#222}",
        "table{border-collapse:collapse;margin-bottom:1.5rem}",
        "th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}",
        "th{background:#f3f3f3}.healthy{color:#176f2c}",
        "</style></head><body><h1>Service Registry</h1>\n"
    ));
    let _ = writeln!(
        html,
        "<p>{} services, {instances} instances, up {uptime_secs} s</p>",
        services.len()
    );
    if services.is_empty() {
        html.push_str("<p>No service is registered.</p>\n");
    }
    for (name, list) in services {
        let _ = writeln!(html, "<h2>{} ({})</h2>", escape(name), list.len());
        html.push_str(concat!(
            "<table><tr><th>Instance</th><th>Address</th><th>Status</th>",
            "<th>Heartbeat interval</th><th>Last heartbeat</th><th>Registered</th>",
            "<th>Metadata</th></tr>\n"
        ));
        for i in list {
            let ago = now_ms.saturating_sub(i.last_heartbeat) / 1000;
            let metadata = serde_json::Value::Object(i.metadata.clone()).to_string();
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{} s</td>\
                 <td>{} ({ago} s ago)</td><td>{}</td><td><code>{}</code></td></tr>",
                escape(&i.id),
                escape(&i.base_url()),
                escape(&i.status),
                escape(&i.status),
                i.heartbeat_interval,
                iso(i.last_heartbeat),
                iso(i.registered_at),
                escape(&metadata),
            );
        }
        html.push_str("</table>\n");
    }
    html.push_str("</body></html>\n");
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
        assert!(html.contains("<h2>svc (1)</h2>"), "{html}");
        assert!(html.contains("http://127.0.0.1:4000"));
        assert!(html.contains("1970-01-01T00:00:01.000Z (10 s ago)"));
        assert!(html.contains("1 services, 1 instances, up 5 s"));
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;"));
        assert!(render(&BTreeMap::new(), 0, 0).contains("No service is registered."));
    }
}
