//! Every metric weir exports, in one place (names from `shared/design/metrics.md`).
//!
//! weir owns its registry (no global state). Label sets are resolved once, at start-up or when
//! a node is added, into plain handles, so recording on the request path is a few atomic adds
//! and never a label lookup. Gauges that describe state (in-flight, error rates, selection
//! probabilities, queue depth) are computed at scrape time, costing the request path nothing.

use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::failure::ATTEMPT_RESULTS;

/// `weir_requests_total{outcome}` values, in index order.
pub const OUTCOMES: [&str; 5] = ["proxied", "buffered", "queued", "rejected", "failed"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Proxied = 0,
    Buffered = 1,
    Queued = 2,
    Rejected = 3,
    Failed = 4,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        OUTCOMES[self as usize]
    }
}

/// `weir_rejected_total{reason}` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Concurrency = 0,
    QueueFull = 1,
    BadRequest = 2,
    /// A client too slow with its request head or body (408).
    ClientTimeout = 3,
    /// A client address over `limits.max_requests_per_client` (429).
    ClientLimit = 4,
    /// The queue's store could not take a request it had room for (a log write failed).
    QueueUnavailable = 5,
}
const REJECTION_REASONS: [&str; 6] = [
    "concurrency",
    "queue_full",
    "bad_request",
    "client_timeout",
    "client_limit",
    "queue_unavailable",
];
/// `weir_connections_refused_total{reason}` values.
const CONNECTION_REFUSALS: [&str; 2] = ["max_connections", "per_client"];

const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const QUEUES: [&str; 2] = ["deferred", "upfront"];
const REPLAY_RESULTS: [&str; 4] = ["delivered", "failed_attempt", "expired", "dead_letter"];
const RELOAD_RESULTS: [&str; 2] = ["ok", "rejected"];
const ACME_ORDER_RESULTS: [&str; 2] = ["ok", "failed"];

/// `weir_retries_total{reason}` values: why the previous attempt of the request ended. The first
/// six are the failure results of [`ATTEMPT_RESULTS`] (index − 1); the last is a pooled
/// connection the node had closed, retried on the same node without blaming it.
pub const RETRY_REASONS: [&str; 8] = [
    "connect_refused",
    "connect_timeout",
    "timeout",
    "reset",
    "bad_response",
    "status",
    "stale_connection",
    "stall",
];

/// Why a request makes another attempt (an index into [`RETRY_REASONS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryReason(u8);

impl RetryReason {
    pub const STALE_CONNECTION: RetryReason = RetryReason(6);
    /// weir aborted the previous attempt because its node stalled.
    pub const STALL: RetryReason = RetryReason(7);

    /// After a failed attempt whose `weir_upstream_attempts_total` result index is `index`.
    pub fn after_failure(result_index: usize) -> RetryReason {
        RetryReason(result_index.clamp(1, 6) as u8 - 1)
    }

    pub fn label(self) -> &'static str {
        RETRY_REASONS[self.0 as usize]
    }
}

/// Buckets from 250µs to ~33s: sub-millisecond loopback hops up to the longest sane timeout.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.000_25, 2.0, 18).unwrap_or_default()
}

/// Per-node handles, built when the node is configured.
pub struct NodeMetrics {
    pub attempts: [IntCounter; ATTEMPT_RESULTS.len()],
    pub response_duration: Histogram,
    pub error_rate: Gauge,
    pub selection_probability: Gauge,
    pub inflight: IntGauge,
}

impl NodeMetrics {
    /// One finished attempt: `result` indexes [`ATTEMPT_RESULTS`]; `header_after` is the time
    /// to the response header, when the node sent one (a refused or timed-out attempt has none
    /// and would only drag the latency histogram towards zero or the timeout).
    #[inline]
    pub fn attempt_done(&self, result: usize, header_after: Option<f64>) {
        self.attempts[result].inc();
        if let Some(seconds) = header_after {
            self.response_duration.observe(seconds);
        }
    }
}

