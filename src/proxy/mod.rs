//! The gateway: weir's `ProxyHttp` implementation. Each hook says in one line what weir does
//! there and delegates to the module named after that stage.
//!
//! ```text
//!  request_filter ─────── admission.rs  concurrency peak ─────────────► 429 Request Discarded
//!        │                defer.rs      upfront queue match: read body, push ─► 202 Request Queued
//!        │                                                     (full ─► 503 Queue Full, >max ─► 413)
//!        │                body.rs       copy of a replay-safe or deferrable body (≤ max_buffered_body)
//!        ▼
//!  upstream_peer ──────── upstream.rs   router picks among untried nodes (+ retry gap)
//!        │
//!  upstream_request_filter  upstream.rs X-Forwarded-*, X-Request-Id, traceparent, Host policy
//!  request_body_filter      body.rs     substitute the full copy on every attempt
//!        │
//!  fail_to_connect ─┐
//!  error_while_proxy ┴─── failures.rs  classify, feed the node's score, retry only if safe
//!  upstream_response_filter            failure statuses fed back (retried if safe; on the last
//!        │                              attempt raised as an error when the request is deferrable)
//!        ▼
//!  response_filter ────── respond.rs   request id + configured response headers
//!  fail_to_proxy ──────── defer.rs     every attempt failed, deferrable ─► push ─► 503 Request Buffered
//!        │                              (queue full ─► 503 Queue Full)
//!                         respond.rs   otherwise 503 / 504 / 502 / 400 with sq_msg bodies
//!  logging                              metrics, access log, ServiceQ-style error log
//!
//!  (background) queue/replay.rs         FIFO delivery of each queue through the same router
//! ```

pub mod admission;
pub mod body;
pub mod defer;
pub mod failures;
pub mod respond;
pub mod trace;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::HeaderValue;
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;
use pingora_error::{ErrorSource, ErrorType, RetryType};
use pingora_proxy::FailToProxy;
use smallvec::SmallVec;

use crate::logs::Logs;
use crate::metrics::{Metrics, Outcome, Rejection, RetryReason};
use crate::queue::{Queue, Queues};
use crate::routing::Outcome as NodeOutcome;
use admission::{Admission, Slot};
use failures::Failure;
use respond::Answer;
pub use upstream::State;

/// Stale pooled connections retried on the same node without blaming it, at most this often.
const MAX_STALE_RETRIES: u8 = 2;

/// Cheap to clone: the proxy service and the admin/background services share one gateway.
#[derive(Clone)]
pub struct Gateway {
    state: Arc<ArcSwap<State>>,
    admission: Admission,
    pub metrics: Arc<Metrics>,
    pub logs: Arc<Logs>,
    /// Capacities are fixed at start-up; everything else about the queues follows reloads.
    pub queues: Arc<Queues>,
    /// ACME challenge answers and the certificate obtained (empty without `tls.acme`).
    pub acme: Arc<crate::acme::AcmeState>,
}

/// One attempt in progress.
struct Attempt {
    node: usize,
    started: Instant,
    /// The full body copy went upstream on this attempt.
    copy_sent: bool,
}

/// Per-request state.
pub struct RequestCtx {
    /// The config this request started on, kept to its end (reloads never change it mid-way).
    state: Arc<State>,
    started: Instant,
    slot: Option<Slot>,
    request_id: Option<HeaderValue>,
    /// W3C trace context sent upstream: the client's when valid, else a new one.
    traceparent: Option<HeaderValue>,
    /// The traceparent is weir's own, so a client `tracestate` belongs to no trace and is dropped.
    trace_started_here: bool,
    /// May be sent again after it reached a node: idempotent method or `Idempotency-Key`.
    replay_safe: bool,
    /// weir's copy of the body, when it keeps one.
    body: Option<Bytes>,
    /// Nodes tried, in order.
    tried: SmallVec<[usize; 4]>,
    attempt: Option<Attempt>,
    stale_retries: u8,
    last_failure: Option<Failure>,
    /// Set when an attempt's end allowed another one; counted when that attempt starts.
    retry_reason: Option<RetryReason>,
    outcome: Outcome,
    /// The deferred queue is on and the request matches its formats.
    deferrable: bool,
    /// Some attempt may have reached a node (anything but a connect failure).
    maybe_sent: bool,
    /// Part of the body went upstream without weir keeping a copy.
    body_streamed: bool,
}

