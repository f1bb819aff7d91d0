//! The route table: an immutable list of routes matched by longest path prefix on
//! segment boundaries, replaced whole (arc-swap) on reload. A request keeps the
//! `Arc<Route>` it matched, so a reload never changes a request in flight.

use std::sync::Arc;

use http::Method;
use http::uri::PathAndQuery;

use crate::config::{FileConfig, RouteSpec};
use crate::limit::{LimitKey, RouteLimiter, SharedLimits};
use crate::policy::{Policy, RateKey, RateLimitSettings};
use crate::upstream::{Upstream, Upstreams};

/// One route, ready to serve.
#[derive(Debug)]
pub struct Route {
    /// Its position in the config file (`routes[i]`).
    pub index: usize,
    /// Its prefix, shared: the `route` label of its metrics.
    pub label: Arc<str>,
    /// Prefix, methods, service, rewrite and policy.
    pub spec: RouteSpec,
    /// The service it reaches.
    pub upstream: Arc<Upstream>,
    /// Its rate limiter, if it has a limit.
    pub limiter: Option<Arc<crate::limit::RouteLimiter>>,
}

impl Route {
    /// The route's policy.
    pub fn policy(&self) -> &Policy {
        &self.spec.policy
    }

    /// The path the upstream gets for `original`: unchanged, or with the matched
    /// prefix replaced by the route's rewrite (query kept).
    pub fn upstream_path(&self, original: &PathAndQuery) -> PathAndQuery {
        match &self.spec.rewrite {
            None => original.clone(),
            Some(to) => rewrite(original, &self.spec.prefix, to),
        }
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum RouteMatch<'a> {
    /// The route to use.
    Found(&'a Arc<Route>),
    /// Some route has the path but none allows the method.
    WrongMethod,
    /// No route has the path.
    NotFound,
}

/// Every route, in match order: longer prefixes first, then routes limited to some
/// methods before catch-alls, then file order.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    file: Arc<FileConfig>,
}

impl RouteTable {
    /// Builds the table for `file`, getting (or creating) each service's upstream state
    /// from `upstreams`, and keeping a route's rate limiter from `previous` when the
    /// same prefix has the same limit (so a reload does not hand out fresh bursts).
    /// With `shared`, rate limits are kept in Redis for every gateway on its prefix.
    pub fn build(
        file: FileConfig,
        upstreams: &Upstreams,
        previous: Option<&RouteTable>,
        shared: Option<&SharedLimits>,
    ) -> Self {
        let file = Arc::new(file);
        let mut routes: Vec<Arc<Route>> = file
            .routes
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                let upstream = upstreams.get_or_create(&spec.service, &spec.policy.service);
                let kept = previous.and_then(|p| {
                    p.routes.iter().find(|r| {
                        r.spec.prefix == spec.prefix
                            && r.spec.methods == spec.methods
                            && r.spec.policy.rate_limit == spec.policy.rate_limit
                    })
                });
                let limiter = match (&spec.policy.rate_limit, kept) {
                    (None, _) => None,
                    (Some(_), Some(old)) if old.limiter.is_some() => old.limiter.clone(),
                    (Some(limit), _) => Some(Arc::new(route_limiter(&spec.prefix, limit, shared))),
                };
                Arc::new(Route {
                    index,
                    label: Arc::from(spec.prefix.as_str()),
                    spec: spec.clone(),
                    upstream,
                    limiter,
                })
            })
            .collect();
        routes.sort_by(|a, b| {
            b.spec
                .prefix
                .len()
                .cmp(&a.spec.prefix.len())
                .then_with(|| b.spec.methods.is_some().cmp(&a.spec.methods.is_some()))
                .then_with(|| a.index.cmp(&b.index))
        });
        Self { routes, file }
    }

    /// The route for `method` and `path`. Allocation-free.
    pub fn find(&self, method: &Method, path: &str) -> RouteMatch<'_> {
        let mut path_known = false;
        for route in &self.routes {
            if !prefix_matches(&route.spec.prefix, path) {
                continue;
            }
            match &route.spec.methods {
                Some(methods) if !methods.contains(method) => path_known = true,
                _ => return RouteMatch::Found(route),
            }
        }
        if path_known {
            RouteMatch::WrongMethod
        } else {
            RouteMatch::NotFound
        }
    }

    /// The routes in match order.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The validated file the table was built from.
    pub fn file(&self) -> &FileConfig {
        &self.file
    }
}

