//! Who a request is from, for per-client rate limiting.

use std::net::{IpAddr, SocketAddr};

use axum::extract::ConnectInfo;
use axum::http::Request;

/// The client's address as a rate-limit key: the TCP peer, or, when the peer is on
/// loopback (the gateway on the same machine forwarding), the first
/// `X-Forwarded-For` entry. A remote peer cannot choose its key by sending the header.
pub(crate) fn client_key<B>(req: &Request<B>) -> String {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let trust_forwarded = peer.is_none_or(|ip| ip.is_loopback());
    if trust_forwarded && let Some(forwarded) = first_forwarded(req) {
        return forwarded.to_string();
    }
    peer.map_or_else(|| "unknown".to_owned(), |ip| canonical(ip).to_string())
}

fn first_forwarded<B>(req: &Request<B>) -> Option<IpAddr> {
    let header = req.headers().get("x-forwarded-for")?.to_str().ok()?;
    let first = header.split(',').next()?.trim();
    first.parse::<IpAddr>().ok().map(canonical)
}

/// `::ffff:1.2.3.4` and `1.2.3.4` are the same client.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(peer: Option<&str>, forwarded: Option<&str>) -> Request<()> {
        let mut req = Request::builder().uri("/");
        if let Some(f) = forwarded {
            req = req.header("x-forwarded-for", f);
        }
        let mut req = req.body(()).unwrap();
        if let Some(peer) = peer {
            req.extensions_mut()
                .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        }
        req
    }

    #[test]
    fn the_peer_is_the_client() {
        assert_eq!(
            client_key(&request(Some("10.0.0.7:5555"), None)),
            "10.0.0.7"
        );
        assert_eq!(
            client_key(&request(Some("[::ffff:10.0.0.7]:5555"), None)),
            "10.0.0.7"
        );
    }

    #[test]
    fn a_local_proxy_names_the_client() {
        let req = request(Some("127.0.0.1:40000"), Some("203.0.113.9, 10.0.0.1"));
        assert_eq!(client_key(&req), "203.0.113.9");
        let req = request(Some("[::1]:40000"), Some(" 2001:db8::1 "));
        assert_eq!(client_key(&req), "2001:db8::1");
        // Garbage in the header: the proxy itself is the key.
        let req = request(Some("127.0.0.1:40000"), Some("not-an-ip"));
        assert_eq!(client_key(&req), "127.0.0.1");
    }

    #[test]
    fn a_remote_peer_cannot_pick_its_key() {
        let req = request(Some("198.51.100.4:1234"), Some("203.0.113.9"));
        assert_eq!(client_key(&req), "198.51.100.4");
    }

    #[test]
    fn without_connection_info() {
        assert_eq!(client_key(&request(None, None)), "unknown");
        assert_eq!(
            client_key(&request(None, Some("203.0.113.9"))),
            "203.0.113.9"
        );
    }
}