impl Gateway {
    pub fn new(state: State, metrics: Arc<Metrics>, logs: Arc<Logs>) -> Gateway {
        set_config_gauges(&metrics, &state);
        let queues = Arc::new(Queues::memory(
            state.config.deferred_queue.capacity,
            state.config.upfront_queue.capacity,
            &metrics,
        ));
        Gateway {
            state: Arc::new(ArcSwap::from_pointee(state)),
            admission: Admission::default(),
            metrics,
            logs,
            queues,
            acme: Arc::default(),
        }
    }

    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
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
            .write_response_body(Some(bytes::Bytes::from(answer)), true)
            .await?;
        Ok(true)
    }

    /// The cell the state lives in, for readers outside requests (the TLS listeners'
    /// certificate resolver).
    pub fn state_cell(&self) -> Arc<ArcSwap<State>> {
        self.state.clone()
    }

    /// Installs a new state (config reload); requests in flight keep the one they started on.
    pub fn swap_state(&self, state: State) {
        set_config_gauges(&self.metrics, &state);
        self.state.store(Arc::new(state));
    }

    pub fn inflight(&self) -> usize {
        self.admission.inflight()
    }

    /// Refreshes the gauges that describe live state; called before each scrape.
    pub fn refresh_gauges(&self) {
        self.metrics.inflight.set(self.inflight() as i64);
        let state = self.state();
        let probabilities = state.router.selection_probabilities();
        for (i, node) in state.nodes.iter().enumerate() {
            node.metrics.error_rate.set(state.router.error_rate(i));
            node.metrics
                .inflight
                .set(i64::from(state.router.inflight(i)));
            node.metrics
                .selection_probability
                .set(probabilities.get(i).copied().unwrap_or(0.0));
        }
        self.queues.deferred.refresh_gauges();
        self.queues.upfront.refresh_gauges();
    }

    /// Closes the current attempt in the router and metrics.
    fn end_attempt(&self, ctx: &mut RequestCtx, result: Result<(), Failure>) {
        let Some(attempt) = ctx.attempt.take() else {
            return;
        };
        self.record_attempt(&ctx.state, attempt.node, result, attempt.started.elapsed());
        match result {
            Ok(()) => {
                // A node answers: a replay waiting out its backoff may try now.
                self.queues.deferred.signal_recovery();
                self.queues.upfront.signal_recovery();
            }
            Err(failure) => {
                ctx.last_failure = Some(failure);
                if !failure.nothing_sent() {
                    ctx.maybe_sent = true;
                }
            }
        }
    }

    /// Feeds one finished attempt (live or replayed) to the router, the metrics and the
    /// error log.
    pub fn record_attempt(
        &self,
        state: &State,
        node: usize,
        result: Result<(), Failure>,
        elapsed: Duration,
    ) {
        let Some(n) = state.nodes.get(node) else {
            return;
        };
        match result {
            Ok(()) => {
                state.router.finish(node, NodeOutcome::Success, elapsed);
                n.metrics.attempt_done(0, Some(elapsed.as_secs_f64()));
            }
            Err(failure) => {
                state.router.finish(node, NodeOutcome::Failure, elapsed);
                // Only a failure status came with a response header to time.
                let header_after =
                    matches!(failure, Failure::Status(_)).then(|| elapsed.as_secs_f64());
                n.metrics.attempt_done(failure.result_index(), header_after);
                let (code, name) = failure.serviceq_code();
                self.logs.error_line(&n.upstream.url, code, name);
            }
        }
    }

    /// An attempt that ended for reasons that are not the node's (client gone, stale pooled
    /// connection): release it without feeding the score.
    fn abandon_attempt(&self, ctx: &mut RequestCtx) {
        if let Some(attempt) = ctx.attempt.take() {
            ctx.state.router.cancel(attempt.node);
        }
    }

    /// Whether the deferred queue may take this request once every attempt failed (the body
    /// aside): it matches, and replaying it is safe or the operator allows unsafe replays.
    fn may_defer(&self, ctx: &RequestCtx) -> bool {
        ctx.deferrable
            && (!ctx.maybe_sent || ctx.replay_safe || ctx.state.config.deferred_queue.replay_unsafe)
    }

    /// Every attempt failed: queue the request if it may be, and say what to answer (`None`:
    /// not deferrable, answer the failure).
    async fn defer(&self, session: &mut Session, ctx: &mut RequestCtx) -> Option<Answer> {
        if !self.may_defer(ctx) {
            return None;
        }
        let body = match &ctx.body {
            Some(copy) => copy.clone(),
            None if ctx.body_streamed => return None,
            // Nothing of the body went anywhere yet (connect failures): read it now.
            None => {
                let max = ctx.state.config.limits.max_buffered_body;
                match defer::read_body(session, max).await {
                    Ok(Some(body)) => body,
                    Ok(None) => {
                        log::info!(
                            "not queueing {} {}: body over limits.max_buffered_body",
                            session.req_header().method,
                            String::from_utf8_lossy(session.req_header().raw_path())
                        );
                        session.set_keepalive(None);
                        return None;
                    }
                    Err(_) => return None,
                }
            }
        };
        let queue = self.queues.deferred.clone();
        let rate = ctx.state.config.deferred_queue.replay_rate;
        Some(self.enqueue(session, ctx, &queue, body, 503, "Request Buffered", rate))
    }

    /// The upfront queue takes the request without proxying it: 202, or 503 when full, or 413
    /// when its body is over `limits.max_buffered_body`.
    async fn enqueue_upfront(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        queue: &Arc<Queue>,
    ) -> Result<()> {
        let max = ctx.state.config.limits.max_buffered_body;
        let too_large = body::content_length(session).is_some_and(|len| len > max);
        let body = if too_large {
            None
        } else {
            defer::read_body(session, max).await?
        };
        let answer = match body {
            Some(body) => {
                let rate = ctx.state.config.upfront_queue.replay_rate;
                self.enqueue(session, ctx, queue, body, 202, "Request Queued", rate)
            }
            None => {
                ctx.outcome = Outcome::Rejected;
                return respond::send(session, ctx, &Answer::new(413, "Request Too Large"), true)
                    .await;
            }
        };
        let close = answer.status != 202;
        respond::send(session, ctx, &answer, close).await
    }

    /// Pushes the request onto `queue` and returns the answer: `status`/`message` with the
    /// queue id, or `503 Queue Full`.
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        queue: &Queue,
        body: Bytes,
        status: u16,
        message: &'static str,
        rate: u32,
    ) -> Answer {
        let entry = defer::entry(session, ctx, queue, body);
        let method = entry.method.clone();
        let target = String::from_utf8_lossy(&entry.target).into_owned();
        match queue.push(entry) {
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
                    retry_after: (status == 503).then(|| defer::retry_after(queue.len(), rate)),
                    queue_id: Some(id),
                    ..Answer::new(status, message)
                }
            }
            Err(_) => {
                log::warn!(
                    "queue={} full ({}): {method} {target} refused",
                    queue.kind.label(),
                    queue.capacity()
                );
                self.metrics.rejected(Rejection::QueueFull);
                ctx.outcome = Outcome::Rejected;
                Answer {
                    retry_after: Some(defer::retry_after(queue.len(), rate)),
                    ..Answer::new(503, "Queue Full")
                }
            }
        }
    }

    /// Whether another attempt may follow the failure `f` of the current one; remembers why,
    /// for `weir_retries_total`, when it may.
    fn may_retry(&self, session: &Session, ctx: &mut RequestCtx, f: Failure) -> bool {
        let retry = self.retry_allowed(session, ctx, f);
        ctx.retry_reason = retry.then(|| RetryReason::after_failure(f.result_index()));
        retry
    }

    fn retry_allowed(&self, session: &Session, ctx: &RequestCtx, f: Failure) -> bool {
        if response_started(session) {
            return false;
        }
        let limit = ctx.state.attempts.min(ctx.state.nodes.len());
        if ctx.tried.len() >= limit {
            return false;
        }
        if f.nothing_sent() {
            return true;
        }
        ctx.replay_safe && body_replayable(session, ctx)
    }
}

