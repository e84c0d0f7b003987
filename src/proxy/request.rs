//! Per-request state, and the life of one attempt: started by `upstream_peer`, ended by the
//! response header (ok or a failure status) or by an error, or released without a verdict
//! when the node is not to blame (client gone, stale pooled connection).
//!
//! ```text
//!            upstream_peer                 response header / error
//!   Idle ───────────────────► InFlight ───────────────────────────► Ended { retry }
//!    ▲                           │  released (not the node's fault)      │
//!    └───────────────────────────┘                                       │ retry: Some(reason)
//!                                 InFlight ◄─── upstream_peer ───────────┘ (counted, gap)
//! ```

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use smallvec::SmallVec;

use super::admission::{ClientSlot, Slot};
use super::hedge::{Ticket, Won};
use crate::abort::{AbortGuard, AbortReason};
use crate::failure::Failure;
use crate::forward::Client;
use crate::logs::Logs;
use crate::metrics::{Outcome, RetryReason};
use crate::runtime::{Cluster, Runtime};

/// The attempt state of a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attempt {
    /// No attempt yet, or the last one was released without a verdict.
    Idle,
    InFlight {
        node: usize,
        started: Instant,
        /// The full body copy went upstream on this attempt.
        copy_sent: bool,
    },
    /// The last attempt ended; `retry` is the decision taken then (and why), counted when the
    /// next attempt starts.
    Ended { retry: Option<RetryReason> },
}

/// Per-request state.
pub struct RequestCtx {
    /// The runtime this request started on, kept to its end (reloads never change it mid-way).
    pub runtime: Arc<Runtime>,
    /// The request's cluster in `runtime` (routes; set by `request_filter`, default 0).
    pub cluster: usize,
    pub started: Instant,
    pub slot: Option<Slot>,
    /// This request counted against its client address (`limits.max_requests_per_client`).
    pub client_slot: Option<ClientSlot>,
    /// The client's side of the forwarding headers and the request's ids (set by
    /// `request_filter`, before anything else can answer).
    pub client: Option<Client>,
    /// May be sent again after it reached a node: idempotent method or `Idempotency-Key`.
    pub replay_safe: bool,
    /// The deferred queue is on and the request matches its formats.
    pub deferrable: bool,
    /// weir's copy of the body, when it keeps one.
    pub body: Option<Bytes>,
    /// Part of the body went upstream without weir keeping a copy.
    pub body_streamed: bool,
    /// Reading the client's body failed (closed early, timed out, bad framing): the request
    /// is not what the client meant to send and is never forwarded or queued.
    pub body_failed: bool,
    /// Nodes tried, in order.
    pub tried: SmallVec<[usize; 4]>,
    pub attempt: Attempt,
    /// Attempts released because their pooled connection was stale.
    pub stale_retries: u8,
    /// The last failure a node caused, for the final answer.
    pub last_failure: Option<Failure>,
    /// Some attempt may have reached a node (anything but a connect failure).
    pub maybe_sent: bool,
    /// The attempt in flight is watched (its deadlines, abort on stall) until it ends or its
    /// response is complete.
    pub abort: Option<AbortGuard>,
    /// weir ended the attempt in flight, and why.
    pub aborted: Option<AbortReason>,
    /// An upgrade request (WebSocket): a tunnel once answered `101`.
    pub upgrade: bool,
    /// The request's hedge, from its first attempt until an answer is chosen.
    pub hedge: Option<Ticket>,
    /// The hedge won; its answer waits for `fail_to_proxy` to write it.
    pub hedge_won: Option<Box<Won>>,
    pub outcome: Outcome,
}

impl RequestCtx {
    pub fn new(runtime: Arc<Runtime>) -> RequestCtx {
        RequestCtx {
            runtime,
            cluster: 0,
            started: Instant::now(),
            slot: None,
            client_slot: None,
            client: None,
            replay_safe: false,
            deferrable: false,
            body: None,
            body_streamed: false,
            body_failed: false,
            tried: SmallVec::new(),
            attempt: Attempt::Idle,
            stale_retries: 0,
            last_failure: None,
            maybe_sent: false,
            abort: None,
            aborted: None,
            upgrade: false,
            hedge: None,
            hedge_won: None,
            outcome: Outcome::Proxied,
        }
    }

    /// The request's cluster.
    pub fn cluster(&self) -> &Cluster {
        self.runtime.cluster(self.cluster)
    }

    /// The node of the attempt in flight.
    pub fn node_in_flight(&self) -> Option<usize> {
        match self.attempt {
            Attempt::InFlight { node, .. } => Some(node),
            _ => None,
        }
    }

