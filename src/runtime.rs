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
    /// The peer of an upgrade request (WebSocket): its reads and writes wait up to
    /// `timeouts.tunnel_idle` (its header wait is weir's watch's, `timeouts.first_byte`).
    pub tunnel_peer: HttpPeer,
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
            let peer = peer_for(u, &config)?;
            let mut tunnel_peer = peer.clone();
            tunnel_peer.options.read_timeout = Some(config.timeouts.tunnel_idle);
            tunnel_peer.options.write_timeout = Some(config.timeouts.tunnel_idle);
            nodes.push(Node {
                peer,
                tunnel_peer,
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

    /// The retry budget's terms (`retries.budget`, `retries.budget_floor`).
    pub fn budget_terms(&self) -> BudgetTerms {
        BudgetTerms {
            share: self.config.retries.budget,
            floor_per_sec: self.config.retries.budget_floor,
        }
    }

    /// One sweep of the attempt watch over every node: attempts past a deadline end, and on
    /// stalled nodes the abortable ones older than the abort age — `max(retries.abort_after,
    /// 4 × the node's latency as of its last answer)`, so a node whose answers are slow by
    /// nature is not mistaken for a stuck one (and see `Router::should_abort`). Each abort on
    /// stall takes its retry from `budget` first.
    pub fn watch(&self, now: Instant, budget: &RetryBudget) -> Swept {
        let retries = &self.config.retries;
        let terms = self.budget_terms();
        let mut total = Swept::default();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.aborts.is_empty() {
                continue;
            }
            let stall_age = retries
                .abort_on_stall
                .then(|| {
                    let typical = self.router.answered_latency(i).unwrap_or_default() * 4;
                    retries.abort_after.max(typical)
                })
                .filter(|min_age| self.router.should_abort(i, *min_age));
            let grant = || budget.try_withdraw(terms);
            total += node.aborts.sweep(now, stall_age, grant);
        }
        total
    }

    /// What the watch keeps an eye on for one attempt (`stall`: it may be aborted on stall).
    pub fn watch_terms(&self, stall: bool, upgrade: bool) -> Terms {
        let t = &self.config.timeouts;
        Terms {
            stall,
            first_byte: t.first_byte(),
            // Pingora's per-read timeout already is exactly the body's idle limit when the
            // two coincide; a tunnel's reads have `tunnel_idle`.
            body_idle: t
                .body_idle()
                .filter(|idle| !upgrade && t.per_read() != Some(*idle)),
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
    o.read_timeout = config.timeouts.per_read();
    o.write_timeout = config.timeouts.body_idle();
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
