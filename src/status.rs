//! The live status page of the admin listener: `GET /` serves one self-contained HTML page
//! (`status.html`, no external assets) that polls `GET /status.json` every second.
//!
//! The JSON is built on demand from the same sources as `/metrics` (the router's live node
//! state and weir's own counters), so the page and Prometheus never disagree. It costs the
//! request path nothing: everything here is read at request time of the admin listener.
//!
//! ```json
//! { "version": "0.1.0", "started_at": "…", "uptime_seconds": 12.5, "algorithm": "feedback",
//!   "inflight": 3, "concurrency_peak": 2048,
//!   "requests": { "requests": 120, "by_outcome": {"proxied": 118, …}, "by_code": {"2xx": 117, …},
//!                 "rejected": {"concurrency": 0, …}, "retries": {"connect_refused": 4, …},
//!                 "reloads": {"ok": 0, "rejected": 0} },
//!   "upstreams": [ { "url": "http://10.0.0.1:80", "weight": 1, "error_rate": 0.63,
//!                    "error_score": 1.2, "selection_probability": 0.02, "inflight": 0,
//!                    "latency_ms": 1.4, "attempts": {"ok": 40, "connect_refused": 4, …},
//!                    "attempts_total": 44 } ],
//!   "queues": { "deferred": { "enabled": true, "depth": 0, "capacity": 2048,
//!                             "oldest_age_seconds": 0, "enqueued": 0,
//!                             "replayed": {"delivered": 0, …}, "dead_letters": 0 },
//!               "upfront": { … } } }
//! ```

use std::time::Instant;

use serde::Serialize;

use crate::failure::ATTEMPT_RESULTS;
use crate::metrics::{Counts, QueueTotals, Totals};
use crate::proxy::Gateway;
use crate::routing::Algorithm;

/// The page, served as is.
pub const PAGE: &str = include_str!("status.html");

/// When the process started, for `uptime_seconds`.
pub struct Started {
    at: Instant,
    wall: chrono::DateTime<chrono::Utc>,
}

impl Started {
    pub fn now() -> Started {
        Started {
            at: Instant::now(),
            wall: chrono::Utc::now(),
        }
    }
}

#[derive(Serialize)]
pub struct Status {
    pub version: &'static str,
    pub started_at: String,
    pub uptime_seconds: f64,
    pub algorithm: Algorithm,
    pub inflight: usize,
    pub concurrency_peak: usize,
    pub requests: Totals,
    /// Every node of every cluster, `default` first.
    pub upstreams: Vec<UpstreamStatus>,
    pub clusters: Vec<ClusterStatus>,
    pub queues: Queues,
}

#[derive(Serialize)]
pub struct UpstreamStatus {
    pub cluster: String,
    pub url: String,
    /// Joined through the registry (not in the config).
    pub registered: bool,
    /// Passes its health check; `None`: the cluster has none.
    pub healthy: Option<bool>,
    pub weight: u32,
    /// 0..1, as `weir_upstream_error_rate`.
    pub error_rate: f64,
    /// The router's raw score (decayed failures for feedback, ServiceQ's counter).
    pub error_score: f64,
    /// 0..1, as `weir_upstream_selection_probability`.
    pub selection_probability: f64,
    pub inflight: u32,
    /// The router's latency estimate (time to response header), before the first success none.
    pub latency_ms: Option<f64>,
    pub attempts: Counts,
    pub attempts_total: u64,
}

/// One cluster: its node count (registered ones included) and what routes to it.
#[derive(Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub nodes: usize,
    pub registered: usize,
    pub registry: bool,
    /// What DNS discovery looks up (`name:port` or the SRV name).
    pub dns: Option<String>,
    pub health_check: bool,
    /// Its routes as `host/path_prefix*` (in match order).
    pub routes: Vec<String>,
}

