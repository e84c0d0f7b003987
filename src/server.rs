//! Assembles the Pingora server: the proxy service on every listener, the admin service
//! (metrics, health, queues) and the background services (replay of each queue, signals).

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use std::path::PathBuf;

use crate::admin::AdminApp;
use crate::config::{Config, Listener};
use crate::logs::Logs;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::queue::delivery::ClusterDelivery;
use crate::queue::replay::{Replay, ReplaySettings};
use crate::queue::QueueKind;
use crate::reload::Reloader;
use crate::runtime::Runtime;

/// Pingora's own cap on attempts per request. weir's retry policy decides every retry itself
/// from the runtime in force (so `retries.max_attempts` and the node list reload live); this
/// only stops a runaway loop.
const PINGORA_MAX_RETRIES: usize = 1024;

/// What `weir check` verifies beyond the file itself: the runtime builds (upstream CA files,
/// header values) and the TLS pair loads.
pub fn check(config: &Config) -> Result<(), String> {
    Runtime::build(config.clone(), &Metrics::new())?;
    crate::certs::load_configured(config)?;
    Ok(())
}

/// What `weir run` needs beyond the config.
#[derive(Default, Clone)]
pub struct RunOptions {
    pub upgrade: bool,
    pub daemon: bool,
    /// The file to re-read on SIGHUP (none: reload is off, e.g. for the demo).
    pub config_path: Option<PathBuf>,
    /// `--listen`, which applies to reloaded files too.
    pub listen_override: Option<Vec<Listener>>,
}

/// Pingora's own settings, from weir's config.
fn server_conf(config: &Config, opts: &RunOptions) -> ServerConf {
    let s = &config.server;
    ServerConf {
        threads: s.threads,
        pid_file: s.pid_file.to_string_lossy().into_owned(),
        upgrade_sock: s.upgrade_sock.to_string_lossy().into_owned(),
        grace_period_seconds: Some(s.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout.as_secs()),
        max_retries: PINGORA_MAX_RETRIES,
        daemon: opts.daemon,
        // One worker thread gains nothing from tokio's work-stealing scheduler and pays for it
        // on every wake-up; Pingora's per-thread runtime is cheaper.
        work_stealing: s.threads > 1,
        ..ServerConf::default()
    }
}

/// The running gateway's shared parts, for callers (like the demo) that watch it.
pub struct Built {
    pub server: Server,
    pub gateway: Arc<Gateway>,
}

