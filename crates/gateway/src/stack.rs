//! The per-route request path: rate limit -> cache -> total deadline -> retries
//! (budgeted; idempotent or `Idempotency-Key`) -> breaker (per service) -> balancer
//! (skipping ejected endpoints) -> one try ([`forward::send_once`]) -> one
//! classification ([`classify`]) that feeds retry, breaker, ejection, EWMA and
//! metrics.
//!
//! [`proxy`] is the router's fallback for every path the config routes; [`dispatch`]
//! is the resilient call itself, which the composed endpoints use too. [`serve`] runs
//! each proxied request inside the gateway's own [`GatewaySpan`] (W3C trace context).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use axum::BoxError;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use breakwater_resilience::breaker::Outcome;
use breakwater_resilience::deadline::Deadline;
use breakwater_resilience::retry::{Decision, GiveUpReason, RetryPolicy};
use breakwater_runtime::observe::{self, TraceContext};
use breakwater_runtime::otlp::{SpanTimer, Tracer};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;

use crate::balance::{self, Tried};
use crate::cache::{CacheStatus, CachedResponse, ResponseCache};
use crate::classify::{self, AttemptKind, Classified};
use crate::errors::{self, GatewayError};
use crate::forward::{self, ClientBody, Fields, Outbound, Seen, TRACEPARENT, TryError};
use crate::metrics::AttemptOutcome;
use crate::policy::Policy;
use crate::route::{Route, RouteMatch};
use crate::server::GatewayState;
use crate::trace::Trace;
use crate::upstream::Upstream;

/// Response header naming the cause a route's fallback stood in for.
pub const FALLBACK_HEADER: HeaderName = HeaderName::from_static("x-breakwater-fallback");
/// Response header of cached routes: `HIT` or `MISS`.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Largest upstream body a cached route reads whole (the cache decides separately
/// what it stores); past it the answer is a 502.
const MAX_CACHEABLE_READ: usize = 16 << 20;

/// The route a response was served by, for the request metrics (a response extension).
#[derive(Debug, Clone)]
pub struct RouteLabel(pub Arc<str>);

/// A proxied request's response: the upstream's body unboxed, or the gateway's own.
pub type ProxyResponse = hyper::Response<ClientBody>;

/// The gateway's own span of one proxied request, in W3C trace context: a child of the
/// caller's span when the request carried a valid `traceparent`, else the root of a
/// new (sampled) trace. The upstream gets `traceparent` naming this span as its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewaySpan {
    /// The trace id (the caller's, or new) and the gateway's own span id.
    pub context: TraceContext,
    /// The caller's span id, when it sent a valid `traceparent`.
    pub parent_span_id: Option<u64>,
    /// When the gateway took the request (wall clock, as spans are exported); read
    /// only while a tracer is installed, since nothing else uses it.
    pub started: Option<SystemTime>,
}

impl GatewaySpan {
    /// The span of a request with `headers`, starting now.
    pub fn start(headers: &HeaderMap) -> Self {
        Self::with_parent(
            headers
                .get(TRACEPARENT)
                .and_then(|v| v.to_str().ok())
                .and_then(TraceContext::parse),
        )
    }

    /// The span of a request whose caller sent no trace context: the root of a new
    /// trace, starting now.
    pub fn root() -> Self {
        Self::with_parent(None)
    }

    fn with_parent(parent: Option<TraceContext>) -> Self {
        let (context, parent_span_id) = match parent {
            Some(parent) => (parent.child(), Some(parent.span_id)),
            None => (TraceContext::new_root(), None),
        };
        Self {
            context,
            parent_span_id,
            started: Tracer::global().map(|_| SystemTime::now()),
        }
    }
}

/// A response made by the gateway itself (errors, fallbacks, cached answers).
fn own(res: Response) -> ProxyResponse {
    res.map(ClientBody::Other)
}

