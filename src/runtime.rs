//! The running state built from one config: the nodes with their prebuilt Pingora peers and
//! metric handles, the router over them, and the values requests read on every attempt. Built
//! once per (re)load and shared read-only; live traffic and the queue replay both record their
//! attempts through [`Runtime::record_attempt`], so node scores, metrics and the error log
//! learn from both alike.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{HeaderName, HeaderValue};
use pingora::upstreams::peer::HttpPeer;

use crate::abort::{AbortRegistry, Swept, Terms};
use std::collections::HashMap;

use crate::config::{ClusterConfig, Config, Retries, Route, Scheme, Timeouts, Upstream};
use crate::failure::Failure;
use crate::logs::Logs;
use crate::metrics::{Metrics, NodeMetrics};
use crate::routing::{
    BudgetTerms, Clock, Outcome, RetryBudget, Router, RouterSettings, SystemClock,
};

/// Where the runtime in force lives: requests load it once at their start, a reload swaps it.
pub type RuntimeCell = Arc<ArcSwap<Runtime>>;

/// One upstream node.
pub struct Node {
    pub upstream: Upstream,
    /// Cloned for each attempt; options (timeouts, TLS) set once here.
    pub peer: HttpPeer,
    pub metrics: NodeMetrics,
    /// The peer of an upgrade request (WebSocket): its reads and writes wait up to
    /// `timeouts.tunnel_idle` (its header wait is weir's watch's, `timeouts.first_byte`).
    pub tunnel_peer: HttpPeer,
    /// `host:port` for `upstream_host: rewrite`.
    pub host_header: HeaderValue,
    /// Its attempts that may be aborted when it stalls (kept across reloads, like its state).
    pub aborts: Arc<AbortRegistry>,
}

/// One cluster: its nodes (static and dynamic), the router over them, and the timeouts and
/// retry rules in force for its attempts (its own keys over the top-level ones).
pub struct Cluster {
    pub name: Arc<str>,
    pub nodes: Vec<Node>,
    pub router: Router,
    /// Attempts per request (retries.max_attempts, 0 = one per node).
    pub attempts: usize,
    pub timeouts: Timeouts,
    pub retries: Retries,
    /// Its registry and health-check settings.
    pub settings: ClusterConfig,
}

/// Nodes that joined a cluster at run time (registry), by cluster name.
pub type Members = HashMap<String, Vec<Upstream>>;

/// Everything a request needs from the config, built once per (re)load and shared read-only.
pub struct Runtime {
    pub config: Config,
    /// `default` first, then the named clusters by name.
    pub clusters: Vec<Cluster>,
    /// `routes`, each with the index of its cluster.
    pub routes: Vec<(Route, usize)>,
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    /// Client keep-alive in whole seconds; `None`: off (close after each response).
    pub keepalive_secs: Option<u64>,
    /// The router's clock, handed on to the router of the next reload.
    pub clock: Arc<dyn Clock>,
}

