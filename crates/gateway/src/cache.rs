//! The gateway's GET response cache: per-route TTL and request coalescing.
//!
//! Built on moka's `future::Cache` and its `try_get_with`, so N concurrent misses on one
//! key make one upstream call and all N callers get its result.
//!
//! Freshness is judged against `tokio::time` (each entry records when it goes stale), so
//! paused-time tests can expire entries; moka's own per-entry expiry ([`Expiry`]) uses the
//! same TTL and only frees the memory of entries nobody asks for again.
//!
//! Only what a shared cache may keep is stored: a 200 without `Cache-Control: no-store`,
//! `no-cache` or `private`, without `Set-Cookie` or `Vary`, and with a body of at most
//! `max_body` bytes. Anything else (and any fetch error) is handed to the caller and to
//! the callers coalesced with it, and not stored.
//!
//! With [`RedisLevel`] (the gateway's `--redis`), moka is the first level and Redis a
//! second one shared by every gateway on the prefix: a local miss reads
//! `<prefix>:cache:<key>` (inside the coalesced fetch, so one read per key at a time)
//! and a hit there fills the local level for the entry's remaining TTL, without an
//! upstream call; a stored fetch is written there with `SET .. PX <ttl>`. Entries are
//! [`encode`]d compactly (status, headers, body). Every Redis call is bounded by a short
//! timeout; a failure, a timeout or an entry that does not decode is a miss, counted in
//! `breakwater_gateway_redis_fallbacks_total{kind="cache"}`, never an error, and after a
//! failure Redis is skipped for [`REDIS_PAUSE`] so an outage costs no time per request.
//! [`ResponseCache::invalidate_all`] (a reload) empties the local level only: shared
//! entries are other gateways' too, and end with their TTL.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{AUTHORIZATION, CACHE_CONTROL, PRAGMA, SET_COOKIE, VARY};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use moka::Expiry;
use prometheus_client::metrics::counter::Counter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisResult};
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// The longest a response is kept, whatever the route says: keeps the deadline
/// arithmetic far from overflow.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A response as the cache keeps it: whole, so that it can be replayed.
#[derive(Debug, Clone)]
pub struct CachedResponse {
    /// The upstream's status.
    pub status: StatusCode,
    /// The upstream's headers (the caller has already removed hop-by-hop ones).
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

/// Whether a response came from the cache.
///
/// `Miss` means this caller ran `fetch` (one upstream call). `Hit` means it made no
/// upstream call: it was served a stored entry, or it waited on another caller's
/// concurrent fetch of the same key and got that result (coalescing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served without an upstream call.
    Hit,
    /// This caller fetched from upstream.
    Miss,
}

impl CacheStatus {
    /// The `X-Cache` header value: `"HIT"` or `"MISS"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "HIT",
            Self::Miss => "MISS",
        }
    }
}

/// A stored response and when it goes stale.
#[derive(Debug)]
struct Entry {
    response: CachedResponse,
    ttl: Duration,
    stale_at: Instant,
}

/// What a coalesced fetch that stores nothing hands to every caller waiting on it.
enum Unstored<E> {
    Failed(Arc<E>),
    Passed(CachedResponse),
}

/// moka's eviction of an entry once its TTL has passed.
struct EntryTtl;

impl Expiry<String, Arc<Entry>> for EntryTtl {
    #[expect(
        clippy::disallowed_types,
        reason = "moka's Expiry trait is defined over std::time::Instant"
    )]
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The response cache shared by all routes (the route id is part of the key).
pub struct ResponseCache {
    entries: moka::future::Cache<String, Arc<Entry>>,
    max_body: usize,
    redis: Option<RedisLevel>,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("entries", &self.entries.entry_count())
            .field("max_body", &self.max_body)
            .field("redis", &self.redis)
            .finish()
    }
}

impl ResponseCache {
    /// A cache of at most `max_entries` responses, each with a body of at most
    /// `max_body` bytes.
    pub fn new(max_entries: u64, max_body: usize) -> Self {
        Self {
            entries: moka::future::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(EntryTtl)
                .build(),
            max_body,
            redis: None,
        }
    }

    /// Adds `redis` as the shared second level.
    #[must_use]
    pub fn with_redis(mut self, redis: RedisLevel) -> Self {
        self.redis = Some(redis);
        self
    }

