//! Queueing a request instead of (upfront) or after (deferred) proxying it: reading its whole
//! body when weir does not hold a copy yet, and building the queued entry with the headers an
//! upstream would get.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::HeaderName;
use pingora::prelude::*;

use super::RequestCtx;
use crate::queue::{unix_ms, Queue, QueuedRequest};

/// How long a client may take between two body reads while weir reads its body.
const CLIENT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1), plus the framing
/// and expectation headers weir sets itself.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "expect",
    "proxy-authorization",
];

/// The request's whole body, read from the client now, if it is at most `max` bytes. `None`
/// when it is longer (what was read is dropped; the client must be answered and closed).
pub async fn read_body(session: &mut Session, max: usize) -> Result<Option<Bytes>> {
    if session.is_body_done() {
        return Ok(Some(Bytes::new()));
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue && session.response_written().is_none() {
        session.write_continue_response().await?;
    }
    session.set_read_timeout(Some(CLIENT_BODY_READ_TIMEOUT));
    let mut copy = BytesMut::new();
    let result = loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if copy.len() + chunk.len() > max {
                    break Ok(None);
                }
                copy.extend_from_slice(&chunk);
            }
            Ok(None) => break Ok(Some(copy.freeze())),
            Err(e) => break Err(e),
        }
    };
    session.set_read_timeout(None);
    result
}

/// The queued form of the request in `session` with `body`.
pub fn entry(session: &Session, ctx: &RequestCtx, queue: &Queue, body: Bytes) -> QueuedRequest {
    let req = session.req_header();
    let connection_named: Vec<String> = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let forwarded = |name: &HeaderName| {
        !HOP_BY_HOP.contains(&name.as_str())
            && !connection_named.iter().any(|c| c == name.as_str())
            && name.as_str() != "x-forwarded-for"
            && name.as_str() != "x-forwarded-proto"
            && name.as_str() != super::respond::X_REQUEST_ID
    };
    let mut lines = Vec::with_capacity(256);
    let mut line = |name: &[u8], value: &[u8]| {
        lines.extend_from_slice(name);
        lines.extend_from_slice(b": ");
        lines.extend_from_slice(value);
        lines.extend_from_slice(b"\r\n");
    };
    let mut xff: Option<String> = None;
    for (name, value) in req.headers.iter() {
        if name.as_str() == "x-forwarded-for" {
            if let Ok(v) = value.to_str() {
                xff = Some(match xff {
                    Some(prev) => format!("{prev}, {v}"),
                    None => v.to_string(),
                });
            }
        }
        if forwarded(name) {
            line(name.as_str().as_bytes(), value.as_bytes());
        }
    }
    // The forwarding headers `upstream::prepare_request` adds on a live attempt.
    let client_ip = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    let xff = match (xff.filter(|p| !p.trim().is_empty()), client_ip) {
        (Some(prev), Some(ip)) => Some(format!("{prev}, {ip}")),
        (None, Some(ip)) => Some(ip.to_string()),
        (prev, None) => prev,
    };
    if let Some(xff) = xff {
        line(b"x-forwarded-for", xff.as_bytes());
    }
    line(b"x-forwarded-proto", b"http");
    if let Some(id) = &ctx.request_id {
        line(super::respond::X_REQUEST_ID.as_bytes(), id.as_bytes());
    }
    QueuedRequest {
        id: queue.new_id(),
        method: req.method.clone(),
        target: Bytes::copy_from_slice(req.raw_path()),
        headers: Bytes::from(lines.into_boxed_slice()),
        body,
        enqueued: tokio::time::Instant::now(),
        enqueued_unix_ms: unix_ms(SystemTime::now()),
        attempts: 0,
        replay_safe: ctx.replay_safe,
        last_error: None,
    }
}

/// How long a client is told to wait before asking again: the time the replay needs for the
/// backlog at its rate, between 1 s and 60 s.
pub fn retry_after(depth: usize, rate: u32) -> u32 {
    let rate = rate.max(1) as usize;
    (1 + depth / rate).min(60) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_grows_with_the_backlog_and_is_capped() {
        assert_eq!(retry_after(0, 200), 1);
        assert_eq!(retry_after(1000, 200), 6);
        assert_eq!(retry_after(1_000_000, 200), 60);
        assert_eq!(retry_after(5, 0), 6);
    }
}
