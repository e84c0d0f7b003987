//! The typed configuration: every knob, its default and its validation.
//!
//! Each section of the file is one type below, with its defaults (`impl Default`) and
//! `deny_unknown_fields`; the native YAML is deserialized straight into [`Config`] (`yaml.rs`),
//! and ServiceQ's `sq.properties` starts from [`Config::default`] and sets fields
//! (`properties.rs`). Value types (durations, sizes, rates, addresses, upstream URLs, request
//! formats, header lists, statuses) read and print themselves (`units.rs`, `values.rs`,
//! `formats.rs`), so a bad value is reported at its own line. Rules that involve more than one
//! value live in one pass, [`Config::validate`] (`validate.rs`), run by both readers.
//! `weir check` and `weir convert` print a config by serializing this same type.
//!
//! Adding a key: one field here (doc comment, `with` module if its value type needs one, its
//! default in the section's `Default`), and its line in `conf/weir.yaml`.
//!
//! Everything downstream (proxy, routing, queues) reads only this typed form, never the files.

pub mod clusters;
pub mod formats;
pub mod properties;
pub mod units;
pub mod validate;
pub mod values;
pub mod yaml;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use clusters::{ClusterConfig, Route, DEFAULT_CLUSTER};
use formats::RequestFormats;
pub use validate::{Finding, Key};

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

/// Something accepted but worth telling the operator (e.g. an unverified upstream).
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

/// The whole file. Sections are in the order of `conf/weir.yaml`, which is also the order
/// `weir check` prints them in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a map of weir settings (see conf/weir.yaml)"
)]
pub struct Config {
    /// Listening addresses of the proxy (at least one). Default `0.0.0.0:5252`.
    #[serde(with = "values::listeners")]
    pub listen: Vec<Listener>,
    /// Downstream TLS: the certificate of the TLS listeners. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// The cluster `default` (at least one node, unless `clusters.default` has a registry).
    pub upstreams: Vec<Upstream>,
    /// More clusters by name (and the dynamic parts of `default`). Default none.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub clusters: std::collections::BTreeMap<String, ClusterConfig>,
    /// Which cluster a request goes to; first match wins, no match: `default`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    pub upstream_host: UpstreamHost,
    pub routing: Routing,
    pub retries: Retries,
    pub hedging: Hedging,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub deferred_queue: QueueConfig,
    /// The same type as `deferred_queue`, with the upfront defaults ([`QueueConfig::upfront`]).
    pub upfront_queue: QueueConfig,
    /// Headers added to every response, in order. Default none.
    #[serde(with = "values::headers")]
    pub response_headers: Vec<(String, String)>,
    pub admin: Admin,
    pub log: LogConfig,
    pub server: ServerSettings,
    pub store: Store,
}

impl Default for Config {
    /// Every knob at its default, listening on [`DEFAULT_LISTEN`], and no upstreams.
    fn default() -> Self {
        Config {
            listen: vec![Listener {
                addr: DEFAULT_LISTEN.to_string(),
                tls: false,
            }],
            tls: None,
            upstreams: Vec::new(),
            clusters: std::collections::BTreeMap::new(),
            routes: Vec::new(),
            upstream_host: UpstreamHost::default(),
            routing: Routing::default(),
            retries: Retries::default(),
            hedging: Hedging::default(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            deferred_queue: QueueConfig::default(),
            upfront_queue: QueueConfig::upfront(),
            response_headers: Vec::new(),
            admin: Admin::default(),
            log: LogConfig::default(),
            server: ServerSettings::default(),
            store: Store::default(),
        }
    }
}

/// Where the proxy listens when the config does not say.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:5252";

/// One listening address. Written as `host:port` or `{addr: host:port, tls: bool}`; in YAML a
/// listener without `tls` follows the `tls` block (see `yaml.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// `remote = "Self"`: the derived (de)serializers become inherent functions, which the trait
// impls in values.rs call for the map form (a bare `host:port` is read there too).
#[serde(
    remote = "Self",
    deny_unknown_fields,
    expecting = "a listener map with addr and tls"
)]
pub struct Listener {
    /// `host:port`, e.g. `0.0.0.0:5252` or `[::1]:5252`.
    #[serde(deserialize_with = "values::listen_addr")]
    pub addr: String,
    /// Terminates TLS with the `tls` certificate.
    #[serde(default)]
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a tls block with cert and key, or acme"
)]
pub struct TlsConfig {
    /// PEM chain, leaf first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// weir obtains and renews the certificate itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an acme block")]
pub struct AcmeConfig {
    /// The ACME directory URL; default Let's Encrypt production.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The names the certificate is for (at least one).
    pub domains: Vec<String>,
    /// Where the account, certificate and key are kept (required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// Renew this long before expiry. Default 30 days.
    #[serde(with = "units::positive_duration")]
    pub renew_before: Duration,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            directory: None,
            email: None,
            domains: Vec::new(),
            cache_dir: None,
            renew_before: DEFAULT_RENEW_BEFORE,
        }
    }
}