impl Runtime {
    pub fn build(config: Config, metrics: &Metrics) -> Result<Runtime, String> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        Self::build_with_clock(config, metrics, clock)
    }

    /// A state for a reloaded config or changed membership: nodes that stay (same cluster,
    /// same URL) keep their router state and their watched attempts.
    pub fn build_carried(
        config: Config,
        metrics: &Metrics,
        old: &Runtime,
        members: &Members,
    ) -> Result<Runtime, String> {
        Self::assemble(config, metrics, old.clock.clone(), members, Some(old))
    }

    pub fn build_with_clock(
        config: Config,
        metrics: &Metrics,
        clock: Arc<dyn Clock>,
    ) -> Result<Runtime, String> {
        Self::assemble(config, metrics, clock, &Members::new(), None)
    }

    fn assemble(
        config: Config,
        metrics: &Metrics,
        clock: Arc<dyn Clock>,
        members: &Members,
        old: Option<&Runtime>,
    ) -> Result<Runtime, String> {
        let mut clusters = Vec::with_capacity(config.clusters.len() + 1);
        for (name, statics, settings) in config.cluster_list() {
            let mut upstreams: Vec<Upstream> = statics.to_vec();
            if settings.registry.is_some() || settings.dns.is_some() {
                for u in members.get(name).into_iter().flatten() {
                    if !upstreams.iter().any(|s| s.url == u.url) {
                        upstreams.push(u.clone());
                    }
                }
            }
            let old_cluster = old.and_then(|o| o.clusters.iter().find(|c| &*c.name == name));
            clusters.push(Cluster::build(
                name,
                upstreams,
                settings,
                &config,
                metrics,
                clock.clone(),
                old_cluster,
            )?);
        }
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let i = clusters
                    .iter()
                    .position(|c| *c.name == *r.cluster)
                    .unwrap_or(0);
                (r.clone(), i)
            })
            .collect();
        let mut response_headers = Vec::with_capacity(config.response_headers.len());
        for (name, value) in &config.response_headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("response header name {name:?}: {e}"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| format!("response header value {value:?}: {e}"))?;
            response_headers.push((name, value));
        }
        Ok(Runtime {
            keepalive_secs: config.timeouts.keepalive.map(|d| d.as_secs()),
            response_headers,
            clusters,
            routes,
            config,
            clock,
        })
    }

    pub fn is_failure_status(&self, status: u16) -> bool {
        self.config.routing.failure_statuses.contains(&status)
    }

    /// The cluster a request for `host` (as the client sent it, port allowed) and `path`
    /// goes to: the first matching route's, else `default` (0).
    pub fn route(&self, host: &[u8], path: &str) -> usize {
        if self.routes.is_empty() {
            return 0;
        }
        let host = std::str::from_utf8(host).unwrap_or("");
        let host = strip_port(host);
        let mut lower = [0u8; 256];
        let host = match host.len() <= lower.len() {
            true => {
                let l = &mut lower[..host.len()];
                l.copy_from_slice(host.as_bytes());
                l.make_ascii_lowercase();
                std::str::from_utf8(l).unwrap_or("")
            }
            false => "",
        };
        self.routes
            .iter()
            .find(|(r, _)| r.matches(host, path))
            .map_or(0, |(_, i)| *i)
    }

    /// Cluster `i` (the default cluster for an index out of range).
    pub fn cluster(&self, i: usize) -> &Cluster {
        &self.clusters[if i < self.clusters.len() { i } else { 0 }]
    }

    /// The index of the cluster named `name`.
    pub fn cluster_index(&self, name: &str) -> Option<usize> {
        self.clusters.iter().position(|c| &*c.name == name)
    }

    /// Every node of every cluster: (cluster, node).
    pub fn all_nodes(&self) -> impl Iterator<Item = (&Cluster, &Node)> {
        self.clusters
            .iter()
            .flat_map(|c| c.nodes.iter().map(move |n| (c, n)))
    }
}

/// A Host header without its port (`[v6]:p` keeps the brackets' content).
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

