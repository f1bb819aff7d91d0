//! The connection loops: one task per connection, each owning one keep-alive HTTP/1.1
//! connection made with hyper's low-level client, sending back-to-back (closed loop) or
//! on a fixed schedule (open loop, `-R`).
//!
//! The task drives hyper's connection future itself, next to the request, instead of
//! spawning it: one task per connection means one wake-up per response and no hand-off
//! between worker threads on the hot path.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

use super::plan::{Plan, RequestBody};
use super::tally::{ErrorKind, Tally};
use crate::component::UsageError;

/// First pause after a failed connect in closed-loop mode; doubles up to
/// [`MAX_CONNECT_BACKOFF`]. Without it a down target turns the run into a connect flood
/// that measures only the kernel's refusal path.
const FIRST_CONNECT_BACKOFF: Duration = Duration::from_millis(1);
const MAX_CONNECT_BACKOFF: Duration = Duration::from_millis(50);

/// State every connection task shares: the clock, the stop conditions, the progress count.
#[derive(Debug)]
pub(super) struct Shared {
    /// When the run started.
    pub start: Instant,
    /// When it must stop (`None`: only the amount bounds it).
    pub end: Option<Instant>,
    /// Attempts still allowed, when `-a` is given.
    amount: Option<u64>,
    /// Attempts handed out so far (only counted when `amount` is set).
    issued: AtomicU64,
    /// Attempts finished (responses and errors), for the progress bar.
    pub finished: AtomicU64,
}

impl Shared {
    /// Starts the clock for `plan`.
    pub fn new(plan: &Plan) -> Self {
        let start = Instant::now();
        Self {
            start,
            end: plan.duration.and_then(|d| start.checked_add(d)),
            amount: plan.amount,
            issued: AtomicU64::new(0),
            finished: AtomicU64::new(0),
        }
    }

    /// Claims one attempt; false once `-a` attempts have been handed out.
    fn claim(&self) -> bool {
        match self.amount {
            None => true,
            Some(limit) => self.issued.fetch_add(1, Ordering::Relaxed) < limit,
        }
    }

    fn past_end(&self, now: Instant) -> bool {
        self.end.is_some_and(|end| now >= end)
    }

    /// The earlier of `at` and the end of the run.
    fn cap(&self, at: Instant) -> Instant {
        self.end.map_or(at, |end| end.min(at))
    }
}

/// Send times on a fixed grid: connection `i` of `c` sends at
/// `start + (i / c + k) * interval`, so that the connections together send evenly.
#[derive(Debug, Clone, Copy)]
pub(super) struct Schedule {
    next: Instant,
    interval: Duration,
}

impl Schedule {
    /// The grid of connection `index` out of `connections` sharing `rate` requests/s.
    pub fn new(start: Instant, rate: f64, index: usize, connections: usize) -> Option<Self> {
        let per_connection = rate / connections as f64;
        let interval = Duration::try_from_secs_f64(1.0 / per_connection).ok()?;
        let offset = interval.mul_f64(index as f64 / connections as f64);
        Some(Self {
            next: start.checked_add(offset)?,
            interval,
        })
    }

    /// The next send time.
    pub fn next_send(&mut self) -> Instant {
        let at = self.next;
        self.next += self.interval;
        at
    }
}

/// Runs every connection until the plan's duration or amount is reached, and returns
/// the merged tally.
pub(super) async fn execute(
    plan: &Plan,
    addrs: Arc<[SocketAddr]>,
    shared: Arc<Shared>,
) -> anyhow::Result<Tally> {
    let mut tasks = JoinSet::new();
    for index in 0..plan.connections {
        let schedule = match plan.rate {
            Some(rate) => Some(
                Schedule::new(shared.start, rate, index, plan.connections)
                    .ok_or_else(|| UsageError(format!("-R {rate}: too low a rate to schedule")))?,
            ),
            None => None,
        };
        let connection = Connection {
            addrs: Arc::clone(&addrs),
            request: plan.request.clone(),
            timeout: plan.timeout,
            schedule,
            shared: Arc::clone(&shared),
            read: Arc::new(AtomicU64::new(0)),
        };
        tasks.spawn(connection.run(Tally::new()?));
    }
    let mut total = Tally::new()?;
    while let Some(done) = tasks.join_next().await {
        total.merge(&done.context("a connection task failed")?)?;
    }
    Ok(total)
}