/// The default ACME renewal margin.
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "`http` or `https`")]
pub enum Scheme {
    Http,
    Https,
}

/// One upstream node. Written as its URL, or as a map with `url` and the optional fields
/// (read and printed in values.rs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The URL as configured, normalised to `scheme://host:port` (used as the metrics label).
    pub url: String,
    pub scheme: Scheme,
    /// Host part of the URL (a name or an IP literal, without brackets).
    pub host: String,
    pub port: u16,
    /// Resolved once at load time.
    pub addr: SocketAddr,
    /// Relative share of first attempts among healthy nodes (>= 1). Default 1.
    pub weight: u32,
    /// Verify an https upstream's certificate. Default true.
    pub tls_verify: bool,
    /// Trust only this CA (PEM) for an https upstream. Default: the system roots.
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a map of routing settings")]
pub struct Routing {
    pub algorithm: Algorithm,
    /// Upstream response statuses counted as node failures (and retried where safe).
    #[serde(with = "values::statuses")]
    pub failure_statuses: Vec<u16>,
    /// How fast a node's error score fades with time.
    #[serde(with = "units::positive_duration")]
    pub decay_half_life: Duration,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            algorithm: Algorithm::Feedback,
            failure_statuses: vec![502, 503, 504],
            decay_half_life: Duration::from_secs(10),
        }
    }
}

/// Hedged requests: a replay-safe request whose attempt has no response header after the
/// hedge delay gets a second attempt on another node; the first header wins, the other
/// attempt is cancelled. Hedges and retries share `retries.budget`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a map of hedging settings")]
pub struct Hedging {
    /// On for idempotent methods (and requests with an `Idempotency-Key`), body kept or none.
    pub enabled: bool,
    /// The delay follows this quantile of the cluster's time to first response byte.
    #[serde(with = "units::quantile")]
    pub quantile: f64,
    /// The delay's bounds (the upper one also while there are too few samples).
    #[serde(with = "units::positive_duration")]
    pub min_delay: Duration,
    #[serde(with = "units::positive_duration")]
    pub max_delay: Duration,
}

