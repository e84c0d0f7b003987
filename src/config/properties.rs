//! ServiceQ's `sq.properties`, read as is into a [`Config`].
//!
//! The file is `KEY=value` lines and `#` comments. ServiceQ is lenient in ways that hide
//! mistakes: it panics on a line without `=`, drops the text after a second `=`, ignores
//! `KEY = value` (spaces around the key), turns an unparsable number into 0 and ignores unknown
//! keys. weir reports each of these as an error with its line number instead, so a file either
//! means what it says or is refused.
//!
//! The reader starts from [`Config::default`] and sets the fields the file's keys map to (the
//! table in `interface.md`), then runs [`Config::validate`] like the YAML reader; a finding is
//! reported at the line of the sq.properties key that set the native key it names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::formats::RequestFormats;
use super::validate::{Finding, Key};
use super::values::{check_listen_addr, parse_upstream};
use super::{
    AcmeConfig, Config, ConfigError, ConfigWarning, Listener, Loaded, QueueConfig, TlsConfig,
    Upstream, DEFAULT_RENEW_BEFORE,
};

/// Every key weir understands in sq.properties.
pub(crate) const KEYS: &[&str] = &[
    "LISTENER_PORT",
    "LISTENER_ADDR",
    "PROTO",
    "ENDPOINTS",
    "CONCURRENCY_PEAK",
    "OUTGOING_REQUEST_TIMEOUT",
    "RETRY_GAP",
    "ENABLE_DEFERRED_Q",
    "ENABLE_UPFRONT_Q",
    "Q_REQUEST_FORMATS",
    "DEFERRED_Q_REQUEST_FORMATS",
    "CUSTOM_RESPONSE_HEADERS",
    "KEEP_ALIVE_TIMEOUT",
    "SSL_ENABLE",
    "SSL_CERTIFICATE_FILE",
    "SSL_PRIVATE_KEY_FILE",
    "SSL_AUTO_ENABLE",
    "SSL_AUTO_CERTIFICATE_DIR",
    "SSL_AUTO_EMAIL",
    "SSL_AUTO_DOMAIN_NAMES",
    "SSL_AUTO_RENEW_BEFORE",
    "METRICS_LISTENER",
];

/// ServiceQ's default listener port.
const DEFAULT_PORT: u16 = 5252;

/// One `KEY=value` line.
struct Entry<'a> {
    line: usize,
    value: &'a str,
}

/// The file's lines, checked for shape and indexed by key.
struct Lines<'a> {
    path: &'a Path,
    entries: HashMap<&'a str, Entry<'a>>,
}

impl<'a> Lines<'a> {
    fn read(path: &'a Path, text: &'a str) -> Result<Self, ConfigError> {
        let mut entries: HashMap<&str, Entry> = HashMap::new();
        // A UTF-8 byte order mark (as some Windows editors save) is not part of the first key.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |msg: String| ConfigError::new(path, Some(line), msg);
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let (key, value) = raw.split_once('=').ok_or_else(|| {
                err(format!(
                    "expected KEY=value, found `{trimmed}` (ServiceQ would crash on this line)"
                ))
            })?;
            if key != key.trim() {
                return Err(err(format!(
                    "remove the spaces around the key `{}`: write `{}=...` \
                     (ServiceQ silently ignores this line)",
                    key.trim(),
                    key.trim()
                )));
            }
            if key.is_empty() {
                return Err(err("a key is missing before `=`".to_string()));
            }
            if value.contains('=') {
                return Err(err(format!(
                    "a second `=` in the value of {key} (ServiceQ drops everything after it)"
                )));
            }
            if !KEYS.contains(&key) {
                return Err(err(format!("unknown key `{key}`")));
            }
            if let Some(first) = entries.get(key) {
                return Err(err(format!(
                    "duplicate key `{key}` (first set on line {})",
                    first.line
                )));
            }
            entries.insert(
                key,
                Entry {
                    line,
                    value: value.trim(),
                },
            );
        }
        Ok(Lines { path, entries })
    }

    /// A validation finding in this file's terms: at the line of the first key that set it,
    /// named by that key.
    fn report(&self, finding: Finding) -> (Option<usize>, String) {
        let set_by = origin(&finding.at)
            .iter()
            .find_map(|k| self.get(k).map(|e| (*k, e.line)));
        match set_by {
            Some((key, line)) => (Some(line), format!("{key}: {finding}")),
            None => (None, finding.to_string()),
        }
    }

    fn get(&self, key: &str) -> Option<&Entry<'a>> {
        self.entries.get(key)
    }

    fn error(&self, line: Option<usize>, msg: impl Into<String>) -> ConfigError {
        ConfigError::new(self.path, line, msg)
    }

    /// Parses the value of `key` with `parse`, if the key is present; errors name key and line.
    fn value<T>(
        &self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(e) => parse(e.value)
                .map(Some)
                .map_err(|why| self.error(Some(e.line), format!("{key}: {why}"))),
        }
    }
}

