//! Delivery of a queued request through the running cluster: the router of the current
//! [`Runtime`] picks the node (select/start/finish, so node scores learn from replays), the
//! node's prebuilt Pingora peer carries the configured connect/request timeouts and TLS, the
//! head is built by the same forwarding policy as a live attempt ([`forward::prepare`]), errors
//! are classified by the one failure taxonomy, and the same retry rule as live traffic decides
//! whether another node may be tried after a failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::protocols::http::client::HttpSession;
use pingora_core::connectors::http::Connector;
use smallvec::SmallVec;

use super::replay::{Deliver, Delivery};
use super::{QueueKind, QueuedRequest};
use crate::failure::{classify, AttemptError, Failure, Phase};
use crate::forward;
use crate::logs::Logs;
use crate::runtime::{Cluster, Node, Runtime, RuntimeCell};

/// How much of a replayed request's response body is read (and thrown away) before the
/// connection is dropped.
const MAX_RESPONSE_DRAIN: usize = 1 << 20;

pub struct ClusterDelivery {
    runtime: RuntimeCell,
    logs: Arc<Logs>,
    kind: QueueKind,
    connector: Connector,
}

impl ClusterDelivery {
    pub fn new(runtime: RuntimeCell, logs: Arc<Logs>, kind: QueueKind) -> ClusterDelivery {
        ClusterDelivery {
            runtime,
            logs,
            kind,
            connector: Connector::new(None),
        }
    }

    fn replay_unsafe(&self, state: &Runtime) -> bool {
        match self.kind {
            QueueKind::Deferred => state.config.deferred_queue.replay_unsafe,
            QueueKind::Upfront => state.config.upfront_queue.replay_unsafe,
        }
    }

    /// One attempt on one node: `Ok(status)` for any complete response header; an error with
    /// the phase it happened in.
    async fn attempt(
        &self,
        state: &Runtime,
        cluster: &Cluster,
        node: usize,
        req: &QueuedRequest,
    ) -> std::result::Result<u16, (Box<Error>, Phase)> {
        let n = &cluster.nodes[node];
        let (mut session, reused) = self
            .connector
            .get_http_session(&n.peer)
            .await
            .map_err(|e| (e, Phase::Connect))?;
        let phase = Phase::Exchange { reused };
        session.set_read_timeout(cluster.timeouts.request);
        session.set_write_timeout(cluster.timeouts.request);
        let head = request_head(req, state, n).map_err(|e| (e, phase))?;
        let body = (!req.body.is_empty()).then(|| req.body.clone());
        let status = send_request(&mut session, head, body)
            .await
            .map_err(|mut e| {
                e.as_up();
                (e, phase)
            })?;
        // Read the answer off the wire (bounded) so the node sees a normal exchange.
        let mut drained = 0usize;
        while drained < MAX_RESPONSE_DRAIN {
            match session.read_response_body().await {
                Ok(Some(chunk)) => drained += chunk.len(),
                _ => break,
            }
        }
        session.shutdown().await;
        Ok(status)
    }
}

/// Sends one request on `session` (head, then the body if any) and reads up to its final
/// response header (1xx skipped; a `101` is final); returns the status. Shared by queue
/// deliveries and hedges, weir's two attempts outside Pingora's proxy loop.
pub(crate) async fn send_request(
    session: &mut HttpSession,
    head: RequestHeader,
    body: Option<bytes::Bytes>,
) -> Result<u16> {
    session.write_request_header(Box::new(head)).await?;
    if let Some(body) = body {
        session.write_request_body(body, true).await?;
    }
    session.finish_request_body().await?;
    loop {
        session.read_response_header().await?;
        let status = session
            .response_header()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        if !(100..200).contains(&status) || status == 101 {
            return Ok(status);
        }
    }
}

/// The request head for one attempt: method, raw target, the client's header lines through
/// the forwarding policy, and the body length.
pub(crate) fn request_head(
    req: &QueuedRequest,
    state: &Runtime,
    node: &Node,
) -> Result<RequestHeader> {
    let mut head = RequestHeader::build(req.method.clone(), &req.target, Some(16))?;
    for (name, value) in req.header_lines() {
        let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(name),
            http::header::HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        head.append_header(name, value)?;
    }
    forward::prepare(&mut head, node, state.config.upstream_host, &req.client)?;
    let body_method = matches!(req.method.as_str(), "POST" | "PUT" | "PATCH");
    if !req.body.is_empty() || body_method {
        head.insert_header(http::header::CONTENT_LENGTH, req.body.len())?;
    }
    Ok(head)
}

#[async_trait]
impl Deliver for ClusterDelivery {
    async fn deliver(&self, req: &QueuedRequest) -> Delivery {
        let state = self.runtime.load_full();
        // The cluster the request was routed to when it arrived (a reload may have removed it:
        // then it waits, as for a cluster that is down, until its ttl or max_attempts).
        let cluster = match req.cluster.as_deref() {
            None => state.cluster(0),
            Some(name) => match state.cluster_index(name) {
                Some(i) => state.cluster(i),
                None => {
                    return Delivery::Failed {
                        error: format!("cluster `{name}` is not in the running config"),
                        sent: false,
                    }
                }
            },
        };
        let limit = cluster.attempt_limit();
        let mut tried: SmallVec<[usize; 4]> = SmallVec::new();
        let mut sent = false;
        let mut last_error = String::from("no upstream is configured");
        // A backstop over Pingora's per-operation timeouts.
        let bound = cluster.timeouts.connect
            + cluster.timeouts.request.unwrap_or(Duration::from_secs(60)) * 3;
        while tried.len() < limit {
            let Some(node) = cluster.router.select(&tried, fastrand::f64()) else {
                break;
            };
            tried.push(node);
            cluster.router.start(node);
            let started = Instant::now();
            let result =
                match tokio::time::timeout(bound, self.attempt(&state, cluster, node, req)).await {
                    Ok(r) => r,
                    Err(_) => Err((
                        Error::explain(ErrorType::ReadTimedout, "replay attempt").into_up(),
                        Phase::Exchange { reused: false },
                    )),
                };
            let url = &cluster.nodes[node].upstream.url;
            let failure = match result {
                Ok(status) if !state.is_failure_status(status) => {
                    cluster.record_attempt(&self.logs, node, Ok(()), started.elapsed());
                    return Delivery::Delivered {
                        status,
                        node: url.clone(),
                    };
                }
                Ok(status) => Failure::Status(status),
                Err((e, phase)) => match classify(&e, phase) {
                    AttemptError::Node(f) => f,
                    // A delivery uses one connection per attempt: a stale or broken one is
                    // the node's as far as this replay can tell.
                    AttemptError::Stale { unsent: true } => Failure::ConnectRefused,
                    AttemptError::Stale { unsent: false }
                    | AttemptError::Client
                    | AttemptError::Internal => Failure::Reset,
                },
            };
            cluster.record_attempt(&self.logs, node, Err(failure), started.elapsed());
            last_error = format!("{url}: {}", failure.label());
            if !failure.nothing_sent() {
                sent = true;
                if !(req.replay_safe || self.replay_unsafe(&state)) {
                    break;
                }
            }
        }
        Delivery::Failed {
            error: last_error,
            sent,
        }
    }
}