impl Default for Hedging {
    fn default() -> Self {
        Hedging {
            enabled: true,
            quantile: 0.95,
            min_delay: Duration::from_millis(3),
            max_delay: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a map of retry settings")]
pub struct Retries {
    /// Total attempts per request; 0 (the default) = one per upstream.
    #[serde(with = "values::count")]
    pub max_attempts: u32,
    /// Pause between two attempts of one request (not after the last). Default 0.
    #[serde(with = "units::duration")]
    pub gap: Duration,
    /// Extra attempts (retries, aborted attempts sent again) as a share of the requests of the
    /// last 10 s; `None` (`off`): no budget, every safe retry up to `max_attempts`.
    #[serde(with = "units::percent_or_off")]
    pub budget: Option<f64>,
    /// Extra attempts per second allowed whatever the share (a quiet gateway can still retry).
    #[serde(with = "units::rate_or_zero")]
    pub budget_floor: u32,
    /// End the replay-safe attempts stuck on a node the router judges stalled, and send them
    /// to another node.
    pub abort_on_stall: bool,
    /// The youngest attempt an abort may end (at least 4 × the node's usual latency, too).
    #[serde(with = "units::positive_duration")]
    pub abort_after: Duration,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            max_attempts: 0,
            gap: Duration::ZERO,
            budget: Some(0.2),
            budget_floor: 10,
            abort_on_stall: true,
            abort_after: Duration::from_millis(20),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a map of timeouts")]
pub struct Timeouts {
    /// TCP/TLS connect to an upstream.
    #[serde(with = "units::positive_duration")]
    pub connect: Duration,
    /// The whole attempt, from its start to the last byte of the response body (ServiceQ's
    /// OUTGOING_REQUEST_TIMEOUT); `None` = no limit (OUTGOING_REQUEST_TIMEOUT <= 0). An
    /// upgraded connection's attempt ends at its `101`: the tunnel has `tunnel_idle`.
    #[serde(with = "units::duration_or_off")]
    pub request: Option<Duration>,
    /// An attempt's time to its response header, counted once the request (body included) went
    /// to the node; `None` (absent): `request`.
    #[serde(
        with = "units::inherited_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub first_byte: Option<Duration>,
    /// The longest silence between two reads of a response body (and two writes of a request
    /// body to the node); `None` (absent): `request`. A slow but steady body that keeps within
    /// it is cut only by `request`.
    #[serde(
        with = "units::inherited_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub body_idle: Option<Duration>,
    /// An upgraded connection (WebSocket) is a tunnel: it is closed after this long with no
    /// byte either way, and that is no node's failure.
    #[serde(with = "units::positive_duration")]
    pub tunnel_idle: Duration,
    /// Client idle keep-alive, whole seconds; `None` (`off`, `0`) = keep-alive off, the
    /// connection is closed after each response.
    #[serde(with = "units::seconds_or_off")]
    pub keepalive: Option<Duration>,
    /// The whole request head, from the connection's accept (or a keep-alive request's first
    /// byte); beyond it weir answers 408 and closes.
    #[serde(with = "units::positive_duration")]
    pub client_head: Duration,
    /// A request body's allowance before `limits.min_body_rate` applies: the body must have
    /// arrived by `client_body + bytes / min_body_rate` after the head (408 otherwise).
    #[serde(with = "units::positive_duration")]
    pub client_body: Duration,
}

impl Timeouts {
    /// The time to the response header in force: `first_byte`, else `request`.
    pub fn first_byte(&self) -> Option<Duration> {
        self.first_byte.or(self.request)
    }

    /// The body silence in force: `body_idle`, else `request`.
    pub fn body_idle(&self) -> Option<Duration> {
        self.body_idle.or(self.request)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(1),
            request: Some(Duration::from_secs(5)),
            first_byte: None,
            body_idle: None,
            tunnel_idle: Duration::from_secs(3600),
            keepalive: Some(Duration::from_secs(120)),
            client_head: Duration::from_secs(10),
            client_body: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a map of limits")]
pub struct Limits {
    /// Requests going to a node (their head and any body up to `max_buffered_body` already
    /// received); beyond it weir answers 429.
    #[serde(with = "values::positive")]
    pub concurrency_peak: usize,
    /// Bodies up to this size are read in full before the request goes to a node, and kept
    /// for retry and queue.
    #[serde(with = "units::size")]
    pub max_buffered_body: usize,
    /// Open client connections over all listeners; a connection beyond it is answered 503 and
    /// closed.
    #[serde(with = "values::positive")]
    pub max_connections: usize,
    /// Open connections from one client address; 0 = no limit.
    #[serde(with = "values::count")]
    pub max_connections_per_client: usize,
    /// Requests in progress from one client address (from their head on); beyond it 429.
    /// 0 = no limit.
    #[serde(with = "values::count")]
    pub max_requests_per_client: usize,
    /// The slowest a request body may arrive once its `timeouts.client_body` allowance is used
    /// up; 0/off = no minimum.
    #[serde(with = "units::byte_rate_or_off")]
    pub min_body_rate: usize,
}

impl Limits {
    /// The largest `max_buffered_body`: each request may hold a body this size in memory.
    pub const MAX_BUFFERED_BODY: usize = 1 << 30;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            concurrency_peak: 2048,
            max_buffered_body: 1 << 20,
            max_connections: 16384,
            max_connections_per_client: 0,
            max_requests_per_client: 0,
            min_body_rate: 1024,
        }
    }
}

/// One queue. `Default` is the deferred queue's defaults; [`QueueConfig::upfront`] the upfront
/// queue's (off, no request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a map of queue settings")]
pub struct QueueConfig {
    pub enabled: bool,
    /// Which requests the queue takes (request-format grammar, see formats.rs).
    pub formats: RequestFormats,
    /// Queued requests (fixed at start); beyond it 503 Queue Full.
    #[serde(with = "values::positive")]
    pub capacity: usize,
    /// Deliveries before dead-lettering; 0 = unlimited.
    #[serde(with = "values::count")]
    pub max_attempts: u32,
    /// Age before dead-lettering.
    #[serde(with = "units::positive_duration")]
    pub ttl: Duration,
    /// Also replay requests that may have reached an upstream.
    pub replay_unsafe: bool,
    /// Deliveries per second during a drain.
    #[serde(with = "units::rate")]
    pub replay_rate: u32,
    /// Deliveries in parallel (dispatched in queue order).
    #[serde(with = "values::positive")]
    pub replay_concurrency: u32,
    /// Where entries are kept: `log` (default, durable under `server.data_dir`) or `memory`.
    pub storage: Storage,
    /// Bytes of queued requests (head and body) beyond which a push is refused (`Queue Full`):
    /// what the queue may hold in memory and on disk.
    #[serde(with = "units::size")]
    pub max_bytes: usize,
}

/// Where a queue keeps its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// An append-only log under `server.data_dir`: survives the process being killed.
    #[default]
    Log,
    /// The process's memory: lost with it (handed over on an upgrade).
    Memory,
    /// A Redis stream shared by every weir that names the same `store.redis` (a fleet).
    Redis,
}

impl Storage {
    pub fn label(self) -> &'static str {
        match self {
            Storage::Log => "log",
            Storage::Memory => "memory",
            Storage::Redis => "redis",
        }
    }
}

/// When the queue log is flushed to stable storage (power-loss durability). Every push is
/// written to the file (and so survives the process) before the client is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// `fdatasync` before each answer (pushes waiting together share one: group commit).
    Always,
    /// `fdatasync` at most this long after a write; the answer does not wait for it.
    Interval(Duration),
    /// Left to the operating system.
    Never,
}

/// Settings of the durable queue stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a map of store settings")]
pub struct Store {
    /// `always`, `never`, or an interval such as `5ms`.
    #[serde(with = "values::fsync")]
    pub fsync: Fsync,
    /// A log segment is closed (and deleted once every entry in it left) at this size.
    #[serde(with = "units::size")]
    pub segment_size: usize,
    /// The Redis server of `storage: redis` queues.
    pub redis: RedisSettings,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            fsync: Fsync::Interval(Duration::from_millis(5)),
            segment_size: 64 << 20,
            redis: RedisSettings::default(),
        }
    }
}