fn integer(s: &str) -> Result<i64, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not a whole number (ServiceQ would silently use 0)"))
}

fn seconds(s: &str) -> Result<Duration, String> {
    match integer(s)? {
        n if n < 0 => Err(format!("`{s}` must not be negative")),
        n => Ok(Duration::from_secs(n.unsigned_abs())),
    }
}

fn boolean(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("`{s}` is not true or false")),
    }
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("the value is empty".to_string())
    } else {
        Ok(s.to_string())
    }
}

/// `ENDPOINTS`: comma-separated upstream URLs.
fn endpoints(s: &str) -> Result<Vec<Upstream>, String> {
    s.split(',')
        .map(|item| match item.trim() {
            "" => Err("an empty entry (two commas in a row, or a comma at an end)".to_string()),
            url => parse_upstream(url),
        })
        .collect()
}

/// `CUSTOM_RESPONSE_HEADERS`: `Name: value` entries separated by `|`; a bare `Server` means
/// `Server: weir`. Names and values are checked by [`Config::validate`].
fn response_headers(s: &str) -> Result<Vec<(String, String)>, String> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split('|')
        .map(str::trim)
        .map(|item| match item.split_once(':') {
            Some((n, v)) => Ok((n.trim().to_string(), v.trim().to_string())),
            None if item.eq_ignore_ascii_case("Server") => Ok(("Server".into(), "weir".into())),
            None if item.is_empty() => {
                Err("an empty entry (two `|` in a row, or one at an end)".to_string())
            }
            None => Err(format!("`{item}` is not `Name: value`")),
        })
        .collect()
}

/// Reads a ServiceQ `sq.properties` file. `path` is only used to label errors.
pub fn parse(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let f = Lines::read(path, text)?;
    let upstreams = f
        .value("ENDPOINTS", endpoints)?
        .ok_or_else(|| f.error(None, "no upstreams configured (ENDPOINTS is missing)"))?;

    let port = f
        .value("LISTENER_PORT", |s| {
            integer(s).and_then(|n| {
                u16::try_from(n).map_err(|_| format!("`{s}` is not a port number (0-65535)"))
            })
        })?
        .unwrap_or(DEFAULT_PORT);
    let host = f.value("LISTENER_ADDR", non_empty)?;
    let host = host.unwrap_or_else(|| "0.0.0.0".to_string());
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let addr = check_listen_addr(&addr).map_err(|why| {
        let line = f.get("LISTENER_ADDR").map(|e| e.line);
        f.error(line, format!("LISTENER_ADDR: {why}"))
    })?;

    let mut c = Config {
        listen: vec![Listener { addr, tls: false }],
        upstreams,
        ..Config::default()
    };

    let mut capped_peak = None;
    if let Some(peak) = f.value("CONCURRENCY_PEAK", |s| match integer(s)? {
        n if n >= 1 => usize::try_from(n).map_err(|_| format!("`{s}` is too large")),
        _ => Err(format!("`{s}` must be at least 1")),
    })? {
        c.limits.concurrency_peak = peak;
        // ServiceQ's buffer is as large as its peak; weir's queue has a ceiling.
        c.deferred_queue.capacity = peak.min(QueueConfig::MAX_CAPACITY);
        if peak > QueueConfig::MAX_CAPACITY {
            capped_peak = f.get("CONCURRENCY_PEAK").map(|e| e.line);
        }
    }
    if let Some(t) = f.value("OUTGOING_REQUEST_TIMEOUT", integer)? {
        c.timeouts.request = u64::try_from(t)
            .ok()
            .filter(|t| *t > 0)
            .map(Duration::from_secs);
    }
    if let Some(gap) = f.value("RETRY_GAP", seconds)? {
        c.retries.gap = gap;
    }
    if let Some(k) = f.value("KEEP_ALIVE_TIMEOUT", integer)? {
        // As OUTGOING_REQUEST_TIMEOUT: 0 or less turns it off.
        c.timeouts.keepalive = u64::try_from(k)
            .ok()
            .filter(|k| *k > 0)
            .map(Duration::from_secs);
    }
    if let Some(on) = f.value("ENABLE_DEFERRED_Q", boolean)? {
        c.deferred_queue.enabled = on;
    }
    if let Some(on) = f.value("ENABLE_UPFRONT_Q", boolean)? {
        c.upfront_queue.enabled = on;
    }

    let formats = match (
        f.get("Q_REQUEST_FORMATS"),
        f.get("DEFERRED_Q_REQUEST_FORMATS"),
    ) {
        (Some(new), Some(old)) => {
            return Err(f.error(
                Some(new.line.max(old.line)),
                format!(
                    "both Q_REQUEST_FORMATS (line {}) and its old name DEFERRED_Q_REQUEST_FORMATS \
                     (line {}) are set; keep only Q_REQUEST_FORMATS",
                    new.line, old.line
                ),
            ))
        }
        (Some(_), None) => f.value("Q_REQUEST_FORMATS", RequestFormats::parse_csv)?,
        (None, Some(_)) => f.value("DEFERRED_Q_REQUEST_FORMATS", RequestFormats::parse_csv)?,
        (None, None) => None,
    }
    .unwrap_or_else(RequestFormats::all);
    c.deferred_queue.formats = formats.clone();
    c.upfront_queue.formats = formats;

    if let Some(h) = f.value("CUSTOM_RESPONSE_HEADERS", response_headers)? {
        c.response_headers = h;
    }
    if let Some(admin) = f.value("METRICS_LISTENER", |s| match s {
        "off" => Ok(None),
        a => check_listen_addr(a).map(Some),
    })? {
        c.admin.listen = admin;
    }
    let mut warnings = Vec::new();
    if let Some(line) = capped_peak {
        warnings.push(ConfigWarning {
            line: Some(line),
            message: format!(
                "CONCURRENCY_PEAK={} also sizes the deferred queue, which holds at most {} \
                 entries: deferred_queue.capacity is {}",
                c.limits.concurrency_peak,
                QueueConfig::MAX_CAPACITY,
                QueueConfig::MAX_CAPACITY
            ),
        });
    }
    c.tls = tls(&f, &mut warnings)?;
    // ServiceQ has one listener: PROTO=https, SSL_ENABLE or SSL_AUTO_ENABLE makes it TLS.
    for l in &mut c.listen {
        l.tls = c.tls.is_some();
    }
    let found = c
        .validate()
        .map_err(|finding| {
            let (line, message) = f.report(finding);
            f.error(line, message)
        })?
        .into_iter()
        .map(|finding| {
            let (line, message) = f.report(finding);
            ConfigWarning { line, message }
        });
    warnings.extend(found);
    warnings.sort_by_key(|w| w.line);
    Ok(Loaded {
        config: c,
        warnings,
    })
}

