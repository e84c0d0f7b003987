//! Queueing a request instead of (upfront) or after (deferred) proxying it: the deferral
//! decision, reading the whole body when weir does not hold a copy yet, building the queued
//! entry, and the answer the client gets (202 / 503 Request Buffered / 503 Queue Full / 413).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use pingora::prelude::*;

use super::request::RequestCtx;
use super::respond::{self, Answer};
use super::Gateway;
use crate::metrics::{Outcome, Rejection};
use crate::queue::{unix_ms, PushError, Queue, QueuedRequest};

/// How long a client may take between two body reads while weir reads its body.
const CLIENT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Framing and expectation headers: each delivery sets its own.
const FRAMING: [http::header::HeaderName; 3] = [
    http::header::CONTENT_LENGTH,
    http::header::EXPECT,
    http::header::TRANSFER_ENCODING,
];

/// Whether the deferred queue may take this request once every attempt failed (the body
/// aside): it matches, and replaying it is safe or the operator allows unsafe replays.
pub fn may_defer(ctx: &RequestCtx) -> bool {
    ctx.deferrable
        && !ctx.body_failed
        && (!ctx.maybe_sent || ctx.replay_safe || ctx.runtime.config.deferred_queue.replay_unsafe)
}

/// Every attempt failed: queue the request if it may be, and say what to answer (`None`:
/// not deferrable, answer the failure).
pub async fn defer(gw: &Gateway, session: &mut Session, ctx: &mut RequestCtx) -> Option<Answer> {
    if !may_defer(ctx) {
        return None;
    }
    let body = match &ctx.body {
        Some(copy) => copy.clone(),
        None if ctx.body_streamed => return None,
        // Nothing of the body went anywhere yet (connect failures): read it now.
        None => {
            let max = ctx.runtime.config.limits.max_buffered_body;
            match read_body(session, max).await {
                Ok(Some(body)) => body,
                Err(e) => {
                    log::info!(
                        "not queueing {} {}: {e}",
                        session.req_header().method,
                        String::from_utf8_lossy(session.req_header().raw_path())
                    );
                    ctx.body_failed = true;
                    session.set_keepalive(None);
                    return None;
                }
                Ok(None) => {
                    log::info!(
                        "not queueing {} {}: body over limits.max_buffered_body",
                        session.req_header().method,
                        String::from_utf8_lossy(session.req_header().raw_path())
                    );
                    session.set_keepalive(None);
                    return None;
                }
            }
        }
    };
    let queue = gw.queues.deferred.clone();
    let rate = ctx.runtime.config.deferred_queue.replay_rate;
    Some(
        enqueue(
            gw,
            session,
            ctx,
            &queue,
            body,
            503,
            "Request Buffered",
            rate,
        )
        .await,
    )
}

/// The upfront queue takes the request without proxying it: 202, or 503 when full, or 413
/// when its body is over `limits.max_buffered_body`.
pub async fn enqueue_upfront(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    queue: &Arc<Queue>,
) -> Result<()> {
    let max = ctx.runtime.config.limits.max_buffered_body;
    let too_large = super::body::content_length(session).is_some_and(|len| len > max);
    let body = if too_large {
        None
    } else {
        match read_body(session, max).await {
            Ok(body) => body,
            Err(e) => {
                ctx.body_failed = true;
                return Err(e);
            }
        }
    };
    let answer = match body {
        Some(body) => {
            let rate = ctx.runtime.config.upfront_queue.replay_rate;
            enqueue(gw, session, ctx, queue, body, 202, "Request Queued", rate).await
        }
        None => {
            ctx.outcome = Outcome::Rejected;
            return respond::send(session, ctx, &Answer::new(413, "Request Too Large"), true).await;
        }
    };
    let close = answer.status != 202;
    respond::send(session, ctx, &answer, close).await
}

