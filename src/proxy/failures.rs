//! The one failure taxonomy. Every upstream failure is classified once into [`Failure`]; the
//! retry decision, the node's error score, the metrics label, the ServiceQ error-log code and
//! the status the client finally sees are all derived from it here, nowhere else.

use pingora::prelude::*;
use pingora_error::{ErrorSource, ErrorType};

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

impl Failure {
    /// Classifies a connect-phase error (from `fail_to_connect`).
    pub fn from_connect_error(e: &Error) -> Failure {
        match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout => Failure::ConnectTimeout,
            _ => Failure::ConnectRefused,
        }
    }

    /// Classifies an error raised after the connection was made (from `error_while_proxy`).
    /// `None` when the node is not to blame: the client went away, or weir itself failed.
    /// (A failure status is raised by weir's response filter as an upstream `HTTPStatus`.)
    pub fn from_proxy_error(e: &Error) -> Option<Failure> {
        if *e.esource() != ErrorSource::Upstream {
            return None;
        }
        Some(match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Timeout,
            ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout => Failure::ConnectTimeout,
            ErrorType::InvalidHTTPHeader
            | ErrorType::H1Error
            | ErrorType::H2Error
            | ErrorType::InvalidH2 => Failure::BadResponse,
            ErrorType::HTTPStatus(s) => Failure::Status(*s),
            _ => Failure::Reset,
        })
    }

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

    #[test]
    fn connect_errors_mean_nothing_was_sent() {
        let refused = Error::new(ErrorType::ConnectRefused);
        let timed_out = Error::new(ErrorType::ConnectTimedout);
        assert_eq!(
            Failure::from_connect_error(&refused),
            Failure::ConnectRefused
        );
        assert_eq!(
            Failure::from_connect_error(&timed_out),
            Failure::ConnectTimeout
        );
        assert!(Failure::ConnectRefused.nothing_sent());
        assert!(!Failure::Timeout.nothing_sent());
    }

    #[test]
    fn downstream_errors_do_not_blame_the_node() {
        let mut e = Error::new(ErrorType::ReadError);
        e.as_down();
        assert_eq!(Failure::from_proxy_error(&e), None);
        let up = Error::new_up(ErrorType::ReadTimedout);
        assert_eq!(Failure::from_proxy_error(&up), Some(Failure::Timeout));
        let bad = Error::new_up(ErrorType::InvalidHTTPHeader);
        assert_eq!(Failure::from_proxy_error(&bad), Some(Failure::BadResponse));
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