/// One connection's loop and what it needs.
#[derive(Debug)]
struct Connection {
    addrs: Arc<[SocketAddr]>,
    /// Cloned per request: the URI and body are reference-counted, so a clone costs the
    /// header map hyper needs anyway.
    request: Request<RequestBody>,
    timeout: Duration,
    schedule: Option<Schedule>,
    shared: Arc<Shared>,
    /// Bytes read off the wire by every socket this task opens.
    read: Arc<AtomicU64>,
}

/// A live HTTP/1.1 connection.
struct Link {
    sender: http1::SendRequest<RequestBody>,
    driver: Pin<Box<http1::Connection<TokioIo<Metered>, RequestBody>>>,
    /// The driver finished: the connection is closed.
    closed: bool,
    /// Responses received on it; a closed connection that served some was simply ended
    /// by the server (keep-alive limit, idle timeout) and is replaced without an error.
    served: u64,
}

/// How one attempt ended without a response.
#[derive(Debug)]
enum Failure {
    /// The run's end came first: the attempt is dropped, not counted.
    End,
    /// A reused connection turned out closed before the request went out.
    Stale,
    Error(ErrorKind),
}

impl Connection {
    async fn run(self, mut tally: Tally) -> Tally {
        let mut schedule = self.schedule;
        let timer = tokio::time::sleep_until(self.shared.start);
        tokio::pin!(timer);
        let mut link: Option<Link> = None;
        let mut backoff = FIRST_CONNECT_BACKOFF;

        'attempts: loop {
            // When latency counts from: the scheduled time if this connection is behind
            // its schedule (it waited on the server, so the wait is the server's doing:
            // coordinated omission corrected as wrk2 does); otherwise the real send, as
            // tokio's 1 ms timer wakes late and that slack is ours, not the server's.
            let behind_since = match schedule.as_mut() {
                Some(grid) => {
                    let at = grid.next_send();
                    if self.shared.past_end(at) {
                        break;
                    }
                    if Instant::now() < at {
                        idle_until(&mut link, timer.as_mut(), at).await;
                        None
                    } else {
                        Some(at)
                    }
                }
                None => {
                    if self.shared.past_end(Instant::now()) {
                        break;
                    }
                    None
                }
            };
            if !self.shared.claim() {
                break;
            }
            let outcome = loop {
                let fresh = match link.as_ref() {
                    Some(live) if !live.closed => false,
                    _ => {
                        match self.connect(timer.as_mut()).await {
                            Ok(new) => {
                                link = Some(new);
                                backoff = FIRST_CONNECT_BACKOFF;
                            }
                            Err(Failure::Error(kind)) => break Err(kind),
                            Err(_) => break 'attempts,
                        }
                        true
                    }
                };
                let Some(live) = link.as_mut() else {
                    continue;
                };
                let sent = behind_since.unwrap_or_else(Instant::now);
                match self.exchange(live, timer.as_mut()).await {
                    Ok(status) => {
                        live.served += 1;
                        break Ok((status, sent.elapsed()));
                    }
                    Err(Failure::End) => break 'attempts,
                    Err(Failure::Stale) if !fresh => link = None,
                    Err(Failure::Stale) => break Err(ErrorKind::Reset),
                    Err(Failure::Error(kind)) => {
                        // An HTTP/1 connection with an unfinished exchange cannot be reused.
                        link = None;
                        break Err(kind);
                    }
                }
            };
            match outcome {
                Ok((status, latency)) => tally.response(status, latency),
                Err(kind) => {
                    tally.error(kind);
                    if kind == ErrorKind::Connect && schedule.is_none() {
                        let until = self.shared.cap(Instant::now() + backoff);
                        timer.as_mut().reset(until);
                        timer.as_mut().await;
                        backoff = (backoff * 2).min(MAX_CONNECT_BACKOFF);
                    }
                }
            }
            self.shared.finished.fetch_add(1, Ordering::Relaxed);
        }
        tally.add_bytes_read(self.read.load(Ordering::Relaxed));
        tally
    }

    /// Opens a connection, bounded by `--timeout` and the end of the run.
    async fn connect(&self, mut timer: Pin<&mut Sleep>) -> Result<Link, Failure> {
        let limit = self.shared.cap(Instant::now() + self.timeout);
        timer.as_mut().reset(limit);
        let open = async {
            let stream = TcpStream::connect(&self.addrs[..])
                .await
                .map_err(|_| Failure::Error(ErrorKind::Connect))?;
            stream
                .set_nodelay(true)
                .map_err(|_| Failure::Error(ErrorKind::Connect))?;
            let io = TokioIo::new(Metered {
                stream,
                read: Arc::clone(&self.read),
            });
            let (sender, driver) = http1::handshake(io)
                .await
                .map_err(|e| Failure::Error(classify(&e)))?;
            Ok(Link {
                sender,
                driver: Box::pin(driver),
                closed: false,
                served: 0,
            })
        };
        tokio::select! {
            biased;
            opened = open => opened,
            () = timer => Err(self.expired(ErrorKind::Connect)),
        }
    }

    /// Sends one request and reads the whole response, driving the connection meanwhile.
    async fn exchange(
        &self,
        link: &mut Link,
        mut timer: Pin<&mut Sleep>,
    ) -> Result<StatusCode, Failure> {
        timer
            .as_mut()
            .reset(self.shared.cap(Instant::now() + self.timeout));
        let Link {
            sender,
            driver,
            closed,
            ..
        } = link;
        let request = self.request.clone();
        let round_trip = async {
            sender.ready().await.map_err(|_| Failure::Stale)?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| Failure::Error(classify(&e)))?;
            let status = response.status();
            let mut body = response.into_body();
            while let Some(frame) = body.frame().await {
                frame.map_err(|e| Failure::Error(classify(&e)))?;
            }
            Ok(status)
        };
        tokio::pin!(round_trip);
        loop {
            tokio::select! {
                biased;
                done = &mut round_trip => return done,
                // When the driver ends, the round trip resolves on the next turn: with
                // the response it already delivered, or with hyper's error.
                _ = driver.as_mut(), if !*closed => *closed = true,
                () = timer.as_mut() => return Err(self.expired(ErrorKind::Timeout)),
            }
        }
    }

    /// What a fired timer means: the run's end, or a timeout of kind `kind`.
    fn expired(&self, kind: ErrorKind) -> Failure {
        if self.shared.past_end(Instant::now()) {
            Failure::End
        } else {
            Failure::Error(kind)
        }
    }
}

