//! Assembles the Pingora server: the proxy service on every listener, the admin service
//! (metrics, health, queues) and the background services (replay of each queue, signals).

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use std::io::ErrorKind;
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};

use pingora::apps::ServerApp;
use pingora::protocols::{Shutdown, Stream, ALPN};
use tokio::io::AsyncWriteExt;

use crate::admin::AdminApp;
use crate::config::{Config, Listener};
use crate::conn::{ClientConn, Refusal};
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
/// header values) and the TLS pair loads. `Ok` carries warnings: the listening addresses that
/// cannot be bound here and now (in use, a port below 1024 without the right, an address this
/// machine does not have). They are warnings, not errors: the address may be the running
/// weir's (a check before a reload or upgrade), `weir run` may run as another user or on
/// another machine, and a free port may be taken a moment later; `weir run` refuses to start
/// on any of them.
pub fn check(config: &Config) -> Result<Vec<String>, String> {
    Runtime::build(config.clone(), &Metrics::new())?;
    crate::certs::load_configured(config)?;
    let mut warnings = Vec::new();
    for (key, addr) in listening_addresses(config) {
        if let Err(f) = probe_bind(addr) {
            let hint = if f.kind == ErrorKind::AddrInUse {
                " (fine if the running weir holds it, before a reload or `weir run -u`; \
                 otherwise `weir run` will fail)"
            } else {
                " (`weir run` will fail where this holds)"
            };
            warnings.push(format!("{key} {addr}: {}{hint}", f.reason));
        }
    }
    let logged = [&config.deferred_queue, &config.upfront_queue]
        .iter()
        .any(|q| q.storage == crate::config::Storage::Log);
    if logged {
        let dir = config.server.data_dir();
        if let Err(reason) = probe_writable(&dir) {
            warnings.push(format!(
                "server.data_dir {}: {reason} (`weir run` will fail where this holds; the \
                 queue log lives there)",
                dir.display()
            ));
        }
    }
    Ok(warnings)
}

/// Whether this user can create and write files in `dir` (or create it): checked on the
/// nearest directory that exists, without creating anything.
pub fn probe_writable(dir: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(format!("{} is not a directory", at.display())),
            Err(_) => match at.parent() {
                Some(p) if !p.as_os_str().is_empty() => at = p,
                _ => {
                    at = Path::new(".");
                    break;
                }
            },
        }
    }
    let mut c = at.as_os_str().as_bytes().to_vec();
    c.push(0);
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::access(c.as_ptr().cast(), libc::W_OK | libc::X_OK) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "{} is not writable by this user: {}",
            at.display(),
            std::io::Error::last_os_error()
        ))
    }
}

/// Every address weir listens on, with the key that configures it.
fn listening_addresses(config: &Config) -> Vec<(&'static str, &str)> {
    let mut out: Vec<(&'static str, &str)> =
        config.listen.iter().map(|l| ("listen", &*l.addr)).collect();
    if let Some(admin) = &config.admin.listen {
        out.push(("admin.listen", admin));
    }
    out
}

/// Why an address cannot be listened on.
#[derive(Debug)]
pub struct BindFailure {
    pub kind: ErrorKind,
    /// For the operator: `address in use`, `permission denied (...)`.
    pub reason: String,
}

/// Binds `addr` as Pingora will (its first resolved address, SO_REUSEADDR, which std's
/// `TcpListener::bind` sets on Unix too) and releases it at once.
pub fn probe_bind(addr: &str) -> Result<(), BindFailure> {
    let fail = |e: &std::io::Error, reason: String| BindFailure {
        kind: e.kind(),
        reason,
    };
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| fail(&e, format!("cannot resolve it: {e}")))?
        .next()
        .ok_or_else(|| BindFailure {
            kind: ErrorKind::NotFound,
            reason: "it resolves to no address".to_string(),
        })?;
    match std::net::TcpListener::bind(sock) {
        Ok(listener) => {
            drop(listener);
            Ok(())
        }
        Err(e) => {
            let reason = match e.kind() {
                ErrorKind::AddrInUse => "address in use".to_string(),
                ErrorKind::PermissionDenied if sock.port() < 1024 => {
                    "permission denied (a port below 1024 needs root or CAP_NET_BIND_SERVICE)"
                        .to_string()
                }
                ErrorKind::PermissionDenied => "permission denied".to_string(),
                ErrorKind::AddrNotAvailable => {
                    format!(
                        "address not available (no interface of this machine has {})",
                        sock.ip()
                    )
                }
                _ => e.to_string(),
            };
            Err(fail(&e, reason))
        }
    }
}

