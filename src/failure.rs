//! The one failure taxonomy. Every error Pingora raises on the way to a node, for a live
//! attempt or a replayed one, is classified here once ([`classify`]) into an [`AttemptError`]:
//! the node's [`Failure`], a stale pooled connection, the client's side, or weir's own. The
//! retry decision, the node's error score, the metrics label, the ServiceQ error-log code and
//! the status the client finally sees are all derived from that value, nowhere else.

use pingora::prelude::*;
use pingora_error::{ErrorSource, ErrorType, RetryType};

/// How one attempt on one node failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The node refused the connection (or any other connect/TLS error): nothing was sent.
    ConnectRefused,
    /// The connection was not established in time: nothing was sent.
    ConnectTimeout,
    /// Connected, but no answer (or no progress) within the per-attempt timeout.
    Timeout,
    /// The connection broke (reset, closed, write failed) before a complete response header.
    Reset,
    /// The node answered with something that is not HTTP.
    BadResponse,
    /// The node answered with a status listed in `routing.failure_statuses`.
    Status(u16),
}

/// `weir_upstream_attempts_total{result}` labels, in index order (`ok` first).
pub const ATTEMPT_RESULTS: [&str; 7] = [
    "ok",
    "connect_refused",
    "connect_timeout",
    "timeout",
    "reset",
    "bad_response",
    "status",
];

/// Where in an attempt an error was raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Getting a connection (`fail_to_connect`): nothing was written to the node.
    Connect,
    /// After a connection was obtained (`error_while_proxy`).
    Exchange {
        /// The connection came from the pool.
        reused: bool,
    },
}

/// What one failed attempt means, decided once from Pingora's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptError {
    /// The node failed: counts against it.
    Node(Failure),
    /// A pooled keep-alive connection the node had already closed. Not the node's fault; the
    /// request may be sent again on a fresh connection when `unsent` (weir saw the close
    /// before writing anything) or when it is replay-safe.
    Stale { unsent: bool },
    /// The client's side failed (went away, sent a bad request, timed out).
    Client,
    /// weir itself failed; the node is not to blame.
    Internal,
}

/// Classifies an error of one attempt. A failure status is raised by weir's response filter
/// as an upstream `HTTPStatus` and classifies as `Node(Status)`.
pub fn classify(e: &Error, phase: Phase) -> AttemptError {
    match phase {
        Phase::Connect => AttemptError::Node(connect_failure(e)),
        Phase::Exchange { reused } => {
            match e.esource() {
                ErrorSource::Upstream => {}
                ErrorSource::Downstream => return AttemptError::Client,
                ErrorSource::Internal | ErrorSource::Unset => return AttemptError::Internal,
            }
            if e.etype() == &ErrorType::Custom(STALE_UNSENT) {
                return AttemptError::Stale { unsent: true };
            }
            // Pingora's H1 client marks a close or reset of a connection `ReusedOnly`: on a
            // pooled connection that is the node having closed it while idle.
            if reused && matches!(e.retry, RetryType::ReusedOnly) {
                return AttemptError::Stale { unsent: false };
            }
            AttemptError::Node(match e.etype() {
                ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Timeout,
                ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout => {
                    Failure::ConnectTimeout
                }
                t if is_connect_error(t) => Failure::ConnectRefused,
                ErrorType::InvalidHTTPHeader
                | ErrorType::H1Error
                | ErrorType::H2Error
                | ErrorType::InvalidH2 => Failure::BadResponse,
                ErrorType::HTTPStatus(s) => Failure::Status(*s),
                _ => Failure::Reset,
            })
        }
    }
}

/// A connect-phase error: nothing reached the node.
fn connect_failure(e: &Error) -> Failure {
    match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout => Failure::ConnectTimeout,
        _ => Failure::ConnectRefused,
    }
}

/// Errors Pingora raises while connecting (TCP or TLS): the request never left weir.
pub fn is_connect_error(t: &ErrorType) -> bool {
    matches!(
        t,
        ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::BindError
            | ErrorType::SocketError
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::InvalidCert
            | ErrorType::HandshakeError
            | ErrorType::ConnectProxyFailure
    )
}

/// A TLS handshake with a node failed: a configuration matter (ca, sni, tls_verify) worth a
/// log line of its own.
pub fn is_tls_handshake_error(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError
    )
}

/// weir's own error type for a pooled connection found closed before anything was written to
/// it ([`stale_unsent`]).
const STALE_UNSENT: &str = "pooled connection closed by the node before use";

/// The error for a pooled connection that turned out closed before anything was written.
pub fn stale_unsent() -> Box<Error> {
    Error::new_up(ErrorType::Custom(STALE_UNSENT))
}

