//! The native YAML config (`conf/weir.yaml`): reading it into [`Config`], and printing a
//! [`Config`] back as YAML (`weir convert`, `weir check`).
//!
//! Why the hand-written visitors: serde_yaml attaches a line number only to errors raised while
//! a value is being deserialized. So every check that can be made on one value (a duration, a
//! URL, a header name, a request format) runs inside its visitor, and the operator gets
//! `weir.yaml:12: upstreams[1]: ...` instead of an error without a place. Unknown keys are
//! rejected everywhere (`deny_unknown_fields`): a typo must not silently fall back to a default.
//!
//! The defaults of every knob live in [`defaults`], shared with the sq.properties reader.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv6Addr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Unexpected, Visitor};
use serde_yaml::{Mapping, Value};

use super::formats::{RequestFormat, RequestFormats};
use super::units::{self, format_duration, format_size};
use super::{
    AccessLog, AcmeConfig, Admin, Algorithm, Config, ConfigError, ConfigWarning, Limits, Listener,
    Loaded, LogConfig, QueueConfig, Retries, Routing, Scheme, ServerSettings, Timeouts, TlsConfig,
    Upstream, UpstreamHost,
};

/// Where the proxy listens when the config does not say.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:5252";

/// The config every file starts from: all defaults, with the given listeners and upstreams.
pub fn defaults(listen: Vec<Listener>, upstreams: Vec<Upstream>) -> Config {
    let queue = |enabled, formats| QueueConfig {
        enabled,
        formats,
        capacity: 2048,
        max_attempts: 0,
        ttl: Duration::from_secs(24 * 3600),
        replay_unsafe: false,
        replay_rate: 200,
        replay_concurrency: 1,
    };
    let unsafe_methods = ["POST", "PUT", "PATCH", "DELETE"].map(String::from);
    Config {
        listen,
        tls: None,
        upstreams,
        upstream_host: UpstreamHost::Keep,
        routing: Routing {
            algorithm: Algorithm::Feedback,
            failure_statuses: vec![502, 503, 504],
            decay_half_life: Duration::from_secs(10),
        },
        retries: Retries {
            max_attempts: 0,
            gap: Duration::ZERO,
        },
        timeouts: Timeouts {
            connect: Duration::from_secs(1),
            request: Some(Duration::from_secs(5)),
            keepalive: Duration::from_secs(120),
        },
        limits: Limits {
            concurrency_peak: 2048,
            max_buffered_body: 1 << 20,
        },
        deferred_queue: queue(
            true,
            RequestFormats::parse_list(&unsafe_methods).unwrap_or_else(|_| RequestFormats::all()),
        ),
        upfront_queue: queue(false, RequestFormats::none()),
        response_headers: Vec::new(),
        admin: Admin {
            listen: Some("127.0.0.1:9100".to_string()),
        },
        log: LogConfig {
            level: "info".to_string(),
            access: AccessLog::Stdout,
            error_file: Some(PathBuf::from("logs/weir_error.log")),
        },
        server: ServerSettings {
            threads: 2,
            pid_file: PathBuf::from("/tmp/weir.pid"),
            upgrade_sock: PathBuf::from("/tmp/weir_upgrade.sock"),
            grace_period: Duration::from_secs(5),
            graceful_shutdown_timeout: Duration::from_secs(5),
        },
    }
}

/// The default ACME renewal margin.
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

