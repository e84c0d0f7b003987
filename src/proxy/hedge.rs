//! Hedged requests: a replay-safe request whose first attempt has no response header after
//! the hedge delay gets a second attempt on another node; the first response header wins and
//! the other attempt is cancelled.
//!
//! Pingora runs the attempts of a request one after the other, so the hedge is weir's own: a
//! task with its own connector (its own connection pool), started by the background watch.
//! Both attempts go through the same forwarding policy (`forward::prepare`), their results
//! through the same bookkeeping (`Runtime::record_attempt`: node scores, metrics, error log),
//! and the hedge takes its extra attempt from the one retry budget.
//!
//! ```text
//!  upstream_request_filter   first attempt, replay-safe, body kept or none, another node
//!        │                   left ─► a ticket: due at now + delay (a sliding quantile of the
//!        │                   cluster's time to first byte, clamped to hedging.min/max_delay)
//!  (watch, every 2 ms)       due and still no header ─► budget ─► hedge task on another node
//!        │
//!  hedge header first  ──►   HEDGE_WON: the first attempt's socket is shut (AbortReason::
//!        │                   HedgeLost), its error ends in fail_to_proxy, which writes the
//!        │                   hedge's response through the usual response headers
//!  first attempt's header ─► PRIMARY_WON: the hedge task drops its connection (the node
//!                            sees it close)
//! ```
//!
//! What it costs: one copy of the request head per eligible request, in one buffer
//! (`HeadCopy`, taken when its first attempt goes out) and a registration; a hedge that is
//! sent costs a task, the head rebuilt, a connection from the hedge pool and, when it wins, a
//! client connection (Pingora reuses none after its error path, so the answer says
//! `Connection: close`).

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use pingora::prelude::*;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora_core::connectors::http::Connector;
use smallvec::SmallVec;
use tokio::sync::Notify;

use super::head_copy::HeadCopy;
use super::request::RequestCtx;
use super::respond;
use crate::abort::{AbortReason, AbortRegistry};
use crate::failure::{classify, AttemptError, Failure, Phase};
use crate::forward::{self, Client};
use crate::logs::Logs;
use crate::metrics::Metrics;
use crate::queue::delivery::send_request;
use crate::routing::{RetryBudget, SystemClock, TtfbQuantile};
use crate::runtime::Runtime;

const WAITING: u8 = 0;
const LAUNCHED: u8 = 1;
const HEDGE_WON: u8 = 2;
/// No hedge (refused by the budget, no node left) or the hedge failed.
const NO_HEDGE: u8 = 3;
const PRIMARY_WON: u8 = 4;

/// The hedges of a gateway: requests waiting for their delay, the pool hedges use, and the
/// quantile the delay follows.
pub struct Hedges {
    pending: Mutex<Vec<(usize, Instant, Arc<Cell>)>>,
    len: AtomicUsize,
    next_id: AtomicUsize,
    pub ttfb: TtfbQuantile,
    connector: Connector,
}

/// What a hedge needs to go out.
struct Plan {
    runtime: Arc<Runtime>,
    /// The request's cluster in `runtime`.
    cluster: usize,
    /// The request head as Pingora would send it, before the forwarding policy.
    head: HeadCopy,
    body: Option<Bytes>,
    client: Client,
    tried: SmallVec<[usize; 4]>,
    /// The first attempt: its node's registry and its registration there.
    primary: (Arc<AbortRegistry>, usize),
}

/// The hedge's answer, for the request to write.
pub struct Won {
    pub session: HttpSession,
    pub header: ResponseHeader,
    pub node: usize,
    peer: HttpPeer,
}

/// One request's hedge, shared by the request and the hedge task.
pub struct Cell {
    state: AtomicU8,
    plan: Mutex<Option<Plan>>,
    won: Mutex<Option<Won>>,
    /// The hedge node (`usize::MAX`: none).
    node: AtomicUsize,
    /// The hedge finished (won, or failed).
    done: Notify,
    /// The first attempt won, or the request went away: the hedge stops.
    cancel: Notify,
}