/// A route's limiter: in Redis when the gateway has it, else local. A limit the shared
/// limiter refuses (config validation rules those out) stays local, loudly.
fn route_limiter(
    route: &str,
    limit: &RateLimitSettings,
    shared: Option<&SharedLimits>,
) -> RouteLimiter {
    let key = limit_key(&limit.key);
    if let Some(shared) = shared {
        match RouteLimiter::shared(
            limit.requests,
            limit.per,
            key.clone(),
            route,
            limit.on_redis_error,
            shared,
        ) {
            Ok(limiter) => return limiter,
            Err(e) => {
                tracing::error!(route, error = %e, "rate limit cannot be shared in Redis; limiting locally");
            }
        }
    }
    RouteLimiter::new(limit.requests, limit.per, key)
}

fn limit_key(key: &RateKey) -> LimitKey {
    match key {
        RateKey::ClientIp => LimitKey::ClientIp,
        RateKey::ApiKey => LimitKey::ApiKey,
        RateKey::Header(name) => LimitKey::Header(name.clone()),
    }
}

/// Whether `prefix` matches `path` on a segment boundary: `/users` matches `/users`,
/// `/users/` and `/users/1` but not `/usersx`; `/data/` and `/` match whatever starts
/// with them.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// Replaces the matched `prefix` of `original`'s path with `to`, joining with exactly
/// one `/`; an empty result is `/`. The query is kept.
pub fn rewrite(original: &PathAndQuery, prefix: &str, to: &str) -> PathAndQuery {
    let path = original.path();
    let rest = path.get(prefix.len()..).unwrap_or("");
    let mut out = String::with_capacity(
        to.len() + rest.len() + 1 + original.query().map_or(0, |q| q.len() + 1),
    );
    out.push_str(to);
    match (to.ends_with('/'), rest.starts_with('/')) {
        (true, true) => out.push_str(&rest[1..]),
        (false, false) if !rest.is_empty() => {
            out.push('/');
            out.push_str(rest);
        }
        _ => out.push_str(rest),
    }
    if out.is_empty() {
        out.push('/');
    }
    if let Some(q) = original.query() {
        out.push('?');
        out.push_str(q);
    }
    // Built from a valid path and a validated rewrite, so it parses; the original is
    // the safe answer if it somehow does not.
    PathAndQuery::try_from(out).unwrap_or_else(|_| original.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/users", "/users"));
        assert!(prefix_matches("/users", "/users/"));
        assert!(prefix_matches("/users", "/users/1"));
        assert!(!prefix_matches("/users", "/usersx"));
        assert!(!prefix_matches("/users", "/user"));
        assert!(prefix_matches("/data/", "/data/5"));
        assert!(!prefix_matches("/data/", "/data"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api/metrics", "/api/metrics/summary"));
        assert!(!prefix_matches("/api/metrics", "/api/metricsx"));
    }

    #[test]
    fn rewrites_join_with_one_slash_and_keep_the_query() {
        let pq = |s: &'static str| PathAndQuery::from_static(s);
        assert_eq!(rewrite(&pq("/data"), "/data", "/"), "/");
        assert_eq!(rewrite(&pq("/data?x=1"), "/data", "/"), "/?x=1");
        assert_eq!(rewrite(&pq("/data/5"), "/data", "/"), "/5");
        assert_eq!(rewrite(&pq("/v1/users/2"), "/v1", "/api"), "/api/users/2");
        assert_eq!(rewrite(&pq("/v1/"), "/v1/", "/api"), "/api");
        assert_eq!(rewrite(&pq("/v1/x"), "/v1/", "/api"), "/api/x");
        assert_eq!(rewrite(&pq("/v1/x"), "/v1/", "/api/"), "/api/x");
    }
}