/// Reads the native YAML config. `path` is only used to label errors.
pub fn parse(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let raw: Option<RawConfig> = serde_yaml::from_str(text).map_err(|e| yaml_error(path, &e))?;
    let raw = raw.unwrap_or_default();
    let upstreams = raw
        .upstreams
        .ok_or_else(|| ConfigError::new(path, None, "no upstreams configured"))?;
    let tls_block = raw.tls.is_some();
    let listen = match raw.listen {
        None => vec![Listener {
            addr: DEFAULT_LISTEN.to_string(),
            tls: tls_block,
        }],
        Some(items) => {
            let mut out = Vec::with_capacity(items.len());
            for RawListener { addr, tls } in items {
                if tls == Some(true) && !tls_block {
                    return Err(ConfigError::new(
                        path,
                        None,
                        format!("listen `{addr}` has `tls: true` but there is no `tls` block (cert and key)"),
                    ));
                }
                out.push(Listener {
                    addr,
                    tls: tls.unwrap_or(tls_block),
                });
            }
            out
        }
    };
    let mut warnings = Vec::new();
    if tls_block && !listen.iter().any(|l| l.tls) {
        warnings.push(ConfigWarning {
            line: None,
            message: "a `tls` block is configured but every listener says `tls: false`".into(),
        });
    }
    if raw.tls.as_ref().is_some_and(|t| t.acme.is_some()) && listen.iter().all(|l| l.tls) {
        warnings.push(ConfigWarning {
            line: None,
            message: format!("tls.acme: {}", super::ACME_NEEDS_PLAIN_LISTENER),
        });
    }
    for u in upstreams
        .iter()
        .filter(|u| u.scheme == Scheme::Https && !u.tls_verify)
    {
        warnings.push(ConfigWarning {
            line: None,
            message: format!(
                "upstream {}: tls_verify: false, its certificate is not checked (anyone on the path can impersonate it)",
                u.url
            ),
        });
    }
    let mut c = defaults(listen, upstreams);
    c.tls = raw.tls;
    set(&mut c.upstream_host, raw.upstream_host);
    if let Some(r) = raw.routing {
        set(&mut c.routing.algorithm, r.algorithm);
        set(&mut c.routing.failure_statuses, r.failure_statuses);
        set(&mut c.routing.decay_half_life, r.decay_half_life);
    }
    if let Some(r) = raw.retries {
        set(&mut c.retries.max_attempts, r.max_attempts);
        set(&mut c.retries.gap, r.gap);
    }
    if let Some(t) = raw.timeouts {
        set(&mut c.timeouts.connect, t.connect);
        set(&mut c.timeouts.request, t.request);
        set(&mut c.timeouts.keepalive, t.keepalive);
    }
    if let Some(l) = raw.limits {
        set(&mut c.limits.concurrency_peak, l.concurrency_peak);
        set(&mut c.limits.max_buffered_body, l.max_buffered_body);
    }
    if let Some(q) = raw.deferred_queue {
        q.apply(&mut c.deferred_queue);
    }
    if let Some(q) = raw.upfront_queue {
        q.apply(&mut c.upfront_queue);
    }
    set(&mut c.response_headers, raw.response_headers);
    if let Some(a) = raw.admin {
        set(&mut c.admin.listen, a.listen);
    }
    if let Some(l) = raw.log {
        set(&mut c.log.level, l.level);
        set(&mut c.log.access, l.access);
        set(&mut c.log.error_file, l.error_file);
    }
    if let Some(s) = raw.server {
        set(&mut c.server.threads, s.threads);
        set(&mut c.server.pid_file, s.pid_file);
        set(&mut c.server.upgrade_sock, s.upgrade_sock);
        set(&mut c.server.grace_period, s.grace_period);
        set(
            &mut c.server.graceful_shutdown_timeout,
            s.graceful_shutdown_timeout,
        );
    }
    Ok(Loaded {
        config: c,
        warnings,
    })
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// A serde_yaml error as a [`ConfigError`]: the line moves out of the message into the error.
fn yaml_error(path: &Path, e: &serde_yaml::Error) -> ConfigError {
    let mut message = e.to_string();
    let line = e.location().map(|loc| {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(i) = message.find(&suffix) {
            message.replace_range(i..i + suffix.len(), "");
        }
        loc.line()
    });
    ConfigError::new(path, line, message)
}

// === raw structs: the file's shape, every key optional ===

#[derive(Default, serde::Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a map of weir settings (see conf/weir.yaml)"
)]
struct RawConfig {
    #[serde(default, deserialize_with = "de_listen")]
    listen: Option<Vec<RawListener>>,
    #[serde(default, deserialize_with = "de_tls")]
    tls: Option<TlsConfig>,
    #[serde(default, deserialize_with = "de_upstreams")]
    upstreams: Option<Vec<Upstream>>,
    #[serde(default, deserialize_with = "de_upstream_host")]
    upstream_host: Option<UpstreamHost>,
    routing: Option<RawRouting>,
    retries: Option<RawRetries>,
    timeouts: Option<RawTimeouts>,
    limits: Option<RawLimits>,
    deferred_queue: Option<RawQueue>,
    upfront_queue: Option<RawQueue>,
    #[serde(default, deserialize_with = "de_headers")]
    response_headers: Option<Vec<(String, String)>>,
    admin: Option<RawAdmin>,
    log: Option<RawLog>,
    server: Option<RawServer>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map of routing settings")]
struct RawRouting {
    #[serde(default, deserialize_with = "de_algorithm")]
    algorithm: Option<Algorithm>,
    #[serde(default, deserialize_with = "de_statuses")]
    failure_statuses: Option<Vec<u16>>,
    #[serde(default, deserialize_with = "de_positive_duration")]
    decay_half_life: Option<Duration>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map of retry settings")]
struct RawRetries {
    #[serde(default, deserialize_with = "de_u32")]
    max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "de_duration")]
    gap: Option<Duration>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map of timeouts")]
struct RawTimeouts {
    #[serde(default, deserialize_with = "de_positive_duration")]
    connect: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration_or_off")]
    request: Option<Option<Duration>>,
    #[serde(default, deserialize_with = "de_duration")]
    keepalive: Option<Duration>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map of limits")]
struct RawLimits {
    #[serde(default, deserialize_with = "de_positive_usize")]
    concurrency_peak: Option<usize>,
    #[serde(default, deserialize_with = "de_size")]
    max_buffered_body: Option<usize>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map of queue settings")]
struct RawQueue {
    enabled: Option<bool>,
    #[serde(default, deserialize_with = "de_formats")]
    formats: Option<RequestFormats>,
    #[serde(default, deserialize_with = "de_positive_usize")]
    capacity: Option<usize>,
    #[serde(default, deserialize_with = "de_u32")]
    max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "de_positive_duration")]
    ttl: Option<Duration>,
    replay_unsafe: Option<bool>,
    #[serde(default, deserialize_with = "de_rate")]
    replay_rate: Option<u32>,
    #[serde(default, deserialize_with = "de_positive_u32")]
    replay_concurrency: Option<u32>,
}

impl RawQueue {
    fn apply(self, q: &mut QueueConfig) {
        set(&mut q.enabled, self.enabled);
        set(&mut q.formats, self.formats);
        set(&mut q.capacity, self.capacity);
        set(&mut q.max_attempts, self.max_attempts);
        set(&mut q.ttl, self.ttl);
        set(&mut q.replay_unsafe, self.replay_unsafe);
        set(&mut q.replay_rate, self.replay_rate);
        set(&mut q.replay_concurrency, self.replay_concurrency);
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map of admin settings")]
struct RawAdmin {
    #[serde(default, deserialize_with = "de_addr_or_off")]
    listen: Option<Option<String>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map of log settings")]
struct RawLog {
    #[serde(default, deserialize_with = "de_level")]
    level: Option<String>,
    #[serde(default, deserialize_with = "de_access")]
    access: Option<AccessLog>,
    #[serde(default, deserialize_with = "de_path_or_off")]
    error_file: Option<Option<PathBuf>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map of server settings")]
struct RawServer {
    #[serde(default, deserialize_with = "de_positive_usize")]
    threads: Option<usize>,
    pid_file: Option<PathBuf>,
    upgrade_sock: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_duration")]
    grace_period: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    graceful_shutdown_timeout: Option<Duration>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a tls block")]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_acme")]
    acme: Option<AcmeConfig>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "an acme block")]
struct RawAcme {
    directory: Option<String>,
    email: Option<String>,
    #[serde(default)]
    domains: Vec<String>,
    cache_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_positive_duration")]
    renew_before: Option<Duration>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "an upstream map with `url`")]
struct RawUpstream {
    #[serde(deserialize_with = "de_upstream_url")]
    url: Upstream,
    #[serde(default, deserialize_with = "de_positive_u32")]
    weight: Option<u32>,
    tls_verify: Option<bool>,
    ca: Option<PathBuf>,
    sni: Option<String>,
}

// === value checks shared with properties.rs ===

/// Checks a listening address `host:port` (an IP literal, IPv6 in brackets, or a host name).
pub fn check_listen_addr(s: &str) -> Result<String, String> {
    let s = s.trim();
    let bad = |why: &str| format!("invalid listen address `{s}`: {why}");
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port (e.g. 0.0.0.0:5252)"))?;
    if let Some(inner) = host.strip_prefix('[') {
        let ok = inner
            .strip_suffix(']')
            .is_some_and(|v6| v6.parse::<Ipv6Addr>().is_ok());
        if !ok {
            return Err(bad("the part in brackets must be an IPv6 address"));
        }
    } else if host.contains(':') {
        return Err(bad("an IPv6 address needs brackets (e.g. [::1]:5252)"));
    } else if host.is_empty() {
        return Err(bad(
            "the host is missing (use 0.0.0.0:PORT for every interface)",
        ));
    } else if !is_host_name(host) {
        return Err(bad(&format!("`{host}` is not an IP address or host name")));
    }
    port.parse::<u16>()
        .map_err(|_| bad(&format!("`{port}` is not a port number (0-65535)")))?;
    Ok(s.to_string())
}

fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        || host.parse::<IpAddr>().is_ok()
}