/// A request's hold on its hedge; dropping it withdraws a waiting hedge and cancels one in
/// flight that has not won.
pub struct Ticket {
    hedges: Arc<Hedges>,
    id: usize,
    cell: Arc<Cell>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for Hedges {
    fn default() -> Self {
        Hedges {
            pending: Mutex::new(Vec::new()),
            len: AtomicUsize::new(0),
            next_id: AtomicUsize::new(0),
            ttfb: TtfbQuantile::new(Arc::new(SystemClock::new())),
            connector: Connector::new(None),
        }
    }
}

/// How a request's hedge ended, once it did.
pub enum Outcome {
    Won(Box<Won>),
    /// No hedge, or it failed (its node is in `tried` now).
    None,
}

impl Hedges {
    /// A ticket for a request whose first attempt went out now, if it qualifies (see
    /// `RequestCtx::hedgeable`).
    pub fn register(self: &Arc<Self>, ctx: &RequestCtx, head: &RequestHeader) -> Option<Ticket> {
        let runtime = &ctx.runtime;
        let h = &runtime.config.hedging;
        let guard = ctx.abort.as_ref()?;
        let node = ctx.node_in_flight()?;
        let plan = Plan {
            runtime: runtime.clone(),
            cluster: ctx.cluster,
            head: HeadCopy::of(head)?,
            body: ctx.body.clone(),
            client: ctx.client.clone()?,
            tried: ctx.tried.clone(),
            primary: (ctx.cluster().nodes.get(node)?.aborts.clone(), guard.id()),
        };
        let cell = Arc::new(Cell {
            state: AtomicU8::new(WAITING),
            plan: Mutex::new(Some(plan)),
            won: Mutex::new(None),
            node: AtomicUsize::new(usize::MAX),
            done: Notify::new(),
            cancel: Notify::new(),
        });
        let due = Instant::now() + self.ttfb.delay(h.min_delay, h.max_delay);
        let id = self.next_id.fetch_add(1, Relaxed);
        let mut pending = lock(&self.pending);
        pending.push((id, due, cell.clone()));
        self.len.store(pending.len(), Relaxed);
        Some(Ticket {
            hedges: self.clone(),
            id,
            cell,
        })
    }

    fn withdraw(&self, id: usize) {
        if self.len.load(Relaxed) == 0 {
            return;
        }
        let mut pending = lock(&self.pending);
        if let Some(i) = pending.iter().position(|(p, _, _)| *p == id) {
            pending.swap_remove(i);
        }
        self.len.store(pending.len(), Relaxed);
    }

    /// Sends the hedges that are due at `now`: each takes an extra attempt from `budget` and
    /// goes to a node the request has not tried.
    pub fn launch_due(
        self: &Arc<Self>,
        now: Instant,
        budget: &RetryBudget,
        metrics: &Arc<Metrics>,
        logs: &Arc<Logs>,
    ) {
        if self.len.load(Relaxed) == 0 {
            return;
        }
        let due: Vec<Arc<Cell>> = {
            let mut pending = lock(&self.pending);
            let mut due = Vec::new();
            pending.retain(|(_, at, cell)| {
                if *at > now {
                    return true;
                }
                due.push(cell.clone());
                false
            });
            self.len.store(pending.len(), Relaxed);
            due
        };
        for cell in due {
            if cell
                .state
                .compare_exchange(WAITING, LAUNCHED, AcqRel, Acquire)
                .is_err()
            {
                continue;
            }
            let Some(plan) = lock(&cell.plan).take() else {
                cell.finish(NO_HEDGE);
                continue;
            };
            let runtime = plan.runtime.clone();
            let cluster = runtime.cluster(plan.cluster);
            let node = cluster.router.select(&plan.tried, fastrand::f64());
            let Some(node) = node.filter(|n| !plan.tried.contains(n)) else {
                cell.finish(NO_HEDGE);
                continue;
            };
            if !budget.try_withdraw(runtime.budget_terms()) {
                metrics.retry_budget_exhausted.inc();
                cell.finish(NO_HEDGE);
                continue;
            }
            metrics.hedges_sent.inc();
            cell.node.store(node, Relaxed);
            cluster.router.start(node);
            let hedges = self.clone();
            let (metrics, logs) = (metrics.clone(), logs.clone());
            tokio::spawn(async move {
                hedges.run(cell, plan, node, &metrics, &logs).await;
            });
        }
    }