/// Pushes the request onto `queue` and returns the answer: `status`/`message` with the
/// queue id, or `503 Queue Full`.
#[allow(clippy::too_many_arguments)]
async fn enqueue(
    gw: &Gateway,
    session: &Session,
    ctx: &mut RequestCtx,
    queue: &Queue,
    body: Bytes,
    status: u16,
    message: &'static str,
    rate: u32,
) -> Answer {
    let entry = entry(session, ctx, queue, body);
    let method = entry.method.clone();
    let target = String::from_utf8_lossy(&entry.target).into_owned();
    match queue.push(entry).await {
        Ok(id) => {
            log::info!(
                "queue={} id={id} {method} {target} queued (depth {})",
                queue.kind.label(),
                queue.len()
            );
            ctx.outcome = if status == 202 {
                Outcome::Queued
            } else {
                Outcome::Buffered
            };
            Answer {
                retry_after: (status == 503).then(|| retry_after(queue.len(), rate)),
                queue_id: Some(id),
                ..Answer::new(status, message)
            }
        }
        Err(PushError::Unavailable(_, e)) => {
            log::error!(
                "queue={} cannot store {method} {target}: {e}; refused",
                queue.kind.label()
            );
            gw.metrics.rejected(Rejection::QueueUnavailable);
            ctx.outcome = Outcome::Rejected;
            Answer {
                retry_after: Some(5),
                ..Answer::new(503, "Queue Unavailable")
            }
        }
        Err(PushError::Full(_)) => {
            log::warn!(
                "queue={} full ({} entries, {} of {} bytes): {method} {target} refused",
                queue.kind.label(),
                queue.len(),
                queue.bytes(),
                queue.max_bytes()
            );
            gw.metrics.rejected(Rejection::QueueFull);
            ctx.outcome = Outcome::Rejected;
            Answer {
                retry_after: Some(retry_after(queue.len(), rate)),
                ..Answer::new(503, "Queue Full")
            }
        }
    }
}

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
    let declared = super::body::content_length(session);
    let mut copy = BytesMut::new();
    let result = loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if copy.len() + chunk.len() > max {
                    break Ok(None);
                }
                copy.extend_from_slice(&chunk);
            }
            // Pingora reports a body cut short as an error; this is the backstop for any
            // path where the declared length was not met.
            Ok(None) if declared.is_some_and(|len| len != copy.len()) => {
                break super::body::incomplete(declared.unwrap_or(0), copy.len());
            }
            Ok(None) => break Ok(Some(copy.freeze())),
            Err(mut e) => {
                e.as_down();
                break Err(e);
            }
        }
    };
    session.set_read_timeout(None);
    result
}

/// The queued form of the request in `session` with `body`: the client's head as it arrived
/// (less its framing; each delivery runs it through the forwarding policy like a live
/// attempt) and the client's side of the forwarding headers.
pub fn entry(session: &Session, ctx: &RequestCtx, queue: &Queue, body: Bytes) -> QueuedRequest {
    let req = session.req_header();
    let client = ctx
        .client
        .clone()
        .unwrap_or_else(|| super::client_of(session));
    QueuedRequest {
        id: queue.new_id(),
        method: req.method.clone(),
        target: Bytes::copy_from_slice(req.raw_path()),
        headers: header_lines(req),
        client,
        body,
        enqueued: tokio::time::Instant::now(),
        enqueued_unix_ms: unix_ms(SystemTime::now()),
        attempts: 0,
        replay_safe: ctx.replay_safe,
        last_error: None,
        cluster: (ctx.cluster != 0).then(|| ctx.cluster().name.clone()),
    }
}

/// The header lines a queued request keeps of `req` (`name: value\r\n`): all but the framing
/// headers, and a `host` line from the URI's authority when there is no `Host` header.
pub(crate) fn header_lines(req: &RequestHeader) -> Bytes {
    let mut lines = Vec::with_capacity(256);
    let mut line = |name: &[u8], value: &[u8]| {
        lines.extend_from_slice(name);
        lines.extend_from_slice(b": ");
        lines.extend_from_slice(value);
        lines.extend_from_slice(b"\r\n");
    };
    // An HTTP/2 client names the authority in the URI; a replay goes out as HTTP/1.1.
    if !req.headers.contains_key(http::header::HOST) {
        if let Some(authority) = req.uri.authority() {
            line(b"host", authority.as_str().as_bytes());
        }
    }
    for (name, value) in req.headers.iter() {
        if !FRAMING.contains(name) {
            line(name.as_str().as_bytes(), value.as_bytes());
        }
    }
    Bytes::from(lines.into_boxed_slice())
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
