//! Gateway events (breaker transitions, ejections, returns, reloads) fanned out to the
//! admin API's Server-Sent-Events subscribers.
//!
//! Live delivery is a bounded tokio broadcast: a subscriber that falls behind loses the
//! oldest events instead of slowing the publisher (the request path publishes). A ring of
//! the last [`RECENT`] events lets a dashboard that connects late show what just happened.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::response::{IntoResponse, Response};
use breakwater_resilience::breaker::Transition;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use hyper::body::Frame;
use serde::Serialize;
use tokio::sync::broadcast::{self, Receiver, Sender, error::RecvError};
use tokio::time::{Sleep, sleep};
use tokio_util::sync::ReusableBoxFuture;

/// Capacity of the live channel; a subscriber this far behind starts losing events.
pub const CAPACITY: usize = 1024;
/// How many past events a new subscriber is shown first.
pub const RECENT: usize = 100;
/// Interval of the SSE keep-alive comments, so proxies and browsers keep an idle
/// stream open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One thing that happened in the gateway.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `"breaker"`, `"ejection"`, `"return"` or `"reload"`.
    pub kind: &'static str,
    /// The service concerned, if any.
    pub service: Option<String>,
    /// The instance concerned, if any.
    pub instance: Option<String>,
    /// Kind-specific details (a breaker transition, an ejection's reason, ...).
    pub detail: serde_json::Value,
    /// When it happened, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

impl Event {
    /// An event stamped with the current wall-clock time.
    pub fn new(
        kind: &'static str,
        service: Option<String>,
        instance: Option<String>,
        detail: serde_json::Value,
    ) -> Self {
        Self {
            kind,
            service,
            instance,
            detail,
            at_unix_ms: breakwater_runtime::clock::now_millis(),
        }
    }

    /// A `"breaker"` event for `service`'s `transition`: `detail` holds `from`, `to`, the
    /// structured `reason` and a human `message`; the time is the transition's.
    pub fn breaker(service: &str, transition: &Transition) -> Self {
        let detail = serde_json::json!({
            "from": transition.from,
            "to": transition.to,
            "reason": transition.reason,
            "message": transition.to_string(),
        });
        Self {
            kind: "breaker",
            service: Some(service.to_owned()),
            instance: None,
            detail,
            at_unix_ms: transition.at_unix_ms,
        }
    }
}

/// The fan-out point: publishers call [`EventHub::publish`], the admin API streams
/// [`sse`].
#[derive(Debug)]
pub struct EventHub {
    live: Sender<Event>,
    /// Also serialises publish against subscribe, so that a new subscriber's snapshot of
    /// the past and its live feed neither overlap nor leave a gap.
    recent: Mutex<VecDeque<Event>>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new()
    }
}

impl EventHub {
    /// An empty hub.
    pub fn new() -> Self {
        let (live, _) = broadcast::channel(CAPACITY);
        Self {
            live,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        }
    }

    /// Records `event` in the recent ring and sends it to every live subscriber. Never
    /// blocks on a slow subscriber.
    pub fn publish(&self, event: Event) {
        let mut recent = self.lock_recent();
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(event.clone());
        // An error only means nobody is listening right now, which is fine.
        let _ = self.live.send(event);
    }