impl Cluster {
    fn build(
        name: &str,
        upstreams: Vec<Upstream>,
        settings: ClusterConfig,
        config: &Config,
        metrics: &Metrics,
        clock: Arc<dyn Clock>,
        old: Option<&Cluster>,
    ) -> Result<Cluster, String> {
        let timeouts = settings.timeouts.over(&config.timeouts);
        let retries = settings.retries.over(&config.retries);
        let mut nodes = Vec::with_capacity(upstreams.len());
        for u in &upstreams {
            let peer = peer_for(u, &timeouts)?;
            let mut tunnel_peer = peer.clone();
            tunnel_peer.options.read_timeout = Some(timeouts.tunnel_idle);
            tunnel_peer.options.write_timeout = Some(timeouts.tunnel_idle);
            let aborts = old
                .and_then(|o| o.nodes.iter().find(|n| n.upstream.url == u.url))
                .map(|n| n.aborts.clone())
                .unwrap_or_default();
            nodes.push(Node {
                peer,
                tunnel_peer,
                metrics: metrics.node(name, &u.url),
                host_header: HeaderValue::from_str(&host_port(u))
                    .map_err(|e| format!("upstream {}: bad host: {e}", u.url))?,
                aborts,
                upstream: u.clone(),
            });
        }
        let weights: Vec<u32> = upstreams.iter().map(|u| u.weight).collect();
        let router_settings = RouterSettings {
            algorithm: config.routing.algorithm,
            decay_half_life: config.routing.decay_half_life,
        };
        let mut router = match old {
            Some(o) => {
                let carry: Vec<Option<usize>> = upstreams
                    .iter()
                    .map(|u| o.nodes.iter().position(|n| n.upstream.url == u.url))
                    .collect();
                Router::with_carried_state(&weights, router_settings, clock, &o.router, &carry)
            }
            None => Router::new(&weights, router_settings, clock),
        };
        router.set_health_checked(settings.health_check.is_some());
        let attempts = match retries.max_attempts {
            0 => nodes.len().max(1),
            m => m as usize,
        };
        Ok(Cluster {
            name: Arc::from(name),
            nodes,
            router,
            attempts,
            timeouts,
            retries,
            settings,
        })
    }

    /// Attempts one request may make: `retries.max_attempts` (0 = one per node), at most one
    /// per node.
    pub fn attempt_limit(&self) -> usize {
        self.attempts.min(self.nodes.len())
    }

    /// Feeds one finished attempt (live or replayed) to the router, the metrics and the error
    /// log.
    pub fn record_attempt(
        &self,
        logs: &Logs,
        node: usize,
        result: Result<(), Failure>,
        elapsed: Duration,
    ) {
        let Some(n) = self.nodes.get(node) else {
            return;
        };
        match result {
            Ok(()) => {
                self.router.finish(node, Outcome::Success, elapsed);
                n.metrics.attempt_done(0, Some(elapsed.as_secs_f64()));
            }
            Err(failure) => {
                self.router.finish(node, Outcome::Failure, elapsed);
                // Only a failure status came with a response header to time.
                let header_after =
                    matches!(failure, Failure::Status(_)).then(|| elapsed.as_secs_f64());
                n.metrics.attempt_done(failure.result_index(), header_after);
                let (code, name) = failure.serviceq_code();
                logs.error_line(&n.upstream.url, code, name);
            }
        }
    }
}

impl Cluster {
    /// Feeds an attempt weir aborted because its node stalled: a timeout for the metrics and
    /// the error log, a failure for the node's score, but not progress (see
    /// `Router::finish_stalled`).
    pub fn record_aborted(&self, logs: &Logs, node: usize, elapsed: Duration) {
        let Some(n) = self.nodes.get(node) else {
            return;
        };
        self.router.finish_stalled(node, elapsed);
        let failure = Failure::Timeout;
        n.metrics.attempt_done(failure.result_index(), None);
        let (code, name) = failure.serviceq_code();
        logs.error_line(&n.upstream.url, code, name);
    }

    /// Feeds a deadline a node missed after its response header (a body that went silent
    /// or outlived the attempt): the attempt was already counted when its header came; this
    /// is one more failure for the node's score and a line in the error log.
    pub fn record_late_timeout(&self, logs: &Logs, node: usize, elapsed: Duration) {
        let Some(n) = self.nodes.get(node) else {
            return;
        };
        self.router.start(node);
        self.router.finish(node, Outcome::Failure, elapsed);
        let (code, name) = Failure::Timeout.serviceq_code();
        logs.error_line(&n.upstream.url, code, name);
    }
}