    /// The response for `key` (method, path and query, and the route id), fresh from the
    /// cache or from `fetch`, which is called at most once among concurrent callers of
    /// one key. A storable result is kept for `ttl`. A fetch error or an unstorable
    /// response is returned to the caller that fetched and to the callers coalesced with
    /// it, and not stored. See [`CacheStatus`] for what `Hit` and `Miss` mean.
    pub async fn get_or_fetch<F, Fut, E>(
        &self,
        key: &str,
        ttl: Duration,
        fetch: F,
    ) -> Result<(CachedResponse, CacheStatus), Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<CachedResponse, E>>,
        E: Send + Sync + 'static,
    {
        if let Some(entry) = self.entries.get(key).await {
            if Instant::now() < entry.stale_at {
                return Ok((entry.response.clone(), CacheStatus::Hit));
            }
            // Two callers can both see the stale entry and the second may remove the
            // first one's fresh replacement: that costs one extra fetch, never a stale
            // answer.
            self.entries.invalidate(key).await;
        }

        let fetched = AtomicBool::new(false);
        let max_body = self.max_body;
        let redis = self.redis.as_ref().filter(|_| !ttl.is_zero());
        let init = async {
            if let Some(redis) = redis
                && let Some((response, left)) = redis.get(key, max_body).await
            {
                let ttl = left.min(ttl).min(MAX_TTL);
                return Ok(Arc::new(Entry {
                    response,
                    ttl,
                    stale_at: Instant::now() + ttl,
                }));
            }
            fetched.store(true, Ordering::Relaxed);
            let response = fetch().await.map_err(|e| Unstored::Failed(Arc::new(e)))?;
            if ttl.is_zero() || !response_storable(&response, max_body) {
                return Err(Unstored::Passed(response));
            }
            let ttl = ttl.min(MAX_TTL);
            if let Some(redis) = redis {
                redis.put(key, &response, ttl).await;
            }
            Ok(Arc::new(Entry {
                response,
                ttl,
                stale_at: Instant::now() + ttl,
            }))
        };
        let result = self.entries.try_get_with_by_ref(key, init).await;
        let status = if fetched.load(Ordering::Relaxed) {
            CacheStatus::Miss
        } else {
            CacheStatus::Hit
        };
        match result {
            Ok(entry) => Ok((entry.response.clone(), status)),
            Err(unstored) => match &*unstored {
                Unstored::Failed(e) => Err(Arc::clone(e)),
                Unstored::Passed(response) => Ok((response.clone(), status)),
            },
        }
    }

    /// Whether a request may be answered from (and fill) the cache: not when it says
    /// `Cache-Control: no-store` or `no-cache` (or `Pragma: no-cache`), and not when it
    /// carries `Authorization` (a shared cache must not hand one user's answer to
    /// another).
    pub fn request_allows(headers: &HeaderMap) -> bool {
        !headers.contains_key(AUTHORIZATION)
            && !has_directive(headers, CACHE_CONTROL, &["no-store", "no-cache"])
            && !has_directive(headers, PRAGMA, &["no-cache"])
    }

    /// The cache key of a request on `route`: route id, method, and path with query.
    /// The route id is length-prefixed so that no two (route, request) pairs share a key.
    pub fn key(route: &str, method: &http::Method, path_and_query: &str) -> String {
        format!("{}:{route}{method} {path_and_query}", route.len())
    }

    /// Drops every stored response (on a config reload).
    pub fn invalidate_all(&self) {
        self.entries.invalidate_all();
    }
}

/// How long the cache leaves Redis alone after a failed call.
pub const REDIS_PAUSE: Duration = Duration::from_secs(1);

/// Header names never written to the shared level: they describe one exchange, not the
/// resource.
const PER_REQUEST_HEADERS: [&str; 2] = ["x-request-id", "traceparent"];

/// First bytes of an [`encode`]d entry (format version 1).
const MAGIC: &[u8; 4] = b"BWC1";

/// The cache's shared second level in Redis (see the module docs). Connects lazily, so
/// it can be built while Redis is down.
pub struct RedisLevel {
    client: Client,
    conn: OnceCell<ConnectionManager>,
    /// `<gateway prefix>:cache`.
    prefix: String,
    timeout: Duration,
    failures: Counter,
    /// Redis is skipped until this many ms after `epoch` (0: not paused).
    paused_until_ms: AtomicU64,
    epoch: Instant,
    /// Whether the last call failed, so an outage is logged when it starts and ends.
    down: AtomicBool,
}