/// Builds the server with every service; call `run_forever` on the result.
pub fn build(config: Config, opts: &RunOptions) -> Result<Built, String> {
    let metrics = Metrics::new();
    let logs = Arc::new(
        Logs::start(&config.log.access, &config.log.error_log)
            .map_err(|e| format!("cannot open log files: {e}"))?,
    );
    let runtime = Runtime::build(config.clone(), &metrics)?;
    let pair = crate::certs::load_configured(&config)?;
    let gateway = Arc::new(Gateway::new(runtime, metrics, logs));
    gateway.certs.set_files(pair);

    let opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        ..Opt::default()
    };
    let conf = server_conf(&config, opts);
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut proxy = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        (*gateway).clone(),
        "weir proxy",
    );
    for l in &config.listen {
        if l.tls {
            let settings = crate::tls::listener_settings(gateway.certs.clone())?;
            proxy.add_tls_with_settings(&l.addr, None, settings);
        } else {
            proxy.add_tcp(&l.addr);
        }
    }
    server.add_service(proxy);

    if let Some(addr) = &config.admin.listen {
        let mut admin = Service::new(
            "weir admin".to_string(),
            pingora::apps::http_app::HttpServer::new_app(AdminApp::new(gateway.clone())),
        );
        admin.add_tcp(addr);
        server.add_service(admin);
    }
    if let Some(acme) = config.tls.as_ref().and_then(|t| t.acme.clone()) {
        if let Some(dir) = &acme.cache_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("tls.acme.cache_dir {}: {e}", dir.display()))?;
        }
        server.add_service(background_service(
            "weir acme",
            crate::acme::AcmeService {
                config: acme,
                state: gateway.acme.clone(),
                certs: gateway.certs.clone(),
                metrics: gateway.metrics.clone(),
            },
        ));
    }
    let handover = crate::queue::handover::socket_path(&config.server.upgrade_sock);
    if opts.upgrade {
        server.add_service(background_service(
            "weir queue hand-over",
            HandoverReceiver {
                path: handover.clone(),
                queues: gateway.queues.clone(),
            },
        ));
    }
    for queue in [&gateway.queues.deferred, &gateway.queues.upfront] {
        let kind = queue.kind;
        let g = gateway.clone();
        let replay = Replay {
            queue: queue.clone(),
            deliver: Arc::new(ClusterDelivery::new(
                gateway.runtime_cell(),
                gateway.logs.clone(),
                kind,
            )),
            settings: Arc::new(move || {
                let state = g.runtime();
                let q = match kind {
                    QueueKind::Deferred => &state.config.deferred_queue,
                    QueueKind::Upfront => &state.config.upfront_queue,
                };
                ReplaySettings {
                    rate: q.replay_rate,
                    concurrency: q.replay_concurrency as usize,
                    max_attempts: q.max_attempts,
                    ttl: q.ttl,
                    replay_unsafe: q.replay_unsafe,
                    grace: state.config.server.grace_period,
                }
            }),
            handover: Some(handover.clone()),
        };
        server.add_service(background_service(
            &format!("weir replay {}", kind.label()),
            ReplayService(replay),
        ));
    }
    let reloader = opts
        .config_path
        .as_deref()
        .map(|p| Reloader::new(p, opts.listen_override.clone(), gateway.clone()));
    server.add_service(background_service(
        "weir signals",
        Signals {
            gateway: gateway.clone(),
            reloader,
        },
    ));
    if !opts.daemon {
        // Pingora writes the pid file only when it daemonizes; `weir reload` needs it always.
        let pid_file = &config.server.pid_file;
        if let Err(e) = std::fs::write(pid_file, format!("{}\n", std::process::id())) {
            log::warn!("cannot write pid file {}: {e}", pid_file.display());
        }
    }
    Ok(Built { server, gateway })
}

/// SIGHUP reloads the config, SIGUSR1 reopens the log files (rotation).
/// (SIGQUIT, SIGTERM and SIGINT are Pingora's: upgrade hand-over, graceful and fast stop.)
struct Signals {
    gateway: Arc<Gateway>,
    reloader: Option<Reloader>,
}

#[async_trait]
impl BackgroundService for Signals {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut usr1), Ok(mut hup)) = (
            signal(SignalKind::user_defined1()),
            signal(SignalKind::hangup()),
        ) else {
            log::error!(
                "cannot install the SIGHUP/SIGUSR1 handlers; reload and log reopening are off"
            );
            return;
        };
        loop {
            tokio::select! {
                _ = usr1.recv() => {
                    log::info!("SIGUSR1: reopening log files");
                    self.gateway.logs.reopen();
                }
                _ = hup.recv() => match &self.reloader {
                    Some(r) => r.reload_and_log(),
                    None => log::warn!("SIGHUP: this process has no config file to reload"),
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The replay of one queue, run until the shutdown signal plus the grace period.
struct ReplayService(Replay<ClusterDelivery>);

/// In a successor (`weir run -u`): takes the old process's queues over.
struct HandoverReceiver {
    path: PathBuf,
    queues: Arc<crate::queue::Queues>,
}

#[async_trait]
impl BackgroundService for HandoverReceiver {
    async fn start(&self, _shutdown: ShutdownWatch) {
        crate::queue::handover::receive(self.path.clone(), self.queues.clone()).await;
    }
}

#[async_trait]
impl BackgroundService for ReplayService {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.run(shutdown, fastrand::Rng::new()).await;
    }
}
