//! `GET /`: the gateway dashboard, one self-contained HTML page (inline CSS and vanilla
//! JS, no third-party file) that calls the gateway's own endpoints: the seed's four
//! sections, then services with their instances and breakers (`/admin/services`, live
//! through `/admin/events`), and SVG charts of the last minutes (`/admin/stats`). Off
//! loopback, an `/admin` call answered 401/403 makes the affected section ask for the
//! admin token, which the page keeps in `sessionStorage` and sends as
//! `Authorization: Bearer` on every `/admin` call; the event stream is read with
//! `fetch` (not `EventSource`, which cannot send a header).

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};

use crate::config::GatewayConfig;
use crate::server::GatewayState;

const TEMPLATE: &str = include_str!("../assets/dashboard.html");

/// The page with this gateway's details filled in. Built once per gateway, since
/// nothing in it changes while the gateway runs.
pub fn render(config: &GatewayConfig) -> String {
    TEMPLATE
        .replace(
            "{{REGISTRY_DASHBOARD_URL}}",
            &escape_html(&config.registry_dashboard_url),
        )
        .replace("{{INSTANCE}}", &escape_html(&config.instance))
}

/// `GET /`.
pub async fn dashboard(State(state): State<GatewayState>) -> Response {
    let mut res = Html(state.dashboard_page().to_owned()).into_response();
    // Always revalidate, so a restarted gateway with another registry link is seen.
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_links_the_registry_and_has_every_section() {
        let mut config = GatewayConfig::new(8000, "http://127.0.0.1:3000");
        config.registry_dashboard_url = "http://reg.example:3000/?a=1&b=\"x\"".into();
        let page = render(&config);
        assert!(page.contains(r#"href="http://reg.example:3000/?a=1&amp;b=&quot;x&quot;""#));
        assert!(page.contains("api-gateway-8000"));
        assert!(!page.contains("{{"), "every placeholder is filled");
        for id in [
            "id=\"users\"",
            "id=\"orders\"",
            "id=\"users-with-orders\"",
            "id=\"health\"",
            "id=\"refresh-slider\"",
            "id=\"refresh-all\"",
            "id=\"services\"",
            "id=\"traffic\"",
            "id=\"events\"",
            "id=\"chart-rps\"",
            "id=\"chart-latency\"",
            "id=\"chart-errors\"",
            "id=\"next-refresh\"",
            "/admin/stats",
            "/admin/events",
        ] {
            assert!(page.contains(id), "missing {id}");
        }
        // The admin token: asked for on a 401/403, kept for the tab only, sent as a
        // header (the event stream too, so it is read with fetch, not EventSource).
        for part in [
            "data-token",
            "sessionStorage",
            "authorization: `Bearer ${token}`",
            "TextDecoderStream",
        ] {
            assert!(page.contains(part), "missing {part}");
        }
        assert!(!page.contains("localStorage"));
        assert!(!page.contains("new EventSource"));
        assert!(!page.contains("<script src"), "no third-party files");
        assert!(!page.contains("<link"), "no third-party files");
    }
}