/// The sq.properties keys that set a native key, most specific first.
fn origin(at: &[Key]) -> &'static [&'static str] {
    let name = |i: usize| match at.get(i) {
        Some(Key::Name(n)) => n.as_str(),
        _ => "",
    };
    match (name(0), name(1), name(2)) {
        ("listen", _, _) => &["PROTO", "LISTENER_ADDR", "LISTENER_PORT"],
        ("tls", "acme", "domains") => &["SSL_AUTO_DOMAIN_NAMES", "SSL_AUTO_ENABLE"],
        ("tls", "acme", "cache_dir") => &["SSL_AUTO_CERTIFICATE_DIR", "SSL_AUTO_ENABLE"],
        ("tls", "acme", _) => &["SSL_AUTO_ENABLE"],
        ("tls", "cert", _) => &["SSL_CERTIFICATE_FILE", "SSL_ENABLE", "PROTO"],
        ("tls", "key", _) => &["SSL_PRIVATE_KEY_FILE", "SSL_ENABLE", "PROTO"],
        ("tls", _, _) => &["SSL_ENABLE", "PROTO", "SSL_AUTO_ENABLE"],
        ("upstreams", _, _) => &["ENDPOINTS"],
        ("response_headers", _, _) => &["CUSTOM_RESPONSE_HEADERS"],
        ("limits", "concurrency_peak", _) | ("deferred_queue", "capacity", _) => {
            &["CONCURRENCY_PEAK"]
        }
        ("admin", _, _) => &["METRICS_LISTENER"],
        _ => &[],
    }
}