    /// The attempt in flight may be hedged: hedging on, the first attempt of a replay-safe
    /// request whose whole body weir has (or that has none), not an upgrade, watched (so that
    /// it can be cancelled), and another attempt allowed.
    pub fn hedgeable(&self, has_body: bool) -> bool {
        self.runtime.config.hedging.enabled
            && self.tried.len() == 1
            && self.hedge.is_none()
            && self.replay_safe
            && (self.body.is_some() || !has_body)
            && !self.upgrade
            && self.abort.is_some()
            && self.cluster().attempt_limit() >= 2
    }

    /// Starts an attempt on `node`.
    pub fn start(&mut self, node: usize) {
        self.cluster().router.start(node);
        self.tried.push(node);
        self.abort = None;
        self.aborted = None;
        self.attempt = Attempt::InFlight {
            node,
            started: Instant::now(),
            copy_sent: false,
        };
    }

    /// Ends the attempt in flight with the node's verdict (`Err`: its failure) and records it
    /// in the router, the metrics and the error log. The retry decision is set separately.
    pub fn end(&mut self, logs: &Logs, result: Result<(), Failure>) {
        let Attempt::InFlight { node, started, .. } = self.attempt else {
            return;
        };
        self.abort = None;
        self.attempt = Attempt::Ended { retry: None };
        self.cluster()
            .record_attempt(logs, node, result, started.elapsed());
        if let Err(failure) = result {
            self.last_failure = Some(failure);
            if !failure.nothing_sent() {
                self.maybe_sent = true;
            }
        }
    }

    /// Releases the attempt in flight without a verdict: the node is not to blame.
    pub fn release(&mut self) {
        self.abort = None;
        if let Attempt::InFlight { node, .. } = self.attempt {
            self.cluster().router.cancel(node);
            self.attempt = Attempt::Idle;
        }
    }

    /// Releases a stale pooled connection's attempt: not the node's fault, and the node may be
    /// picked again.
    pub fn release_stale(&mut self, retry: Option<RetryReason>) {
        self.release();
        self.tried.pop();
        self.stale_retries = self.stale_retries.saturating_add(1);
        self.attempt = Attempt::Ended { retry };
    }

    /// Ends the attempt's watch; the reason when weir had already ended the attempt, which
    /// is then remembered in `aborted`.
    pub fn take_abort(&mut self) -> Option<AbortReason> {
        if let Some(guard) = self.abort.take() {
            self.aborted = self.aborted.or(guard.reason());
        }
        self.aborted
    }

    /// The response header of the attempt in flight arrived: its watch moves on to the body
    /// (`Err`: weir had ended the attempt first, and its connection is shut).
    pub fn header_arrived(&mut self) -> Result<(), AbortReason> {
        let Some(guard) = &self.abort else {
            return Ok(());
        };
        guard.header().inspect_err(|reason| {
            self.aborted = Some(*reason);
            self.abort = None;
        })
    }

    /// A deadline weir enforced after the response header ended the exchange: one more
    /// failure for the node that answered (its attempt was counted at the header).
    pub fn end_late_timeout(&mut self, logs: &Logs) {
        if let Some(&node) = self.tried.last() {
            self.cluster()
                .record_late_timeout(logs, node, self.started.elapsed());
        }
        self.last_failure = Some(Failure::Timeout);
    }

    /// Ends an attempt weir aborted on a stalled node: a failure for the node's score (a
    /// timeout in the metrics and the error log) that is not progress.
    pub fn end_aborted(&mut self, logs: &Logs) {
        let Attempt::InFlight { node, started, .. } = self.attempt else {
            return;
        };
        self.abort = None;
        self.attempt = Attempt::Ended { retry: None };
        self.cluster().record_aborted(logs, node, started.elapsed());
        self.last_failure = Some(Failure::Timeout);
        self.maybe_sent = true;
    }

    /// Ends an attempt whose hedge answered first: for the router, a failure without
    /// progress (see `Router::finish_stalled`); no metric or error line blames the node.
    pub fn end_hedge_lost(&mut self) {
        let Attempt::InFlight { node, started, .. } = self.attempt else {
            return;
        };
        self.abort = None;
        self.attempt = Attempt::Ended { retry: None };
        self.cluster()
            .router
            .finish_stalled(node, started.elapsed());
    }

    /// Records the retry decision for the attempt that just ended.
    pub fn decide(&mut self, retry: Option<RetryReason>) {
        self.attempt = Attempt::Ended { retry };
    }

    /// The pending retry decision, taken by the next `upstream_peer`.
    pub fn take_retry(&mut self) -> Option<RetryReason> {
        match self.attempt {
            Attempt::Ended { retry } => {
                self.attempt = Attempt::Ended { retry: None };
                retry
            }
            _ => None,
        }
    }
}
