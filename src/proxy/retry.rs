//! The retry policy: whether another attempt may follow a failed one. The only home of the
//! rule; live traffic applies it here, the queue replay applies the same rule to its entries.
//!
//! - Never once a response header went to the client.
//! - At most `retries.max_attempts` attempts (0: one per node), one per node.
//! - After a failure where nothing reached the node (connect refused or timed out), always.
//! - After the request may have reached the node, only when replaying it is safe (idempotent
//!   method or `Idempotency-Key`) and its whole body can be sent again.
//! - A pooled connection the node had closed ([`AttemptError::Stale`]) is not the node's
//!   failure: when weir saw the close before writing anything, the request is sent again on
//!   another connection whatever it is; when the close came after the request was written,
//!   it is sent again only where replay is safe, and otherwise counts as the node's reset.

use pingora::prelude::*;

use super::request::RequestCtx;
use crate::failure::Failure;
use crate::metrics::RetryReason;

/// Stale pooled connections released in one request before a further one counts as the
/// node's failure (each costs one non-blocking `recv`; a node that went away can leave
/// several dead connections in the pool).
pub const MAX_STALE_RETRIES: u8 = 8;

/// What follows an attempt that met a stale pooled connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleVerdict {
    /// Release the attempt (not the node's fault) and send the request again.
    Retry,
    /// Count it as the node's failure: a reset when the request may have been seen (and
    /// cannot be replayed); when nothing was written but the stale budget is spent, a node
    /// whose pool holds only dead connections is as good as refusing them.
    NodeFailure(Failure),
}

/// The decision after the node's failure `f`: `Some(reason)` when another attempt may follow.
pub fn after_failure(session: &Session, ctx: &RequestCtx, f: Failure) -> Option<RetryReason> {
    allowed(session, ctx, f).then(|| RetryReason::after_failure(f.result_index()))
}

fn allowed(session: &Session, ctx: &RequestCtx, f: Failure) -> bool {
    if response_started(session) {
        return false;
    }
    if ctx.tried.len() >= ctx.cluster().attempt_limit() {
        return false;
    }
    f.nothing_sent() || replayable(session, ctx)
}

/// The verdict for a stale pooled connection; `unsent`: weir saw it closed before writing.
pub fn after_stale(session: &Session, ctx: &RequestCtx, unsent: bool) -> StaleVerdict {
    let fits = ctx.stale_retries < MAX_STALE_RETRIES && !response_started(session);
    if fits && (unsent || replayable(session, ctx)) {
        StaleVerdict::Retry
    } else if unsent {
        StaleVerdict::NodeFailure(Failure::ConnectRefused)
    } else {
        StaleVerdict::NodeFailure(Failure::Reset)
    }
}

/// The request may be sent again after it reached a node.
pub fn replayable(session: &Session, ctx: &RequestCtx) -> bool {
    ctx.replay_safe && body_replayable(session, ctx)
}

/// True once a final (or 101) response header went to the client: nothing may be retried then.
pub fn response_started(session: &Session) -> bool {
    session
        .response_written()
        .is_some_and(|r| r.status.as_u16() >= 200 || r.status.as_u16() == 101)
}

/// The body can be sent again: weir holds a copy, there is none, or Pingora's buffer has it all.
fn body_replayable(session: &Session, ctx: &RequestCtx) -> bool {
    ctx.body.is_some() || !session.as_ref().retry_buffer_truncated()
}

/// Replay-safe by method: RFC 9110's idempotent methods.
pub fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// Whether a pooled connection was closed by the node while it sat idle: a non-blocking peek
/// that reads end-of-file or an error. Nothing has been written to it yet, so a closed one
/// provably never carried this request.
pub fn pooled_connection_closed(fd: std::os::unix::io::RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: `fd` is the live socket Pingora hands to `connected_to_upstream`; a one-byte
    // MSG_PEEK read into a stack buffer neither consumes data nor changes the socket.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => {
            let err = std::io::Error::last_os_error();
            !matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::io::AsRawFd;
    use std::time::Duration;

    #[test]
    fn a_peek_tells_an_idle_open_connection_from_one_the_peer_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 1];
        assert!(!pooled_connection_closed(client.as_raw_fd()));
        // Unread data is not a close, and the peek leaves it in place.
        server.write_all(b"x").unwrap();
        assert_eq!(client.peek(&mut buf).unwrap(), 1); // blocks until it arrived
        assert!(!pooled_connection_closed(client.as_raw_fd()));
        (&client).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"x");
        drop(server);
        assert_eq!(client.peek(&mut buf).unwrap(), 0); // blocks until the FIN arrived
        assert!(pooled_connection_closed(client.as_raw_fd()));
    }
}