pub struct Metrics {
    registry: Registry,
    requests: [[IntCounter; OUTCOMES.len()]; CODE_CLASSES.len()],
    request_duration: [Histogram; OUTCOMES.len()],
    pub inflight: IntGauge,
    pub concurrency_peak: IntGauge,
    rejected: [IntCounter; REJECTION_REASONS.len()],
    attempts: IntCounterVec,
    response_duration: HistogramVec,
    error_rate: GaugeVec,
    selection_probability: GaugeVec,
    node_inflight: IntGaugeVec,
    retries: [IntCounter; RETRY_REASONS.len()],
    pub queue_depth: IntGaugeVec,
    pub queue_capacity: IntGaugeVec,
    pub queue_oldest_age: GaugeVec,
    pub queue_enqueued: IntCounterVec,
    pub queue_replayed: IntCounterVec,
    pub queue_dead_letters: IntGaugeVec,
    pub queue_remaining_at_shutdown: IntGaugeVec,
    pub queue_store_up: IntGaugeVec,
    /// Nodes registered in each cluster's registry (set at scrape time).
    pub registry_nodes: IntGaugeVec,
    /// Registry events by cluster: registered | renewed | expired | deleted.
    pub registry_events: IntCounterVec,
    /// 1 while the node passes its cluster's health check (or has none), else 0.
    pub upstream_healthy: IntGaugeVec,
    /// Health-check probes by cluster, node and result: ok | failed.
    pub health_checks: IntCounterVec,
    /// DNS discovery lookups by cluster and result: ok | failed.
    pub dns_lookups: IntCounterVec,
    pub reloads: IntCounterVec,
    /// ACME certificate orders (first issue and renewals) by result: ok | failed.
    pub acme_orders: IntCounterVec,
    /// Unix time the served ACME certificate expires (0 = none yet).
    pub acme_certificate_expiry: prometheus::IntGauge,
    /// Open client connections (set at scrape time).
    pub client_connections: IntGauge,
    /// `limits.max_connections` in force.
    pub max_connections: IntGauge,
    connections_refused: [IntCounter; CONNECTION_REFUSALS.len()],
    /// Attempts weir ended because their node stalled (sent again elsewhere when allowed).
    pub attempts_aborted: IntCounter,
    /// Extra attempts the retry budget refused.
    pub retry_budget_exhausted: IntCounter,
    /// Attempts that missed a deadline, by kind (`ATTEMPT_DEADLINES`).
    pub attempt_timeouts: [IntCounter; ATTEMPT_DEADLINES.len()],
    /// Second attempts sent because the first had no response header after the hedge delay.
    pub hedges_sent: IntCounter,
    /// Hedges whose response header came first (their rival was cancelled).
    pub hedges_won: IntCounter,
}