/// The router's fallback: matches the route table and serves the route, or answers
/// 404 / 405.
pub async fn proxy(State(state): State<GatewayState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let table = state.routes();
    let route = match table.find(&parts.method, parts.uri.path()) {
        RouteMatch::Found(route) => Arc::clone(route),
        RouteMatch::WrongMethod => return errors::wrong_method(parts.method, parts.uri).await,
        RouteMatch::NotFound => return errors::no_route(parts.method, parts.uri).await,
    };
    drop(table);
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let arrival = Arrival {
        peer,
        fresh_id: None,
        seen: Seen::of(&parts.headers),
        fields: Fields::Map,
    };
    let (mut head, body) = serve(&state, &route, parts, body, arrival)
        .await
        .into_parts();
    head.extensions.insert(RouteLabel(Arc::clone(&route.label)));
    Response::from_parts(head, body.into_axum())
}

/// What the caller of [`serve`] knows about a request besides its parts and body.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// The client's address, when known.
    pub peer: Option<SocketAddr>,
    /// The request id the front made for it, when the client sent none (the client's
    /// is on its parts).
    pub fresh_id: Option<HeaderValue>,
    /// [`Seen::of`] its headers: one pass over the client's names, so that the lookups
    /// in [`serve`] and `Outbound::from_client` are made only for names it sent.
    pub seen: Seen,
    /// How an upstream response's fields may come back: [`Fields::Raw`] only for a
    /// caller that writes the response itself (a cached route still gets a map: the
    /// cache stores it).
    pub fields: Fields,
}

/// Serves a request already matched to `route` (the router's fallback, or the front's
/// fast path, [`crate::server::Front`]).
pub async fn serve<B>(
    state: &GatewayState,
    route: &Route,
    parts: axum::http::request::Parts,
    body: B,
    arrival: Arrival,
) -> ProxyResponse
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let Arrival {
        peer,
        fresh_id,
        seen,
        fields,
    } = arrival;
    let span = if seen.has(Seen::TRACEPARENT) {
        GatewaySpan::start(&parts.headers)
    } else {
        GatewaySpan::root()
    };
    // Exported only with a tracer installed and a sampled span; otherwise this is all
    // the span costs.
    let tracer = Tracer::global().filter(|_| span.context.sampled());
    let method = tracer.map(|_| parts.method.clone());
    // One block rather than an `async fn` of its own: each nested future is one more
    // copy of it per request. Every way out passes the span's end below.
    let res = 'serve: {
        let mut trace = if seen.has(Seen::TRACE) {
            Trace::from_request(&parts.headers)
        } else {
            Trace::off()
        };
        trace.note("route", &route.spec.prefix);
        if forward::has_dot_segment(parts.uri.path()) {
            break 'serve own(GatewayError::bad_request(
                "Invalid path: dot segments are not allowed",
            )
            .into_response());
        }

        let mut limit_headers = None;
        if let Some(limiter) = &route.limiter {
            let peer = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip());
            // Boxed, as the cache below: a shared (Redis) check is a large future, and held
            // inline it would make every request's future larger, which is copied as the
            // request moves into hyper's dispatcher.
            match Box::pin(limiter.check(&parts.headers, peer)).await {
                Ok(headers) => {
                    trace.note("limit", "ok");
                    limit_headers = Some(headers);
                }
                Err(mut res) => {
                    state.metrics().rate_limited(&route.label);
                    trace.note("limit", "rejected");
                    trace.finish(res.headers_mut());
                    break 'serve own(res);
                }
            }
        }

        let original = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let path = route.upstream_path(&original);
        let cache_ttl = route
            .policy()
            .cache
            .filter(|_| {
                parts.method == Method::GET && ResponseCache::request_allows(&parts.headers)
            })
            .map(|c| c.ttl);
        if route.policy().cache.is_some() && cache_ttl.is_none() {
            trace.note("cache", "bypass");
        }
        // Each future below is pinned where it is made: awaited by value, it would be
        // copied into this one's state first (several KiB per request in all).
        let reading = std::pin::pin!(Outbound::from_client(
            parts, body, path, peer, seen, fresh_id
        ));
        let mut outbound = match reading.await {
            Ok(outbound) => outbound,
            Err(e) => break 'serve own(e.into_response()),
        };
        outbound.added.traceparent = Some(span.context);
        if cache_ttl.is_none() {
            outbound.fields = fields;
        }

        let mut res = match cache_ttl {
            Some(ttl) => own(Box::pin(cached(state, route, outbound, ttl, &mut trace)).await),
            None => {
                let result = {
                    let dispatching = std::pin::pin!(dispatch(
                        state,
                        &route.upstream,
                        route.policy(),
                        outbound,
                        &mut trace
                    ));
                    dispatching.await
                };
                match result {
                    Ok(res) => forward::proxied_response(res),
                    Err(e) => own(failure_response(route, e, &mut trace)),
                }
            }
        };
        if let Some(headers) = limit_headers {
            res.headers_mut().extend(headers);
        }
        trace.finish(res.headers_mut());
        res
    };
    if let (Some(tracer), Some(method), Some(started)) = (tracer, method, span.started) {
        tracer.record(observe::server_span(
            span.context,
            span.parent_span_id,
            SpanTimer::since(started),
            method.as_str(),
            Some(&route.label),
            res.status().as_u16(),
        ));
    }
    res
}