/// The gauges that state configured limits: the concurrency peak and each queue's capacity
/// (0 for a queue that is off).
fn set_config_gauges(metrics: &Metrics, state: &State) {
    let config = &state.config;
    metrics
        .concurrency_peak
        .set(config.limits.concurrency_peak as i64);
    for (name, queue) in [
        ("deferred", &config.deferred_queue),
        ("upfront", &config.upfront_queue),
    ] {
        let capacity = if queue.enabled { queue.capacity } else { 0 };
        metrics
            .queue_capacity
            .with_label_values(&[name])
            .set(capacity as i64);
    }
}

/// True once a final (or 101) response header went to the client: nothing may be retried then.
fn response_started(session: &Session) -> bool {
    session
        .response_written()
        .is_some_and(|r| r.status.as_u16() >= 200 || r.status.as_u16() == 101)
}

/// The body can be sent again: weir holds a copy, there is none, or Pingora's buffer has it all.
fn body_replayable(session: &Session, ctx: &RequestCtx) -> bool {
    ctx.body.is_some() || !session.as_ref().retry_buffer_truncated()
}

fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// No downstream modules: weir compresses nothing, and Pingora's default (a disabled
    /// compression module) still costs an allocation per request.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            state: self.state(),
            started: Instant::now(),
            slot: None,
            request_id: None,
            traceparent: None,
            trace_started_here: false,
            replay_safe: false,
            body: None,
            tried: SmallVec::new(),
            attempt: None,
            stale_retries: 0,
            last_failure: None,
            retry_reason: None,
            outcome: Outcome::Proxied,
            deferrable: false,
            maybe_sent: false,
            body_streamed: false,
        }
    }

    /// Admission (concurrency peak), request id, keep-alive, the upfront queue, and the body
    /// copy for replay and deferral.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let headers = &session.req_header().headers;
        let id = headers
            .get(respond::X_REQUEST_ID)
            .filter(|v| respond::acceptable_request_id(v))
            .cloned()
            .unwrap_or_else(respond::new_request_id);
        ctx.request_id = Some(id);
        // Exactly one valid traceparent is propagated; none, several or a bad one start a trace.
        let mut parents = headers.get_all(trace::TRACEPARENT).iter();
        match (parents.next(), parents.next()) {
            (Some(tp), None) if trace::valid_traceparent(tp.as_bytes()) => {
                ctx.traceparent = Some(tp.clone());
            }
            _ => {
                ctx.traceparent = Some(trace::new_traceparent());
                ctx.trace_started_here = true;
            }
        }
        session.set_keepalive(ctx.state.keepalive_secs);
        // ACME HTTP-01 validation requests are weir's own, ahead of admission.
        if session
            .req_header()
            .raw_path()
            .starts_with(crate::acme::CHALLENGE_PREFIX.as_bytes())
            && self.answer_acme_challenge(session).await?
        {
            return Ok(true);
        }

        match self
            .admission
            .try_admit(ctx.state.config.limits.concurrency_peak)
        {
            Some(slot) => ctx.slot = Some(slot),
            None => {
                ctx.outcome = Outcome::Rejected;
                self.metrics.rejected(Rejection::Concurrency);
                self.logs.error_line("gateway", 601, "GATEWAY_FLOODED");
                let answer = Answer {
                    retry_after: Some(1),
                    ..Answer::new(429, "Request Discarded")
                };
                respond::send(session, ctx, &answer, false).await?;
                return Ok(true);
            }
        }

        let req = session.req_header();
        ctx.replay_safe = is_idempotent(&req.method) || req.headers.contains_key("idempotency-key");
        let config = &ctx.state.config;
        let target = String::from_utf8_lossy(req.raw_path());
        let upfront = config.upfront_queue.enabled
            && config
                .upfront_queue
                .formats
                .matches(req.method.as_str(), &target);
        ctx.deferrable = config.deferred_queue.enabled
            && config
                .deferred_queue
                .formats
                .matches(req.method.as_str(), &target);
        if upfront {
            let queue = self.queues.upfront.clone();
            self.enqueue_upfront(session, ctx, &queue).await?;
            return Ok(true);
        }
        if ctx.replay_safe || ctx.deferrable {
            if let Some(len) = body::content_length(session) {
                if len > 0 && len <= ctx.state.config.limits.max_buffered_body {
                    ctx.body = Some(body::capture(session, len).await?);
                }
            }
        }
        Ok(false)
    }

    /// Routing: the router picks a node among those this request has not tried yet.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        if let Some(reason) = ctx.retry_reason.take() {
            self.metrics.retry(reason);
            let gap = ctx.state.config.retries.gap;
            if gap > Duration::ZERO && reason != RetryReason::STALE_CONNECTION {
                tokio::time::sleep(gap).await;
            }
        }
        let Some(node) = ctx.state.router.select(&ctx.tried, fastrand::f64()) else {
            return Error::e_explain(ErrorType::HTTPStatus(503), "every node was tried");
        };
        ctx.state.router.start(node);
        ctx.tried.push(node);
        ctx.attempt = Some(Attempt {
            node,
            started: Instant::now(),
            copy_sent: false,
        });
        Ok(Box::new(ctx.state.nodes[node].peer.clone()))
    }

    /// Forwarding headers, the request id and the Host policy, on every attempt.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(attempt) = &ctx.attempt else {
            return Ok(());
        };
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        // The TLS listeners' sessions carry a TLS digest; plain ones do not.
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        upstream::prepare_request(
            upstream_request,
            &ctx.state.nodes[attempt.node],
            ctx.state.config.upstream_host,
            upstream::Downstream { ip: client_ip, tls },
            ctx.request_id.as_ref(),
            ctx.traceparent.as_ref(),
            ctx.trace_started_here,
        )
    }

    /// Replay: weir's full copy replaces the tail Pingora replays.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(copy), Some(attempt)) = (&ctx.body, ctx.attempt.as_mut()) {
            body::substitute(body, end_of_stream, copy, &mut attempt.copy_sent);
        } else if body.as_ref().is_some_and(|b| !b.is_empty()) {
            ctx.body_streamed = true;
        }
        Ok(())
    }

    /// Feedback: the response header closes the attempt; failure statuses count against the
    /// node and are retried on another one when that is safe.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        if status < 200 {
            return Ok(());
        }
        if ctx.state.is_failure_status(status) {
            let failure = Failure::Status(status);
            self.end_attempt(ctx, Err(failure));
            let retry = self.may_retry(session, ctx, failure);
            if retry || self.may_defer(ctx) {
                // Raised as the node's error so that error_while_proxy retries it, or, on the
                // last attempt, so that fail_to_proxy queues it instead of passing it on.
                let mut e = Error::explain(ErrorType::HTTPStatus(status), "failure status");
                e.as_up();
                e.set_retry(retry);
                return Err(e);
            }
        } else {
            self.end_attempt(ctx, Ok(()));
        }
        Ok(())
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

    /// Connect failures: nothing was sent, so another node is always tried while one is left.
    fn fail_to_connect(
        &self,
        session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // An upstream certificate that does not verify is a configuration matter (ca, sni,
        // tls_verify); the error log's UPSTREAM_DOWN alone would hide it.
        if matches!(
            e.etype(),
            ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError
        ) {
            log::warn!("TLS handshake with upstream {peer} failed: {e}");
        }
        let failure = Failure::from_connect_error(&e);
        self.end_attempt(ctx, Err(failure));
        let retry = self.may_retry(session, ctx, failure);
        e.set_retry(retry);
        e
    }

    /// Failures after the request was sent: retried only where replay is safe.
    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        // Our own failure-status error: the attempt is already closed and the retry decided.
        if matches!(e.etype(), ErrorType::HTTPStatus(_)) && ctx.attempt.is_none() {
            let retry = e.retry();
            e.set_retry(retry);
            return e;
        }
        let stale =
            client_reused && matches!(e.retry, RetryType::ReusedOnly) && !response_started(session);
        if stale && ctx.stale_retries < MAX_STALE_RETRIES {
            // A pooled connection the node had already closed: not the node's fault, and it may
            // be picked again.
            self.abandon_attempt(ctx);
            ctx.tried.pop();
            ctx.stale_retries += 1;
            // Written to a connection the node had closed: most likely unseen, but not provably.
            ctx.maybe_sent = true;
            let retry = ctx.replay_safe && body_replayable(session, ctx);
            ctx.retry_reason = retry.then_some(RetryReason::STALE_CONNECTION);
            e.set_retry(retry);
            return e;
        }
        match Failure::from_proxy_error(&e) {
            Some(failure) => {
                self.end_attempt(ctx, Err(failure));
                let retry = self.may_retry(session, ctx, failure);
                e.set_retry(retry);
            }
            None => {
                self.abandon_attempt(ctx);
                e.set_retry(false);
            }
        }
        e
    }

    /// The final failure: the deferred queue takes the request if it may (503 Request Buffered);
    /// otherwise weir's own answer from the last node failure, or 400 for a bad request.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        self.abandon_attempt(ctx);
        let done = FailToProxy {
            error_code: 0,
            can_reuse_downstream: false,
        };
        if let Some(resp) = session.response_written() {
            if response_started(session) {
                return FailToProxy {
                    error_code: resp.status.as_u16(),
                    ..done
                };
            }
        }
        if *e.esource() != ErrorSource::Downstream {
            if let Some(answer) = self.defer(session, ctx).await {
                let status = answer.status;
                return match respond::send(session, ctx, &answer, false).await {
                    Ok(()) => FailToProxy {
                        error_code: status,
                        ..done
                    },
                    Err(_) => done,
                };
            }
        }
        let answer = match (e.esource(), e.etype()) {
            (ErrorSource::Downstream, ErrorType::ReadError)
            | (ErrorSource::Downstream, ErrorType::WriteError)
            | (ErrorSource::Downstream, ErrorType::ConnectionClosed)
            | (ErrorSource::Downstream, ErrorType::ReadTimedout)
            | (ErrorSource::Downstream, ErrorType::WriteTimedout) => return done,
            (ErrorSource::Downstream, _) => {
                self.metrics.rejected(Rejection::BadRequest);
                ctx.outcome = Outcome::Rejected;
                Answer::new(400, "Bad Request")
            }
            _ => match ctx.last_failure.and_then(Failure::client_answer) {
                Some((status, message)) => Answer::new(status, message),
                None => match e.etype() {
                    ErrorType::HTTPStatus(503) => Answer::new(503, "Service Unavailable"),
                    ErrorType::HTTPStatus(s) if *s >= 400 && *s < 500 => {
                        Answer::new(*s, "Bad Request")
                    }
                    _ if *e.esource() == ErrorSource::Upstream => Answer::new(502, "Bad Gateway"),
                    _ => Answer::new(500, "Internal Error"),
                },
            },
        };
        if ctx.outcome == Outcome::Proxied {
            ctx.outcome = Outcome::Failed;
        }
        let status = answer.status;
        match respond::send(session, ctx, &answer, true).await {
            Ok(()) => FailToProxy {
                error_code: status,
                ..done
            },
            Err(_) => done,
        }
    }

    /// Metrics, access log; releases the concurrency slot.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        self.abandon_attempt(ctx);
        ctx.slot = None;
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let elapsed = ctx.started.elapsed();
        self.metrics
            .request_done(status, ctx.outcome, elapsed.as_secs_f64());
        if let Some(sink) = &self.logs.access {
            sink.write(access_line(session, ctx, status, elapsed));
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        // Upstream failures go to weir's own error log and metrics.
        true
    }
}

/// One JSON access-log line.
fn access_line(session: &Session, ctx: &RequestCtx, status: u16, elapsed: Duration) -> String {
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
            .request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
        traceparent: ctx
            .traceparent
            .as_ref()
            .and_then(|v| v.to_str().ok())
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
            .map(|&i| ctx.state.nodes[i].upstream.url.as_str()),
        attempts: ctx.tried.len(),
        duration_ms: (elapsed.as_secs_f64() * 1e6).round() / 1e3,
    };
    serde_json::to_string(&line).unwrap_or_default()
}