/// Waits until `at`, keeping the idle connection driven so a close by the server is
/// noticed now rather than on the next request.
async fn idle_until(link: &mut Option<Link>, mut timer: Pin<&mut Sleep>, at: Instant) {
    timer.as_mut().reset(at);
    if let Some(live) = link.as_mut().filter(|l| !l.closed) {
        tokio::select! {
            biased;
            () = timer.as_mut() => return,
            _ = live.driver.as_mut() => live.closed = true,
        }
    }
    timer.await;
}

/// Sorts a hyper error into the kinds the report counts.
fn classify(error: &hyper::Error) -> ErrorKind {
    if error.is_parse() || error.is_parse_status() || error.is_parse_too_large() {
        return ErrorKind::Protocol;
    }
    if error.is_incomplete_message() || error.is_canceled() || error.is_closed() {
        return ErrorKind::Reset;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            return match io.kind() {
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => ErrorKind::Reset,
                io::ErrorKind::TimedOut => ErrorKind::Timeout,
                _ => ErrorKind::Io,
            };
        }
        source = cause.source();
    }
    ErrorKind::Other
}

/// A TCP stream that counts the bytes read from it.
#[derive(Debug)]
struct Metered {
    stream: TcpStream,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.read.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Resolves the target once, so reconnects do not repeat the lookup.
pub(super) async fn resolve(host: &str, port: u16) -> anyhow::Result<Arc<[SocketAddr]>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve {host}:{port}"))?
        .collect();
    anyhow::ensure!(!addrs.is_empty(), "{host}:{port} resolves to no address");
    Ok(addrs.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_share_one_even_grid() {
        let start = Instant::now();
        let mut grids: Vec<Schedule> = (0..4)
            .map(|i| Schedule::new(start, 200.0, i, 4).unwrap())
            .collect();
        let end = start + Duration::from_secs(1);
        let mut sends = Vec::new();
        for grid in &mut grids {
            loop {
                let at = grid.next_send();
                if at >= end {
                    break;
                }
                sends.push(at.duration_since(start));
            }
        }
        sends.sort();
        assert_eq!(sends.len(), 200);
        for pair in sends.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap.abs_diff(Duration::from_millis(5)) < Duration::from_micros(1),
                "{gap:?}"
            );
        }
    }

    #[test]
    fn a_rate_too_low_to_schedule_is_refused() {
        assert!(Schedule::new(Instant::now(), 1e-300, 0, 1).is_none());
    }

    #[test]
    fn attempts_stop_at_the_amount() {
        let start = Instant::now();
        let shared = Shared {
            start,
            end: None,
            amount: Some(3),
            issued: AtomicU64::new(0),
            finished: AtomicU64::new(0),
        };
        let granted = (0..10).filter(|_| shared.claim()).count();
        assert_eq!(granted, 3);
        assert!(!shared.past_end(start + Duration::from_secs(3600)));
    }
}