/// `kind` of `weir_attempt_timeouts_total`: `timeouts.first_byte`, `timeouts.body_idle`,
/// `timeouts.request` (the whole attempt).
pub const ATTEMPT_DEADLINES: [&str; 3] = ["first_byte", "body_idle", "attempt"];

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are constants and unique, so registration cannot collide.
    if let Err(e) = r.register(Box::new(c.clone())) {
        log::error!("metric registration failed: {e}");
    }
    c
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let requests_vec = register(
            &r,
            IntCounterVec::new(
                Opts::new("weir_requests_total", "Client requests finished"),
                &["code", "outcome"],
            )
            .expect("valid metric"),
        );
        let requests = CODE_CLASSES
            .map(|code| OUTCOMES.map(|outcome| requests_vec.with_label_values(&[code, outcome])));
        let duration_vec = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "weir_request_duration_seconds",
                    "Client-visible request latency",
                )
                .buckets(latency_buckets()),
                &["outcome"],
            )
            .expect("valid metric"),
        );
        let request_duration = OUTCOMES.map(|o| duration_vec.with_label_values(&[o]));
        let inflight = register(
            &r,
            IntGauge::new("weir_inflight_requests", "Client requests in flight now")
                .expect("valid metric"),
        );
        let concurrency_peak = register(
            &r,
            IntGauge::new(
                "weir_concurrency_peak",
                "Configured limit of in-flight requests",
            )
            .expect("valid metric"),
        );
        let rejected_vec = register(
            &r,
            IntCounterVec::new(
                Opts::new("weir_rejected_total", "Requests refused by weir"),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let rejected = REJECTION_REASONS.map(|reason| rejected_vec.with_label_values(&[reason]));
        let attempts = register(
            &r,
            IntCounterVec::new(
                Opts::new("weir_upstream_attempts_total", "Attempts sent to each node"),
                &["cluster", "upstream", "result"],
            )
            .expect("valid metric"),
        );
        let response_duration = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "weir_upstream_response_duration_seconds",
                    "Time to response header per attempt",
                )
                .buckets(latency_buckets()),
                &["cluster", "upstream"],
            )
            .expect("valid metric"),
        );
        let error_rate = register(
            &r,
            GaugeVec::new(
                Opts::new(
                    "weir_upstream_error_rate",
                    "The node's current decayed error score as a rate (0..1)",
                ),
                &["cluster", "upstream"],
            )
            .expect("valid metric"),
        );
        let selection_probability = register(
            &r,
            GaugeVec::new(
                Opts::new(
                    "weir_upstream_selection_probability",
                    "Probability the router picks the node for a first attempt now",
                ),
                &["cluster", "upstream"],
            )
            .expect("valid metric"),
        );
        let node_inflight = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "weir_upstream_inflight_requests",
                    "Attempts in flight on each node now",
                ),
                &["cluster", "upstream"],
            )
            .expect("valid metric"),
        );
        let retries_vec = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "weir_retries_total",
                    "Attempts beyond the first, by why the previous one ended",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let retries = RETRY_REASONS.map(|reason| retries_vec.with_label_values(&[reason]));
        let queue_depth = register(
            &r,
            IntGaugeVec::new(
                Opts::new("weir_deferred_queue_depth", "Requests waiting"),
                &["queue"],
            )
            .expect("valid metric"),
        );
        let queue_capacity = register(
            &r,
            IntGaugeVec::new(
                Opts::new("weir_deferred_queue_capacity", "Configured capacity"),
                &["queue"],
            )
            .expect("valid metric"),
        );
        let queue_oldest_age = register(
            &r,
            GaugeVec::new(
                Opts::new(
                    "weir_deferred_queue_oldest_age_seconds",
                    "Age of the queue head",
                ),
                &["queue"],
            )
            .expect("valid metric"),
        );
        let queue_enqueued = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "weir_deferred_enqueued_total",
                    "Requests accepted into a queue",
                ),
                &["queue"],
            )
            .expect("valid metric"),
        );
        let queue_replayed = register(
            &r,
            IntCounterVec::new(
                Opts::new("weir_deferred_replayed_total", "Replay outcomes"),
                &["queue", "result"],
            )
            .expect("valid metric"),
        );
        let queue_dead_letters = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "weir_deferred_dead_letters",
                    "Requests given up on and kept for inspection",
                ),
                &["queue"],
            )
            .expect("valid metric"),
        );
        let queue_remaining_at_shutdown = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "weir_deferred_remaining_at_shutdown",
                    "Requests still queued when the replay stopped at shutdown (0 while running)",
                ),
                &["queue"],
            )
            .expect("valid metric"),
        );
        let queue_store_up = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "weir_queue_store_up",
                    "1 while the queue's storage takes pushes (storage: redis: Redis answered \
                     the last command), else 0",
                ),
                &["queue"],
            )
            .expect("valid metric"),
        );
        for q in QUEUES {
            queue_store_up.with_label_values(&[q]).set(1);
            queue_remaining_at_shutdown.with_label_values(&[q]);
            queue_depth.with_label_values(&[q]);
            queue_capacity.with_label_values(&[q]);
            queue_oldest_age.with_label_values(&[q]);
            queue_enqueued.with_label_values(&[q]);
            queue_dead_letters.with_label_values(&[q]);
            for result in REPLAY_RESULTS {
                queue_replayed.with_label_values(&[q, result]);
            }
        }
        let registry_nodes = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "weir_registry_nodes",
                    "Nodes registered (and not expired) in each cluster's registry",
                ),
                &["cluster"],
            )
            .expect("valid metric"),
        );
        let registry_events = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "weir_registry_events_total",
                    "Registry events per cluster: registered, renewed, expired (no renewal \
                     within liveness), deleted",
                ),
                &["cluster", "event"],
            )
            .expect("valid metric"),
        );
        let upstream_healthy = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "weir_upstream_healthy",
                    "1 while the node passes its cluster's active health check, 0 while it \
                     fails it (nodes of clusters without health_check are not listed)",
                ),
                &["cluster", "upstream"],
            )
            .expect("valid metric"),
        );
        let health_checks = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "weir_health_checks_total",
                    "Active health-check probes per node by result: ok, failed",
                ),
                &["cluster", "upstream", "result"],
            )
            .expect("valid metric"),
        );
        let dns_lookups = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "weir_dns_lookups_total",
                    "DNS discovery lookups per cluster by result: ok, failed (a failed or \
                     empty answer keeps the nodes of the last good one)",
                ),
                &["cluster", "result"],
            )
            .expect("valid metric"),
        );
        let reloads = register(
            &r,
            IntCounterVec::new(
                Opts::new("weir_config_reloads_total", "Config reloads"),
                &["result"],
            )
            .expect("valid metric"),
        );
        for result in RELOAD_RESULTS {
            reloads.with_label_values(&[result]);
        }
        let acme_orders = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "weir_acme_orders_total",
                    "ACME certificate orders (issue and renewal) by result",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        for result in ACME_ORDER_RESULTS {
            acme_orders.with_label_values(&[result]);
        }
        let acme_certificate_expiry = register(
            &r,
            prometheus::IntGauge::new(
                "weir_acme_certificate_expiry_timestamp_seconds",
                "When the served ACME certificate expires (unix seconds; 0 = none)",
            )
            .expect("valid metric"),
        );
        let client_connections = register(
            &r,
            IntGauge::new("weir_client_connections", "Open client connections")
                .expect("valid metric"),
        );
        let max_connections = register(
            &r,
            IntGauge::new(
                "weir_max_connections",
                "Configured limit of open client connections",
            )
            .expect("valid metric"),
        );
        let refused_vec = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "weir_connections_refused_total",
                    "Client connections refused at accept",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let connections_refused =
            CONNECTION_REFUSALS.map(|reason| refused_vec.with_label_values(&[reason]));
        let attempts_aborted = register(
            &r,
            IntCounter::new(
                "weir_attempts_aborted_total",
                "Attempts ended by weir because their node stalled",
            )
            .expect("valid metric"),
        );
        let retry_budget_exhausted = register(
            &r,
            IntCounter::new(
                "weir_retry_budget_exhausted_total",
                "Extra attempts (retries) refused by the retry budget",
            )
            .expect("valid metric"),
        );
        let timeouts_vec = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "weir_attempt_timeouts_total",
                    "Attempts that missed a deadline: first_byte (no response header in time), \
                     body_idle (the body paused too long), attempt (the whole attempt too long)",
                ),
                &["kind"],
            )
            .expect("valid metric"),
        );
        let attempt_timeouts = ATTEMPT_DEADLINES.map(|k| timeouts_vec.with_label_values(&[k]));
        let hedges_sent = register(
            &r,
            IntCounter::new(
                "weir_hedges_sent_total",
                "Second attempts sent because the first had no response header after the hedge delay",
            )
            .expect("valid metric"),
        );
        let hedges_won = register(
            &r,
            IntCounter::new(
                "weir_hedges_won_total",
                "Hedges whose response header came first (the first attempt was cancelled)",
            )
            .expect("valid metric"),
        );
        let build_info = register(
            &r,
            IntGaugeVec::new(
                Opts::new("weir_build_info", "Build information (always 1)"),
                &["version"],
            )
            .expect("valid metric"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        Arc::new(Metrics {
            registry: r,
            requests,
            request_duration,
            inflight,
            concurrency_peak,
            rejected,
            attempts,
            response_duration,
            error_rate,
            selection_probability,
            node_inflight,
            retries,
            queue_depth,
            queue_capacity,
            queue_oldest_age,
            queue_enqueued,
            queue_replayed,
            queue_dead_letters,
            queue_remaining_at_shutdown,
            queue_store_up,
            registry_nodes,
            registry_events,
            upstream_healthy,
            health_checks,
            dns_lookups,
            reloads,
            acme_orders,
            acme_certificate_expiry,
            client_connections,
            max_connections,
            connections_refused,
            attempts_aborted,
            retry_budget_exhausted,
            attempt_timeouts,
            hedges_sent,
            hedges_won,
        })
    }

    /// Handles for one node of `cluster`, labelled with its normalised URL.
    pub fn node(&self, cluster: &str, upstream: &str) -> NodeMetrics {
        let l = [cluster, upstream];
        NodeMetrics {
            attempts: ATTEMPT_RESULTS.map(|result| {
                self.attempts
                    .with_label_values(&[cluster, upstream, result])
            }),
            response_duration: self.response_duration.with_label_values(&l),
            error_rate: self.error_rate.with_label_values(&l),
            selection_probability: self.selection_probability.with_label_values(&l),
            inflight: self.node_inflight.with_label_values(&l),
        }
    }

    /// Drops the series of a node that left its cluster.
    pub fn forget_node(&self, cluster: &str, upstream: &str) {
        let l = [cluster, upstream];
        for result in ATTEMPT_RESULTS {
            let _ = self
                .attempts
                .remove_label_values(&[cluster, upstream, result]);
        }
        let _ = self.response_duration.remove_label_values(&l);
        let _ = self.error_rate.remove_label_values(&l);
        let _ = self.selection_probability.remove_label_values(&l);
        let _ = self.node_inflight.remove_label_values(&l);
        let _ = self.upstream_healthy.remove_label_values(&l);
        for result in ["ok", "failed"] {
            let _ = self
                .health_checks
                .remove_label_values(&[cluster, upstream, result]);
        }
    }

    /// One finished client request. A request that got no response at all (the client went
    /// away first, nginx's 499) is counted as 4xx.
    #[inline]
    pub fn request_done(&self, status: u16, outcome: Outcome, seconds: f64) {
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            500..=599 => 4,
            _ => 3,
        };
        self.requests[class][outcome as usize].inc();
        self.request_duration[outcome as usize].observe(seconds);
    }

    pub fn rejected(&self, why: Rejection) {
        self.rejected[why as usize].inc();
    }

    /// A connection refused at accept: `per_client` or (otherwise) `max_connections`.
    pub fn connection_refused(&self, per_client: bool) {
        self.connections_refused[usize::from(per_client)].inc();
    }

    pub fn retry(&self, reason: RetryReason) {
        self.retries[reason.0 as usize].inc();
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("metrics encoding failed: {e}");
        }
        out
    }
}