/// Where and how `storage: redis` queues live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a map of Redis settings")]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`; empty: not configured.
    pub url: String,
    /// Prefix of the keys: the stream of a queue is `<key>:<queue>`. Instances that share a
    /// key share the queue.
    pub key: String,
    /// How long the delivery lease lasts without a renewal: after an instance dies, another
    /// one takes its deliveries over after at most this long.
    #[serde(with = "units::duration")]
    pub lease: Duration,
    /// Longest wait for Redis on a push (then `503 Queue Unavailable`) or any other command.
    #[serde(with = "units::duration")]
    pub timeout: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: String::new(),
            key: "weir".into(),
            lease: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            enabled: true,
            formats: RequestFormats::parse_csv("POST, PUT, PATCH, DELETE")
                .unwrap_or_else(|_| RequestFormats::all()),
            capacity: 2048,
            max_attempts: 0,
            ttl: Duration::from_secs(24 * 3600),
            replay_unsafe: false,
            replay_rate: 200,
            replay_concurrency: 1,
            storage: Storage::Log,
            max_bytes: 256 << 20,
        }
    }
}

impl QueueConfig {
    /// The most entries a queue may hold (each costs about 200 B of memory besides its bytes,
    /// whatever the storage: the log keeps an index in memory).
    pub const MAX_CAPACITY: usize = 10_000_000;
    /// The most bytes a memory queue may hold (every byte of it is in memory).
    pub const MAX_MEMORY_BYTES: usize = 64 << 30;
    /// The most bytes a log queue may hold. The log also keeps every queued entry in
    /// memory (the replay reads from there), so this bounds memory as well.
    pub const MAX_BYTES: usize = 256 << 30;

