//! The access log line of a finished request.

use std::time::Duration;

use pingora::prelude::*;

use super::request::RequestCtx;
use crate::logs::AccessRecord;

/// The values of its access-log line (borrowed: nothing is allocated).
pub fn record<'a>(
    session: &'a Session,
    ctx: &'a RequestCtx,
    status: u16,
    elapsed: Duration,
) -> AccessRecord<'a> {
    let req = session.req_header();
    let client = ctx.client.as_ref();
    AccessRecord {
        id: client
            .and_then(|c| c.request_id.to_str().ok())
            .unwrap_or(""),
        traceparent: client
            .and_then(|c| c.traceparent.to_str().ok())
            .unwrap_or(""),
        client: session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip()),
        method: req.method.as_str().as_bytes(),
        target: req.raw_path(),
        status,
        outcome: ctx.outcome.label(),
        upstream: ctx
            .tried
            .last()
            .map(|&i| ctx.cluster().nodes[i].upstream.url.as_str()),
        attempts: ctx.tried.len(),
        elapsed,
    }
}