    /// The last [`RECENT`] events, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        self.lock_recent().iter().cloned().collect()
    }

    /// A live feed of the events published from now on.
    pub fn subscribe(&self) -> Receiver<Event> {
        self.live.subscribe()
    }

    /// The recent events and a live feed that continues exactly after them.
    pub fn subscribe_with_recent(&self) -> (Vec<Event>, Receiver<Event>) {
        let recent = self.lock_recent();
        (recent.iter().cloned().collect(), self.live.subscribe())
    }

    fn lock_recent(&self) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
        // The ring stays consistent even if a holder panicked: every mutation is a
        // single push or pop.
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An SSE response (`text/event-stream`): the recent events first, then live ones, each
/// as one `data: <json>` message; a keep-alive comment every [`KEEP_ALIVE`] of silence;
/// a `: missed N events` comment when this subscriber fell behind. It ends when the client
/// goes (the body is dropped) or the hub is dropped.
///
/// Messages carry no `event:` field, so a browser's `EventSource.onmessage` sees them all;
/// the kind is inside the JSON.
pub fn sse(hub: &EventHub) -> Response {
    let (recent, live) = hub.subscribe_with_recent();
    let body = EventStream {
        pending: recent.iter().map(message).collect(),
        next: ReusableBoxFuture::new(receive(live)),
        keep_alive: Box::pin(sleep(KEEP_ALIVE)),
        done: false,
    };
    (
        [
            (CONTENT_TYPE, "text/event-stream"),
            (CACHE_CONTROL, "no-cache"),
            // Stops nginx-style proxies in front of the admin API from buffering the stream.
            (http::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::new(body),
    )
        .into_response()
}

/// One SSE message for `event`.
fn message(event: &Event) -> Bytes {
    // Serialising this struct cannot fail (string keys, no maps with other keys), but
    // if it ever did the subscriber gets a comment rather than a broken stream.
    match serde_json::to_string(event) {
        Ok(json) => Bytes::from(format!("data: {json}\n\n")),
        Err(e) => Bytes::from(format!(": unserialisable {} event: {e}\n\n", event.kind)),
    }
}

async fn receive(mut live: Receiver<Event>) -> (Result<Event, RecvError>, Receiver<Event>) {
    let result = live.recv().await;
    (result, live)
}

/// The SSE body. Written against `http_body::Body` directly rather than
/// `axum::response::Sse`, which wants a `futures::Stream`: that trait is not reachable
/// from this crate's dependencies.
struct EventStream {
    pending: VecDeque<Bytes>,
    next: ReusableBoxFuture<'static, (Result<Event, RecvError>, Receiver<Event>)>,
    keep_alive: Pin<Box<Sleep>>,
    done: bool,
}

impl EventStream {
    fn rearm_keep_alive(&mut self) {
        let at = tokio::time::Instant::now() + KEEP_ALIVE;
        self.keep_alive.as_mut().reset(at);
    }
}

impl HttpBody for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(bytes) = this.pending.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready((result, live)) = this.next.poll(cx) {
            this.next.set(receive(live));
            this.rearm_keep_alive();
            let bytes = match result {
                Ok(event) => message(&event),
                Err(RecvError::Lagged(missed)) => {
                    Bytes::from(format!(": missed {missed} events\n\n"))
                }
                Err(RecvError::Closed) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
            };
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        if this.keep_alive.as_mut().poll(cx).is_ready() {
            this.rearm_keep_alive();
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b": keep-alive\n\n",
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use serde_json::json;

    fn event(kind: &'static str, n: u64) -> Event {
        Event {
            kind,
            service: Some("users".into()),
            instance: Some(format!("users-127.0.0.1-{n}")),
            detail: json!({ "n": n }),
            at_unix_ms: n,
        }
    }

    async fn next_text(body: &mut Body) -> String {
        let frame = body.frame().await.unwrap().unwrap();
        String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
    }

    #[test]
    fn publish_keeps_the_last_hundred_oldest_first() {
        let hub = EventHub::new();
        for n in 0..150 {
            hub.publish(event("ejection", n));
        }
        let recent = hub.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].at_unix_ms, 50);
        assert_eq!(recent[99].at_unix_ms, 149);
    }

    #[tokio::test]
    async fn subscribers_receive_what_is_published_after_they_subscribe() {
        let hub = EventHub::new();
        hub.publish(event("reload", 1));
        let mut rx = hub.subscribe();
        hub.publish(event("breaker", 2));
        let got = rx.recv().await.unwrap();
        assert_eq!((got.kind, got.at_unix_ms), ("breaker", 2));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn new_stamps_the_current_time() {
        let e = Event::new("reload", None, None, json!({}));
        assert!(e.at_unix_ms > 1_700_000_000_000);
    }

    #[test]
    fn breaker_events_carry_the_transition() {
        use breakwater_resilience::breaker::{Reason, State};
        let t = Transition {
            from: State::Closed,
            to: State::Open,
            reason: Reason::ConsecutiveFailures { count: 3 },
            at_unix_ms: 42,
        };
        let e = Event::breaker("users", &t);
        assert_eq!(
            (e.kind, e.service.as_deref(), e.at_unix_ms),
            ("breaker", Some("users"), 42)
        );
        assert_eq!(e.detail["from"], "CLOSED");
        assert_eq!(e.detail["to"], "OPEN");
        assert_eq!(e.detail["reason"]["count"], 3);
        assert_eq!(
            e.detail["message"],
            "CLOSED -> OPEN: 3 consecutive failures"
        );
    }

    #[tokio::test]
    async fn sse_sends_recent_then_live_events_as_data_lines() {
        let hub = EventHub::new();
        hub.publish(event("ejection", 1));
        let res = sse(&hub);
        assert_eq!(res.headers()[CONTENT_TYPE], "text/event-stream");
        let mut body = res.into_body();

        let first = next_text(&mut body).await;
        assert!(first.starts_with("data: {"), "{first}");
        assert!(first.ends_with("\n\n"), "{first}");
        let json: serde_json::Value =
            serde_json::from_str(first.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(json["kind"], "ejection");
        assert_eq!(json["instance"], "users-127.0.0.1-1");
        assert_eq!(json["detail"]["n"], 1);

        hub.publish(event("return", 2));
        let second = next_text(&mut body).await;
        assert!(second.starts_with("data: {\"kind\":\"return\""), "{second}");
    }

    #[tokio::test(start_paused = true)]
    async fn sse_sends_keep_alives_when_idle() {
        let hub = EventHub::new();
        let mut body = sse(&hub).into_body();
        // With the clock paused, the runtime jumps to the keep-alive deadline.
        let text = next_text(&mut body).await;
        assert_eq!(text, ": keep-alive\n\n");
    }

    #[tokio::test]
    async fn sse_reports_lag_and_ends_with_the_hub() {
        let hub = EventHub::new();
        let mut body = sse(&hub).into_body();
        for n in 0..(CAPACITY as u64 + 5) {
            hub.publish(event("breaker", n));
        }
        assert_eq!(next_text(&mut body).await, ": missed 5 events\n\n");
        assert!(next_text(&mut body).await.contains("\"at_unix_ms\":5"));
        drop(hub);
        let mut rest = 0;
        while let Some(frame) = body.frame().await {
            frame.unwrap();
            rest += 1;
        }
        assert_eq!(rest, CAPACITY - 1);
        assert!(body.is_end_stream());
    }
}
