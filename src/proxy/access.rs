//! The access log line of a finished request.

use std::time::Duration;

use pingora::prelude::*;

use super::request::RequestCtx;

/// One JSON access-log line.
pub fn access_line(session: &Session, ctx: &RequestCtx, status: u16, elapsed: Duration) -> String {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        ts: String,
        id: &'a str,
        traceparent: &'a str,
        client: Option<String>,
        method: &'a str,
        target: String,
        status: u16,
        outcome: &'static str,
        upstream: Option<&'a str>,
        attempts: usize,
        duration_ms: f64,
    }
    let req = session.req_header();
    let line = Line {
        ts: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        id: ctx
            .client
            .as_ref()
            .and_then(|c| c.request_id.to_str().ok())
            .unwrap_or(""),
        traceparent: ctx
            .client
            .as_ref()
            .and_then(|c| c.traceparent.to_str().ok())
            .unwrap_or(""),
        client: session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string()),
        method: req.method.as_str(),
        target: String::from_utf8_lossy(req.raw_path()).into_owned(),
        status,
        outcome: ctx.outcome.label(),
        upstream: ctx
            .tried
            .last()
            .map(|&i| ctx.cluster().nodes[i].upstream.url.as_str()),
        attempts: ctx.tried.len(),
        duration_ms: (elapsed.as_secs_f64() * 1e6).round() / 1e3,
    };
    serde_json::to_string(&line).unwrap_or_default()
}
