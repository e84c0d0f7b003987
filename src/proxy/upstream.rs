//! The cluster as the proxy sees it: nodes with their prebuilt peers and metric handles, the
//! router over them, and the per-attempt work of `upstream_peer` and `upstream_request_filter`.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;

use crate::config::{Config, Scheme, TlsConfig, Upstream, UpstreamHost};
use crate::metrics::{Metrics, NodeMetrics};
use crate::routing::{Clock, Router, RouterSettings, SystemClock};

/// One upstream node.
pub struct Node {
    pub upstream: Upstream,
    /// Cloned for each attempt; options (timeouts, TLS) set once here.
    pub peer: HttpPeer,
    pub metrics: NodeMetrics,
    /// `host:port` for `upstream_host: rewrite`.
    pub host_header: HeaderValue,
}

/// Everything a request needs from the config, built once per (re)load and shared read-only.
pub struct State {
    pub config: Config,
    pub nodes: Vec<Node>,
    pub router: Router,
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    /// Attempts per request (retries.max_attempts, 0 = one per node).
    pub attempts: usize,
    pub keepalive_secs: Option<u64>,
    /// The router's clock, handed on to the router of the next reload.
    pub clock: Arc<dyn Clock>,
    /// What the TLS listeners serve (read from `tls.cert`/`tls.key` at every load).
    pub certificate: Option<Arc<rustls::sign::CertifiedKey>>,
}

impl State {
    pub fn build(config: Config, metrics: &Metrics) -> std::result::Result<State, String> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        Self::build_with_clock(config, metrics, clock)
    }

    /// A state for a reloaded config: nodes that stay (same URL) keep their router state.
    pub fn build_carried(
        config: Config,
        metrics: &Metrics,
        old: &State,
    ) -> std::result::Result<State, String> {
        let carry: Vec<Option<usize>> = config
            .upstreams
            .iter()
            .map(|u| old.nodes.iter().position(|o| o.upstream.url == u.url))
            .collect();
        Self::assemble(
            config,
            metrics,
            old.clock.clone(),
            |weights, settings, clock| {
                Router::with_carried_state(weights, settings, clock, &old.router, &carry)
            },
        )
    }

    pub fn build_with_clock(
        config: Config,
        metrics: &Metrics,
        clock: Arc<dyn Clock>,
    ) -> std::result::Result<State, String> {
        Self::assemble(config, metrics, clock, Router::new)
    }

    fn assemble(
        config: Config,
        metrics: &Metrics,
        clock: Arc<dyn Clock>,
        router: impl FnOnce(&[u32], RouterSettings, Arc<dyn Clock>) -> Router,
    ) -> std::result::Result<State, String> {
        let mut nodes = Vec::with_capacity(config.upstreams.len());
        for u in &config.upstreams {
            nodes.push(Node {
                peer: peer_for(u, &config)?,
                metrics: metrics.node(&u.url),
                host_header: HeaderValue::from_str(&host_port(u))
                    .map_err(|e| format!("upstream {}: bad host: {e}", u.url))?,
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
        let certificate = match &config.tls {
            Some(TlsConfig {
                cert: Some(cert),
                key: Some(key),
                ..
            }) => Some(crate::tls::load_certified_key(cert, key)?),
            _ => None,
        };
        let acme = config.tls.as_ref().and_then(|t| t.acme.as_ref());
        if acme.is_some_and(|a| a.cache_dir.is_none()) {
            return Err(
                "tls.acme needs cache_dir (where the certificate and account are kept)".into(),
            );
        }
        if certificate.is_none() && acme.is_none() && config.listen.iter().any(|l| l.tls) {
            return Err("tls: a TLS listener needs tls.cert and tls.key, or tls.acme".into());
        }
        Ok(State {
            certificate,
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

fn peer_for(u: &Upstream, config: &Config) -> std::result::Result<HttpPeer, String> {
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
            let certs = crate::tls::load_upstream_ca(ca)
                .map_err(|e| format!("upstream {}: ca: {e}", u.url))?;
            o.ca = Some(certs);
        }
    }
    Ok(peer)
}

/// What the forwarding headers say about the client's side of the connection.
#[derive(Debug, Clone, Copy)]
pub struct Downstream {
    pub ip: Option<std::net::IpAddr>,
    /// The client came in over a TLS listener (`X-Forwarded-Proto: https`).
    pub tls: bool,
}

/// Request headers for one attempt: forwarding headers, request id, trace context, Host policy.
/// `trace_started_here`: the traceparent is weir's own, so any client `tracestate` is dropped.
pub fn prepare_request(
    req: &mut RequestHeader,
    node: &Node,
    host_mode: UpstreamHost,
    client: Downstream,
    request_id: Option<&HeaderValue>,
    traceparent: Option<&HeaderValue>,
    trace_started_here: bool,
) -> Result<()> {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    if let Some(ip) = client.ip {
        use std::io::Write;
        let mut buf = smallvec::SmallVec::<[u8; 64]>::new();
        if let Some(prev) = req.headers.get(&XFF).filter(|v| !v.is_empty()) {
            buf.extend_from_slice(prev.as_bytes());
            buf.extend_from_slice(b", ");
        }
        let _ = write!(buf, "{ip}");
        let value = HeaderValue::from_bytes(&buf).map_err(|_| {
            Error::explain(
                pingora_error::ErrorType::InternalError,
                "bad X-Forwarded-For",
            )
        })?;
        req.insert_header(XFF, value)?;
    }
    req.insert_header(XFP, if client.tls { "https" } else { "http" })?;
    if let Some(id) = request_id {
        req.insert_header(
            HeaderName::from_static(super::respond::X_REQUEST_ID),
            id.clone(),
        )?;
    }
    if let Some(tp) = traceparent {
        req.insert_header(
            HeaderName::from_static(super::trace::TRACEPARENT),
            tp.clone(),
        )?;
        if trace_started_here {
            req.remove_header(super::trace::TRACESTATE);
        }
    }
    if host_mode == UpstreamHost::Rewrite {
        req.insert_header(http::header::HOST, node.host_header.clone())?;
    }
    Ok(())
}
