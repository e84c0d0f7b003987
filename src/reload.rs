//! Config reload (SIGHUP, `weir reload`): read, validate, swap atomically.
//!
//! A reload builds a complete new [`Runtime`] from the file and swaps it in with one atomic
//! store. Requests in flight keep the state they started on to their end, so a node removed by
//! the reload is drained, not cut. Nodes that stay (same normalised URL) keep their error
//! score, latency estimate and in-flight count. A file that does not load is rejected as a
//! whole: the running config stays, the rejection is logged and counted.
//!
//! The TLS certificate and key files are read again by every reload, so renewed certificates
//! are served to new connections (a pair that does not load rejects the reload, and the
//! running certificate stays).
//!
//! Settings bound to sockets, threads or files opened at start (listen addresses and whether
//! they are TLS, admin listener, server threads/pid/upgrade socket, log destinations) cannot
//! change in place;
//! a reload that changes them keeps the running values and says so: `weir run -u` (a
//! zero-downtime upgrade) applies them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::certs;
use crate::config::{Config, Listener};
use crate::proxy::Gateway;
use crate::runtime::Runtime;

/// What a successful reload changed and what it could not.
#[derive(Debug, Default)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub kept: usize,
    /// The certificate files now hold another certificate, served to new connections.
    pub certificate_changed: bool,
    /// Settings that need `weir run -u`; the running values were kept.
    pub needs_restart: Vec<&'static str>,
}

pub struct Reloader {
    path: PathBuf,
    /// `--listen` from the command line, which outlives any file.
    listen_override: Option<Vec<Listener>>,
    gateway: Arc<Gateway>,
}

impl Reloader {
    pub fn new(path: &Path, listen_override: Option<Vec<Listener>>, gateway: Arc<Gateway>) -> Self {
        Reloader {
            path: path.to_path_buf(),
            listen_override,
            gateway,
        }
    }

    /// Reloads the file; on any error the running config stays and the error is returned.
    pub fn reload(&self) -> Result<ReloadReport, String> {
        let result = self.try_reload();
        let label = if result.is_ok() { "ok" } else { "rejected" };
        self.gateway
            .metrics
            .reloads
            .with_label_values(&[label])
            .inc();
        result
    }

    fn try_reload(&self) -> Result<ReloadReport, String> {
        let loaded = Config::load(&self.path).map_err(|e| e.to_string())?;
        for w in &loaded.warnings {
            log::warn!("reload: {}: {}", self.path.display(), w.message);
        }
        let mut config = loaded.config;
        if let Some(listen) = &self.listen_override {
            config.listen = listen.clone();
        }
        // Membership changes wait for this reload (and it builds on the current members).
        let discovery = self.gateway.discovery.clone();
        let _rebuilding = discovery.lock();
        let old = self.gateway.runtime();
        let needs_restart = keep_restart_only_settings(&mut config, &old.config);
        let new =
            Runtime::build_carried(config, &self.gateway.metrics, &old, &discovery.members())?;
        // Read again on every reload: how a renewed certificate reaches new connections.
        let pair = certs::load_configured(&new.config)?;
        let leaf = |c: &Option<std::sync::Arc<rustls::sign::CertifiedKey>>| {
            c.as_ref().and_then(|c| c.cert.first().cloned())
        };
        let mut report = ReloadReport {
            needs_restart,
            certificate_changed: leaf(&pair) != leaf(&self.gateway.certs.files()),
            ..ReloadReport::default()
        };
        // A node is named by its URL in the default cluster, `cluster url` in the others.
        let name = |c: &crate::runtime::Cluster, url: &str| match &*c.name {
            crate::config::DEFAULT_CLUSTER => url.to_string(),
            other => format!("{other} {url}"),
        };
        let has = |rt: &Runtime, c: &crate::runtime::Cluster, url: &str| {
            rt.all_nodes()
                .any(|(rc, n)| rc.name == c.name && n.upstream.url == url)
        };
        for (c, n) in new.all_nodes() {
            if has(&old, c, &n.upstream.url) {
                report.kept += 1;
            } else {
                report.added.push(name(c, &n.upstream.url));
            }
        }
        for (c, o) in old.all_nodes() {
            if !has(&new, c, &o.upstream.url) {
                report.removed.push(name(c, &o.upstream.url));
            }
        }
        crate::discovery::forget_departed(&self.gateway.metrics, &old, &new);
        self.gateway.swap_runtime(new);
        self.gateway.certs.set_files(pair);
        Ok(report)
    }