impl std::fmt::Debug for RedisLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLevel")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("failures", &self.failures.get())
            .finish_non_exhaustive()
    }
}

impl RedisLevel {
    /// The level in the Redis at `url`, keys `<prefix>:<cache key>`, each call bounded
    /// by `timeout`, each failure counted on `failures`. Fails only on a bad URL.
    pub fn new(
        url: &str,
        prefix: impl Into<String>,
        timeout: Duration,
        failures: Counter,
    ) -> RedisResult<Self> {
        Ok(Self {
            client: Client::open(url)?,
            conn: OnceCell::new(),
            prefix: prefix.into(),
            timeout,
            failures,
            paused_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            down: AtomicBool::new(false),
        })
    }

    /// Failed (or timed-out, or undecodable) calls since start.
    pub fn failures(&self) -> u64 {
        self.failures.get()
    }

    fn redis_key(&self, key: &str) -> String {
        format!("{}:{key}", self.prefix)
    }

    fn since_epoch_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The entry for `key` and its remaining TTL; `None` on a miss or any failure.
    async fn get(&self, key: &str, max_body: usize) -> Option<(CachedResponse, Duration)> {
        let key = self.redis_key(key);
        let (value, pttl): (Option<Vec<u8>>, i64) = self
            .attempt("get", |mut conn| async move {
                redis::pipe()
                    .get(&key)
                    .cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let value = value?;
        // PTTL: -2 gone since the GET, -1 no expiry (not written by a gateway).
        let left = u64::try_from(pttl).ok().filter(|ms| *ms > 0)?;
        match decode(&value, max_body) {
            Some(response) => Some((response, Duration::from_millis(left))),
            None => {
                // Redis itself is fine: counted, not paused, and the fetch that follows
                // overwrites the entry.
                self.failures.inc();
                None
            }
        }
    }

    /// Writes `response` under `key` for `ttl`; a failure only counts.
    async fn put(&self, key: &str, response: &CachedResponse, ttl: Duration) {
        let Some(value) = encode(response) else {
            return;
        };
        let key = self.redis_key(key);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let _: Option<()> = self
            .attempt("set", |mut conn| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&value[..])
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut conn)
                    .await
            })
            .await;
    }

    /// Runs `op` within the timeout; `None` (counted, logged once per outage) if it
    /// failed, and `None` at once while paused after a failure.
    async fn attempt<T, F, Fut>(&self, what: &str, op: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let paused_until = self.paused_until_ms.load(Ordering::Relaxed);
        if paused_until != 0 && self.since_epoch_ms() < paused_until {
            self.failures.inc();
            return None;
        }
        let call = async {
            let conn = self
                .conn
                .get_or_try_init(|| async {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(self.timeout))
                        .set_response_timeout(Some(self.timeout))
                        .set_number_of_retries(1);
                    ConnectionManager::new_with_config(self.client.clone(), config).await
                })
                .await?
                .clone();
            op(conn).await
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(prefix = %self.prefix, "response cache: Redis is back");
                }
                Some(value)
            }
            Ok(Err(e)) => {
                self.failed(what, e.to_string());
                None
            }
            Err(_) => {
                self.failed(what, "timed out".to_owned());
                None
            }
        }
    }

    fn failed(&self, what: &str, reason: String) {
        self.failures.inc();
        let until = self
            .since_epoch_ms()
            .saturating_add(u64::try_from(REDIS_PAUSE.as_millis()).unwrap_or(u64::MAX));
        self.paused_until_ms.store(until, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                prefix = %self.prefix, operation = what, %reason,
                "response cache: Redis unavailable, caching locally only"
            );
        }
    }
}

/// A response as the shared level stores it: `BWC1`, status (u16), header count (u16),
/// each header as name length (u16), name, value length (u16), value, then the body to
/// the end. Big-endian. `None` for a header too long for its u16 length (not stored).
pub fn encode(response: &CachedResponse) -> Option<Bytes> {
    let kept = || {
        response
            .headers
            .iter()
            .filter(|(name, _)| !PER_REQUEST_HEADERS.contains(&name.as_str()))
    };
    let count = u16::try_from(kept().count()).ok()?;
    let size = kept()
        .map(|(n, v)| 4 + n.as_str().len() + v.len())
        .sum::<usize>();
    let mut out = BytesMut::with_capacity(MAGIC.len() + 4 + size + response.body.len());
    out.put_slice(MAGIC);
    out.put_u16(response.status.as_u16());
    out.put_u16(count);
    for (name, value) in kept() {
        out.put_u16(u16::try_from(name.as_str().len()).ok()?);
        out.put_slice(name.as_str().as_bytes());
        out.put_u16(u16::try_from(value.len()).ok()?);
        out.put_slice(value.as_bytes());
    }
    out.put_slice(&response.body);
    Some(out.freeze())
}

