//! Responses weir writes itself: small JSON bodies that keep ServiceQ's `sq_msg` key, valid
//! HTTP/1.1 framing, the request id and the configured response headers.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use pingora::prelude::*;

use super::RequestCtx;
use crate::queue::QueueId;

pub const X_REQUEST_ID: &str = "x-request-id";
pub const X_WEIR_QUEUE_ID: &str = "x-weir-queue-id";

/// A response decided by weir (not proxied).
pub struct Answer {
    pub status: u16,
    pub message: &'static str,
    /// `Retry-After` in seconds.
    pub retry_after: Option<u32>,
    /// `X-Weir-Queue-Id` of a queued request.
    pub queue_id: Option<QueueId>,
}

impl Answer {
    pub const fn new(status: u16, message: &'static str) -> Answer {
        Answer {
            status,
            message,
            retry_after: None,
            queue_id: None,
        }
    }
}

pub fn body_of(message: &str) -> Bytes {
    Bytes::from(format!("{{\"sq_msg\":\"{message}\"}}"))
}

/// Writes `answer` downstream. Keeps the client connection reusable unless `close` is set.
pub async fn send(
    session: &mut Session,
    ctx: &RequestCtx,
    answer: &Answer,
    close: bool,
) -> Result<()> {
    let body = body_of(answer.message);
    let mut resp = ResponseHeader::build(answer.status, Some(6))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    if let Some(secs) = answer.retry_after {
        resp.insert_header(http::header::RETRY_AFTER, secs)?;
    }
    if let Some(id) = answer.queue_id {
        resp.insert_header(HeaderName::from_static(X_WEIR_QUEUE_ID), id.to_string())?;
    }
    add_common_headers(&mut resp, ctx)?;
    if close {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// The request id and the operator's `response_headers`, on every response.
pub fn add_common_headers(resp: &mut ResponseHeader, ctx: &RequestCtx) -> Result<()> {
    if let Some(id) = &ctx.request_id {
        resp.insert_header(HeaderName::from_static(X_REQUEST_ID), id.clone())?;
    }
    for (name, value) in ctx.state.response_headers.iter() {
        resp.insert_header(name.clone(), value.clone())?;
    }
    Ok(())
}

/// A request id: 32 hex digits, random (not a secret, just unique enough to grep for).
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    for (i, byte) in buf.iter_mut().enumerate() {
        let word = if i < 16 { a } else { b };
        let nibble = (word >> ((i % 16) * 4)) & 0xf;
        *byte = HEX[nibble as usize];
    }
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// A client-supplied id is kept when it is short and printable; otherwise weir makes its own.
pub fn acceptable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 200 && b.iter().all(|c| c.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_32_hex_digits_and_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn client_ids_must_be_short_and_printable() {
        assert!(acceptable_request_id(&HeaderValue::from_static("abc-123")));
        assert!(!acceptable_request_id(&HeaderValue::from_static(
            "has space"
        )));
        assert!(!acceptable_request_id(
            &HeaderValue::from_str(&"x".repeat(201)).unwrap()
        ));
    }

    #[test]
    fn bodies_keep_the_serviceq_key() {
        assert_eq!(
            &body_of("Request Discarded")[..],
            br#"{"sq_msg":"Request Discarded"}"#
        );
    }
}
