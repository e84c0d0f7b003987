//! weir's `ProxyHttp` implementation. Each hook says in one line what weir does there and
//! delegates to the module of its stage; per-request state and the attempt's life are in
//! `request.rs`.
//!
//! ```text
//!  request_filter ─────── admission.rs  concurrency peak ─────────────► 429 Request Discarded
//!        │                forward       client ids captured (X-Request-Id, traceparent)
//!        │                defer.rs      upfront queue match: read body, push ─► 202 Request Queued
//!        │                                                     (full ─► 503 Queue Full, >max ─► 413)
//!        │                body.rs       copy of a replay-safe or deferrable body (≤ max_buffered_body)
//!        ▼
//!  upstream_peer ──────── request.rs    router picks among untried nodes (+ retry gap)
//!  connected_to_upstream  retry.rs      a pooled connection the node closed: released, sent again
//!  upstream_request_filter  forward     the forwarding policy (shared with the queue replay)
//!  request_body_filter      body.rs     substitute the full copy on every attempt
//!        │
//!  fail_to_connect ─┐     failure       classify once (connect, TLS, timeout, reset, stale, status)
//!  error_while_proxy ┴─── retry.rs      feed the node's score, retry only if safe
//!  upstream_response_filter            failure statuses fed back (retried if safe; on the last
//!        │                              attempt raised as an error when the request is deferrable)
//!        ▼
//!  response_filter ────── respond.rs   request id + configured response headers
//!  fail_to_proxy ──────── defer.rs     every attempt failed, deferrable ─► push ─► 503 Request Buffered
//!        │                              (queue full ─► 503 Queue Full)
//!                         respond.rs   otherwise the answer table: 503 / 504 / 502 / 400
//!  logging ────────────── access.rs    metrics, access log; the slot is released
//!
//!  (background) queue/replay.rs         FIFO delivery of each queue through the same router
//! ```

pub mod access;
pub mod admission;
pub mod body;
pub mod defer;
pub mod gateway;
mod head_copy;
pub mod hedge;
pub mod request;
pub mod respond;
pub mod retry;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::prelude::*;
use pingora::protocols::Digest;
use pingora::upstreams::peer::HttpPeer;
use pingora_error::{ErrorSource, ErrorType};
use pingora_proxy::FailToProxy;

use crate::abort::AbortReason;
use crate::conn::ClientConn;
use crate::failure::{self, AttemptError, Failure, Phase};
use crate::forward::{self, Client};
use crate::metrics::{Outcome, Rejection, RetryReason};
pub use gateway::Gateway;
use request::{Attempt, RequestCtx};
use respond::Answer;
use retry::StaleVerdict;

/// The client's side of the forwarding headers, read off the session.
pub(crate) fn client_of(session: &Session) -> Client {
    let ip = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    // The TLS listeners' sessions carry a TLS digest; plain ones do not.
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    Client::capture(&session.req_header().headers, ip, tls)
}

impl Gateway {
    /// 429 Request Discarded: the concurrency peak, or the client's own limit, is reached.
    async fn refuse_busy(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        why: Rejection,
    ) -> Result<()> {
        ctx.outcome = Outcome::Rejected;
        self.metrics.rejected(why);
        if why == Rejection::Concurrency {
            self.logs.error_line("gateway", 601, "GATEWAY_FLOODED");
        }
        let answer = Answer {
            retry_after: Some(1),
            ..Answer::new(429, "Request Discarded")
        };
        respond::send(session, ctx, &answer, false).await
    }