/// Refuses to start when an address cannot be bound, before anything is started or written
/// (Pingora binds in its service threads, where a failure was a panic in a thread and the
/// process went on without that listener). A successor (`weir run -u`) receives the sockets
/// the old process holds, so `address in use` is expected there; Pingora binds any other.
fn check_addresses_bind(config: &Config, upgrade: bool) -> Result<(), String> {
    for (key, addr) in listening_addresses(config) {
        match probe_bind(addr) {
            Ok(()) => {}
            Err(f) if upgrade && f.kind == ErrorKind::AddrInUse => {}
            Err(f) => return Err(format!("{key} {addr}: {}", f.reason)),
        }
    }
    Ok(())
}

/// The message of Pingora's panic when a service cannot bind its listeners
/// (`services/listening.rs`: `.expect("Failed to build listeners")`).
const PINGORA_LISTENER_PANIC: &str = "Failed to build listeners";

/// Makes a listener that fails in Pingora's service thread (the address was taken between the
/// start-up check and Pingora's bind, or in a successor an address the old process did not
/// hand over is in use) end the process with exit status 1 and the reason on stderr, removing
/// the pid file, instead of leaving it running without that listener. Other panics keep the
/// default behaviour.
fn exit_when_a_listener_fails(pid_file: PathBuf) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info.payload_as_str().unwrap_or("");
        if let Some(rest) = message.strip_prefix(PINGORA_LISTENER_PANIC) {
            eprintln!("weir: a listener could not start, exiting{rest}");
            log::error!("a listener could not start, exiting{rest}");
            let ours = std::fs::read_to_string(&pid_file)
                .is_ok_and(|p| p.trim() == std::process::id().to_string());
            if ours {
                let _ = std::fs::remove_file(&pid_file);
            }
            std::process::exit(1);
        }
        default(info);
    }));
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
        threads: s.worker_threads(),
        upstream_keepalive_pool_size: s.upstream_pool_size,
        pid_file: s.pid_file.to_string_lossy().into_owned(),
        upgrade_sock: s.upgrade_sock.to_string_lossy().into_owned(),
        grace_period_seconds: Some(s.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout.as_secs()),
        max_retries: PINGORA_MAX_RETRIES,
        daemon: opts.daemon,
        // Measured (docs/perf.md): with one worker thread, tokio's multi-thread scheduler
        // cost about the same CPU per request as Pingora's per-thread runtime (within this
        // machine's noise) but tripled the p99 (6 to 14 ms against 4.5 to 4.9 ms), so a single
        // worker gets the per-thread runtime.
        work_stealing: s.worker_threads() > 1,
        ..ServerConf::default()
    }
}

/// The running gateway's shared parts, for callers (like the demo) that watch it.
pub struct Built {
    pub server: Server,
    pub gateway: Arc<Gateway>,
}

/// The proxy's side of every listener: each accepted connection is counted against
/// `limits.max_connections` (and `max_connections_per_client`) and wrapped in a [`ClientConn`]
/// that keeps the client's head and body deadlines, then handed to Pingora's HTTP proxy.
struct ClientListener {
    proxy: Arc<pingora_proxy::HttpProxy<Gateway>>,
    gateway: Arc<Gateway>,
}

/// The answer to a connection beyond the limits, before it is closed.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
    Content-Type: application/json\r\nContent-Length: 33\r\nCache-Control: no-store\r\n\
    Retry-After: 1\r\nConnection: close\r\n\r\n{\"sq_msg\":\"Too Many Connections\"}";

#[async_trait]
impl ServerApp for ClientListener {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let runtime = self.gateway.runtime();
        let ip = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let limits = &runtime.config.limits;
        match self.gateway.conns.admit(
            ip,
            limits.max_connections,
            limits.max_connections_per_client,
        ) {
            Ok(permit) => {
                let conn = ClientConn::new(
                    stream,
                    permit,
                    runtime.clone(),
                    self.gateway.conn_shared.clone(),
                    ip,
                );
                drop(runtime);
                self.proxy.process_new(Box::new(conn), shutdown).await
            }
            Err(refusal) => {
                drop(runtime);
                self.gateway
                    .metrics
                    .connection_refused(refusal == Refusal::PerClient);
                // HTTP/2 clients get no HTTP/1 answer, only the close.
                if !matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(1),
                        stream.write_all(TOO_MANY_CONNECTIONS),
                    )
                    .await;
                }
                Shutdown::shutdown(&mut *stream).await;
                None
            }
        }
    }

    async fn cleanup(&self) {
        self.proxy.cleanup().await
    }
}