/// A cached GET: one upstream call for any number of concurrent misses.
async fn cached(
    state: &GatewayState,
    route: &Route,
    outbound: Outbound,
    ttl: std::time::Duration,
    trace: &mut Trace,
) -> Response {
    // `<route>:<upstream path>`: also the tail of the key in Redis (see `cache`).
    let key = format!("{}:{}", route.spec.prefix, outbound.path_and_query);
    // The fetch's trace comes back through a side slot: the cache's result is shared
    // with coalesced waiters, so it cannot carry one request's trace.
    let slot = std::sync::Mutex::new(None::<Trace>);
    let child = trace.child();
    let result = state
        .cache()
        .get_or_fetch(&key, ttl, || async {
            let mut inner = child;
            let res = dispatch(state, &route.upstream, route.policy(), outbound, &mut inner).await;
            let res = read_whole(res, route.upstream.name()).await;
            if let Ok(mut slot) = slot.lock() {
                *slot = Some(inner);
            }
            res
        })
        .await;
    if let Some(inner) = slot.into_inner().ok().flatten() {
        trace.append(inner);
    }
    match result {
        Ok((cached, status)) => {
            let hit = status == CacheStatus::Hit;
            state.metrics().cache(&route.label, hit);
            trace.note("cache", if hit { "hit" } else { "miss" });
            let mut res = Response::new(Body::from(cached.body));
            *res.status_mut() = cached.status;
            *res.headers_mut() = cached.headers;
            res.headers_mut()
                .insert(X_CACHE, HeaderValue::from_static(status.as_str()));
            res
        }
        Err(e) => {
            trace.note("cache", "miss");
            failure_response(route, GatewayError::clone(&e), trace)
        }
    }
}