/// Parses an upstream URL (`http://host[:port][/]` or `https://...`) and resolves it once.
/// The result carries the defaults of the optional fields (weight 1, tls_verify on).
pub fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let s = s.trim();
    let bad = |why: &str| format!("invalid upstream URL `{s}`: {why}");
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| bad("it must start with http:// or https://"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return Err(bad("it must start with http:// or https://")),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if !path.is_empty() && path != "/" {
        return Err(bad(&format!(
            "an upstream is a host and port; the path `{path}` is not allowed \
             (weir forwards each request's own path)"
        )));
    }
    if authority.contains('@') {
        return Err(bad("credentials in the URL are not supported"));
    }
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        let (v6, after) = after
            .split_once(']')
            .ok_or_else(|| bad("missing `]` after the IPv6 address"))?;
        v6.parse::<Ipv6Addr>()
            .map_err(|_| bad(&format!("`{v6}` is not an IPv6 address")))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| bad("expected `:port` after `]`"))?,
            ),
        };
        (v6, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("the host is missing"));
    }
    if !host.contains(':') && !is_host_name(host) {
        return Err(bad(&format!("`{host}` is not an IP address or host name")));
    }
    let port = match port {
        None => match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        },
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return Err(bad(&format!("`{p}` is not a port number (1-65535)"))),
        },
    };
    let host = host.to_ascii_lowercase();
    let scheme_name = match scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    let url = if host.contains(':') {
        format!("{scheme_name}://[{host}]:{port}")
    } else {
        format!("{scheme_name}://{host}:{port}")
    };
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve upstream `{url}`: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve upstream `{url}`: no address"))?;
    Ok(Upstream {
        url,
        scheme,
        host,
        port,
        addr,
        weight: 1,
        tls_verify: true,
        ca: None,
        sni: None,
    })
}

