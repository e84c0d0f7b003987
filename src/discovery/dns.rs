//! DNS discovery (`clusters.NAME.dns`): the A and AAAA records of `name` (every address a node
//! on `port`), or the SRV records of `srv` (each target's addresses on the record's port, with
//! its weight). Looked up again when the answer's TTL runs out, at least every `refresh`
//! (hickory-resolver, its cache off so the TTL is this loop's). A lookup that fails or finds
//! nothing keeps the nodes of the last good answer (logged once per failing streak, counted)
//! and is tried again within 5 s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use tokio::time::Instant;

use crate::config::clusters::DnsConfig;
use crate::config::values::host_port;
use crate::config::{Scheme, Upstream};
use crate::metrics::Metrics;
use crate::runtime::Runtime;

/// Retry after a failed lookup (or sooner, with a shorter `refresh`).
const RETRY: Duration = Duration::from_secs(5);
/// The shortest wait a TTL may ask for.
const MIN_TTL: Duration = Duration::from_secs(1);
/// How long one lookup (and the SRV targets' lookups) may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

struct State {
    config: DnsConfig,
    next: Instant,
    nodes: Vec<Upstream>,
    failing: bool,
}

/// The nodes DNS gave each cluster, and when to look again.
#[derive(Default)]
pub struct Dns {
    state: Mutex<HashMap<Arc<str>, State>>,
}

impl Dns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, State>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The nodes of the last good answer, by cluster.
    pub fn members(&self) -> HashMap<String, Vec<Upstream>> {
        self.lock()
            .iter()
            .map(|(c, s)| (c.to_string(), s.nodes.clone()))
            .collect()
    }

    /// When the next lookup is due (none: no cluster uses DNS).
    pub fn next_due(&self) -> Option<Instant> {
        self.lock().values().map(|s| s.next).min()
    }

    /// Looks up the clusters that are due at `now`; whether any cluster's nodes changed.
    pub async fn tick(&self, runtime: &Runtime, metrics: &Metrics, now: Instant) -> bool {
        let mut due = Vec::new();
        {
            let mut state = self.lock();
            state.retain(|name, _| {
                runtime
                    .cluster_index(name)
                    .is_some_and(|i| runtime.cluster(i).settings.dns.is_some())
            });
            for c in &runtime.clusters {
                let Some(cfg) = &c.settings.dns else {
                    continue;
                };
                let s = state.entry(c.name.clone()).or_insert_with(|| State {
                    config: cfg.clone(),
                    next: now,
                    nodes: Vec::new(),
                    failing: false,
                });
                if s.config != *cfg {
                    // A reload changed what to look up: at once.
                    s.config = cfg.clone();
                    s.next = now;
                }
                if s.next <= now {
                    due.push((c.name.clone(), cfg.clone()));
                }
            }
        }
        let mut changed = false;
        for (name, cfg) in due {
            let result = tokio::time::timeout(LOOKUP_TIMEOUT, resolve(&cfg))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {LOOKUP_TIMEOUT:?}")))
                .and_then(|(nodes, ttl)| match nodes.is_empty() {
                    true => Err("no records".to_string()),
                    false => Ok((nodes, ttl)),
                });
            let what = cfg.name.as_deref().or(cfg.srv.as_deref()).unwrap_or("");
            let label = if result.is_ok() { "ok" } else { "failed" };
            metrics.dns_lookups.with_label_values(&[&name, label]).inc();
            let mut state = self.lock();
            let Some(s) = state.get_mut(&name) else {
                continue;
            };
            match result {
                Ok((mut nodes, ttl)) => {
                    nodes.sort_by(|a, b| a.url.cmp(&b.url));
                    nodes.dedup_by(|a, b| a.url == b.url);
                    let wait = ttl.clamp(MIN_TTL, cfg.refresh.max(MIN_TTL));
                    s.next = Instant::now() + wait;
                    let same = s.nodes.len() == nodes.len()
                        && s.nodes
                            .iter()
                            .zip(&nodes)
                            .all(|(a, b)| a.url == b.url && a.weight == b.weight);
                    if s.failing {
                        log::warn!("dns: cluster {name}: {what} resolves again");
                        s.failing = false;
                    }
                    if !same {
                        let urls: Vec<&str> = nodes.iter().map(|u| u.url.as_str()).collect();
                        log::info!(
                            "dns: cluster {name}: {what} -> {urls:?} (next lookup in {wait:?})"
                        );
                        s.nodes = nodes;
                        changed = true;
                    }
                }
                Err(e) => {
                    s.next = Instant::now() + RETRY.min(cfg.refresh);
                    if !s.failing {
                        log::warn!(
                            "dns: cluster {name}: lookup of {what} failed: {e}; keeping the {} nodes of the last good answer",
                            s.nodes.len()
                        );
                        s.failing = true;
                    }
                }
            }
        }
        changed
    }
}

/// A resolver that asks `server`, or the system's.
fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut builder = match server {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio().map_err(|e| format!("system resolver: {e}"))?,
    };
    let o = builder.options_mut();
    o.cache_size = 0;
    o.timeout = Duration::from_secs(1);
    o.attempts = 2;
    builder.build().map_err(|e| e.to_string())
}

fn fqdn(name: &str) -> String {
    match name.ends_with('.') {
        true => name.to_string(),
        false => format!("{name}."),
    }
}

/// The nodes `cfg` names now, and how long the answer is valid.
async fn resolve(cfg: &DnsConfig) -> Result<(Vec<Upstream>, Duration), String> {
    let r = resolver(cfg.server_addr()?)?;
    let now = std::time::Instant::now();
    let mut nodes = Vec::new();
    let mut ttl = cfg.refresh;
    if let (Some(name), Some(port)) = (&cfg.name, cfg.port) {
        let l = r.lookup_ip(fqdn(name)).await.map_err(|e| e.to_string())?;
        ttl = ttl.min(l.valid_until().saturating_duration_since(now));
        for ip in l.iter() {
            nodes.push(node(cfg.scheme, name, SocketAddr::new(ip, port), 1));
        }
    } else if let Some(srv) = &cfg.srv {
        let l = r
            .lookup(fqdn(srv), RecordType::SRV)
            .await
            .map_err(|e| e.to_string())?;
        ttl = ttl.min(l.valid_until().saturating_duration_since(now));
        for record in l.answers() {
            let RData::SRV(s) = &record.data else {
                continue;
            };
            let target = s.target.to_string();
            let ips = r
                .lookup_ip(s.target.clone())
                .await
                .map_err(|e| format!("SRV target {target}: {e}"))?;
            ttl = ttl.min(ips.valid_until().saturating_duration_since(now));
            let host = target.trim_end_matches('.');
            for ip in ips.iter() {
                nodes.push(node(
                    cfg.scheme,
                    host,
                    SocketAddr::new(ip, s.port),
                    u32::from(s.weight.max(1)),
                ));
            }
        }
    }
    Ok((nodes, ttl))
}

/// A node at `addr`, named `host` (its SNI and, with `upstream_host: rewrite`, its Host).
fn node(scheme: Scheme, host: &str, addr: SocketAddr, weight: u32) -> Upstream {
    let scheme_name = match scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    Upstream {
        url: format!(
            "{scheme_name}://{}",
            host_port(&addr.ip().to_string(), addr.port())
        ),
        scheme,
        host: host.trim_end_matches('.').to_ascii_lowercase(),
        port: addr.port(),
        addr,
        weight,
        tls_verify: true,
        ca: None,
        sni: None,
    }
}
