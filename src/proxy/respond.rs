//! Responses weir writes itself: small JSON bodies that keep ServiceQ's `sq_msg` key, valid
//! HTTP/1.1 framing, the request id and the configured response headers.

use http::header::HeaderName;
use pingora::prelude::*;
use pingora_error::{ErrorSource, ErrorType};

use super::request::RequestCtx;
use crate::queue::QueueId;

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

pub use crate::conn::answer_body as body_of;

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
    if let Some(client) = &ctx.client {
        // A static name and a shared value: no allocation beyond Pingora's name copy.
        resp.insert_header(crate::forward::X_REQUEST_ID, client.request_id.clone())?;
    }
    for (name, value) in ctx.runtime.response_headers.iter() {
        resp.insert_header(name.clone(), value.clone())?;
    }
    Ok(())
}

/// What weir refuses before anything else: an HTTP/1.1 request without a `Host` (RFC 9112
/// §3.2; Pingora itself refuses several), a `Content-Length` that is not one decimal number
/// (400), a `Connection` that names `Host` or an `X-Forwarded-*` header (400), and a transfer
/// coding other than `chunked` alone (RFC 9112 §6.1: 501).
///
/// Pingora's upstream policy refuses to forward a request whose `Connection` names a header
/// meant for every hop, but only when an attempt starts; the upfront queue took such a
/// request before that, and its replay went out without its `Host`.
///
/// Pingora frames a body by a list of equal lengths (`3, 3`), a repeated header or a signed
/// number (`+3`) and forwards the header as it came; weir would read no length from the first
/// (so keep no copy of the body), and a node may read any of them differently (RFC 9110 §8.6
/// lets a recipient refuse them). Pingora would decode the chunked framing and drop the coding
/// under it (`gzip, chunked`), so the node would get a body the client never meant.
pub fn malformed(req: &RequestHeader) -> Option<Answer> {
    let no_host =
        req.version == http::Version::HTTP_11 && !req.headers.contains_key(http::header::HOST);
    if no_host || !one_decimal_length(req) || names_protected(req) {
        return Some(Answer::new(400, "Bad Request"));
    }
    let mut codings = req
        .headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|c| c.trim_ascii())
        .filter(|c| !c.is_empty());
    let only_chunked = match codings.next() {
        None => true,
        Some(first) => first.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    };
    (!only_chunked).then(|| Answer::new(501, "Not Implemented"))
}

/// The headers a `Connection` value may not name (as Pingora's upstream policy has it).
const PROTECTED: [&str; 4] = [
    "host",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// Whether a `Connection` value names one of [`PROTECTED`].
fn names_protected(req: &RequestHeader) -> bool {
    req.headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|token| token.trim_ascii())
        .any(|token| {
            PROTECTED
                .iter()
                .any(|p| token.eq_ignore_ascii_case(p.as_bytes()))
        })
}

/// No `Content-Length`, or exactly one whose value is digits only (RFC 9110 §8.6).
fn one_decimal_length(req: &RequestHeader) -> bool {
    let mut lengths = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
    match (lengths.next(), lengths.next()) {
        (None, _) => true,
        (Some(v), None) => !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit),
        (Some(_), Some(_)) => false,
    }
}

/// The answer table for a request that no attempt served (and no queue took): `None` when the
/// client is gone or broke its own connection (nothing to answer). The node's last failure
/// decides (504 timed out, 503 unreachable, 502 not HTTP); a bad request is 400, a client
/// too slow with its request 408.
pub fn final_answer(e: &Error, ctx: &RequestCtx) -> Option<Answer> {
    Some(match (e.esource(), e.etype()) {
        // A client still there but too slow with its request is told so.
        (ErrorSource::Downstream, ErrorType::ReadTimedout) => Answer::new(408, "Request Timeout"),
        (
            ErrorSource::Downstream,
            ErrorType::ReadError
            | ErrorType::WriteError
            | ErrorType::ConnectionClosed
            | ErrorType::WriteTimedout,
        ) => return None,
        (ErrorSource::Downstream, _) => Answer::new(400, "Bad Request"),
        _ => match ctx.last_failure.and_then(|f| f.client_answer()) {
            Some((status, message)) => Answer::new(status, message),
            None => match e.etype() {
                ErrorType::HTTPStatus(s) if (400..500).contains(s) => {
                    Answer::new(*s, "Bad Request")
                }
                // A failure status weir kept from the client (to queue it, which then could
                // not be), or no node left to try (503).
                ErrorType::HTTPStatus(502) => Answer::new(502, "Bad Gateway"),
                ErrorType::HTTPStatus(504) => Answer::new(504, "Gateway Timeout"),
                ErrorType::HTTPStatus(_) => Answer::new(503, "Service Unavailable"),
                _ if *e.esource() == ErrorSource::Upstream => Answer::new(502, "Bad Gateway"),
                _ => Answer::new(500, "Internal Error"),
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("POST", b"/", None).expect("head");
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).expect("header");
        }
        req
    }

    #[test]
    fn only_chunked_alone_is_an_accepted_transfer_coding() {
        let ok = [
            vec![("host", "a")],
            vec![("host", "a"), ("transfer-encoding", "chunked")],
            vec![("host", "a"), ("transfer-encoding", " Chunked ")],
        ];
        for headers in ok {
            assert!(malformed(&request(&headers)).is_none(), "{headers:?}");
        }
        let refused = [
            vec![("host", "a"), ("transfer-encoding", "gzip, chunked")],
            vec![
                ("host", "a"),
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked"),
            ],
            vec![("host", "a"), ("transfer-encoding", "chunked, chunked")],
            vec![("host", "a"), ("transfer-encoding", "identity")],
        ];
        for headers in refused {
            let answer = malformed(&request(&headers));
            assert_eq!(answer.map(|a| a.status), Some(501), "{headers:?}");
        }
        assert_eq!(malformed(&request(&[])).map(|a| a.status), Some(400));
    }

    #[test]
    fn a_content_length_other_than_one_decimal_number_is_refused() {
        for value in ["0", "3", "0042"] {
            let req = request(&[("host", "a"), ("content-length", value)]);
            assert!(malformed(&req).is_none(), "{value}");
        }
        let refused = [
            vec![("host", "a"), ("content-length", "3, 3")],
            vec![
                ("host", "a"),
                ("content-length", "3"),
                ("content-length", "3"),
            ],
            vec![("host", "a"), ("content-length", "+3")],
            vec![("host", "a"), ("content-length", "")],
            vec![("host", "a"), ("content-length", "3 ")],
        ];
        for headers in refused {
            let answer = malformed(&request(&headers));
            assert_eq!(answer.map(|a| a.status), Some(400), "{headers:?}");
        }
    }

    #[test]
    fn a_connection_naming_host_or_a_forwarding_header_is_refused() {
        let kept = request(&[("host", "a"), ("connection", "keep-alive, x-secret")]);
        assert!(malformed(&kept).is_none());
        for value in [
            "keep-alive,host",
            "Host",
            " x-forwarded-for ",
            "close, X-Forwarded-Proto",
            "x-forwarded-host",
        ] {
            let req = request(&[("host", "a"), ("connection", value)]);
            assert_eq!(malformed(&req).map(|a| a.status), Some(400), "{value}");
        }
    }

    #[test]
    fn bodies_keep_the_serviceq_key() {
        assert_eq!(
            &body_of("Request Discarded")[..],
            br#"{"sq_msg":"Request Discarded"}"#
        );
    }
}
