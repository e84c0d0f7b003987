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
    let _ = env_logger::Builder::new()
        .parse_filters(level)
        .format_timestamp_millis()
        .try_init();
}