    /// The upfront queue's defaults: off, and no request matches.
    pub fn upfront() -> Self {
        QueueConfig {
            enabled: false,
            formats: RequestFormats::none(),
            ..QueueConfig::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a map of admin settings")]
pub struct Admin {
    /// `None` (`off`) = no admin listener.
    #[serde(with = "values::addr_or_off")]
    pub listen: Option<String>,
    /// When set, requests other than GET (`DELETE /queue/dead`) need
    /// `Authorization: Bearer <token>`. At least 16 visible ASCII characters. Default `off`.
    #[serde(with = "values::token_or_off")]
    pub token: Option<String>,
    /// Names the admin API answers to besides localhost, loopback addresses and the listener's
    /// own address (the `Host` check against DNS rebinding), e.g. the name Prometheus scrapes.
    #[serde(with = "values::host_names")]
    pub hosts: Vec<String>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: Some("127.0.0.1:9100".to_string()),
            token: None,
            hosts: Vec::new(),
        }
    }
}

/// Where the access log goes: `off`, `stdout` or a file path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Stdout,
    File(PathBuf),
}

/// Where the ServiceQ-style error lines go: `stderr` (the default, collected by systemd and
/// container runtimes), `off`, or a file path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ErrorLog {
    #[default]
    Stderr,
    Off,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a map of log settings")]
pub struct LogConfig {
    /// error | warn | info | debug | trace.
    #[serde(with = "values::level")]
    pub level: String,
    /// JSON lines, one per request.
    pub access: AccessLog,
    /// ServiceQ-style error lines (the file key keeps ServiceQ's name).
    #[serde(rename = "error_file")]
    pub error_log: ErrorLog,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            access: AccessLog::Stdout,
            error_log: ErrorLog::Stderr,
        }
    }
}

/// Passed to Pingora.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a map of server settings")]
pub struct ServerSettings {
    /// Worker threads; `auto` (`None`, the default): one per core the process may use.
    #[serde(with = "values::positive_or_auto")]
    pub threads: Option<usize>,
    /// Idle upstream connections kept for reuse, all nodes together (Pingora's
    /// `upstream_keepalive_pool_size`). Beyond it a connection is closed after its response,
    /// and the next request pays for a new one.
    #[serde(with = "values::positive")]
    pub upstream_pool_size: usize,
    pub pid_file: PathBuf,
    pub upgrade_sock: PathBuf,
    /// After SIGTERM, keep accepting this long (whole seconds: Pingora counts seconds).
    #[serde(with = "units::whole_seconds")]
    pub grace_period: Duration,
    /// Then let in-flight requests finish this long (whole seconds).
    #[serde(with = "units::whole_seconds")]
    pub graceful_shutdown_timeout: Duration,
    /// Where the queue logs live; `auto` (default): see [`ServerSettings::data_dir`].
    #[serde(with = "values::path_or_auto")]
    pub data_dir: Option<PathBuf>,
}

/// Pingora's default pool size; weir's default is larger (docs/perf.md).
pub const DEFAULT_UPSTREAM_POOL_SIZE: usize = 1024;