/// The response [`encode`] wrote; `None` if `bytes` is not one, or its body is longer
/// than `max_body`.
pub fn decode(bytes: &[u8], max_body: usize) -> Option<CachedResponse> {
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        *rest = tail;
        Some(head)
    }
    fn u16_of(rest: &mut &[u8]) -> Option<u16> {
        let b = take(rest, 2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    let mut rest = bytes;
    if take(&mut rest, MAGIC.len())? != MAGIC {
        return None;
    }
    let status = StatusCode::from_u16(u16_of(&mut rest)?).ok()?;
    let count = u16_of(&mut rest)?;
    let mut headers = HeaderMap::with_capacity(usize::from(count));
    for _ in 0..count {
        let len = u16_of(&mut rest)?;
        let name = HeaderName::from_bytes(take(&mut rest, usize::from(len))?).ok()?;
        let len = u16_of(&mut rest)?;
        let value = HeaderValue::from_bytes(take(&mut rest, usize::from(len))?).ok()?;
        headers.append(name, value);
    }
    if rest.len() > max_body {
        return None;
    }
    Some(CachedResponse {
        status,
        headers,
        body: Bytes::copy_from_slice(rest),
    })
}

/// Whether a response may be kept and replayed to other clients.
fn response_storable(response: &CachedResponse, max_body: usize) -> bool {
    response.status == StatusCode::OK
        && response.body.len() <= max_body
        && !response.headers.contains_key(SET_COOKIE)
        // Keys do not include request headers, so a varying response cannot be told apart.
        && !response.headers.contains_key(VARY)
        && !has_directive(
            &response.headers,
            CACHE_CONTROL,
            &["no-store", "no-cache", "private"],
        )
}

/// Whether any `name` header lists one of `directives` (case-insensitive, with or
/// without an `=argument`, over repeated headers and comma-separated lists).
fn has_directive(headers: &HeaderMap, name: http::HeaderName, directives: &[&str]) -> bool {
    headers.get_all(name).iter().any(|value| {
        // A value that is not visible ASCII cannot be understood, so it forbids caching.
        let Ok(text) = value.to_str() else {
            return true;
        };
        text.split(',').any(|item| {
            let directive = item.split('=').next().unwrap_or("").trim();
            directives.iter().any(|d| directive.eq_ignore_ascii_case(d))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn ok(body: &'static str) -> CachedResponse {
        CachedResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    fn with_header(
        mut r: CachedResponse,
        name: &'static str,
        value: &'static str,
    ) -> CachedResponse {
        r.headers
            .insert(name, http::HeaderValue::from_static(value));
        r
    }

    const TTL: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_make_one_fetch() {
        let cache = Arc::new(ResponseCache::new(100, 1 << 20));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch("GET /users", TTL, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, std::io::Error>(ok("users"))
                    })
                    .await
                    .unwrap()
            }));
        }
        let mut misses = 0;
        for task in tasks {
            let (response, status) = task.await.unwrap();
            assert_eq!(response.body, "users");
            misses += usize::from(status == CacheStatus::Miss);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(misses, 1);
    }

    /// 10 concurrent callers of one key whose fetch yields `result` after 50 ms: how many
    /// fetches ran, and what each caller got.
    async fn coalesced(
        result: Result<CachedResponse, &'static str>,
    ) -> (
        usize,
        Vec<Result<(CachedResponse, CacheStatus), Arc<&'static str>>>,
    ) {
        let cache = Arc::new(ResponseCache::new(100, 1 << 20));
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (cache, calls, result) = (cache.clone(), calls.clone(), result.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_fetch("k", TTL, || async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            result
                        })
                        .await
                })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        (calls.load(Ordering::SeqCst), results)
    }

    #[tokio::test(start_paused = true)]
    async fn coalesced_callers_share_an_unstorable_response() {
        let (calls, results) =
            coalesced(Ok(with_header(ok("x"), "cache-control", "no-store"))).await;
        assert_eq!(calls, 1);
        for result in results {
            assert_eq!(result.unwrap().0.body, "x");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn coalesced_callers_share_an_error() {
        let (calls, results) = coalesced(Err("upstream down")).await;
        assert_eq!(calls, 1);
        for result in results {
            assert_eq!(*result.unwrap_err(), "upstream down");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_their_ttl() {
        let cache = ResponseCache::new(100, 1 << 20);
        let fetch = |body: &'static str| move || async move { Ok::<_, std::io::Error>(ok(body)) };
        let (r, s) = cache.get_or_fetch("k", TTL, fetch("one")).await.unwrap();
        assert_eq!((r.body.as_ref(), s), (b"one".as_ref(), CacheStatus::Miss));

        tokio::time::advance(TTL - Duration::from_millis(1)).await;
        let (r, s) = cache.get_or_fetch("k", TTL, fetch("two")).await.unwrap();
        assert_eq!((r.body.as_ref(), s), (b"one".as_ref(), CacheStatus::Hit));

        tokio::time::advance(Duration::from_millis(1)).await;
        let (r, s) = cache.get_or_fetch("k", TTL, fetch("three")).await.unwrap();
        assert_eq!((r.body.as_ref(), s), (b"three".as_ref(), CacheStatus::Miss));
    }

    #[tokio::test]
    async fn keys_and_ttls_are_independent() {
        let cache = ResponseCache::new(100, 1 << 20);
        let fetch = |body: &'static str| move || async move { Ok::<_, std::io::Error>(ok(body)) };
        cache.get_or_fetch("a", TTL, fetch("a")).await.unwrap();
        let (r, s) = cache.get_or_fetch("b", TTL, fetch("b")).await.unwrap();
        assert_eq!((r.body.as_ref(), s), (b"b".as_ref(), CacheStatus::Miss));
        // A zero TTL stores nothing.
        cache
            .get_or_fetch("z", Duration::ZERO, fetch("z1"))
            .await
            .unwrap();
        let (r, s) = cache
            .get_or_fetch("z", Duration::ZERO, fetch("z2"))
            .await
            .unwrap();
        assert_eq!((r.body.as_ref(), s), (b"z2".as_ref(), CacheStatus::Miss));
    }

    #[tokio::test]
    async fn unstorable_responses_are_returned_but_not_stored() {
        let cases = [
            with_header(ok("x"), "cache-control", "no-store"),
            with_header(ok("x"), "cache-control", "max-age=60, Private"),
            with_header(ok("x"), "set-cookie", "a=b"),
            with_header(ok("x"), "vary", "accept-encoding"),
            CachedResponse {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                ..ok("x")
            },
            ok("longer than eight bytes"),
        ];
        for case in cases {
            let cache = ResponseCache::new(100, 8);
            let calls = AtomicUsize::new(0);
            for _ in 0..2 {
                let (r, s) = cache
                    .get_or_fetch("k", TTL, || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, std::io::Error>(case.clone())
                    })
                    .await
                    .unwrap();
                assert_eq!(s, CacheStatus::Miss);
                assert_eq!(r.status, case.status);
            }
            assert_eq!(calls.load(Ordering::SeqCst), 2, "{case:?}");
        }
    }

    #[tokio::test]
    async fn errors_are_returned_but_not_stored() {
        let cache = ResponseCache::new(100, 1 << 20);
        let err = cache
            .get_or_fetch("k", TTL, || async {
                Err::<CachedResponse, _>(std::io::Error::other("connect refused"))
            })
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "connect refused");
        let (r, s) = cache
            .get_or_fetch("k", TTL, || async { Ok::<_, std::io::Error>(ok("back")) })
            .await
            .unwrap();
        assert_eq!((r.body.as_ref(), s), (b"back".as_ref(), CacheStatus::Miss));
    }

    #[tokio::test]
    async fn invalidate_all_forgets_everything() {
        let cache = ResponseCache::new(100, 1 << 20);
        let fetch = |body: &'static str| move || async move { Ok::<_, std::io::Error>(ok(body)) };
        cache.get_or_fetch("k", TTL, fetch("old")).await.unwrap();
        cache.invalidate_all();
        let (r, s) = cache.get_or_fetch("k", TTL, fetch("new")).await.unwrap();
        assert_eq!((r.body.as_ref(), s), (b"new".as_ref(), CacheStatus::Miss));
    }

    #[test]
    fn request_directives_are_read_case_insensitively() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, http::HeaderValue::from_static(v));
            }
            h
        };
        assert!(ResponseCache::request_allows(&headers(&[])));
        assert!(ResponseCache::request_allows(&headers(&[(
            "cache-control",
            "max-age=0"
        )])));
        assert!(!ResponseCache::request_allows(&headers(&[(
            "cache-control",
            "No-Cache"
        )])));
        assert!(!ResponseCache::request_allows(&headers(&[
            ("cache-control", "max-age=5"),
            ("cache-control", "no-store"),
        ])));
        assert!(!ResponseCache::request_allows(&headers(&[(
            "pragma", "no-cache"
        )])));
        assert!(!ResponseCache::request_allows(&headers(&[(
            "authorization",
            "Bearer x"
        )])));
    }

    #[test]
    fn keys_separate_routes_methods_and_queries() {
        use http::Method;
        let k = ResponseCache::key;
        assert_eq!(
            k("summary", &Method::GET, "/api/metrics/summary?type=cpu"),
            "7:summaryGET /api/metrics/summary?type=cpu"
        );
        assert_ne!(k("a", &Method::GET, "/x"), k("a", &Method::HEAD, "/x"));
        assert_ne!(
            k("a", &Method::GET, "/x?q=1"),
            k("a", &Method::GET, "/x?q=2")
        );
        assert_ne!(k("aG", &Method::GET, "/x"), k("a", &Method::GET, "/x"));
    }

    #[test]
    fn the_shared_encoding_round_trips_and_refuses_what_it_did_not_write() {
        let mut response = with_header(ok("{\"id\":1}"), "content-type", "application/json");
        response
            .headers
            .append("x-multi", http::HeaderValue::from_static("a"));
        response
            .headers
            .append("x-multi", http::HeaderValue::from_static("b"));
        response.headers.insert(
            "x-request-id",
            http::HeaderValue::from_static("someone-else"),
        );
        let bytes = encode(&response).unwrap();
        let back = decode(&bytes, 1 << 20).unwrap();
        assert_eq!(back.status, StatusCode::OK);
        assert_eq!(back.body, response.body);
        assert_eq!(back.headers["content-type"], "application/json");
        let multi: Vec<_> = back.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
        assert!(
            !back.headers.contains_key("x-request-id"),
            "per-request headers are not shared"
        );
        assert!(decode(&bytes, 3).is_none(), "a body over the limit");
        assert!(decode(b"junk", 1 << 20).is_none());
        assert!(decode(&bytes[..9], 1 << 20).is_none(), "cut short");
        let mut bad_status = bytes.to_vec();
        bad_status[4..6].copy_from_slice(&1000u16.to_be_bytes());
        assert!(decode(&bad_status, 1 << 20).is_none());
    }

    #[tokio::test]
    async fn an_unreachable_second_level_is_a_counted_miss_then_paused() {
        let failures = Counter::default();
        let level = RedisLevel::new(
            "redis://127.0.0.1:1",
            "p:cache",
            Duration::from_millis(200),
            failures.clone(),
        )
        .unwrap();
        let cache = ResponseCache::new(100, 1 << 20).with_redis(level);
        let fetch = |body: &'static str| move || async move { Ok::<_, std::io::Error>(ok(body)) };
        let (r, s) = cache.get_or_fetch("k", TTL, fetch("one")).await.unwrap();
        assert_eq!((r.body.as_ref(), s), (b"one".as_ref(), CacheStatus::Miss));
        // The read failed; the write was skipped (paused) and counted too.
        assert_eq!(failures.get(), 2);
        let (r, s) = cache.get_or_fetch("k", TTL, fetch("two")).await.unwrap();
        assert_eq!((r.body.as_ref(), s), (b"one".as_ref(), CacheStatus::Hit));
        assert_eq!(failures.get(), 2, "a local hit does not ask Redis");
    }

    #[test]
    fn cache_status_names_the_header_value() {
        assert_eq!(CacheStatus::Hit.as_str(), "HIT");
        assert_eq!(CacheStatus::Miss.as_str(), "MISS");
    }
}