impl Failure {
    /// Index into [`ATTEMPT_RESULTS`].
    pub fn result_index(self) -> usize {
        match self {
            Failure::ConnectRefused => 1,
            Failure::ConnectTimeout => 2,
            Failure::Timeout => 3,
            Failure::Reset => 4,
            Failure::BadResponse => 5,
            Failure::Status(_) => 6,
        }
    }

    /// The metrics label (`weir_upstream_attempts_total{result}`).
    pub fn label(self) -> &'static str {
        ATTEMPT_RESULTS[self.result_index()]
    }

    /// True when the request provably never reached the node.
    pub fn nothing_sent(self) -> bool {
        matches!(self, Failure::ConnectRefused | Failure::ConnectTimeout)
    }

    /// ServiceQ's error-log code and name: 701 for a node that cannot be reached, 702 for an
    /// HTTP-level failure (timeout, no or bad response, failure status).
    pub fn serviceq_code(self) -> (u16, &'static str) {
        match self {
            Failure::ConnectRefused => (701, "UPSTREAM_DOWN"),
            Failure::ConnectTimeout => (701, "UPSTREAM_CONNECT_TIMED_OUT"),
            Failure::Timeout => (702, "UPSTREAM_TIMED_OUT"),
            Failure::Reset => (702, "UPSTREAM_NO_RESPONSE"),
            Failure::BadResponse => (702, "UPSTREAM_BAD_RESPONSE"),
            Failure::Status(_) => (702, "UPSTREAM_ERROR_STATUS"),
        }
    }

    /// What the client gets when this was the last failure and no attempt is left.
    /// `None` for a failure status: the node's own response is passed through instead.
    pub fn client_answer(self) -> Option<(u16, &'static str)> {
        match self {
            Failure::ConnectTimeout | Failure::Timeout => Some((504, "Gateway Timeout")),
            Failure::ConnectRefused | Failure::Reset => Some((503, "Service Unavailable")),
            Failure::BadResponse => Some((502, "Bad Gateway")),
            Failure::Status(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH: Phase = Phase::Exchange { reused: false };

    #[test]
    fn connect_errors_mean_nothing_was_sent() {
        let refused = Error::new(ErrorType::ConnectRefused);
        let timed_out = Error::new(ErrorType::ConnectTimedout);
        let tls = Error::new(ErrorType::TLSHandshakeFailure);
        let node = |f| AttemptError::Node(f);
        assert_eq!(
            classify(&refused, Phase::Connect),
            node(Failure::ConnectRefused)
        );
        assert_eq!(
            classify(&timed_out, Phase::Connect),
            node(Failure::ConnectTimeout)
        );
        assert_eq!(
            classify(&tls, Phase::Connect),
            node(Failure::ConnectRefused)
        );
        assert!(Failure::ConnectRefused.nothing_sent());
        assert!(!Failure::Timeout.nothing_sent());
    }

    #[test]
    fn downstream_errors_do_not_blame_the_node() {
        let mut e = Error::new(ErrorType::ReadError);
        e.as_down();
        assert_eq!(classify(&e, FRESH), AttemptError::Client);
        let mut internal = Error::new(ErrorType::InternalError);
        internal.as_in();
        assert_eq!(classify(&internal, FRESH), AttemptError::Internal);
        let up = Error::new_up(ErrorType::ReadTimedout);
        assert_eq!(classify(&up, FRESH), AttemptError::Node(Failure::Timeout));
        let bad = Error::new_up(ErrorType::InvalidHTTPHeader);
        assert_eq!(
            classify(&bad, FRESH),
            AttemptError::Node(Failure::BadResponse)
        );
        let status = Error::new_up(ErrorType::HTTPStatus(503));
        assert_eq!(
            classify(&status, FRESH),
            AttemptError::Node(Failure::Status(503))
        );
    }

    #[test]
    fn a_close_on_a_pooled_connection_is_stale_not_the_nodes_fault() {
        let mut closed = Error::new_up(ErrorType::ConnectionClosed);
        closed.retry = RetryType::ReusedOnly;
        assert_eq!(
            classify(&closed, Phase::Exchange { reused: true }),
            AttemptError::Stale { unsent: false }
        );
        // The same close on a fresh connection is the node's.
        assert_eq!(classify(&closed, FRESH), AttemptError::Node(Failure::Reset));
        assert_eq!(
            classify(&stale_unsent(), Phase::Exchange { reused: true }),
            AttemptError::Stale { unsent: true }
        );
    }

    #[test]
    fn client_answers_follow_the_serviceq_table() {
        assert_eq!(
            Failure::Timeout.client_answer(),
            Some((504, "Gateway Timeout"))
        );
        assert_eq!(
            Failure::ConnectRefused.client_answer(),
            Some((503, "Service Unavailable"))
        );
        assert_eq!(
            Failure::BadResponse.client_answer(),
            Some((502, "Bad Gateway"))
        );
        assert_eq!(Failure::Status(503).client_answer(), None);
        assert_eq!(Failure::Status(503).label(), "status");
    }
}