    /// Reloads and logs the outcome (the SIGHUP path).
    pub fn reload_and_log(&self) {
        match self.reload() {
            Ok(r) => {
                log::warn!(
                    "config reloaded from {}: {} nodes kept, added {:?}, removed {:?}",
                    self.path.display(),
                    r.kept,
                    r.added,
                    r.removed
                );
                if r.certificate_changed {
                    log::warn!("reload: new TLS certificate in service for new connections");
                }
                for setting in r.needs_restart {
                    log::warn!(
                        "reload: `{setting}` changed but cannot change in place; the running value stays until `weir run -u` (zero-downtime upgrade)"
                    );
                }
            }
            Err(e) => log::error!("config reload rejected, the running config stays: {e}"),
        }
    }
}

/// Copies the running values of settings that only a restart can change into `new`, and names
/// the ones that differed.
fn keep_restart_only_settings(new: &mut Config, running: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $name:literal) => {
            if new.$($field).+ != running.$($field).+ {
                changed.push($name);
                new.$($field).+ = running.$($field).+.clone();
            }
        };
    }
    keep!(listen, "listen");
    // The certificate files are read again by every reload (certs::load_configured), which is how a
    // renewed certificate reaches new connections; turning TLS on or off is the listeners'.
    if new.tls.is_some() != running.tls.is_some() {
        changed.push("tls");
        new.tls = running.tls.clone();
    }
    if let (Some(n), Some(r)) = (&mut new.tls, &running.tls) {
        if n.acme != r.acme {
            changed.push("tls.acme");
            n.acme = r.acme.clone();
        }
    }
    keep!(admin, "admin");
    keep!(log, "log");
    keep!(server, "server");
    keep!(deferred_queue.capacity, "deferred_queue.capacity");
    keep!(upfront_queue.capacity, "upfront_queue.capacity");
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_settings_keep_their_running_values() {
        let running = Config::embedded_default();
        let mut new = running.clone();
        new.listen = vec![Listener {
            addr: "127.0.0.1:1".into(),
            tls: false,
        }];
        new.server.threads = Some(new.server.worker_threads() + 1);
        new.limits.concurrency_peak = 7;
        let changed = keep_restart_only_settings(&mut new, &running);
        assert_eq!(changed, vec!["listen", "server"]);
        assert_eq!(new.listen, running.listen);
        assert_eq!(new.server, running.server);
        assert_eq!(new.limits.concurrency_peak, 7, "live settings change");
    }

    #[test]
    fn certificate_paths_reload_but_turning_tls_on_or_acme_changes_need_a_restart() {
        use crate::config::TlsConfig;
        let tls = |cert: &str| TlsConfig {
            cert: Some(cert.into()),
            key: Some("/k.pem".into()),
            acme: None,
        };
        let mut running = Config::embedded_default();
        running.tls = Some(tls("/old.pem"));
        let mut new = running.clone();
        new.tls = Some(tls("/renewed.pem"));
        assert!(keep_restart_only_settings(&mut new, &running).is_empty());
        assert_eq!(new.tls, Some(tls("/renewed.pem")), "new files are read");

        let mut off = running.clone();
        off.tls = None;
        assert_eq!(keep_restart_only_settings(&mut off, &running), vec!["tls"]);
        assert_eq!(off.tls, running.tls);

        let mut acme = running.clone();
        if let Some(t) = &mut acme.tls {
            t.acme = Some(crate::config::AcmeConfig {
                directory: None,
                email: None,
                domains: vec!["a.example".into()],
                cache_dir: None,
                renew_before: std::time::Duration::from_secs(1),
            });
        }
        assert_eq!(
            keep_restart_only_settings(&mut acme, &running),
            vec!["tls.acme"]
        );
        assert_eq!(acme.tls, running.tls);
    }
}