/// `PROTO`, `SSL_ENABLE` (cert and key files) and `SSL_AUTO_*` (ACME) → `tls`. The listener
/// is TLS when any of PROTO=https, SSL_ENABLE=true or SSL_AUTO_ENABLE=true says so; a PROTO
/// that says otherwise is warned. The SSL keys are checked even when TLS is off, so a typo
/// does not wait for the day it is turned on.
fn tls(f: &Lines, warnings: &mut Vec<ConfigWarning>) -> Result<Option<TlsConfig>, ConfigError> {
    let https = f.value("PROTO", |s| match s.to_ascii_lowercase().as_str() {
        "http" => Ok(false),
        "https" => Ok(true),
        _ => Err(format!("`{s}` is not http or https")),
    })?;
    let manual = f.value("SSL_ENABLE", boolean)?;
    let cert = f
        .value("SSL_CERTIFICATE_FILE", non_empty)?
        .map(PathBuf::from);
    let key = f
        .value("SSL_PRIVATE_KEY_FILE", non_empty)?
        .map(PathBuf::from);
    let auto = f.value("SSL_AUTO_ENABLE", boolean)?.unwrap_or(false);
    let cache_dir = f.value("SSL_AUTO_CERTIFICATE_DIR", non_empty)?;
    let email = f.value("SSL_AUTO_EMAIL", |s| {
        Ok(Some(s.to_string()).filter(|s| !s.is_empty()))
    })?;
    let domains = f.value("SSL_AUTO_DOMAIN_NAMES", |s| {
        Ok(s.split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(String::from)
            .collect::<Vec<_>>())
    })?;
    let renew = f.value("SSL_AUTO_RENEW_BEFORE", |s| match integer(s)? {
        n if n >= 1 => Ok(Duration::from_secs(n.unsigned_abs().saturating_mul(86_400))),
        _ => Err(format!("`{s}` must be at least 1 (days)")),
    })?;
    let line = |key: &str| f.get(key).map(|e| e.line);
    let proto_line = line("PROTO");

    // Who asks for the cert and key files: SSL_ENABLE=true, or PROTO=https without ACME (or
    // with ACME and the files given, served until ACME has a certificate).
    let by_ssl_enable = manual == Some(true);
    let by_proto = https == Some(true) && (!auto || cert.is_some() || key.is_some());
    let mut tls = TlsConfig::default();
    if by_ssl_enable || by_proto {
        let (asker, at) = match by_ssl_enable {
            true => ("SSL_ENABLE=true", line("SSL_ENABLE")),
            false => ("PROTO=https", proto_line),
        };
        match (cert, key) {
            (Some(cert), Some(key)) => {
                tls.cert = Some(cert);
                tls.key = Some(key);
            }
            (None, None) if !by_ssl_enable => {
                return Err(f.error(
                    at,
                    "PROTO=https needs SSL_CERTIFICATE_FILE and SSL_PRIVATE_KEY_FILE, \
                     or SSL_AUTO_ENABLE=true (ACME)",
                ));
            }
            (None, _) => {
                return Err(f.error(at, format!("{asker} needs SSL_CERTIFICATE_FILE")));
            }
            (_, None) => {
                return Err(f.error(at, format!("{asker} needs SSL_PRIVATE_KEY_FILE")));
            }
        }
    }
    if auto {
        let domains = domains.unwrap_or_default();
        if domains.is_empty() {
            return Err(f.error(
                line("SSL_AUTO_ENABLE"),
                "SSL_AUTO_ENABLE=true needs SSL_AUTO_DOMAIN_NAMES",
            ));
        }
        if cache_dir.is_none() {
            return Err(f.error(
                line("SSL_AUTO_ENABLE"),
                "SSL_AUTO_ENABLE=true needs SSL_AUTO_CERTIFICATE_DIR (where the account, \
                 certificate and key are kept)",
            ));
        }
        tls.acme = Some(AcmeConfig {
            directory: None,
            email: email.flatten(),
            domains,
            cache_dir: cache_dir.map(PathBuf::from),
            renew_before: renew.unwrap_or(DEFAULT_RENEW_BEFORE),
        });
    }
    let on = by_ssl_enable || by_proto || auto;
    // PROTO disagreeing with the SSL keys: the listener is TLS, as the key that says so.
    let disagreeing = match https {
        Some(false) if by_ssl_enable => Some(("SSL_ENABLE", "PROTO=https")),
        Some(false) if auto => Some(("SSL_AUTO_ENABLE", "PROTO=https")),
        Some(true) if manual == Some(false) => Some(("SSL_ENABLE", "SSL_ENABLE=true")),
        _ => None,
    };
    if let (Some((other, fix)), Some(at)) = (disagreeing, proto_line) {
        let proto = f.get("PROTO").map_or("", |e| e.value);
        let (other_value, other_line) = f.get(other).map_or(("", 0), |e| (e.value, e.line));
        warnings.push(ConfigWarning {
            line: Some(at),
            message: format!(
                "PROTO={proto} (line {at}) and {other}={other_value} (line {other_line}) \
                 disagree: the listener is TLS; write {fix}"
            ),
        });
    }
    Ok(on.then_some(tls))
}

#[cfg(test)]
mod tests;
