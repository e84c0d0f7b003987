//! The forwarding policy: the request head a node receives. One function, [`prepare`], turns
//! the client's request head into the head of an attempt, for a live attempt
//! (`upstream_request_filter`) and for the delivery of a queued request alike:
//!
//! - hop-by-hop headers (RFC 9110 §7.6.1) and the ones `Connection` names are removed;
//! - `X-Forwarded-For` gets the client's address appended, `X-Forwarded-Proto` says whether the
//!   client came over TLS;
//! - `X-Request-Id` and `traceparent` carry the request's ids (a `tracestate` is dropped when
//!   the trace started at weir);
//! - `Host` follows `upstream_host` (kept, or the node's `host:port`).
//!
//! What the policy needs from the client's connection and the request's ids is captured once
//! when the request arrives, as a [`Client`], and kept with a queued request, so a replay hours
//! later sends what a live attempt would have sent.

pub mod ids;
pub mod trace;

use std::io::Write;
use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use pingora::prelude::*;
use pingora_error::ErrorType;
use smallvec::SmallVec;

use crate::config::UpstreamHost;
use crate::runtime::Node;

pub use ids::X_REQUEST_ID;

const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
/// The names as written on the wire (lowercase, as Pingora writes a name it has no case for).
const XFF_NAME: &str = "x-forwarded-for";
const XFP_NAME: &str = "x-forwarded-proto";

/// What every attempt of a request carries from its client: captured when the request
/// arrives, kept with a queued request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub ip: Option<IpAddr>,
    /// The client came in over a TLS listener (`X-Forwarded-Proto: https`).
    pub tls: bool,
    pub request_id: HeaderValue,
    /// W3C trace context sent upstream: the client's when valid, else a new one.
    pub traceparent: HeaderValue,
    /// The traceparent is weir's own, so a client `tracestate` belongs to no trace and is
    /// dropped.
    pub trace_started_here: bool,
}

impl Client {
    /// The client's ids, kept when acceptable and made otherwise: an `X-Request-Id` that is
    /// short and printable; exactly one valid `traceparent` (none, several or a bad one start
    /// a new trace).
    pub fn capture(headers: &HeaderMap, ip: Option<IpAddr>, tls: bool) -> Client {
        let client_id = headers
            .get(ids::X_REQUEST_ID)
            .filter(|v| ids::acceptable_request_id(v));
        let mut parents = headers.get_all(trace::TRACEPARENT).iter();
        let client_trace = match (parents.next(), parents.next()) {
            (Some(tp), None) if trace::valid_traceparent(tp.as_bytes()) => Some(tp),
            _ => None,
        };
        let trace_started_here = client_trace.is_none();
        let (request_id, traceparent) = match (client_id, client_trace) {
            (Some(id), Some(tp)) => (id.clone(), tp.clone()),
            (Some(id), None) => (id.clone(), trace::new_traceparent()),
            (None, Some(tp)) => (ids::new_request_id(), tp.clone()),
            // The usual case: both made here, in one buffer (one allocation for the two).
            (None, None) => new_ids(),
        };
        Client {
            ip,
            tls,
            request_id,
            traceparent,
            trace_started_here,
        }
    }
}

/// A new request id and a new traceparent, two views of one shared buffer.
fn new_ids() -> (HeaderValue, HeaderValue) {
    const ID: usize = ids::REQUEST_ID_LEN;
    let mut buf = [0u8; ID + trace::TRACEPARENT_LEN];
    let (id, tp) = buf.split_at_mut(ID);
    if let (Ok(id), Ok(tp)) = (id.try_into(), tp.try_into()) {
        ids::write_request_id(id);
        trace::write_traceparent(tp);
    }
    let both = bytes::Bytes::from_owner(buf);
    let value = |b: bytes::Bytes| HeaderValue::from_maybe_shared(b).ok();
    match (value(both.slice(..ID)), value(both.slice(ID..))) {
        (Some(id), Some(tp)) => (id, tp),
        _ => (ids::new_request_id(), trace::new_traceparent()),
    }
}

/// Headers that describe one connection and are never forwarded (RFC 9110 §7.6.1), as
/// Pingora's upstream request policy removes them too.
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "http2-settings"
    )
}