    /// The hedge attempt on `node`: the first response header decides.
    async fn run(&self, cell: Arc<Cell>, plan: Plan, node: usize, metrics: &Metrics, logs: &Logs) {
        let runtime = &plan.runtime;
        let cluster = runtime.cluster(plan.cluster);
        let started = Instant::now();
        let n = &cluster.nodes[node];
        let attempt = self.attempt(&plan, node);
        let result = tokio::select! {
            r = attempt => r,
            _ = cell.cancel.notified() => {
                // The first attempt answered (or the request went away): the connection is
                // dropped, which the node sees as a close. No verdict on the node.
                cluster.router.cancel(node);
                return;
            }
        };
        match result {
            Ok((session, header)) => {
                let status = header.status.as_u16();
                if runtime.is_failure_status(status) {
                    cluster.record_attempt(
                        logs,
                        node,
                        Err(Failure::Status(status)),
                        started.elapsed(),
                    );
                    cell.finish(NO_HEDGE);
                    return;
                }
                let ttfb = started.elapsed();
                cluster.record_attempt(logs, node, Ok(()), ttfb);
                self.ttfb.record(ttfb);
                if cell
                    .state
                    .compare_exchange(LAUNCHED, HEDGE_WON, AcqRel, Acquire)
                    .is_err()
                {
                    // The first attempt's header came first after all.
                    return;
                }
                metrics.hedges_won.inc();
                *lock(&cell.won) = Some(Won {
                    session,
                    header,
                    node,
                    peer: n.peer.clone(),
                });
                let (registry, id) = &plan.primary;
                registry.end(*id, AbortReason::HedgeLost);
                cell.done.notify_one();
            }
            Err((e, phase)) => {
                let failure = match classify(&e, phase) {
                    AttemptError::Node(f) => f,
                    AttemptError::Stale { unsent: true } => Failure::ConnectRefused,
                    _ => Failure::Reset,
                };
                cluster.record_attempt(logs, node, Err(failure), started.elapsed());
                cell.finish(NO_HEDGE);
            }
        }
    }

    /// Connects, sends the request and reads its response header (1xx skipped), within the
    /// attempt's first-byte deadline.
    async fn attempt(
        &self,
        plan: &Plan,
        node: usize,
    ) -> std::result::Result<(HttpSession, ResponseHeader), (Box<Error>, Phase)> {
        let runtime = &plan.runtime;
        let cluster = runtime.cluster(plan.cluster);
        let n = &cluster.nodes[node];
        let (mut session, reused) = self
            .connector
            .get_http_session(&n.peer)
            .await
            .map_err(|e| (e, Phase::Connect))?;
        let phase = Phase::Exchange { reused };
        let mut head = plan.head.rebuild().map_err(|e| (e, phase))?;
        forward::prepare(&mut head, n, runtime.config.upstream_host, &plan.client)
            .map_err(|e| (e, phase))?;
        let exchange = async {
            send_request(&mut session, head, plan.body.clone()).await?;
            match session.response_header() {
                Some(header) => Ok(header.clone()),
                None => Error::e_explain(ErrorType::InvalidHTTPHeader, "no response header"),
            }
        };
        let bound = cluster.timeouts.first_byte();
        let header = match bound {
            Some(t) => match tokio::time::timeout(t, exchange).await {
                Ok(r) => r,
                Err(_) => Error::e_explain(ErrorType::ReadTimedout, "hedge: no response header"),
            },
            None => exchange.await,
        };
        match header {
            Ok(header) => Ok((session, header)),
            Err(mut e) => {
                e.as_up();
                Err((e, phase))
            }
        }
    }

