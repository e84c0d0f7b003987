//! weir: a fault-tolerant HTTP edge gateway on Pingora.
//!
//! The module map follows a request's path (see `docs/ARCHITECTURE.md`):

/// ACME: obtains and renews the listeners' certificate (HTTP-01).
pub mod acme;
/// Admin listener: status page, /status.json, /metrics, /healthz, /queue.
pub mod admin;
/// The typed config and its two readers (native YAML, ServiceQ sq.properties).
pub mod config;
/// `weir demo`: local upstreams (one flapping) plus the gateway.
pub mod demo;
/// Access log and ServiceQ-shaped error log, written off the request path.
pub mod logs;
/// Every exported metric, in one place.
pub mod metrics;
/// The `ProxyHttp` implementation, one file per stage.
pub mod proxy;
/// The deferred and upfront queues: store, replay, delivery, request formats.
pub mod queue;
/// Config reload: read, validate, swap atomically (SIGHUP, `weir reload`).
pub mod reload;
/// Error-feedback routing: pure logic, injected clock.
pub mod routing;
/// Assembles the Pingora server and its services.
pub mod server;
/// The live status page and its JSON (`GET /`, `GET /status.json` on the admin listener).
pub mod status;
/// TLS: the listeners' live certificate, upstream CA files.
pub mod tls;

/// Process-wide logger for weir's own diagnostics (stderr), at the configured level.
pub fn init_logging(level: &str) {
    let _ = env_logger::Builder::new()
        .parse_filters(level)
        .format_timestamp_millis()
        .try_init();
}