// === reading back, for the status page ===

/// Label value → count, serialised as a JSON object in label order.
#[derive(Debug, Clone, Default)]
pub struct Counts(pub Vec<(&'static str, u64)>);

impl Counts {
    pub fn get(&self, label: &str) -> u64 {
        self.0.iter().find(|(l, _)| *l == label).map_or(0, |p| p.1)
    }
}

impl serde::Serialize for Counts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Counter values by label, in the order of their label constants.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Totals {
    pub requests: u64,
    pub by_outcome: Counts,
    pub by_code: Counts,
    pub rejected: Counts,
    pub retries: Counts,
    pub attempts_aborted: u64,
    pub retry_budget_exhausted: u64,
    pub attempt_timeouts: Counts,
    pub hedges_sent: u64,
    pub hedges_won: u64,
    pub reloads: Counts,
}

/// One queue as its gauges and counters show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueTotals {
    pub depth: i64,
    pub capacity: i64,
    pub oldest_age_seconds: f64,
    pub enqueued: u64,
    pub replayed: Counts,
    pub dead_letters: i64,
}

impl Metrics {
    /// The request-level counters, read (not reset) for `/status.json`.
    pub fn totals(&self) -> Totals {
        let by_outcome = Counts(
            OUTCOMES
                .iter()
                .enumerate()
                .map(|(o, name)| (*name, self.requests.iter().map(|c| c[o].get()).sum()))
                .collect(),
        );
        let by_code = Counts(
            CODE_CLASSES
                .iter()
                .zip(&self.requests)
                .map(|(name, row)| (*name, row.iter().map(IntCounter::get).sum()))
                .collect(),
        );
        Totals {
            requests: by_outcome.0.iter().map(|(_, n)| n).sum(),
            by_outcome,
            by_code,
            rejected: pairs(&REJECTION_REASONS, &self.rejected),
            retries: pairs(&RETRY_REASONS, &self.retries),
            attempts_aborted: self.attempts_aborted.get(),
            retry_budget_exhausted: self.retry_budget_exhausted.get(),
            attempt_timeouts: pairs(&ATTEMPT_DEADLINES, &self.attempt_timeouts),
            hedges_sent: self.hedges_sent.get(),
            hedges_won: self.hedges_won.get(),
            reloads: Counts(
                RELOAD_RESULTS
                    .iter()
                    .map(|r| (*r, self.reloads.with_label_values(&[r]).get()))
                    .collect(),
            ),
        }
    }

    /// The queue metrics of `queue` (`deferred` or `upfront`) as last set by the queues.
    pub fn queue_totals(&self, queue: &'static str) -> QueueTotals {
        QueueTotals {
            depth: self.queue_depth.with_label_values(&[queue]).get(),
            capacity: self.queue_capacity.with_label_values(&[queue]).get(),
            oldest_age_seconds: self.queue_oldest_age.with_label_values(&[queue]).get(),
            enqueued: self.queue_enqueued.with_label_values(&[queue]).get(),
            replayed: Counts(
                REPLAY_RESULTS
                    .iter()
                    .map(|r| (*r, self.queue_replayed.with_label_values(&[queue, r]).get()))
                    .collect(),
            ),
            dead_letters: self.queue_dead_letters.with_label_values(&[queue]).get(),
        }
    }
}

fn pairs(names: &[&'static str], counters: &[IntCounter]) -> Counts {
    Counts(
        names
            .iter()
            .zip(counters)
            .map(|(n, c)| (*n, c.get()))
            .collect(),
    )
}
