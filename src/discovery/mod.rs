//! Dynamic membership: nodes that join and leave clusters at run time.
//!
//! The registry (`registry.rs`: nodes register with a PUT on the admin listener and expire
//! without a renewal) and the active health checks (`health.rs`) live here, outside any
//! [`Runtime`]: a membership change builds a new runtime from the running config and the
//! current members, carrying every remaining node's router state, and swaps it in, like a
//! reload. A reload builds from the new file and the same members, so entries survive it.
//! Requests in flight keep the runtime they started on: a node that leaves is drained, not cut.

pub mod dns;
pub mod health;
pub mod registry;
pub mod shared;

use std::sync::{Arc, Mutex, MutexGuard};

use crate::metrics::Metrics;
use crate::runtime::{Members, Runtime, RuntimeCell};

pub use registry::{Registry, RegistryError};

/// The membership of every cluster and the one place runtimes are rebuilt for it.
pub struct Discovery {
    cell: RuntimeCell,
    metrics: Arc<Metrics>,
    pub registry: Registry,
    pub health: health::Health,
    pub dns: dns::Dns,
    /// Serialises rebuilds (membership changes and reloads).
    rebuild: Mutex<()>,
}

impl Discovery {
    pub fn new(cell: RuntimeCell, metrics: Arc<Metrics>) -> Discovery {
        Discovery {
            cell,
            registry: Registry::new(metrics.clone()),
            health: health::Health::default(),
            dns: dns::Dns::default(),
            metrics,
            rebuild: Mutex::new(()),
        }
    }

    /// Held while a runtime is built and swapped in (a reload takes it too).
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        self.rebuild.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The nodes that joined at run time (registry, DNS), by cluster.
    pub fn members(&self) -> Members {
        let mut m = self.registry.members();
        for (cluster, nodes) in self.dns.members() {
            m.entry(cluster).or_default().extend(nodes);
        }
        m
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.cell.load_full()
    }

    /// Membership changed: the running config with the current members, swapped in.
    pub fn rebuild(&self) {
        let _guard = self.lock();
        let old = self.cell.load_full();
        match Runtime::build_carried(old.config.clone(), &self.metrics, &old, &self.members()) {
            Ok(new) => {
                forget_departed(&self.metrics, &old, &new);
                self.cell.store(Arc::new(new));
            }
            Err(e) => log::error!("membership change not applied, the running nodes stay: {e}"),
        }
    }
}

impl Discovery {
    /// The background loop: expires registry entries when their liveness runs out and runs
    /// the health checks on their intervals, until `stop` resolves.
    pub async fn run(&self, stop: impl std::future::Future<Output = ()>) {
        let expiry = async {
            loop {
                let runtime = self.runtime();
                let (expired, next) = self.registry.sweep(&runtime, tokio::time::Instant::now());
                drop(runtime);
                if expired {
                    self.rebuild();
                }
                // Until the next deadline or a registration (which may come sooner).
                self.registry.wait(next).await;
            }
        };
        let health = async {
            loop {
                let runtime = self.runtime();
                self.health
                    .tick(&runtime, &self.metrics, tokio::time::Instant::now())
                    .await;
                drop(runtime);
                tokio::time::sleep(HEALTH_TICK).await;
            }
        };
        let dns = async {
            loop {
                let runtime = self.runtime();
                if self
                    .dns
                    .tick(&runtime, &self.metrics, tokio::time::Instant::now())
                    .await
                {
                    self.rebuild();
                }
                drop(runtime);
                // The next lookup due, looked at again at least every DNS_TICK (a reload may
                // add a cluster).
                let wake = self.dns.next_due().map_or(DNS_TICK, |at| {
                    at.saturating_duration_since(tokio::time::Instant::now())
                        .min(DNS_TICK)
                });
                tokio::time::sleep(wake).await;
            }
        };
        let shared = async {
            loop {
                let runtime = self.runtime();
                if self.registry.sync_shared(&runtime).await {
                    self.rebuild();
                }
                drop(runtime);
                tokio::time::sleep(SHARED_POLL).await;
            }
        };
        tokio::select! {
            _ = expiry => {}
            _ = health => {}
            _ = shared => {}
            _ = dns => {}
            _ = stop => {}
        }
    }
}

/// How often the instances read the shared (`storage: redis`) registries: a node registered
/// on one instance is routed by the others within this.
const SHARED_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// The longest the DNS loop sleeps between two looks at what is due.
const DNS_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// How often the loop looks whether a cluster's health check is due (its interval's
/// granularity).
const HEALTH_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// Drops the metric series of the nodes of `old` that `new` does not have.
pub fn forget_departed(metrics: &Metrics, old: &Runtime, new: &Runtime) {
    for (c, n) in old.all_nodes() {
        let stays = new
            .all_nodes()
            .any(|(nc, nn)| nc.name == c.name && nn.upstream.url == n.upstream.url);
        if !stays {
            metrics.forget_node(&c.name, &n.upstream.url);
        }
    }
}
