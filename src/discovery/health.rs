//! Active health checks (`clusters.NAME.health_check`), probed with pingora-load-balancing's
//! TCP and HTTP checks. A node that fails a probe is marked down in its cluster's router (no
//! attempts while another node is not down) and the failure is fed to its error score like a
//! failed attempt; when it passes again it is marked up and wins its traffic back as the score
//! decays, as after passive failures.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pingora::lb::health_check::{HealthCheck as Probe, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::Backend;
use tokio::time::Instant;

use crate::config::clusters::{CheckKind, HealthCheck};
use crate::config::Scheme;
use crate::metrics::Metrics;
use crate::routing::Outcome;
use crate::runtime::{Cluster, Node, Runtime};

/// When each cluster was last probed.
#[derive(Default)]
pub struct Health {
    last: Mutex<HashMap<Arc<str>, Instant>>,
}

impl Health {
    /// Probes every node of the clusters whose interval has passed by `now`; returns when
    /// those probes are done.
    pub async fn tick(&self, runtime: &Arc<Runtime>, metrics: &Metrics, now: Instant) {
        let mut due = Vec::new();
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            for (i, c) in runtime.clusters.iter().enumerate() {
                let Some(check) = &c.settings.health_check else {
                    continue;
                };
                let at = last.entry(c.name.clone()).or_insert(now - check.interval);
                if now.duration_since(*at) >= check.interval {
                    *at = now;
                    due.push(i);
                }
            }
        }
        let mut probes = tokio::task::JoinSet::new();
        for i in due {
            let cluster = runtime.cluster(i);
            let Some(check) = cluster.settings.health_check.clone() else {
                continue;
            };
            for node in 0..cluster.nodes.len() {
                let runtime = runtime.clone();
                let check = check.clone();
                probes.spawn(async move {
                    let cluster = runtime.cluster(i);
                    let started = std::time::Instant::now();
                    let result = probe(&cluster.nodes[node], &check).await;
                    (i, node, result, started.elapsed())
                });
            }
        }
        while let Some(done) = probes.join_next().await {
            if let Ok((i, node, result, elapsed)) = done {
                record(runtime.cluster(i), metrics, node, result, elapsed);
            }
        }
    }
}

/// The shortest interval of any health-checked cluster (how often the loop must look).
pub fn shortest_interval(runtime: &Runtime) -> Option<Duration> {
    runtime
        .clusters
        .iter()
        .filter_map(|c| c.settings.health_check.as_ref().map(|h| h.interval))
        .min()
}

fn record(
    cluster: &Cluster,
    metrics: &Metrics,
    node: usize,
    result: Result<(), String>,
    elapsed: Duration,
) {
    let Some(n) = cluster.nodes.get(node) else {
        return;
    };
    let url = &n.upstream.url;
    let labels = [&*cluster.name, url.as_str()];
    match result {
        Ok(()) => {
            metrics
                .health_checks
                .with_label_values(&[&*cluster.name, url.as_str(), "ok"])
                .inc();
            metrics.upstream_healthy.with_label_values(&labels).set(1);
            if cluster.router.set_down(node, false) {
                log::warn!(
                    "health check: {url} (cluster {}) passes again; it wins its traffic back as its error score decays",
                    cluster.name
                );
            }
        }
        Err(why) => {
            metrics
                .health_checks
                .with_label_values(&[&*cluster.name, url.as_str(), "failed"])
                .inc();
            metrics.upstream_healthy.with_label_values(&labels).set(0);
            // A failed probe counts against the node's score like a failed attempt.
            cluster.router.start(node);
            cluster.router.finish(node, Outcome::Failure, elapsed);
            if cluster.router.set_down(node, true) {
                log::warn!(
                    "health check: {url} (cluster {}) failed: {why}; no attempts go to it while another node passes",
                    cluster.name
                );
            }
        }
    }
}

/// One probe of one node, bounded by the check's timeout.
async fn probe(node: &Node, check: &HealthCheck) -> Result<(), String> {
    let u = &node.upstream;
    let tls = u.scheme == Scheme::Https;
    let backend = Backend {
        addr: pingora::protocols::l4::socket::SocketAddr::Inet(u.addr),
        weight: 1,
        ext: Default::default(),
    };
    let sni = u.sni.clone().unwrap_or_else(|| u.host.clone());
    let run = async {
        match check.kind {
            CheckKind::Tcp => {
                let mut p = match tls {
                    true => TcpHealthCheck::new_tls(&sni),
                    false => TcpHealthCheck::new(),
                };
                p.peer_template.options.connection_timeout = Some(check.timeout);
                p.peer_template.options.total_connection_timeout = Some(check.timeout);
                p.peer_template.options.verify_cert = u.tls_verify;
                p.peer_template.options.verify_hostname = u.tls_verify;
                p.check(&backend).await
            }
            CheckKind::Http => {
                let host = node.host_header.to_str().unwrap_or(&u.host).to_string();
                let mut p = HttpHealthCheck::new(&host, tls);
                if tls {
                    p.peer_template.sni = sni.clone();
                }
                let o = &mut p.peer_template.options;
                o.connection_timeout = Some(check.timeout);
                o.total_connection_timeout = Some(check.timeout);
                o.read_timeout = Some(check.timeout);
                o.write_timeout = Some(check.timeout);
                o.verify_cert = u.tls_verify;
                o.verify_hostname = u.tls_verify;
                if let Some(ca) = node.peer.options.ca.clone() {
                    o.ca = Some(ca);
                }
                let mut req =
                    pingora::http::RequestHeader::build("GET", check.path.as_bytes(), None)
                        .map_err(|e| {
                            pingora::Error::because(
                                pingora::ErrorType::InternalError,
                                "health check path",
                                e,
                            )
                        })?;
                req.append_header("Host", host.as_str())?;
                req.append_header("User-Agent", "weir-health-check")?;
                p.req = req;
                let expect = check.expect;
                p.validator = Some(Box::new(move |resp| {
                    if resp.status.as_u16() == expect {
                        Ok(())
                    } else {
                        pingora::Error::e_explain(
                            pingora::ErrorType::HTTPStatus(resp.status.as_u16()),
                            format!(
                                "status {} where {expect} was expected",
                                resp.status.as_u16()
                            ),
                        )
                    }
                }));
                p.check(&backend).await
            }
        }
    };
    match tokio::time::timeout(check.timeout, run).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}