/// Checks a response header name and value.
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{name}` is not a valid header name"))?;
    http::HeaderValue::from_str(value)
        .map_err(|_| format!("the value of header `{name}` is not a valid header value"))?;
    Ok(())
}

/// Checks the shape of a TLS block: a cert and key pair, an ACME block, or both.
pub fn check_tls(tls: &TlsConfig) -> Result<(), String> {
    match (&tls.cert, &tls.key) {
        (Some(_), None) => return Err("tls.cert is set but tls.key is missing".into()),
        (None, Some(_)) => return Err("tls.key is set but tls.cert is missing".into()),
        (None, None) if tls.acme.is_none() => {
            return Err("tls needs `cert` and `key`, or an `acme` block".into())
        }
        _ => {}
    }
    if let Some(acme) = &tls.acme {
        if acme.domains.is_empty() {
            return Err("tls.acme.domains must list at least one domain".into());
        }
    }
    Ok(())
}

// === visitors ===

/// Reads one scalar (string, number or bool, as written) through `parse`, so that a bad value
/// is reported at its own line. `null_as` says what an explicit `~`/`null` means, if anything.
struct Scalar<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
    null_as: Option<&'static str>,
}

impl<T> Scalar<T> {
    fn new(expecting: &'static str, parse: fn(&str) -> Result<T, String>) -> Self {
        Scalar {
            expecting,
            parse,
            null_as: None,
        }
    }

    fn null_as(mut self, s: &'static str) -> Self {
        self.null_as = Some(s);
        self
    }
}

impl<'de, T> Visitor<'de> for Scalar<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        self.visit_str(if v { "true" } else { "false" })
    }

    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        match self.null_as {
            Some(s) => self.visit_str(s),
            None => Err(E::invalid_type(Unexpected::Unit, &self)),
        }
    }
}

/// A type read through a [`Scalar`] visitor, for use as a list element or map key.
trait ScalarValue: Sized {
    fn scalar() -> Scalar<Self>;
}

/// Deserializes `T` through its [`ScalarValue`] visitor.
struct Checked<T>(T);

impl<'de, T: ScalarValue> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(T::scalar()).map(Checked)
    }
}

fn scalar<'de, D: Deserializer<'de>, T>(d: D, v: Scalar<T>) -> Result<Option<T>, D::Error> {
    d.deserialize_any(v).map(Some)
}

fn parse_u32(s: &str) -> Result<u32, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number (0 or more)"))
}

fn parse_positive_u32(s: &str) -> Result<u32, String> {
    match parse_u32(s) {
        Ok(0) | Err(_) => Err(format!("`{s}` is not a whole number of at least 1")),
        Ok(n) => Ok(n),
    }
}

fn parse_positive_usize(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) | Err(_) => Err(format!("`{s}` is not a whole number of at least 1")),
        Ok(n) => Ok(n),
    }
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match units::parse_duration(s)? {
        d if d.is_zero() => Err(format!("`{s}` must be longer than 0")),
        d => Ok(d),
    }
}

/// `0`, `none`, `off` (or `null`) mean "no limit".
fn parse_duration_or_off(s: &str) -> Result<Option<Duration>, String> {
    match s.trim() {
        "none" | "off" => Ok(None),
        t => units::parse_duration(t).map(|d| Some(d).filter(|d| !d.is_zero())),
    }
}

fn de_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    scalar(d, Scalar::new("a whole number", parse_u32))
}

fn de_positive_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    scalar(
        d,
        Scalar::new("a whole number of at least 1", parse_positive_u32),
    )
}

fn de_positive_usize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    scalar(
        d,
        Scalar::new("a whole number of at least 1", parse_positive_usize),
    )
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    scalar(
        d,
        Scalar::new("a duration such as 250ms or 5s", units::parse_duration),
    )
}

fn de_positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    scalar(
        d,
        Scalar::new("a duration such as 5s", parse_positive_duration),
    )
}

fn de_duration_or_off<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<Duration>>, D::Error> {
    scalar(
        d,
        Scalar::new("a duration such as 5s, or off", parse_duration_or_off).null_as("off"),
    )
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    scalar(
        d,
        Scalar::new("a size such as 64KiB or 1MiB", units::parse_size),
    )
}

fn de_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    scalar(d, Scalar::new("a rate such as 200/s", units::parse_rate))
}

fn de_upstream_host<'de, D: Deserializer<'de>>(d: D) -> Result<Option<UpstreamHost>, D::Error> {
    scalar(
        d,
        Scalar::new("keep or rewrite", |s| match s.trim() {
            "keep" => Ok(UpstreamHost::Keep),
            "rewrite" => Ok(UpstreamHost::Rewrite),
            _ => Err(format!("`{s}` is not one of: keep, rewrite")),
        }),
    )
}

fn de_algorithm<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Algorithm>, D::Error> {
    scalar(
        d,
        Scalar::new("feedback or serviceq", |s| match s.trim() {
            "feedback" => Ok(Algorithm::Feedback),
            "serviceq" => Ok(Algorithm::Serviceq),
            _ => Err(format!("`{s}` is not one of: feedback, serviceq")),
        }),
    )
}

fn de_level<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    scalar(
        d,
        Scalar::new("a log level", |s| match s.trim() {
            l @ ("error" | "warn" | "info" | "debug" | "trace") => Ok(l.to_string()),
            _ => Err(format!(
                "`{s}` is not one of: error, warn, info, debug, trace"
            )),
        }),
    )
}

fn de_access<'de, D: Deserializer<'de>>(d: D) -> Result<Option<AccessLog>, D::Error> {
    scalar(
        d,
        Scalar::new("off, stdout or a file path", |s| match s.trim() {
            "off" => Ok(AccessLog::Off),
            "stdout" => Ok(AccessLog::Stdout),
            "" => Err("the access log needs off, stdout or a file path".to_string()),
            p => Ok(AccessLog::File(PathBuf::from(p))),
        })
        .null_as("off"),
    )
}

fn de_path_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<PathBuf>>, D::Error> {
    scalar(
        d,
        Scalar::new("a file path or off", |s| match s.trim() {
            "off" => Ok(None),
            "" => Err("expected a file path or off".to_string()),
            p => Ok(Some(PathBuf::from(p))),
        })
        .null_as("off"),
    )
}

fn de_addr_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    scalar(
        d,
        Scalar::new("host:port or off", |s| match s.trim() {
            "off" => Ok(None),
            a => check_listen_addr(a).map(Some),
        })
        .null_as("off"),
    )
}

fn de_upstream_url<'de, D: Deserializer<'de>>(d: D) -> Result<Upstream, D::Error> {
    d.deserialize_any(Scalar::new("an upstream URL", parse_upstream))
}

struct Status(u16);

impl ScalarValue for Status {
    fn scalar() -> Scalar<Self> {
        Scalar::new("an HTTP status (100-599)", |s| {
            match s.trim().parse::<u16>() {
                Ok(n @ 100..=599) => Ok(Status(n)),
                _ => Err(format!("`{s}` is not an HTTP status (100-599)")),
            }
        })
    }
}

fn de_statuses<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u16>>, D::Error> {
    let list: Vec<Checked<Status>> = Deserialize::deserialize(d)?;
    Ok(Some(list.into_iter().map(|Checked(Status(n))| n).collect()))
}

struct ListenAddr(String);

impl ScalarValue for ListenAddr {
    fn scalar() -> Scalar<Self> {
        Scalar::new("host:port", |s| check_listen_addr(s).map(ListenAddr))
    }
}

/// One `listen:` item before the `tls` block is known: `tls: None` follows the block.
struct RawListener {
    addr: String,
    tls: Option<bool>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a listener map with addr and tls")]
struct RawListenerMap {
    addr: Checked<ListenAddr>,
    tls: Option<bool>,
}

impl<'de> Deserialize<'de> for RawListener {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawListener;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("host:port or {addr: host:port, tls: true|false}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let addr = check_listen_addr(v).map_err(E::custom)?;
                Ok(RawListener { addr, tls: None })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let raw = RawListenerMap::deserialize(MapAccessDeserializer::new(map))?;
                Ok(RawListener {
                    addr: raw.addr.0 .0,
                    tls: raw.tls,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// `listen:` is one address or a list of them (at least one, no duplicates); an item may be a
/// map `{addr, tls}`.
fn de_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<RawListener>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<RawListener>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("host:port, {addr: host:port, tls: bool}, or a list of them")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            let addr = check_listen_addr(v).map_err(E::custom)?;
            Ok(vec![RawListener { addr, tls: None }])
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            let raw = RawListenerMap::deserialize(MapAccessDeserializer::new(map))?;
            Ok(vec![RawListener {
                addr: raw.addr.0 .0,
                tls: raw.tls,
            }])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out: Vec<RawListener> = Vec::new();
            while let Some(item) = seq.next_element::<RawListener>()? {
                if out.iter().any(|l| l.addr == item.addr) {
                    return Err(de::Error::custom(format!(
                        "listen address `{}` is listed twice",
                        item.addr
                    )));
                }
                out.push(item);
            }
            if out.is_empty() {
                return Err(de::Error::custom("listen needs at least one address"));
            }
            Ok(out)
        }
    }
    d.deserialize_any(V).map(Some)
}

/// One `upstreams:` item: a URL, or a map with `url` and options.
struct UpstreamItem(Upstream);

impl<'de> Deserialize<'de> for UpstreamItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Upstream;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an upstream URL or a map with `url`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Upstream, E> {
                parse_upstream(v).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Upstream, A::Error> {
                let raw = RawUpstream::deserialize(MapAccessDeserializer::new(map))?;
                let mut u = raw.url;
                set(&mut u.weight, raw.weight);
                set(&mut u.tls_verify, raw.tls_verify);
                u.ca = raw.ca;
                u.sni = raw.sni;
                Ok(u)
            }
        }
        d.deserialize_any(V).map(UpstreamItem)
    }
}

fn de_upstreams<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Upstream>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<Upstream>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of upstream URLs")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(E::custom("no upstreams configured"))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out: Vec<Upstream> = Vec::new();
            while let Some(UpstreamItem(u)) = seq.next_element()? {
                if out.iter().any(|o| o.url == u.url) {
                    return Err(de::Error::custom(format!(
                        "upstream `{}` is listed twice",
                        u.url
                    )));
                }
                out.push(u);
            }
            if out.is_empty() {
                return Err(de::Error::custom("no upstreams configured"));
            }
            Ok(out)
        }
    }
    d.deserialize_any(V).map(Some)
}

struct FormatEntry(String);

impl ScalarValue for FormatEntry {
    fn scalar() -> Scalar<Self> {
        Scalar::new("a request format such as `POST /orders`", |s| {
            RequestFormat::parse(s).map(|_| FormatEntry(s.to_string()))
        })
    }
}

/// `formats:` is a list of entries, or one comma-separated string as in `Q_REQUEST_FORMATS`;
/// `[]`, `""` and `~` mean no request.
fn de_formats<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RequestFormats>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = RequestFormats;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of request formats")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(RequestFormats::none())
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            RequestFormats::parse_csv(v).map_err(E::custom)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            while let Some(Checked(FormatEntry(e))) = seq.next_element()? {
                entries.push(e);
            }
            RequestFormats::parse_list(&entries).map_err(de::Error::custom)
        }
    }
    d.deserialize_any(V).map(Some)
}

struct HeaderText(String);

impl ScalarValue for HeaderText {
    fn scalar() -> Scalar<Self> {
        Scalar::new("a header name or value", |s| Ok(HeaderText(s.to_string())))
    }
}

/// `response_headers:` is a map, kept in file order; names are unique (case-insensitively).
fn de_headers<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<(String, String)>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of header name to value")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out: Vec<(String, String)> = Vec::new();
            let mut seen = HashSet::new();
            while let Some(Checked(HeaderText(name))) = map.next_key()? {
                let Checked(HeaderText(value)) = map.next_value()?;
                check_header(&name, &value).map_err(de::Error::custom)?;
                if !seen.insert(name.to_ascii_lowercase()) {
                    return Err(de::Error::custom(format!(
                        "response header `{name}` is set twice"
                    )));
                }
                out.push((name, value));
            }
            Ok(out)
        }
    }
    d.deserialize_any(V).map(Some)
}

/// Deserializes the raw map `R` and checks it with `check`, inside the map's own visitor so that
/// a failed check points at the map's line.
struct CheckedMap<R, T> {
    expecting: &'static str,
    check: fn(R) -> Result<T, String>,
    raw: PhantomData<R>,
}

impl<'de, R: Deserialize<'de>, T> Visitor<'de> for CheckedMap<R, T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        let raw = R::deserialize(MapAccessDeserializer::new(map))?;
        (self.check)(raw).map_err(de::Error::custom)
    }
}

fn de_tls<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TlsConfig>, D::Error> {
    let v = CheckedMap {
        expecting: "a tls block with cert and key, or acme",
        check: |raw: RawTls| {
            let tls = TlsConfig {
                cert: raw.cert,
                key: raw.key,
                acme: raw.acme,
            };
            check_tls(&tls).map(|()| tls)
        },
        raw: PhantomData,
    };
    d.deserialize_any(v).map(Some)
}

fn de_acme<'de, D: Deserializer<'de>>(d: D) -> Result<Option<AcmeConfig>, D::Error> {
    let v = CheckedMap {
        expecting: "an acme block",
        check: |raw: RawAcme| {
            if raw.domains.is_empty() {
                return Err("tls.acme.domains must list at least one domain".to_string());
            }
            Ok(AcmeConfig {
                directory: raw.directory,
                email: raw.email,
                domains: raw.domains,
                cache_dir: raw.cache_dir,
                renew_before: raw.renew_before.unwrap_or(DEFAULT_RENEW_BEFORE),
            })
        },
        raw: PhantomData,
    };
    d.deserialize_any(v).map(Some)
}

// === printing ===

/// Prints a config as native YAML that [`parse`] reads back to an equal [`Config`].
pub fn to_yaml(config: &Config) -> String {
    let c = config;
    let mut root = Mapping::new();
    // A listener that follows the `tls` block is written as its address alone.
    let listener = |l: &Listener| {
        if l.tls == c.tls.is_some() {
            return s(&l.addr);
        }
        let mut m = Mapping::new();
        m.insert(s("addr"), s(&l.addr));
        m.insert(s("tls"), Value::from(l.tls));
        Value::Mapping(m)
    };
    let listen = match c.listen.as_slice() {
        [one] => listener(one),
        many => Value::Sequence(many.iter().map(listener).collect()),
    };
    root.insert(s("listen"), listen);
    if let Some(tls) = &c.tls {
        let mut t = Mapping::new();
        opt(
            &mut t,
            "cert",
            tls.cert.as_ref().map(|p| p.display().to_string()),
        );
        opt(
            &mut t,
            "key",
            tls.key.as_ref().map(|p| p.display().to_string()),
        );
        if let Some(a) = &tls.acme {
            let mut m = Mapping::new();
            opt(&mut m, "directory", a.directory.clone());
            opt(&mut m, "email", a.email.clone());
            m.insert(
                s("domains"),
                Value::Sequence(a.domains.iter().map(|d| s(d)).collect()),
            );
            opt(
                &mut m,
                "cache_dir",
                a.cache_dir.as_ref().map(|p| p.display().to_string()),
            );
            m.insert(s("renew_before"), s(&format_duration(a.renew_before)));
            t.insert(s("acme"), Value::Mapping(m));
        }
        root.insert(s("tls"), Value::Mapping(t));
    }
    let upstreams = c.upstreams.iter().map(|u| {
        let plain = u.weight == 1 && u.tls_verify && u.ca.is_none() && u.sni.is_none();
        if plain {
            return s(&u.url);
        }
        let mut m = Mapping::new();
        m.insert(s("url"), s(&u.url));
        m.insert(s("weight"), Value::from(u.weight));
        m.insert(s("tls_verify"), Value::from(u.tls_verify));
        opt(&mut m, "ca", u.ca.as_ref().map(|p| p.display().to_string()));
        opt(&mut m, "sni", u.sni.clone());
        Value::Mapping(m)
    });
    root.insert(s("upstreams"), Value::Sequence(upstreams.collect()));
    let host = match c.upstream_host {
        UpstreamHost::Keep => "keep",
        UpstreamHost::Rewrite => "rewrite",
    };
    root.insert(s("upstream_host"), s(host));
    let algorithm = match c.routing.algorithm {
        Algorithm::Feedback => "feedback",
        Algorithm::Serviceq => "serviceq",
    };
    let statuses = c.routing.failure_statuses.iter().map(|n| Value::from(*n));
    section(
        &mut root,
        "routing",
        [
            ("algorithm", s(algorithm)),
            ("failure_statuses", Value::Sequence(statuses.collect())),
            ("decay_half_life", dur(c.routing.decay_half_life)),
        ],
    );
    section(
        &mut root,
        "retries",
        [
            ("max_attempts", Value::from(c.retries.max_attempts)),
            ("gap", dur(c.retries.gap)),
        ],
    );
    section(
        &mut root,
        "timeouts",
        [
            ("connect", dur(c.timeouts.connect)),
            ("request", c.timeouts.request.map_or_else(|| s("off"), dur)),
            ("keepalive", dur(c.timeouts.keepalive)),
        ],
    );
    section(
        &mut root,
        "limits",
        [
            ("concurrency_peak", Value::from(c.limits.concurrency_peak)),
            (
                "max_buffered_body",
                s(&format_size(c.limits.max_buffered_body)),
            ),
        ],
    );
    root.insert(s("deferred_queue"), queue(&c.deferred_queue));
    root.insert(s("upfront_queue"), queue(&c.upfront_queue));
    let mut headers = Mapping::new();
    for (name, value) in &c.response_headers {
        headers.insert(s(name), s(value));
    }
    root.insert(s("response_headers"), Value::Mapping(headers));
    let admin = c.admin.listen.as_deref().unwrap_or("off");
    section(&mut root, "admin", [("listen", s(admin))]);
    let access = match &c.log.access {
        AccessLog::Off => s("off"),
        AccessLog::Stdout => s("stdout"),
        AccessLog::File(p) => s(&p.display().to_string()),
    };
    let error_file = c
        .log
        .error_file
        .as_ref()
        .map_or_else(|| s("off"), |p| s(&p.display().to_string()));
    section(
        &mut root,
        "log",
        [
            ("level", s(&c.log.level)),
            ("access", access),
            ("error_file", error_file),
        ],
    );
    let srv = &c.server;
    section(
        &mut root,
        "server",
        [
            ("threads", Value::from(srv.threads)),
            ("pid_file", s(&srv.pid_file.display().to_string())),
            ("upgrade_sock", s(&srv.upgrade_sock.display().to_string())),
            ("grace_period", dur(srv.grace_period)),
            (
                "graceful_shutdown_timeout",
                dur(srv.graceful_shutdown_timeout),
            ),
        ],
    );
    serde_yaml::to_string(&Value::Mapping(root))
        .unwrap_or_else(|e| format!("# cannot print the config: {e}\n"))
}

fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

fn dur(d: Duration) -> Value {
    s(&format_duration(d))
}

fn opt(m: &mut Mapping, key: &str, value: Option<String>) {
    if let Some(v) = value {
        m.insert(s(key), Value::String(v));
    }
}

fn section<const N: usize>(root: &mut Mapping, name: &str, fields: [(&str, Value); N]) {
    let m: Mapping = fields.into_iter().map(|(k, v)| (s(k), v)).collect();
    root.insert(s(name), Value::Mapping(m));
}

fn queue(q: &QueueConfig) -> Value {
    let formats = q.formats.entries().into_iter().map(Value::String);
    let m: Mapping = [
        ("enabled", Value::from(q.enabled)),
        ("formats", Value::Sequence(formats.collect())),
        ("capacity", Value::from(q.capacity)),
        ("max_attempts", Value::from(q.max_attempts)),
        ("ttl", dur(q.ttl)),
        ("replay_unsafe", Value::from(q.replay_unsafe)),
        ("replay_rate", s(&format!("{}/s", q.replay_rate))),
        ("replay_concurrency", Value::from(q.replay_concurrency)),
    ]
    .into_iter()
    .map(|(k, v)| (s(k), v))
    .collect();
    Value::Mapping(m)
}

#[cfg(test)]
mod tests;
