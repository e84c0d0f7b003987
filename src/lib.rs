//! weir: a fault-tolerant HTTP edge gateway on Pingora.
//!
//! The module map follows a request's path (see `docs/ARCHITECTURE.md`):

//! Layers, lowest first; a module names only modules above it in this list:
//!
//! ```text
//! config                     the typed config and its two readers
//! routing, failure           pure cores: node scores and choice; the failure taxonomy
//! metrics, logs, certs       metric handles; access/error logs; the certificate store
//! abort                      abortable attempts in flight (socket duplicates)
//! runtime                    the running state built from one config (nodes, router)
//! forward                    the forwarding policy (the upstream request head)
//! conn                       client connections: counts, head and body deadlines
//! discovery                  dynamic membership: registry, health checks (rebuilds runtimes)
//! queue, tls, acme           queues and their replay; TLS listeners; ACME
//! proxy                      the ProxyHttp hooks
//! admin, status, reload      admin listener, status page, config reload
//! server, demo               the assembled Pingora server; `weir demo`
//! ```

/// Abort on stall: the attempts in flight that weir may shut down when their node stalls.
pub mod abort;
/// ACME: obtains and renews the listeners' certificate (HTTP-01).
pub mod acme;
/// Admin listener: status page, /status.json, /metrics, /healthz, /queue.
pub mod admin;
/// The certificates the TLS listeners serve (files and ACME), and PEM readers.
pub mod certs;
/// The typed config and its two readers (native YAML, ServiceQ sq.properties).
pub mod config;
/// Client connections: connection limits, request head and body deadlines, Pingora's own
/// refusals answered in weir's format.
pub mod conn;
/// `weir demo`: local upstreams (one flapping) plus the gateway.
pub mod demo;
/// Dynamic membership: the service registry and active health checks.
pub mod discovery;
/// The one failure taxonomy: every upstream error classified once.
pub mod failure;
/// The forwarding policy: the head of every upstream request, live or replayed.
pub mod forward;
/// Fuzz targets (`fuzz/`, `tests/fuzz_smoke.rs`): entry points over arbitrary bytes.
#[doc(hidden)]
pub mod fuzzing;
/// Access log and ServiceQ-shaped error log, written off the request path.
pub mod logs;
/// Every exported metric, in one place.
pub mod metrics;
/// The `ProxyHttp` implementation, one file per stage.
pub mod proxy;
/// The deferred and upfront queues: store, replay, delivery.
pub mod queue;
/// Config reload: read, validate, swap atomically (SIGHUP, `weir reload`).
pub mod reload;
/// Error-feedback routing: pure logic, injected clock.
pub mod routing;
/// The running state built from one config: nodes, peers, router.
pub mod runtime;
/// Assembles the Pingora server and its services.
pub mod server;
/// The live status page and its JSON (`GET /`, `GET /status.json` on the admin listener).
pub mod status;
/// TLS listeners: settings and the live certificate resolver.
pub mod tls;

/// Process-wide logger for weir's own diagnostics (stderr), at the configured level.
pub fn init_logging(level: &str) {
    let inner = env_logger::Builder::new()
        .parse_filters(level)
        .format_timestamp_millis()
        .build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Diagnostics(inner))).is_ok() {
        log::set_max_level(max);
    }
}

/// Pingora's connector logs at `error` when its idle-pool watcher still holds a pooled
/// connection a request wants (a race inside Pingora under load, several a second with work
/// stealing): the request simply gets a new connection, nothing fails, and an operator can do
/// nothing about it. weir reports it at `debug`.
fn is_benign_pingora_error(record: &log::Record) -> bool {
    record.level() == log::Level::Error
        && record.target() == "pingora_core::connectors"
        && record.args().as_str() == Some("failed to acquire reusable stream")
}

/// env_logger, with Pingora's benign errors moved to `debug`.
struct Diagnostics(env_logger::Logger);

impl log::Log for Diagnostics {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if !is_benign_pingora_error(record) {
            return self.0.log(record);
        }
        let lowered = log::Record::builder()
            .level(log::Level::Debug)
            .target(record.target())
            .args(*record.args())
            .module_path(record.module_path())
            .file(record.file())
            .line(record.line())
            .build();
        if self.0.matches(&lowered) {
            self.0.log(&lowered);
        }
    }

    fn flush(&self) {
        self.0.flush()
    }
}

#[cfg(test)]
mod logging_tests {
    use super::is_benign_pingora_error;

    fn record_is_benign(level: log::Level, target: &str, args: std::fmt::Arguments) -> bool {
        let record = log::Record::builder()
            .level(level)
            .target(target)
            .args(args)
            .build();
        is_benign_pingora_error(&record)
    }

    #[test]
    fn only_the_pool_reuse_race_is_lowered() {
        let t = "pingora_core::connectors";
        let msg = format_args!("failed to acquire reusable stream");
        assert!(record_is_benign(log::Level::Error, t, msg));
        let other = format_args!("connect refused");
        assert!(!record_is_benign(log::Level::Error, t, other));
        let msg = format_args!("failed to acquire reusable stream");
        assert!(!record_is_benign(log::Level::Error, "weir::proxy", msg));
        let msg = format_args!("failed to acquire reusable stream");
        assert!(!record_is_benign(log::Level::Warn, t, msg));
    }
}