/// Removes the hop-by-hop headers and those that `Connection` names. One pass over the
/// headers; nothing is allocated when there is nothing to remove (the live path, where
/// Pingora's own policy already removed them).
pub fn strip_hop_by_hop(req: &mut RequestHeader) {
    // An upgrade request (WebSocket, RFC 9110 §7.8) keeps its `Upgrade` and says so again in
    // a `Connection` of its own: the node must see what the client asks to switch to.
    let upgrade = is_upgrade(&req.headers).then(|| req.headers.get(http::header::UPGRADE).cloned());
    let mut remove: SmallVec<[HeaderName; 4]> = SmallVec::new();
    for value in req.headers.get_all(http::header::CONNECTION) {
        // Bytes, not `to_str`: one non-ASCII byte in the value must not keep the headers it
        // names (found by fuzz/request_head).
        for token in value.as_bytes().split(|&b| b == b',') {
            if let Ok(name) = HeaderName::from_bytes(token.trim_ascii()) {
                remove.push(name);
            }
        }
    }
    for name in req.headers.keys() {
        if is_hop_by_hop(name.as_str()) && !remove.contains(name) {
            remove.push(name.clone());
        }
    }
    for name in &remove {
        req.remove_header(name);
    }
    if let Some(Some(protocol)) = upgrade {
        // Both values come from the client's own head: they are valid header values.
        let _ = req.insert_header(http::header::UPGRADE, protocol);
        let _ = req.insert_header(http::header::CONNECTION, "upgrade");
    }
}

/// `Upgrade` present and named by `Connection`.
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::UPGRADE)
        && headers.get_all(http::header::CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
        })
}

/// Builds the head of one attempt on `node` from the client's head (see the module docs).
pub fn prepare(
    req: &mut RequestHeader,
    node: &Node,
    host_mode: UpstreamHost,
    client: &Client,
) -> Result<()> {
    strip_hop_by_hop(req);
    if let Some(ip) = client.ip {
        let mut buf = SmallVec::<[u8; 64]>::new();
        // Several X-Forwarded-For lines are one list (RFC 9110 §5.3).
        for prev in req.headers.get_all(&XFF) {
            if prev.as_bytes().trim_ascii().is_empty() {
                continue;
            }
            buf.extend_from_slice(prev.as_bytes());
            buf.extend_from_slice(b", ");
        }
        let _ = write!(buf, "{ip}");
        let value = HeaderValue::from_bytes(&buf)
            .map_err(|_| Error::explain(ErrorType::InternalError, "bad X-Forwarded-For"))?;
        req.insert_header(XFF_NAME, value)?;
    }
    // Names as static text and values that are shared or static: Pingora's insert then
    // allocates only the header name's own copy (and its clone for the case map) and
    // nothing for the case-preserving name or the value.
    let proto = HeaderValue::from_static(if client.tls { "https" } else { "http" });
    req.insert_header(XFP_NAME, proto)?;
    req.insert_header(X_REQUEST_ID, client.request_id.clone())?;
    req.insert_header(trace::TRACEPARENT, client.traceparent.clone())?;
    if client.trace_started_here {
        req.remove_header(trace::TRACESTATE);
    }
    if host_mode == UpstreamHost::Rewrite {
        req.insert_header(http::header::HOST, node.host_header.clone())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("POST", b"/x", None).unwrap();
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).unwrap();
        }
        req
    }

    fn names(req: &RequestHeader) -> Vec<String> {
        let mut v: Vec<String> = req.headers.keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut req = head(&[
            ("host", "a"),
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "h2c"),
            ("x-kept", "2"),
        ]);
        strip_hop_by_hop(&mut req);
        assert_eq!(names(&req), ["host", "x-kept"]);
    }

    #[test]
    fn a_connection_value_with_a_non_ascii_byte_still_removes_what_it_names() {
        let mut req = head(&[("host", "a"), ("x-secret", "1"), ("x-kept", "2")]);
        let value = HeaderValue::from_bytes(b"x-secret, \xe9t\xe9").unwrap();
        req.append_header("connection", value).unwrap();
        strip_hop_by_hop(&mut req);
        assert_eq!(names(&req), ["host", "x-kept"]);
    }

    #[test]
    fn ids_are_kept_when_valid_and_made_otherwise() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        h.insert("traceparent", HeaderValue::from_static(tp));
        let c = Client::capture(&h, None, false);
        assert_eq!(c.request_id, "abc");
        assert_eq!(c.traceparent, tp);
        assert!(!c.trace_started_here);
        h.append("traceparent", HeaderValue::from_static(tp));
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        let c = Client::capture(&h, None, false);
        assert_ne!(c.traceparent, tp);
        assert!(c.trace_started_here);
        assert_eq!(c.request_id.len(), 32);
    }
}