    /// Answers an ACME HTTP-01 challenge request if its token is pending.
    async fn answer_acme_challenge(&self, session: &mut Session) -> Result<bool> {
        let path = String::from_utf8_lossy(session.req_header().raw_path()).into_owned();
        let Some(answer) = self.acme.challenge_answer(&path) else {
            return Ok(false);
        };
        let mut resp = ResponseHeader::build(200, Some(2))?;
        resp.insert_header(http::header::CONTENT_TYPE, "application/octet-stream")?;
        resp.insert_header(http::header::CONTENT_LENGTH, answer.len())?;
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(Bytes::from(answer)), true)
            .await?;
        Ok(true)
    }

    /// The attempt in flight failed through the node: record it and decide whether another
    /// attempt may follow (`true`).
    fn node_failed(&self, session: &Session, ctx: &mut RequestCtx, f: Failure) -> bool {
        ctx.end(&self.logs, Err(f));
        let retry = self.budgeted(retry::after_failure(session, ctx, f), ctx);
        ctx.decide(retry);
        retry.is_some()
    }

    /// A retry the policy allows is taken from the retry budget; over budget it is refused
    /// (and counted): the request is answered (or queued) without it.
    fn budgeted(&self, retry: Option<RetryReason>, ctx: &RequestCtx) -> Option<RetryReason> {
        let retry = retry?;
        if self.budget.try_withdraw(ctx.runtime.budget_terms()) {
            Some(retry)
        } else {
            self.metrics.retry_budget_exhausted.inc();
            None
        }
    }

    /// The hedge's answer, when it won (or wins now: a hedge still in flight is waited for):
    /// written to the client; `Some(status)` once it was. `None`: no hedge answer to give.
    async fn deliver_hedge(&self, session: &mut Session, ctx: &mut RequestCtx) -> Option<u16> {
        if ctx.hedge_won.is_none() {
            let ticket = ctx.hedge.take()?;
            if let hedge::Outcome::Won(won) = ticket.outcome(&mut ctx.tried).await {
                ctx.hedge_won = Some(won);
            }
        }
        let won = ctx.hedge_won.take()?;
        if session.response_written().is_some() && retry::response_started(session) {
            return None;
        }
        ctx.outcome = Outcome::Proxied;
        match self.hedges.deliver(session, ctx, &self.logs, won).await {
            Ok(status) => Some(status),
            Err(_) => Some(session.response_written().map_or(0, |r| r.status.as_u16())),
        }
    }

    /// weir aborted the attempt in flight because its node stalled: the node's failure
    /// (neither progress nor the node having closed a connection), and another attempt on
    /// another node (registration made sure one is left).
    fn stall_aborted(&self, session: &Session, ctx: &mut RequestCtx) -> bool {
        self.metrics.attempts_aborted.inc();
        ctx.end_aborted(&self.logs);
        // The stall watch took this retry from the budget before it aborted.
        let retry =
            retry::after_failure(session, ctx, Failure::Timeout).map(|_| RetryReason::STALL);
        ctx.decide(retry);
        retry.is_some()
    }

    /// The attempt in flight ended in an error: classify it once and act on what it means.
    /// Returns whether another attempt may follow. A node that timed out while the client had
    /// not finished sending its body waited on the client: that is the client's failure
    /// (`e` becomes a downstream timeout, answered 408), never the node's.
    fn attempt_failed(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        e: &mut Error,
        phase: Phase,
    ) -> bool {
        // The client's whole request body has been read (or it has none).
        let body_done = session.as_mut().is_body_done();
        let session = &*session;
        let aborted = ctx.take_abort();
        if aborted == Some(AbortReason::Stall) && matches!(phase, Phase::Exchange { .. }) {
            return self.stall_aborted(session, ctx);
        }
        if aborted == Some(AbortReason::HedgeLost) {
            // The hedge answered first: this attempt was cancelled and fail_to_proxy writes
            // the hedge's answer. For the router its node was slower than another that
            // answered: a failure without progress, as an abort on stall (a hung node
            // must keep looking stalled while its hedged attempts are cancelled).
            ctx.end_hedge_lost();
            ctx.decide(None);
            return false;
        }
        // A deadline the watch enforced: the node timed out, whatever error the shut socket
        // produced.
        let class = match aborted.and_then(AbortReason::deadline_index) {
            Some(i) => {
                self.metrics.attempt_timeouts[i].inc();
                // The shut socket surfaced as some read or write error: it is a timeout (a
                // client still sending its body is answered 408, as by Pingora's timeouts).
                e.etype = ErrorType::ReadTimedout;
                if ctx.node_in_flight().is_none() {
                    ctx.end_late_timeout(&self.logs);
                }
                AttemptError::Node(Failure::Timeout)
            }
            None => failure::classify(e, phase),
        };
        match class {
            AttemptError::Node(Failure::Timeout) if !body_done => {
                e.as_down();
                ctx.release();
                ctx.decide(None);
                false
            }
            AttemptError::Node(f) => self.node_failed(session, ctx, f),
            AttemptError::Stale { unsent } => match retry::after_stale(session, ctx, unsent) {
                StaleVerdict::Retry => {
                    if !unsent {
                        // Written to a connection the node had closed: most likely unseen,
                        // but not provably.
                        ctx.maybe_sent = true;
                    }
                    ctx.release_stale(Some(RetryReason::STALE_CONNECTION));
                    true
                }
                StaleVerdict::NodeFailure(f) => self.node_failed(session, ctx, f),
            },
            AttemptError::Client | AttemptError::Internal => {
                ctx.release();
                ctx.decide(None);
                false
            }
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// No downstream modules: weir compresses nothing, and Pingora's default (a disabled
    /// compression module) still costs an allocation per request.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    /// The runtime in force when the request arrives, for its whole life.
    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.runtime())
    }

    /// Client ids, keep-alive, ACME challenges, admission (concurrency peak), the upfront
    /// queue, and the body copy for replay and deferral.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // The head is in: the connection's head deadline ends, its body's (if any) begins.
        let has_body = body::has_body(session);
        if let Some(conn) = ClientConn::of(session) {
            conn.head_done(has_body);
        }
        ctx.client = Some(client_of(session));
        ctx.upgrade = session.is_upgrade_req();
        // A client that asked for no keep-alive (HTTP/1.0 without it, `Connection: close`)
        // keeps its choice; weir bounds the idle time of the others. Pipelined requests are
        // answered in order (RFC 9112 §9.3.2).
        if session.get_keepalive().is_some() {
            session.set_keepalive(ctx.runtime.keepalive_secs);
        }
        session.set_pipelining_enabled(true);
        if let Some(answer) = respond::malformed(session.req_header()) {
            self.metrics.rejected(Rejection::BadRequest);
            ctx.outcome = Outcome::Rejected;
            respond::send(session, ctx, &answer, true).await?;
            return Ok(true);
        }
        if body::ambiguous_framing(session) {
            // RFC 9112 §6.1: a request with both framings is answered, then the connection
            // closed (the chunked framing wins and is what goes upstream).
            session.set_keepalive(None);
        }
        // ACME HTTP-01 validation requests are weir's own, ahead of admission.
        if session
            .req_header()
            .raw_path()
            .starts_with(crate::acme::CHALLENGE_PREFIX.as_bytes())
            && self.answer_acme_challenge(session).await?
        {
            return Ok(true);
        }

        let per_client = ctx.runtime.config.limits.max_requests_per_client;
        if let (true, Some(ip)) = (per_client > 0, ctx.client.as_ref().and_then(|c| c.ip)) {
            match self.admission.try_admit_client(ip, per_client) {
                Some(slot) => ctx.client_slot = Some(slot),
                None => {
                    self.refuse_busy(session, ctx, Rejection::ClientLimit)
                        .await?;
                    return Ok(true);
                }
            }
        }

        let req = session.req_header();
        // Routes: an absolute-form target's host wins over the Host header (RFC 9112 §3.2.2).
        let host = match req.uri.host() {
            Some(h) => h.as_bytes(),
            None => req
                .headers
                .get(http::header::HOST)
                .map_or(&b""[..], |h| h.as_bytes()),
        };
        ctx.cluster = ctx.runtime.route(host, req.uri.path());
        ctx.replay_safe =
            retry::is_idempotent(&req.method) || req.headers.contains_key("idempotency-key");
        let config = &ctx.runtime.config;
        let target = String::from_utf8_lossy(req.raw_path());
        let method = req.method.as_str();
        let upfront =
            config.upfront_queue.enabled && config.upfront_queue.formats.matches(method, &target);
        ctx.deferrable =
            config.deferred_queue.enabled && config.deferred_queue.formats.matches(method, &target);
        if upfront {
            let queue = self.queues.upfront.clone();
            defer::enqueue_upfront(self, session, ctx, &queue).await?;
            return Ok(true);
        }
        // Bodies up to max_buffered_body are read before the request takes a slot: a slow
        // client waits on weir's memory (bounded by its deadlines), never on the cluster's
        // capacity. The copy also serves retries and the deferred queue.
        if let Some(len) = body::content_length(session) {
            if len > 0 && len <= ctx.runtime.config.limits.max_buffered_body {
                match body::capture(session, len).await {
                    Ok(copy) => {
                        ctx.body = Some(copy);
                        if let Some(conn) = ClientConn::of(session) {
                            conn.body_done();
                        }
                    }
                    Err(e) => {
                        ctx.body_failed = true;
                        return Err(e);
                    }
                }
            }
        }

        let peak = ctx.runtime.config.limits.concurrency_peak;
        let uploading = has_body && ctx.body.is_none();
        match self.admission.try_admit(peak, uploading) {
            Some(slot) => ctx.slot = Some(slot),
            None => {
                self.refuse_busy(session, ctx, Rejection::Concurrency)
                    .await?;
                return Ok(true);
            }
        }
        // The request goes to a node: it earns the retry budget its share.
        self.budget.deposit();
        Ok(false)
    }

    /// Routing: the router picks a node among those this request has not tried yet; a retry
    /// is counted and waits out `retries.gap`.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // A hedge in flight decides first: its answer, or its node counts as tried.
        if let Some(ticket) = &ctx.hedge {
            match ticket.outcome(&mut ctx.tried).await {
                hedge::Outcome::Won(won) => {
                    ctx.hedge_won = Some(won);
                    return Error::e_explain(ErrorType::HTTPStatus(200), "the hedge answered");
                }
                hedge::Outcome::None => ctx.hedge = None,
            }
        }
        if let Some(reason) = ctx.take_retry() {
            self.metrics.retry(reason);
            let gap = ctx.cluster().retries.gap;
            if gap > Duration::ZERO && reason != RetryReason::STALE_CONNECTION {
                tokio::time::sleep(gap).await;
            }
        }
        let Some(node) = ctx.cluster().router.select(&ctx.tried, fastrand::f64()) else {
            return Error::e_explain(ErrorType::HTTPStatus(503), "every node was tried");
        };
        ctx.start(node);
        let n = &ctx.cluster().nodes[node];
        let peer = if ctx.upgrade { &n.tunnel_peer } else { &n.peer };
        Ok(Box::new(peer.clone()))
    }

    /// A pooled connection the node closed while it sat idle is refused here, before anything
    /// is written to it, so that the request can go out again on another connection.
    async fn connected_to_upstream(
        &self,
        session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        _digest: Option<&Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Only a request that may not be sent again needs to know before it is written (a
        // replayable one is retried on a fresh connection either way): one syscall saved per
        // reused connection for the common GET.
        if reused && !retry::replayable(session, ctx) && retry::pooled_connection_closed(fd) {
            return Err(failure::stale_unsent());
        }
        // The attempt is watched for its deadlines and, when it may be sent again, for abort
        // on stall. Upstream connections are HTTP/1 (one exchange per socket at a time), so
        // shutting the socket down ends this attempt only.
        if let Attempt::InFlight { node, started, .. } = ctx.attempt {
            let cluster = ctx.runtime.cluster(ctx.cluster);
            // The whole request goes out at once: no body, or weir's copy of it.
            let whole = ctx.body.is_some() || !body::has_body(session);
            let stall = cluster.retries.abort_on_stall
                && ctx.replay_safe
                && whole
                && ctx.tried.len() < cluster.attempt_limit();
            let terms = cluster.watch_terms(stall, ctx.upgrade);
            if let (true, Some(n)) = (terms.any(), cluster.nodes.get(node)) {
                ctx.abort = n.aborts.register(fd, started, terms, whole);
                if ctx.abort.is_none() {
                    // Out of descriptors: nothing would bound this attempt's reads.
                    return Error::e_explain(
                        ErrorType::InternalError,
                        "cannot watch the attempt's deadlines (no descriptor to spare)",
                    );
                }
            }
        }
        Ok(())
    }

    /// The forwarding policy, on every attempt.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.hedgeable(body::has_body(session)) {
            ctx.hedge = self.hedges.register(ctx, upstream_request);
        }
        let (Some(node), Some(client)) = (ctx.node_in_flight(), &ctx.client) else {
            return Ok(());
        };
        let runtime = &ctx.runtime;
        forward::prepare(
            upstream_request,
            &runtime.cluster(ctx.cluster).nodes[node],
            runtime.config.upstream_host,
            client,
        )
    }

    /// Replay: weir's full copy replaces the tail Pingora replays.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        match (&ctx.body, &mut ctx.attempt) {
            (Some(copy), Attempt::InFlight { copy_sent, .. }) => {
                body::substitute(body, end_of_stream, copy, copy_sent);
            }
            _ if body.as_ref().is_some_and(|b| !b.is_empty()) => ctx.body_streamed = true,
            _ => {}
        }
        if end_of_stream {
            if let Some(conn) = ClientConn::of(session) {
                conn.body_done();
            }
            // A streamed body is all out: the attempt's first-byte clock starts.
            if let (None, Some(watch)) = (&ctx.body, &ctx.abort) {
                watch.sent();
            }
            if let Some(slot) = &mut ctx.slot {
                slot.body_done();
            }
        }
        Ok(())
    }

    /// Feedback: the response header ends the attempt; failure statuses count against the
    /// node and are retried on another one when that is safe.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        if status < 200 && status != 101 {
            return Ok(());
        }
        // The first good header decides a hedged request: this one, or the hedge's that came
        // first. (A failure status leaves the hedge running: it may still answer.)
        let failure_status = status != 101 && ctx.runtime.is_failure_status(status);
        if let Some(ticket) = ctx.hedge.take_if(|_| !failure_status) {
            if !ticket.primary_answered() {
                ctx.hedge = Some(ticket);
                let mut e = Error::explain(
                    ErrorType::ConnectionClosed,
                    AbortReason::HedgeLost.explain(),
                );
                e.as_up();
                return Err(e);
            }
        }
        // From here on an abort on stall would cut a response; the body's deadlines run. An
        // abort that came first left the connection shut: the attempt failed after all.
        if let Err(reason) = ctx.header_arrived() {
            let mut e = Error::explain(ErrorType::ConnectionClosed, reason.explain());
            e.as_up();
            return Err(e);
        }
        if !failure_status {
            // The watch stays while a body follows (it ends with the body's last byte, before
            // Pingora can pool the connection); a tunnel has only its idle timeout.
            let watch = ctx.abort.take();
            if let Attempt::InFlight { started, .. } = ctx.attempt {
                self.hedges.ttfb.record(started.elapsed());
            }
            ctx.end(&self.logs, Ok(()));
            if status != 101 && !body::response_is_empty(session, upstream_response) {
                ctx.abort = watch;
            }
            // A node answers: a replay waiting out its backoff may try now.
            self.queues.deferred.signal_recovery();
            self.queues.upfront.signal_recovery();
            return Ok(());
        }
        let retry = self.node_failed(session, ctx, Failure::Status(status));
        if retry || defer::may_defer(ctx) {
            // Raised as the node's error so that error_while_proxy retries it, or, on the
            // last attempt, so that fail_to_proxy queues it instead of passing it on.
            let mut e = Error::explain(ErrorType::HTTPStatus(status), "failure status");
            e.as_up();
            e.set_retry(retry);
            return Err(e);
        }
        Ok(())
    }

    /// The watch learns of the body's progress, and lets go at its last byte.
    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(watch) = &ctx.abort {
            match end_of_stream {
                true => ctx.abort = None,
                false => watch.progress(),
            }
        }
        Ok(None)
    }

    /// The request id and the configured response headers.
    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        respond::add_common_headers(upstream_response, ctx)
    }

    /// Connect failures: nothing was sent, so another node is tried while one is left.
    fn fail_to_connect(
        &self,
        session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if failure::is_tls_handshake_error(&e) {
            log::warn!("TLS handshake with upstream {peer} failed: {e}");
        }
        let retry = self.attempt_failed(session, ctx, &mut e, Phase::Connect);
        e.set_retry(retry);
        e
    }

    /// Failures after a connection was obtained: classified once, retried only where safe.
    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        // weir's own failure-status error: the attempt already ended and its retry is decided.
        if matches!(e.etype(), ErrorType::HTTPStatus(_)) && ctx.node_in_flight().is_none() {
            let retry = e.retry();
            e.set_retry(retry);
            return e;
        }
        let phase = Phase::Exchange {
            reused: client_reused,
        };
        let retry = self.attempt_failed(session, ctx, &mut e, phase);
        e.set_retry(retry);
        e
    }

    /// The final failure: the deferred queue takes the request if it may (503 Request
    /// Buffered); otherwise weir's answer from the nodes' failures, or 400 for a bad request.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        ctx.release();
        let done = FailToProxy {
            error_code: 0,
            can_reuse_downstream: false,
        };
        if let Some(status) = self.deliver_hedge(session, ctx).await {
            return FailToProxy {
                error_code: status,
                ..done
            };
        }
        if let Some(resp) = session.response_written() {
            if retry::response_started(session) {
                return FailToProxy {
                    error_code: resp.status.as_u16(),
                    ..done
                };
            }
        }
        let deferred = match e.esource() {
            ErrorSource::Downstream => None,
            _ => defer::defer(self, session, ctx).await,
        };
        // Pingora reuses no client connection after a failed proxy (nor after an error
        // answered here), so every answer from this hook says `Connection: close`: one that
        // looked reusable had its next request race the close.
        let answer = match deferred {
            Some(answer) => answer,
            None => {
                // A body read weir cut because the client sent it too slowly.
                let too_slow = ClientConn::of(session).is_some_and(|c| c.timed_out());
                let answer = if too_slow {
                    Answer::new(408, "Request Timeout")
                } else {
                    let Some(answer) = respond::final_answer(e, ctx) else {
                        return done;
                    };
                    answer
                };
                if answer.status == 400 {
                    self.metrics.rejected(Rejection::BadRequest);
                    ctx.outcome = Outcome::Rejected;
                } else if answer.status == 408 {
                    // The client's failure (weir_requests_total{code="4xx",outcome="rejected"}).
                    self.metrics.rejected(Rejection::ClientTimeout);
                    ctx.outcome = Outcome::Rejected;
                } else if ctx.outcome == Outcome::Proxied {
                    ctx.outcome = Outcome::Failed;
                }
                answer
            }
        };
        match respond::send(session, ctx, &answer, true).await {
            Ok(()) => FailToProxy {
                error_code: answer.status,
                ..done
            },
            Err(_) => done,
        }
    }

    /// Metrics, access log; releases the concurrency slot.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.release();
        ctx.slot = None;
        ctx.client_slot = None;
        if let Some(conn) = ClientConn::of(session) {
            conn.request_done();
        }
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let elapsed = ctx.started.elapsed();
        self.metrics
            .request_done(status, ctx.outcome, elapsed.as_secs_f64());
        if let Some(sink) = &self.logs.access {
            sink.write_access(&access::record(session, ctx, status, elapsed));
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        // Upstream failures go to weir's own error log and metrics.
        true
    }
}