async fn read_whole(
    res: Result<hyper::Response<forward::UpstreamIncoming>, GatewayError>,
    service: &str,
) -> Result<CachedResponse, GatewayError> {
    let (mut parts, body) = res?.into_parts();
    let body = Limited::new(body, MAX_CACHEABLE_READ)
        .collect()
        .await
        .map_err(|e| GatewayError::Protocol {
            service: service.to_owned(),
            cause: format!("reading the response body: {}", forward::error_chain(&*e)),
        })?
        .to_bytes();
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok(CachedResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// The response for a failed request: the route's fallback when it has one and the
/// failure is on the upstream side, else the error's own response.
fn failure_response(route: &Route, err: GatewayError, trace: &mut Trace) -> Response {
    trace.note("error", err.cause());
    match &route.policy().fallback {
        Some(fallback) if err.is_upstream_failure() => {
            tracing::debug!(route = %route.spec.prefix, cause = err.cause(), error = %err, "serving the route's fallback");
            trace.note("fallback", err.cause());
            let mut res = Response::new(Body::from(Bytes::clone(&fallback.body)));
            *res.status_mut() = fallback.status;
            let headers = res.headers_mut();
            headers.insert(header::CONTENT_TYPE, fallback.content_type.clone());
            headers.insert(FALLBACK_HEADER, HeaderValue::from_static(err.cause()));
            if let Some(wait) = err.retry_after() {
                headers.insert(header::RETRY_AFTER, errors::retry_after_value(wait));
            }
            res
        }
        _ => err.into_response(),
    }
}

/// Sends `outbound` to `upstream` under `policy`: resolves the endpoints, then tries,
/// classifies and retries within the total deadline, the attempt cap and the retry
/// budget, asking the breaker before each try. The response head has arrived; its
/// body streams. A 5xx that is not retried (or whose retries ran out) is returned as
/// the upstream's response, not as an error.
pub async fn dispatch(
    state: &GatewayState,
    upstream: &Upstream,
    policy: &Policy,
    mut outbound: Outbound,
    trace: &mut Trace,
) -> Result<hyper::Response<forward::UpstreamIncoming>, GatewayError> {
    let started = Instant::now();
    let deadline = Deadline::after(started, policy.timeout.total);
    let service = upstream.name();
    // Pinned where it is made, as in `serve`.
    let resolving = std::pin::pin!(resolve(state, service, started));
    let instances = resolving.await?;
    let set = upstream.endpoints_for(&instances);
    let service_state = upstream.state();
    let breaker = service_state.breaker.as_deref();
    let budget = &service_state.budget;
    budget.deposit(started);
    let retry = RetryPolicy {
        max_attempts: policy.retries.max_attempts,
        backoff: policy.retries.backoff,
    };
    let replay = outbound.replay();
    let metrics = state.metrics();

    let mut tried = Tried::default();
    let mut attempt: u32 = 0;
    // The previous try's failure, answered if the next try cannot be made.
    let mut last: Option<Result<hyper::Response<forward::UpstreamIncoming>, GatewayError>> = None;
    loop {
        attempt += 1;
        let now = Instant::now();
        let Some(try_timeout) = deadline.try_timeout(now, policy.timeout.per_try) else {
            trace.note("deadline", "exceeded");
            return Err(GatewayError::DeadlineExceeded {
                service: service.to_owned(),
            });
        };
        let cut_by_deadline = try_timeout < policy.timeout.per_try;

        let permit = match breaker.map(|b| b.try_acquire(now)) {
            None => None,
            Some(Ok(permit)) => {
                if trace.is_on() {
                    let state = breaker.map(|b| b.state(now).as_str().to_ascii_lowercase());
                    trace.note("breaker", state.unwrap_or_default());
                }
                Some(permit)
            }
            Some(Err(rejected)) => {
                metrics.breaker_rejected(service);
                trace.note(
                    "breaker",
                    format_args!("open (retry in {}ms)", rejected.retry_after.as_millis()),
                );
                return last.unwrap_or(Err(GatewayError::BreakerOpen {
                    service: service.to_owned(),
                    retry_after: rejected.retry_after,
                }));
            }
        };

        let now_ns = upstream.nanos(now);
        let Some(pick) = balance::pick(
            upstream,
            &set,
            policy.balance,
            tried,
            now_ns,
            &mut rand::rng(),
        ) else {
            return Err(GatewayError::NoInstance {
                service: service.to_owned(),
            });
        };
        tried.add(pick.index);
        let in_flight = pick.endpoint.start();
        // Only the breaker and the balancer ran since `now`: no second clock read.
        let sent = now;
        let sending = std::pin::pin!(forward::send_once(
            &pick.endpoint,
            &mut outbound,
            sent,
            try_timeout
        ));
        let result = sending.await;
        drop(in_flight);
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(sent);
        let classified = match &result {
            Ok(res) => classify::response(res.status(), replay),
            Err(e) => classify::failure(e.kind(), replay),
        };

        if let (Some(breaker), Some(permit)) = (breaker, permit) {
            breaker.record(permit, Outcome::from_ok(!classified.failure), elapsed, now);
        }
        upstream.observe(
            &set,
            &pick.endpoint,
            &classified,
            pick.probe.is_some(),
            elapsed,
            now,
        );
        drop(pick.probe);
        metrics.attempt(
            service,
            &pick.endpoint.id,
            attempt_outcome(&classified),
            elapsed,
        );
        if trace.is_on() {
            match &result {
                Ok(res) => {
                    trace.attempt(attempt, &pick.endpoint.id, res.status().as_u16(), elapsed)
                }
                Err(e) => trace.attempt(attempt, &pick.endpoint.id, e.kind().as_str(), elapsed),
            }
        }

        let outcome = match result {
            Ok(res) => Ok(res),
            Err(TryError::Timeout) if cut_by_deadline => Err(GatewayError::DeadlineExceeded {
                service: service.to_owned(),
            }),
            Err(e) => {
                tracing::debug!(service, instance = %pick.endpoint.id, attempt, error = %e, "try failed");
                Err(e.into_error(service))
            }
        };
        if !classified.retryable {
            return outcome;
        }
        let breaker_open = breaker.is_some_and(|b| b.is_rejecting(now));
        let decision = retry.decide(
            attempt,
            Some(budget),
            breaker_open,
            Some(deadline.instant()),
            now,
            &mut rand::rng(),
        );
        match decision {
            Decision::Retry { after } => {
                metrics.retry(service);
                trace.note("budget", "ok");
                if trace.is_on() {
                    trace.note(
                        "backoff",
                        format_args!("{:.1}ms", after.as_secs_f64() * 1e3),
                    );
                }
                // The failed answer's body is not needed if the retry is made; it is
                // kept (unread) in case the next try cannot start.
                last = Some(outcome);
                tokio::time::sleep(after).await;
            }
            Decision::GiveUp(reason) => {
                match reason {
                    GiveUpReason::BudgetExhausted => {
                        metrics.retry_budget_exhausted(service);
                        trace.note("budget", "exhausted");
                        tracing::debug!(service, "retry budget exhausted; not retrying");
                    }
                    GiveUpReason::AttemptsExhausted => {}
                    other => trace.note("retry", other.as_str()),
                }
                return outcome;
            }
        }
    }
}

fn attempt_outcome(c: &Classified) -> AttemptOutcome {
    match c.kind {
        AttemptKind::Success => AttemptOutcome::Success,
        AttemptKind::Status4xx => AttemptOutcome::Status4xx,
        AttemptKind::Status5xx => AttemptOutcome::Status5xx,
        AttemptKind::ConnectError => AttemptOutcome::ConnectError,
        AttemptKind::Timeout => AttemptOutcome::Timeout,
        AttemptKind::ProtocolError => AttemptOutcome::ProtocolError,
    }
}

/// The live instances of `service` as discovery knows them.
async fn resolve(
    state: &GatewayState,
    service: &str,
    now: Instant,
) -> Result<Arc<[breakwater_registry::wire::Instance]>, GatewayError> {
    use breakwater_registry::client::DiscoveryError;
    match state.discovery().resolve_at(service, now).await {
        Ok(list) if list.is_empty() => Err(GatewayError::NoInstance {
            service: service.to_owned(),
        }),
        Ok(list) => Ok(list),
        Err(DiscoveryError::NoInstances { .. }) => Err(GatewayError::NoInstance {
            service: service.to_owned(),
        }),
        Err(DiscoveryError::Unavailable { source, .. }) => Err(GatewayError::RegistryUnreachable {
            service: service.to_owned(),
            cause: forward::error_chain(&source),
        }),
    }
}
