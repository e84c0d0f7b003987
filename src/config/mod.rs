//! The typed configuration: every knob, its default and its validation.
//!
//! Two input formats feed one [`Config`]: the native YAML (`yaml.rs`) and ServiceQ's
//! `sq.properties` (`properties.rs`). Everything downstream (proxy, routing, queues) reads only
//! this typed form, never the files.

pub mod formats;
pub mod properties;
pub mod units;
pub mod yaml;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use formats::RequestFormats;

/// Said when ACME is configured but no listener can answer its HTTP-01 challenge.
pub const ACME_NEEDS_PLAIN_LISTENER: &str = "ACME validates with HTTP-01: the ACME server fetches http://DOMAIN/.well-known/acme-challenge/... on port 80, which needs a plain listener (`{addr: \"0.0.0.0:80\", tls: false}`); every listener here is TLS, so no certificate can be obtained (a cached one in cache_dir is still served)";

/// A config error that points at its origin: file, line (where one is known) and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: impl Into<PathBuf>, line: Option<usize>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.into(),
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Something accepted but worth telling the operator (e.g. a ServiceQ key weir does not act on yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub line: Option<usize>,
    pub message: String,
}

/// A loaded config plus the warnings found while reading it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<ConfigWarning>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Listening addresses of the proxy (at least one).
    pub listen: Vec<Listener>,
    /// Downstream TLS: the certificate of the TLS listeners.
    pub tls: Option<TlsConfig>,
    pub upstreams: Vec<Upstream>,
    pub upstream_host: UpstreamHost,
    pub routing: Routing,
    pub retries: Retries,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub deferred_queue: QueueConfig,
    pub upfront_queue: QueueConfig,
    /// Headers added to every response, in order.
    pub response_headers: Vec<(String, String)>,
    pub admin: Admin,
    pub log: LogConfig,
    pub server: ServerSettings,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    /// `host:port`, e.g. `0.0.0.0:5252` or `[::1]:5252`.
    pub addr: String,
    /// Terminates TLS with the `tls` certificate. A listener is TLS when a `tls` block is
    /// configured unless it says `tls: false` (so `listen` + `tls`, and ServiceQ's SSL_ENABLE,
    /// make the listener TLS).
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub acme: Option<AcmeConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AcmeConfig {
    pub directory: Option<String>,
    pub email: Option<String>,
    pub domains: Vec<String>,
    pub cache_dir: Option<PathBuf>,
    #[serde(serialize_with = "units::serialize_duration")]
    pub renew_before: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Upstream {
    /// The URL as configured, normalised to `scheme://host:port` (used as the metrics label).
    pub url: String,
    pub scheme: Scheme,
    /// Host part of the URL (a name or an IP literal, without brackets).
    pub host: String,
    pub port: u16,
    /// Resolved once at load time.
    pub addr: SocketAddr,
    /// Relative share of first attempts among healthy nodes (>= 1).
    pub weight: u32,
    pub tls_verify: bool,
    pub ca: Option<PathBuf>,
    /// SNI for https upstreams; defaults to `host`.
    pub sni: Option<String>,
}

/// How the router picks a node (see `routing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Error feedback with latency and in-flight awareness.
    #[default]
    Feedback,
    /// ServiceQ's exact formula.
    Serviceq,
}

/// What `Host` header upstreams receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamHost {
    /// The client's Host, unchanged.
    #[default]
    Keep,
    /// The upstream's `host:port` (ServiceQ's behaviour).
    Rewrite,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Routing {
    pub algorithm: Algorithm,
    /// Upstream response statuses counted as node failures (and retried where safe).
    pub failure_statuses: Vec<u16>,
    #[serde(serialize_with = "units::serialize_duration")]
    pub decay_half_life: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retries {
    /// Total attempts per request; 0 = one per upstream.
    pub max_attempts: u32,
    /// Pause between two attempts of one request (not after the last).
    #[serde(serialize_with = "units::serialize_duration")]
    pub gap: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeouts {
    #[serde(serialize_with = "units::serialize_duration")]
    pub connect: Duration,
    /// Per attempt; `None` = no timeout (sq.properties OUTGOING_REQUEST_TIMEOUT <= 0).
    #[serde(serialize_with = "units::serialize_opt_duration")]
    pub request: Option<Duration>,
    /// Client idle keep-alive.
    #[serde(serialize_with = "units::serialize_duration")]
    pub keepalive: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// In-flight client requests; beyond it weir answers 429.
    pub concurrency_peak: usize,
    /// Bodies up to this size are kept for retry and queue.
    pub max_buffered_body: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueConfig {
    pub enabled: bool,
    pub formats: RequestFormats,
    pub capacity: usize,
    /// 0 = unlimited.
    pub max_attempts: u32,
    #[serde(serialize_with = "units::serialize_duration")]
    pub ttl: Duration,
    pub replay_unsafe: bool,
    /// Deliveries per second during a drain.
    pub replay_rate: u32,
    pub replay_concurrency: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Admin {
    /// `None` = no admin listener.
    pub listen: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    Off,
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogConfig {
    pub level: String,
    pub access: AccessLog,
    /// ServiceQ-style error lines; `None` = off.
    pub error_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerSettings {
    pub threads: usize,
    pub pid_file: PathBuf,
    pub upgrade_sock: PathBuf,
    #[serde(serialize_with = "units::serialize_duration")]
    pub grace_period: Duration,
    #[serde(serialize_with = "units::serialize_duration")]
    pub graceful_shutdown_timeout: Duration,
}

impl Config {
    /// Reads a config file: `.properties` files (or files shaped like `KEY=value`) as ServiceQ
    /// `sq.properties`, everything else as native YAML.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, None, format!("cannot read file: {e}")))?;
        if is_properties(path, &text) {
            properties::parse(path, &text)
        } else {
            yaml::parse(path, &text)
        }
    }

    /// The embedded default (`conf/weir.yaml`), used by `weir demo` and when no file exists.
    pub fn embedded_default() -> Config {
        yaml::parse(Path::new("<embedded conf/weir.yaml>"), DEFAULT_YAML)
            .map(|l| l.config)
            .unwrap_or_else(|e| panic!("the embedded default config is invalid: {e}"))
    }

    /// Attempts per request after applying `retries.max_attempts` (0 = one per upstream).
    pub fn attempts_per_request(&self) -> usize {
        let n = self.upstreams.len().max(1);
        match self.retries.max_attempts {
            0 => n,
            m => m as usize,
        }
    }
}

/// `conf/weir.yaml`, compiled in.
pub const DEFAULT_YAML: &str = include_str!("../../conf/weir.yaml");

/// A file is read as ServiceQ properties when it says so by name, or when its first meaningful
/// line looks like `KEY=value`.
pub fn is_properties(path: &Path, text: &str) -> bool {
    if path.extension().and_then(|e| e.to_str()) == Some("properties") {
        return true;
    }
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let key = l.split('=').next().unwrap_or("");
            l.contains('=')
                && !l.contains(':')
                && !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .unwrap_or(false)
}