/// Builds the server with every service; call `run_forever` on the result.
pub fn build(config: Config, opts: &RunOptions) -> Result<Built, String> {
    check_addresses_bind(&config, opts.upgrade)?;
    let metrics = Metrics::new();
    let logs = Arc::new(
        Logs::start(&config.log.access, &config.log.error_log)
            .map_err(|e| format!("cannot open log files: {e}"))?,
    );
    let runtime = Runtime::build(config.clone(), &metrics)?;
    let pair = crate::certs::load_configured(&config)?;
    let queues = Arc::new(crate::queue::Queues::open(&config, &metrics, opts.upgrade)?);
    crate::queue::report_at_exit(queues.clone());
    let gateway = Arc::new(Gateway::with_queues(runtime, metrics, logs, queues));
    gateway.certs.set_files(pair);

    let opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        ..Opt::default()
    };
    let conf = server_conf(&config, opts);
    exit_when_a_listener_fails(config.server.pid_file.clone());
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut http = pingora_proxy::HttpProxy::new((*gateway).clone(), server.configuration.clone());
    http.handle_init_modules();
    let mut proxy = Service::new(
        "weir proxy".to_string(),
        ClientListener {
            proxy: Arc::new(http),
            gateway: gateway.clone(),
        },
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
    server.add_service(background_service(
        "weir discovery",
        DiscoveryService {
            gateway: gateway.clone(),
        },
    ));
    server.add_service(background_service(
        "weir stall watch",
        StallWatch {
            gateway: gateway.clone(),
        },
    ));
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

/// SIGHUP reloads the config, SIGUSR1 reopens the log files (rotation), SIGINT reports the
/// queues before Pingora's fast stop.
/// (SIGQUIT, SIGTERM and SIGINT are also Pingora's: upgrade hand-over, graceful and fast stop.)
struct Signals {
    gateway: Arc<Gateway>,
    reloader: Option<Reloader>,
}

#[async_trait]
impl BackgroundService for Signals {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut usr1), Ok(mut hup), Ok(mut int)) = (
            signal(SignalKind::user_defined1()),
            signal(SignalKind::hangup()),
            signal(SignalKind::interrupt()),
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
                // Pingora's fast stop: no grace period and no replay shutdown, so the queues
                // report here what is left (a durable log keeps it for the next start).
                // (The queues report what is left when the process exits: `report_at_exit`.)
                _ = int.recv() => {
                    log::warn!("SIGINT: fast shutdown");
                    for q in [&self.gateway.queues.deferred, &self.gateway.queues.upfront] {
                        q.sync().await;
                    }
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

/// Abort on stall: every few milliseconds, the abortable attempts on stalled nodes are ended
/// (see `abort.rs`). Tokio's timer, not Pingora's 10 ms ticks; a sweep that finds no
/// registered attempt costs an atomic load per node.
struct StallWatch {
    gateway: Arc<Gateway>,
}

/// The hedge delay's quantile is recomputed every this many ticks (50 ms).
const QUANTILE_EVERY: u32 = 25;

/// Period of the stall watch.
const STALL_WATCH_PERIOD: std::time::Duration = std::time::Duration::from_millis(2);

#[async_trait]
impl BackgroundService for StallWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(STALL_WATCH_PERIOD);
        let mut ticks: u32 = 0;
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let g = &self.gateway;
                    let now = std::time::Instant::now();
                    let runtime = g.runtime();
                    let swept = runtime.watch(now, &g.budget);
                    g.count_swept(swept);
                    g.hedges.launch_due(now, &g.budget, &g.metrics, &g.logs);
                    ticks = ticks.wrapping_add(1);
                    if ticks.is_multiple_of(QUANTILE_EVERY) {
                        g.hedges.ttfb.refresh(runtime.config.hedging.quantile);
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Registry expiry and health checks.
struct DiscoveryService {
    gateway: Arc<Gateway>,
}

#[async_trait]
impl BackgroundService for DiscoveryService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let stop = async move {
            let _ = shutdown.changed().await;
        };
        self.gateway.discovery.run(stop).await;
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