/// A route as one line: `api.example.com/v2/*`, `*/api/*`.
pub fn route_text(r: &crate::config::Route) -> String {
    format!(
        "{}{}*",
        r.host.as_deref().unwrap_or("*"),
        r.path_prefix.as_deref().unwrap_or("/")
    )
}

#[derive(Serialize)]
pub struct Queues {
    pub deferred: QueueStatus,
    pub upfront: QueueStatus,
}

#[derive(Serialize)]
pub struct QueueStatus {
    pub enabled: bool,
    #[serde(flatten)]
    pub totals: QueueTotals,
}

/// The current status of `gateway`.
pub fn status(gateway: &Gateway, started: &Started) -> Status {
    // The queues (and any other scrape-time gauge) are read from the metrics they keep current.
    gateway.refresh_gauges();
    let state = gateway.runtime();
    let mut upstreams = Vec::new();
    let mut clusters = Vec::new();
    let registered = gateway.discovery.members();
    for cluster in &state.clusters {
        let router = &cluster.router;
        let probabilities = router.selection_probabilities();
        let dynamic = registered.get(&*cluster.name);
        clusters.push(ClusterStatus {
            name: cluster.name.to_string(),
            nodes: cluster.nodes.len(),
            registered: dynamic.map_or(0, Vec::len),
            registry: cluster.settings.registry.is_some(),
            dns: cluster
                .settings
                .dns
                .as_ref()
                .map(|d| match (&d.name, d.port, &d.srv) {
                    (Some(n), Some(p), _) => format!("{n}:{p}"),
                    (_, _, Some(s)) => format!("SRV {s}"),
                    _ => String::new(),
                }),
            health_check: cluster.settings.health_check.is_some(),
            routes: state
                .routes
                .iter()
                .filter(|(_, i)| state.clusters[*i].name == cluster.name)
                .map(|(r, _)| route_text(r))
                .collect(),
        });
        upstreams.extend(cluster.nodes.iter().enumerate().map(|(i, node)| {
            let attempts = Counts(
                ATTEMPT_RESULTS
                    .iter()
                    .zip(&node.metrics.attempts)
                    .map(|(label, c)| (*label, c.get()))
                    .collect(),
            );
            UpstreamStatus {
                cluster: cluster.name.to_string(),
                registered: dynamic.is_some_and(|d| d.iter().any(|u| u.url == node.upstream.url)),
                healthy: cluster
                    .settings
                    .health_check
                    .as_ref()
                    .map(|_| !router.is_down(i)),
                url: node.upstream.url.clone(),
                weight: node.upstream.weight,
                error_rate: router.error_rate(i),
                error_score: router.error_score(i),
                selection_probability: probabilities.get(i).copied().unwrap_or(0.0),
                inflight: router.inflight(i),
                latency_ms: router.latency(i).map(|d| d.as_secs_f64() * 1e3),
                attempts_total: attempts.0.iter().map(|(_, n)| n).sum(),
                attempts,
            }
        }));
    }
    let metrics = &gateway.metrics;
    let config = &state.config;
    Status {
        version: env!("CARGO_PKG_VERSION"),
        started_at: started
            .wall
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        uptime_seconds: (started.at.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        algorithm: config.routing.algorithm,
        inflight: gateway.inflight(),
        concurrency_peak: config.limits.concurrency_peak,
        requests: metrics.totals(),
        upstreams,
        clusters,
        queues: Queues {
            deferred: QueueStatus {
                enabled: config.deferred_queue.enabled,
                totals: metrics.queue_totals("deferred"),
            },
            upfront: QueueStatus {
                enabled: config.upfront_queue.enabled,
                totals: metrics.queue_totals("upfront"),
            },
        },
    }
}

/// `status` as the JSON body of `/status.json`.
pub fn status_json(gateway: &Gateway, started: &Started) -> Vec<u8> {
    serde_json::to_vec(&status(gateway, started)).unwrap_or_else(|e| {
        log::error!("status encoding failed: {e}");
        b"{}".to_vec()
    })
}
