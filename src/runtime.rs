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

use crate::abort::AbortRegistry;
use crate::config::{Config, Scheme, Upstream};
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
    /// `host:port` for `upstream_host: rewrite`.
    pub host_header: HeaderValue,
    /// Its attempts that may be aborted when it stalls (kept across reloads, like its state).
    pub aborts: Arc<AbortRegistry>,
}

/// Everything a request needs from the config, built once per (re)load and shared read-only.
pub struct Runtime {
    pub config: Config,
    pub nodes: Vec<Node>,
    pub router: Router,
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    /// Attempts per request (retries.max_attempts, 0 = one per node).
    pub attempts: usize,
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

    /// A state for a reloaded config: nodes that stay (same URL) keep their router state.
    pub fn build_carried(
        config: Config,
        metrics: &Metrics,
        old: &Runtime,
    ) -> Result<Runtime, String> {
        let carry: Vec<Option<usize>> = config
            .upstreams
            .iter()
            .map(|u| old.nodes.iter().position(|o| o.upstream.url == u.url))
            .collect();
        let aborts = |u: &Upstream| {
            old.nodes
                .iter()
                .find(|o| o.upstream.url == u.url)
                .map(|o| o.aborts.clone())
        };
        Self::assemble(
            config,
            metrics,
            old.clock.clone(),
            aborts,
            |weights, settings, clock| {
                Router::with_carried_state(weights, settings, clock, &old.router, &carry)
            },
        )
    }

    pub fn build_with_clock(
        config: Config,
        metrics: &Metrics,
        clock: Arc<dyn Clock>,
    ) -> Result<Runtime, String> {
        Self::assemble(config, metrics, clock, |_| None, Router::new)
    }

    fn assemble(
        config: Config,
        metrics: &Metrics,
        clock: Arc<dyn Clock>,
        aborts: impl Fn(&Upstream) -> Option<Arc<AbortRegistry>>,
        router: impl FnOnce(&[u32], RouterSettings, Arc<dyn Clock>) -> Router,
    ) -> Result<Runtime, String> {
        let mut nodes = Vec::with_capacity(config.upstreams.len());
        for u in &config.upstreams {
            nodes.push(Node {
                peer: peer_for(u, &config)?,
                metrics: metrics.node(&u.url),
                host_header: HeaderValue::from_str(&host_port(u))
                    .map_err(|e| format!("upstream {}: bad host: {e}", u.url))?,
                aborts: aborts(u).unwrap_or_default(),
                upstream: u.clone(),
            });
        }
        let weights: Vec<u32> = config.upstreams.iter().map(|u| u.weight).collect();
        let router = router(
            &weights,
            RouterSettings {
                algorithm: config.routing.algorithm,
                decay_half_life: config.routing.decay_half_life,
            },
            clock.clone(),
        );
        let mut response_headers = Vec::with_capacity(config.response_headers.len());
        for (name, value) in &config.response_headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("response header name {name:?}: {e}"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| format!("response header value {value:?}: {e}"))?;
            response_headers.push((name, value));
        }
        Ok(Runtime {
            attempts: config.attempts_per_request(),
            keepalive_secs: config.timeouts.keepalive.map(|d| d.as_secs()),
            response_headers,
            router,
            nodes,
            config,
            clock,
        })
    }

    pub fn is_failure_status(&self, status: u16) -> bool {
        self.config.routing.failure_statuses.contains(&status)
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

impl Runtime {
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

    /// The retry budget's terms (`retries.budget`, `retries.budget_floor`).
    pub fn budget_terms(&self) -> BudgetTerms {
        BudgetTerms {
            share: self.config.retries.budget,
            floor_per_sec: self.config.retries.budget_floor,
        }
    }

    /// Aborts the abortable attempts on stalled nodes that are older than the abort age:
    /// `max(retries.abort_after, 4 × the node's latency as of its last answer)`, so a node whose answers
    /// are slow by nature is not mistaken for a stuck one (and see `Router::should_abort`). Each abort takes its retry from
    /// `budget` first. Returns how many were aborted and how many the budget refused.
    pub fn abort_stalled(&self, now: Instant, budget: &RetryBudget) -> (usize, usize) {
        let retries = &self.config.retries;
        let mut total = (0, 0);
        if !retries.abort_on_stall {
            return total;
        }
        let terms = self.budget_terms();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.aborts.is_empty() {
                continue;
            }
            let typical = self.router.answered_latency(i).unwrap_or_default() * 4;
            let min_age = retries.abort_after.max(typical);
            if !self.router.should_abort(i, min_age) {
                continue;
            }
            let grant = || budget.try_withdraw(terms);
            let (aborted, refused) = node.aborts.abort_older_than(now, min_age, grant);
            total.0 += aborted;
            total.1 += refused;
        }
        total
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

fn peer_for(u: &Upstream, config: &Config) -> Result<HttpPeer, String> {
    let tls = u.scheme == Scheme::Https;
    // Plain-HTTP peers carry no SNI, so cloning the peer per attempt allocates less.
    let sni = match tls {
        true => u.sni.clone().unwrap_or_else(|| u.host.clone()),
        false => String::new(),
    };
    let mut peer = HttpPeer::new(u.addr, tls, sni);
    let o = &mut peer.options;
    o.connection_timeout = Some(config.timeouts.connect);
    o.total_connection_timeout = Some(config.timeouts.connect);
    o.read_timeout = config.timeouts.request;
    o.write_timeout = config.timeouts.request;
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
