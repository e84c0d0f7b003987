//! Request bodies kept for replay.
//!
//! Pingora replays at most 64 KiB of request body on a retry. weir keeps its own copy of
//! bodies up to `limits.max_buffered_body` when a retry after sending could happen (the request
//! is replay-safe) and the length is known up front, using the "late enable" technique measured
//! in `shared/design/pingora-0.9.1.md` §14: read the body here with Pingora's retry buffer off,
//! switch the buffer on only for the last ≤64 KiB, and on every attempt substitute the full copy
//! for the tail that Pingora hands to `request_body_filter`. Larger bodies, and chunked bodies
//! Pingora cannot replay, stream through and are retried only when nothing reached a node.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::prelude::*;
use pingora_error::ErrorType;

/// Pingora's own replay buffer limit (core/protocols/http/v1/common.rs `BODY_BUF_LIMIT`).
const PINGORA_REPLAY_LIMIT: usize = 64 * 1024;

/// The first allocation of a body copy; it grows with what arrives.
const INITIAL_COPY: usize = 16 * 1024;

/// How long a client may take between two body reads while weir is buffering its body.
const CLIENT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The declared body length, if the request has a Content-Length and no chunked encoding.
pub fn content_length(session: &Session) -> Option<usize> {
    let req = session.req_header();
    if req.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return None;
    }
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<usize>().ok())
}

/// Whether the request announces a body (chunked, or a Content-Length above 0).
pub fn has_body(session: &Session) -> bool {
    let h = &session.req_header().headers;
    h.contains_key(http::header::TRANSFER_ENCODING)
        || h.get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes().iter().any(|&b| (b'1'..=b'9').contains(&b)))
}

/// The response has no body to follow its header: a `HEAD` request, `204`, `304`, or a
/// `Content-Length` of 0 without a transfer coding.
pub fn response_is_empty(session: &Session, resp: &ResponseHeader) -> bool {
    if session.req_header().method == http::Method::HEAD
        || matches!(resp.status.as_u16(), 204 | 304)
    {
        return true;
    }
    let h = &resp.headers;
    !h.contains_key(http::header::TRANSFER_ENCODING)
        && h.get(http::header::CONTENT_LENGTH).is_some_and(|v| {
            let v = v.as_bytes();
            !v.is_empty() && v.iter().all(|&b| b == b'0')
        })
}

/// Both `Content-Length` and `Transfer-Encoding`: a request smuggling vector.
pub fn ambiguous_framing(session: &Session) -> bool {
    let h = &session.req_header().headers;
    h.contains_key(http::header::TRANSFER_ENCODING) && h.contains_key(http::header::CONTENT_LENGTH)
}

/// Reads the whole body of a Content-Length request into a copy for replay, leaving Pingora's
/// retry buffer holding the tail it will hand to `request_body_filter` on every attempt.
pub async fn capture(session: &mut Session, len: usize) -> Result<Bytes> {
    if is_expect_continue(session) {
        // The client waits for this before sending the body; the upstream must not see the
        // expectation since the body will arrive with the head.
        session.write_continue_response().await?;
        session
            .req_header_mut()
            .remove_header(&http::header::EXPECT);
    }
    session.set_read_timeout(Some(CLIENT_BODY_READ_TIMEOUT));
    // Memory follows the bytes that arrive, not the length a client announces.
    let mut copy = BytesMut::with_capacity(len.min(INITIAL_COPY));
    let mut enabled = false;
    loop {
        if !enabled && len - copy.len().min(len) <= PINGORA_REPLAY_LIMIT {
            session.enable_retry_buffering();
            enabled = true;
        }
        let chunk = session.read_request_body().await.map_err(|mut e| {
            e.as_down();
            e
        })?;
        match chunk {
            Some(chunk) => {
                if copy.len() + chunk.len() > len {
                    return Error::e_explain(
                        ErrorType::InvalidHTTPHeader,
                        "request body longer than its Content-Length",
                    )
                    .map_err(|mut e| {
                        e.as_down();
                        e
                    });
                }
                copy.extend_from_slice(&chunk);
            }
            None if copy.len() < len => return incomplete(len, copy.len()),
            None => break,
        }
    }
    session.set_read_timeout(None);
    Ok(copy.freeze())
}

/// The client's body ended before its declared length: the client's failure.
pub fn incomplete<T>(declared: usize, read: usize) -> Result<T> {
    let mut e = Error::explain(
        ErrorType::ConnectionClosed,
        format!("request body ended after {read} of {declared} bytes"),
    );
    e.as_down();
    Err(e)
}

fn is_expect_continue(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// In `request_body_filter`: swap Pingora's replayed tail for weir's full copy, exactly once per
/// attempt (`sent` is reset when an attempt starts).
pub fn substitute(body: &mut Option<Bytes>, end_of_stream: bool, copy: &Bytes, sent: &mut bool) {
    if end_of_stream && !*sent {
        *body = Some(copy.clone());
        *sent = true;
    } else if body.is_some() {
        // Only the final tail is expected while a copy is held; hold anything else back (an
        // empty chunk is skipped, while `None` would end the upstream body).
        *body = Some(Bytes::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_copy_replaces_the_tail_once_per_attempt() {
        let copy = Bytes::from_static(b"the whole body");
        let mut sent = false;
        let mut chunk = Some(Bytes::from_static(b"body"));
        substitute(&mut chunk, true, &copy, &mut sent);
        assert_eq!(chunk.as_deref(), Some(&b"the whole body"[..]));
        let mut again = Some(Bytes::from_static(b"body"));
        substitute(&mut again, true, &copy, &mut sent);
        assert_eq!(again.as_deref(), Some(&b""[..]));
        let mut early = Some(Bytes::from_static(b"x"));
        let mut fresh = false;
        substitute(&mut early, false, &copy, &mut fresh);
        assert_eq!(early.as_deref(), Some(&b""[..]));
        assert!(!fresh);
    }
}
