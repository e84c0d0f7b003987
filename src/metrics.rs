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

use crate::proxy::failures::ATTEMPT_RESULTS;

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
}
const REJECTION_REASONS: [&str; 3] = ["concurrency", "queue_full", "bad_request"];

const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const QUEUES: [&str; 2] = ["deferred", "upfront"];
const REPLAY_RESULTS: [&str; 4] = ["delivered", "failed_attempt", "expired", "dead_letter"];

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
    retries: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub queue_capacity: IntGaugeVec,
    pub queue_oldest_age: GaugeVec,
    pub queue_enqueued: IntCounterVec,
    pub queue_replayed: IntCounterVec,
    pub queue_dead_letters: IntGaugeVec,
    pub queue_remaining_at_shutdown: IntGaugeVec,
    pub reloads: IntCounterVec,
}

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
                &["upstream", "result"],
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
                &["upstream"],
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
                &["upstream"],
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
                &["upstream"],
            )
            .expect("valid metric"),
        );
        let retries = register(
            &r,
            IntCounterVec::new(
                Opts::new("weir_retries_total", "Attempts beyond the first"),
                &["reason"],
            )
            .expect("valid metric"),
        );
        for reason in &ATTEMPT_RESULTS[1..] {
            retries.with_label_values(&[reason]);
        }
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
        for q in QUEUES {
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
        let reloads = register(
            &r,
            IntCounterVec::new(
                Opts::new("weir_config_reloads_total", "Config reloads"),
                &["result"],
            )
            .expect("valid metric"),
        );
        for result in ["ok", "rejected"] {
            reloads.with_label_values(&[result]);
        }
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
            retries,
            queue_depth,
            queue_capacity,
            queue_oldest_age,
            queue_enqueued,
            queue_replayed,
            queue_dead_letters,
            queue_remaining_at_shutdown,
            reloads,
        })
    }

    /// Handles for one node, labelled with its normalised URL.
    pub fn node(&self, upstream: &str) -> NodeMetrics {
        NodeMetrics {
            attempts: ATTEMPT_RESULTS
                .map(|result| self.attempts.with_label_values(&[upstream, result])),
            response_duration: self.response_duration.with_label_values(&[upstream]),
            error_rate: self.error_rate.with_label_values(&[upstream]),
            selection_probability: self.selection_probability.with_label_values(&[upstream]),
        }
    }

    /// Drops the series of a node that left the config.
    pub fn forget_node(&self, upstream: &str) {
        for result in ATTEMPT_RESULTS {
            let _ = self.attempts.remove_label_values(&[upstream, result]);
        }
        let _ = self.response_duration.remove_label_values(&[upstream]);
        let _ = self.error_rate.remove_label_values(&[upstream]);
        let _ = self.selection_probability.remove_label_values(&[upstream]);
    }

    /// One finished client request. A request that got no response at all (the client went
    /// away first, nginx's 499) is counted as 4xx.
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

    pub fn retry(&self, reason: &str) {
        self.retries.with_label_values(&[reason]).inc();
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