impl Runtime {
    /// The retry budget's terms (`retries.budget`, `retries.budget_floor`).
    pub fn budget_terms(&self) -> BudgetTerms {
        BudgetTerms {
            share: self.config.retries.budget,
            floor_per_sec: self.config.retries.budget_floor,
        }
    }

    /// One sweep of the attempt watch over every node of every cluster: attempts past a
    /// deadline end, and on stalled nodes the abortable ones older than the abort age —
    /// `max(retries.abort_after, 4 × the node's latency as of its last answer)`, so a node
    /// whose answers are slow by nature is not mistaken for a stuck one (and see
    /// `Router::should_abort`). Each abort on stall takes its retry from `budget` first.
    pub fn watch(&self, now: Instant, budget: &RetryBudget) -> Swept {
        let terms = self.budget_terms();
        let mut total = Swept::default();
        for cluster in &self.clusters {
            let retries = &cluster.retries;
            for (i, node) in cluster.nodes.iter().enumerate() {
                if node.aborts.is_empty() {
                    continue;
                }
                let stall_age = retries
                    .abort_on_stall
                    .then(|| {
                        let typical = cluster.router.answered_latency(i).unwrap_or_default() * 4;
                        retries.abort_after.max(typical)
                    })
                    .filter(|min_age| cluster.router.should_abort(i, *min_age));
                let grant = || budget.try_withdraw(terms);
                total += node.aborts.sweep(now, stall_age, grant);
            }
        }
        total
    }
}

impl Cluster {
    /// What the watch keeps an eye on for one attempt (`stall`: it may be aborted on stall).
    pub fn watch_terms(&self, stall: bool, upgrade: bool) -> Terms {
        let t = &self.timeouts;
        Terms {
            stall,
            first_byte: t.first_byte(),
            // The watch is the only limit on the node's reads (the peers carry no per-read
            // timeout); a tunnel's reads have `tunnel_idle`.
            body_idle: t.body_idle().filter(|_| !upgrade),
            deadline: t.request.filter(|_| !upgrade),
        }
    }
}

fn host_port(u: &Upstream) -> String {
    if u.host.contains(':') {
        format!("[{}]:{}", u.host, u.port)
    } else {
        format!("{}:{}", u.host, u.port)
    }
}

/// How long an idle pooled upstream connection is kept.
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

fn peer_for(u: &Upstream, timeouts: &Timeouts) -> Result<HttpPeer, String> {
    let tls = u.scheme == Scheme::Https;
    // Plain-HTTP peers carry no SNI, so cloning the peer per attempt allocates less.
    let sni = match tls {
        true => u.sni.clone().unwrap_or_else(|| u.host.clone()),
        false => String::new(),
    };
    let mut peer = HttpPeer::new(u.addr, tls, sni);
    let o = &mut peer.options;
    o.connection_timeout = Some(timeouts.connect);
    o.total_connection_timeout = Some(timeouts.connect);
    // No per-read timeout: the attempt watch (`abort.rs`) enforces `first_byte`, `body_idle`
    // and `request` for every attempt, and an attempt it cannot watch is not sent. Pingora
    // would otherwise arm a timer (a timer-wheel entry and two allocations) around every read
    // of every response, only to repeat a limit the watch already keeps. Writes keep theirs:
    // before its request is sent an attempt has only the whole-attempt deadline.
    o.read_timeout = None;
    o.write_timeout = timeouts.body_idle();
    o.idle_timeout = Some(UPSTREAM_IDLE);
    if tls {
        o.verify_cert = u.tls_verify;
        o.verify_hostname = u.tls_verify;
        // Without `ca`, Pingora's connector trusts the system roots (rustls-native-certs:
        // /etc/ssl/certs, or SSL_CERT_FILE / SSL_CERT_DIR).
        if let Some(ca) = &u.ca {
            let certs = crate::certs::load_upstream_ca(ca)
                .map_err(|e| format!("upstream {}: ca: {e}", u.url))?;
            o.ca = Some(certs);
        }
    }
    Ok(peer)
}
