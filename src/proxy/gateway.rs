//! The gateway: what the proxy hooks, the admin listener and the background services share.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::admission::Admission;
use super::hedge::Hedges;
use crate::abort::Swept;
use crate::acme::AcmeState;
use crate::certs::CertStore;
use crate::conn::{ConnShared, Connections};
use crate::discovery::Discovery;
use crate::logs::Logs;
use crate::metrics::Metrics;
use crate::queue::Queues;
use crate::routing::{RetryBudget, SystemClock};
use crate::runtime::{Runtime, RuntimeCell};

/// Cheap to clone: the proxy service and the admin/background services share one gateway.
#[derive(Clone)]
pub struct Gateway {
    runtime: RuntimeCell,
    pub(super) admission: Admission,
    pub metrics: Arc<Metrics>,
    pub logs: Arc<Logs>,
    /// Capacities are fixed at start-up; everything else about the queues follows reloads.
    pub queues: Arc<Queues>,
    /// ACME challenge answers (empty without `tls.acme`).
    pub acme: Arc<AcmeState>,
    /// The certificates the TLS listeners serve.
    pub certs: Arc<CertStore>,
    /// Open client connections of every listener.
    pub conns: Arc<Connections>,
    /// What each client connection needs of the gateway.
    pub conn_shared: Arc<ConnShared>,
    /// One retry budget for every extra attempt, across reloads.
    pub budget: Arc<RetryBudget>,
    /// Hedged requests: those waiting for their delay, the hedges' pool and the quantile.
    pub hedges: Arc<Hedges>,
    /// Registered nodes and health checks; rebuilds the runtime when membership changes.
    pub discovery: Arc<Discovery>,
}

impl Gateway {
    /// Counts what one sweep of the attempt watch did that no request counts: the retries
    /// the budget refused. (Each aborted or timed-out attempt is counted by its request, when
    /// it learns of it: a client that has its answer finds it counted.)
    pub fn count_swept(&self, swept: Swept) {
        self.metrics
            .retry_budget_exhausted
            .inc_by(swept.refused as u64);
    }

    /// A gateway with memory queues (tests, the fuzzer).
    pub fn new(runtime: Runtime, metrics: Arc<Metrics>, logs: Arc<Logs>) -> Gateway {
        let queues = Arc::new(Queues::memory(
            runtime.config.deferred_queue.capacity,
            runtime.config.upfront_queue.capacity,
            &metrics,
        ));
        Gateway::with_queues(runtime, metrics, logs, queues)
    }

    /// A gateway with `queues` (see [`Queues::open`]).
    pub fn with_queues(
        runtime: Runtime,
        metrics: Arc<Metrics>,
        logs: Arc<Logs>,
        queues: Arc<Queues>,
    ) -> Gateway {
        set_config_gauges(&metrics, &runtime);
        let conn_shared = Arc::new(ConnShared {
            metrics: metrics.clone(),
            logs: logs.clone(),
        });
        let cell: RuntimeCell = Arc::new(ArcSwap::from_pointee(runtime));
        Gateway {
            discovery: Arc::new(Discovery::new(cell.clone(), metrics.clone())),
            runtime: cell,
            admission: Admission::default(),
            metrics,
            logs,
            conns: Arc::default(),
            conn_shared,
            budget: Arc::new(RetryBudget::new(Arc::new(SystemClock::new()))),
            hedges: Arc::default(),
            queues,
            acme: Arc::default(),
            certs: Arc::default(),
        }
    }

    /// The runtime in force now.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// The cell the runtime lives in, for readers outside requests (the queue replay).
    pub fn runtime_cell(&self) -> RuntimeCell {
        self.runtime.clone()
    }

    /// Installs a new runtime (config reload); requests in flight keep the one they started on.
    pub fn swap_runtime(&self, runtime: Runtime) {
        set_config_gauges(&self.metrics, &runtime);
        self.runtime.store(Arc::new(runtime));
    }

    pub fn inflight(&self) -> usize {
        self.admission.inflight()
    }

    /// Refreshes the gauges that describe live state; called before each scrape.
    pub fn refresh_gauges(&self) {
        self.metrics.inflight.set(self.inflight() as i64);
        self.metrics
            .client_connections
            .set(self.conns.open() as i64);
        let runtime = self.runtime();
        self.discovery.registry.refresh_gauges(&runtime);
        for cluster in &runtime.clusters {
            let router = &cluster.router;
            let probabilities = router.selection_probabilities();
            for (i, node) in cluster.nodes.iter().enumerate() {
                node.metrics.error_rate.set(router.error_rate(i));
                node.metrics.inflight.set(i64::from(router.inflight(i)));
                node.metrics
                    .selection_probability
                    .set(probabilities.get(i).copied().unwrap_or(0.0));
            }
        }
        self.queues.deferred.refresh_gauges();
        self.queues.upfront.refresh_gauges();
    }
}

/// The gauges that state configured limits: the concurrency peak and each queue's capacity
/// (0 for a queue that is off).
fn set_config_gauges(metrics: &Metrics, runtime: &Runtime) {
    let config = &runtime.config;
    metrics
        .concurrency_peak
        .set(config.limits.concurrency_peak as i64);
    metrics
        .max_connections
        .set(config.limits.max_connections as i64);
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