    /// Writes the hedge's response to the client: the usual response headers, the body as it
    /// comes (within `timeouts.body_idle` per read and the attempt's whole deadline), and a
    /// close (Pingora reuses no client connection after its error path).
    pub async fn deliver(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        logs: &Logs,
        won: Box<Won>,
    ) -> Result<u16> {
        let Won {
            session: mut upstream,
            mut header,
            node,
            peer,
        } = *won;
        ctx.tried.push(node);
        let status = header.status.as_u16();
        for name in ["connection", "keep-alive", "proxy-connection"] {
            header.remove_header(name);
        }
        header.insert_header(http::header::CONNECTION, "close")?;
        respond::add_common_headers(&mut header, ctx)?;
        session.set_keepalive(None);
        let no_body = super::body::response_is_empty(session, &header);
        session
            .write_response_header(Box::new(header), no_body)
            .await?;
        if no_body {
            self.connector
                .release_http_session(upstream, &peer, peer.idle_timeout())
                .await;
            return Ok(status);
        }
        let timeouts = &ctx.cluster().timeouts;
        upstream.set_read_timeout(timeouts.body_idle());
        let body = async {
            loop {
                match upstream.read_response_body().await? {
                    Some(chunk) => session.write_response_body(Some(chunk), false).await?,
                    None => {
                        session.write_response_body(None, true).await?;
                        return Ok::<(), Box<Error>>(());
                    }
                }
            }
        };
        let result = match timeouts.request {
            Some(t) => tokio::time::timeout(t, body)
                .await
                .unwrap_or_else(|_| Error::e_explain(ErrorType::ReadTimedout, "hedge: body")),
            None => body.await,
        };
        match result {
            Ok(()) => {
                self.connector
                    .release_http_session(upstream, &peer, peer.idle_timeout())
                    .await;
                Ok(status)
            }
            Err(e) => {
                if matches!(e.etype(), ErrorType::ReadTimedout) {
                    ctx.end_late_timeout(logs);
                }
                Err(e)
            }
        }
    }
}

impl Cell {
    fn finish(&self, to: u8) {
        self.state.store(to, Release);
        self.done.notify_one();
    }
}

impl Ticket {
    /// The first attempt's response header came: `false` when the hedge's came first (the
    /// first attempt has lost, and its connection is being shut).
    pub fn primary_answered(&self) -> bool {
        let cell = &self.cell;
        loop {
            let s = cell.state.load(Acquire);
            match s {
                HEDGE_WON => return false,
                WAITING | LAUNCHED => {
                    if cell
                        .state
                        .compare_exchange(s, PRIMARY_WON, AcqRel, Acquire)
                        .is_ok()
                    {
                        if s == LAUNCHED {
                            cell.cancel.notify_one();
                        }
                        return true;
                    }
                }
                _ => return true,
            }
        }
    }

    /// Waits for a hedge in flight to end; a waiting one is withdrawn (the request's own next
    /// step supersedes it). The hedge's node counts as tried.
    pub async fn outcome(&self, tried: &mut SmallVec<[usize; 4]>) -> Outcome {
        let cell = &self.cell;
        if cell
            .state
            .compare_exchange(WAITING, NO_HEDGE, AcqRel, Acquire)
            .is_ok()
        {
            self.hedges.withdraw(self.id);
            return Outcome::None;
        }
        loop {
            // Registered before the state is read: a finish in between is not missed.
            let done = cell.done.notified();
            match cell.state.load(Acquire) {
                LAUNCHED => done.await,
                HEDGE_WON => {
                    return match lock(&cell.won).take() {
                        Some(won) => Outcome::Won(Box::new(won)),
                        None => Outcome::None,
                    }
                }
                _ => break,
            }
        }
        let node = cell.node.load(Relaxed);
        if node != usize::MAX && !tried.contains(&node) {
            tried.push(node);
        }
        Outcome::None
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let cell = &self.cell;
        match cell
            .state
            .compare_exchange(WAITING, NO_HEDGE, AcqRel, Acquire)
        {
            Ok(_) => self.hedges.withdraw(self.id),
            Err(LAUNCHED) => {
                if cell
                    .state
                    .compare_exchange(LAUNCHED, PRIMARY_WON, AcqRel, Acquire)
                    .is_ok()
                {
                    cell.cancel.notify_one();
                }
            }
            Err(_) => {}
        }
    }
}
