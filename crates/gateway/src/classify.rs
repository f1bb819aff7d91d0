//! The one classification of a try at an upstream. It is made once per try, and the
//! same verdict feeds the retry decision, the breaker, outlier ejection, the EWMA
//! latency and the metrics, so they can never disagree about what happened.

use http::{Method, StatusCode};

/// What came of one try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    /// A response below 400.
    Success,
    /// A 4xx: the upstream is healthy and said no.
    Status4xx,
    /// A 5xx.
    Status5xx,
    /// No connection was made, so nothing was sent.
    ConnectError,
    /// No response head within the per-try timeout.
    Timeout,
    /// The connection broke or spoke nonsense before a response head arrived.
    ProtocolError,
}

impl AttemptKind {
    /// Short name for traces and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "ok",
            Self::Status4xx => "4xx",
            Self::Status5xx => "5xx",
            Self::ConnectError => "connect-error",
            Self::Timeout => "timeout",
            Self::ProtocolError => "protocol-error",
        }
    }
}

/// How much of a request may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// The body is streamed, not kept: one try only.
    Never,
    /// Only when nothing was sent (connect errors): a non-idempotent request without an
    /// `Idempotency-Key`.
    UnsentOnly,
    /// After any retryable failure: an idempotent method, or an `Idempotency-Key`.
    Any,
}

impl Replay {
    /// The replay rule for `method`: idempotent methods (GET HEAD OPTIONS PUT DELETE
    /// TRACE), or any method with an `Idempotency-Key`, may be sent again; others only
    /// when nothing was sent; a streamed body never.
    pub fn for_request(method: &Method, has_idempotency_key: bool, body_kept: bool) -> Self {
        if !body_kept {
            Self::Never
        } else if method.is_idempotent() || has_idempotency_key {
            Self::Any
        } else {
            Self::UnsentOnly
        }
    }
}

/// The verdict on one try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    /// What happened.
    pub kind: AttemptKind,
    /// Counts against the upstream (breaker, ejection): 5xx, connect errors, timeouts,
    /// broken connections.
    pub failure: bool,
    /// May be tried again (elsewhere) under the request's replay rule.
    pub retryable: bool,
}

/// Classifies a try that got a response head with `status`.
pub fn response(status: StatusCode, replay: Replay) -> Classified {
    let kind = if status.is_server_error() {
        AttemptKind::Status5xx
    } else if status.is_client_error() {
        AttemptKind::Status4xx
    } else {
        AttemptKind::Success
    };
    // 502/503/504 say "not handled here, try elsewhere"; a 500 is the service's own
    // verdict on the request, which another instance would most likely repeat.
    let retryable_status = matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    );
    Classified {
        kind,
        failure: kind == AttemptKind::Status5xx,
        retryable: retryable_status && replay == Replay::Any,
    }
}

/// Classifies a try that ended without a response head.
pub fn failure(kind: AttemptKind, replay: Replay) -> Classified {
    let retryable = match kind {
        AttemptKind::ConnectError => replay != Replay::Never,
        AttemptKind::Timeout | AttemptKind::ProtocolError => replay == Replay::Any,
        AttemptKind::Success | AttemptKind::Status4xx | AttemptKind::Status5xx => false,
    };
    Classified {
        kind,
        failure: true,
        retryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_rules_follow_the_method_and_the_key() {
        assert_eq!(Replay::for_request(&Method::GET, false, true), Replay::Any);
        assert_eq!(Replay::for_request(&Method::PUT, false, true), Replay::Any);
        assert_eq!(
            Replay::for_request(&Method::POST, false, true),
            Replay::UnsentOnly
        );
        assert_eq!(Replay::for_request(&Method::POST, true, true), Replay::Any);
        assert_eq!(Replay::for_request(&Method::PATCH, true, true), Replay::Any);
        assert_eq!(
            Replay::for_request(&Method::GET, false, false),
            Replay::Never
        );
    }

    #[test]
    fn only_gateway_statuses_are_retried_and_only_when_replayable() {
        for (status, retry) in [
            (502, true),
            (503, true),
            (504, true),
            (500, false),
            (501, false),
        ] {
            let c = response(StatusCode::from_u16(status).unwrap(), Replay::Any);
            assert!(c.failure, "{status}");
            assert_eq!(c.retryable, retry, "{status}");
            assert_eq!(c.kind, AttemptKind::Status5xx);
            assert!(!response(StatusCode::from_u16(status).unwrap(), Replay::UnsentOnly).retryable);
        }
        let ok = response(StatusCode::OK, Replay::Any);
        assert_eq!(
            (ok.kind, ok.failure, ok.retryable),
            (AttemptKind::Success, false, false)
        );
        let nf = response(StatusCode::NOT_FOUND, Replay::Any);
        assert_eq!((nf.kind, nf.failure), (AttemptKind::Status4xx, false));
    }

    #[test]
    fn connect_errors_are_retried_unless_the_body_is_gone() {
        assert!(failure(AttemptKind::ConnectError, Replay::UnsentOnly).retryable);
        assert!(!failure(AttemptKind::ConnectError, Replay::Never).retryable);
        assert!(!failure(AttemptKind::Timeout, Replay::UnsentOnly).retryable);
        assert!(failure(AttemptKind::Timeout, Replay::Any).retryable);
        assert!(!failure(AttemptKind::ProtocolError, Replay::UnsentOnly).retryable);
        assert!(failure(AttemptKind::ProtocolError, Replay::Any).failure);
    }
}