impl ServerSettings {
    /// The worker threads in force: `threads`, or one per core the process may use.
    pub fn worker_threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }

    /// The data directory: `server.data_dir`, else systemd's `$STATE_DIRECTORY` (set by
    /// `StateDirectory=`), else `$XDG_STATE_HOME/weir`, else `$HOME/.local/state/weir`, else
    /// `/var/lib/weir`.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(dir) = env("STATE_DIRECTORY") {
            // systemd may list several, separated by colons: the first is ours.
            let first = dir
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_string();
            return PathBuf::from(first);
        }
        if let Some(dir) = env("XDG_STATE_HOME") {
            return dir.join("weir");
        }
        if let Some(home) = env("HOME") {
            return home.join(".local/state/weir");
        }
        PathBuf::from("/var/lib/weir")
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            threads: None,
            upstream_pool_size: DEFAULT_UPSTREAM_POOL_SIZE,
            pid_file: PathBuf::from("/tmp/weir.pid"),
            upgrade_sock: PathBuf::from("/tmp/weir_upgrade.sock"),
            grace_period: Duration::from_secs(5),
            graceful_shutdown_timeout: Duration::from_secs(5),
            data_dir: None,
        }
    }
}

impl Config {
    /// Reads a config file: `.properties` files (or files shaped like `KEY=value`) as ServiceQ
    /// `sq.properties`, everything else as native YAML. Both readers run [`Config::validate`].
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

    /// The config as native YAML (`weir check`, `weir convert`); it reads back to an equal
    /// config.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("# cannot print the config: {e}\n"))
    }

    /// The routing table as YAML comments (`weir check`): each route in match order and the
    /// cluster it leads to, with that cluster's static nodes and dynamic sources.
    pub fn routes_text(&self) -> String {
        let describe = |name: &str| {
            let (statics, settings) = match name {
                DEFAULT_CLUSTER => (
                    self.upstreams.len(),
                    self.clusters
                        .get(DEFAULT_CLUSTER)
                        .cloned()
                        .unwrap_or_default(),
                ),
                other => {
                    let c = self.clusters.get(other).cloned().unwrap_or_default();
                    (c.upstreams.len(), c)
                }
            };
            let mut d = format!(
                "{name} ({statics} static node{}",
                if statics == 1 { "" } else { "s" }
            );
            if let Some(r) = &settings.registry {
                d.push_str(&format!(
                    ", registry with liveness {}",
                    units::format_duration(r.liveness)
                ));
            }
            if let Some(dns) = &settings.dns {
                match (&dns.name, dns.port, &dns.srv) {
                    (Some(n), Some(p), _) => d.push_str(&format!(", DNS {n}:{p}")),
                    (_, _, Some(s)) => d.push_str(&format!(", DNS SRV {s}")),
                    _ => {}
                }
            }
            if let Some(h) = &settings.health_check {
                let what = match h.kind {
                    clusters::CheckKind::Tcp => "tcp".to_string(),
                    clusters::CheckKind::Http => format!("GET {} expects {}", h.path, h.expect),
                };
                d.push_str(&format!(
                    ", health check {what} every {}",
                    units::format_duration(h.interval)
                ));
            }
            d.push(')');
            d
        };
        let mut out = String::from("# routes (first match wins):\n");
        for r in &self.routes {
            let pattern = format!(
                "{}{}*",
                r.host.as_deref().unwrap_or("*"),
                r.path_prefix.as_deref().unwrap_or("/")
            );
            out.push_str(&format!("#   {pattern:<32} -> {}\n", describe(&r.cluster)));
        }
        out.push_str(&format!(
            "#   {:<32} -> {}\n",
            "anything else",
            describe(DEFAULT_CLUSTER)
        ));
        for name in self.clusters.keys() {
            if name != DEFAULT_CLUSTER && !self.routes.iter().any(|r| &r.cluster == name) {
                out.push_str(&format!("#   (no route leads to cluster `{name}`)\n"));
            }
        }
        out
    }

    /// Every cluster, `default` first (its nodes the top-level `upstreams`), then the others
    /// by name: (name, static nodes, its settings).
    pub fn cluster_list(&self) -> Vec<(&str, &[Upstream], ClusterConfig)> {
        let mut out = Vec::with_capacity(self.clusters.len() + 1);
        let default = self
            .clusters
            .get(DEFAULT_CLUSTER)
            .cloned()
            .unwrap_or_default();
        out.push((DEFAULT_CLUSTER, self.upstreams.as_slice(), default));
        for (name, c) in &self.clusters {
            if name != DEFAULT_CLUSTER {
                out.push((name.as_str(), c.upstreams.as_slice(), c.clone()));
            }
        }
        out
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
