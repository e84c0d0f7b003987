//! The rules that involve more than one value, in one pass over a whole [`Config`]: both
//! readers run it after building the config, so a YAML file and an sq.properties file are held
//! to the same rules, and so is a config the runtime later builds its state from.
//!
//! A finding names the native key it is about ([`Finding::at`]); each reader turns that into a
//! line of its own file (yaml.rs finds the key in the text; properties.rs maps it to the
//! sq.properties key that set it).

use std::fmt;
use std::time::Duration;

use super::clusters::{
    is_cluster_name, CheckKind, DnsConfig, HealthCheck, RegistryConfig, RegistryStorage,
};
use super::units::format_size;
use super::values::{check_header, host_port, is_host_name};
use super::{
    Config, Limits, QueueConfig, Scheme, Storage, ACME_NEEDS_PLAIN_LISTENER, DEFAULT_CLUSTER,
};

/// One step of a key path: a map key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Name(String),
    Index(usize),
}

/// A broken rule (or a warning) and the native key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// E.g. `[tls, acme, cache_dir]` or `[upstreams, 2]`.
    pub at: Vec<Key>,
    /// What is wrong, without the key (the reader puts its own name for it in front).
    pub message: String,
}

impl Finding {
    fn new(at: Vec<Key>, message: impl Into<String>) -> Self {
        Finding {
            at,
            message: message.into(),
        }
    }

    /// The key path as written in YAML terms: `tls.acme.cache_dir`, `upstreams[2]`.
    pub fn path(&self) -> String {
        let mut out = String::new();
        for k in &self.at {
            match k {
                Key::Name(n) if out.is_empty() => out.push_str(n),
                Key::Name(n) => {
                    out.push('.');
                    out.push_str(n);
                }
                Key::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path(), self.message)
    }
}

/// `at!("tls", "acme")`, `at!("upstreams"; 2)`.
macro_rules! at {
    ($($name:expr),+) => { vec![$(Key::Name($name.to_string())),+] };
    ($($name:expr),+; $index:expr) => { vec![$(Key::Name($name.to_string())),+, Key::Index($index)] };
}

impl Config {
    /// Checks the rules between values; `Ok` carries the warnings (accepted, but worth saying).
    pub fn validate(&self) -> Result<Vec<Finding>, Finding> {
        let mut warnings = Vec::new();
        self.check_listeners(&mut warnings)?;
        self.check_tls(&mut warnings)?;
        self.check_upstreams(&mut warnings)?;
        self.check_clusters(&mut warnings)?;
        self.check_response_headers()?;
        self.check_bounds()?;
        self.check_admin(&mut warnings);
        Ok(warnings)
    }

    /// An admin listener off loopback is reachable from the network: said at every start.
    fn check_admin(&self, warnings: &mut Vec<Finding>) {
        let Some(addr) = &self.admin.listen else {
            return;
        };
        if is_loopback_listen(addr) {
            return;
        }
        let message = if self.admin.token.is_some() {
            format!(
                "`{addr}` is not a loopback address: status, metrics and queues are readable \
                 from the network (DELETE /queue/dead needs admin.token); firewall the port if \
                 that is not intended"
            )
        } else {
            format!(
                "`{addr}` is not a loopback address: the admin API (status, metrics, queues, \
                 DELETE /queue/dead) is open to the network; set admin.token and firewall the port"
            )
        };
        warnings.push(Finding::new(at!("admin", "listen"), message));
    }

    /// Values that would make weir allocate more than a machine has.
    fn check_bounds(&self) -> Result<(), Finding> {
        for (name, q) in [
            ("deferred_queue", &self.deferred_queue),
            ("upfront_queue", &self.upfront_queue),
        ] {
            if q.capacity > QueueConfig::MAX_CAPACITY {
                return Err(Finding::new(
                    at!(name, "capacity"),
                    format!(
                        "{} is more than the maximum of {} entries (a bound on the memory a \
                         full queue may hold)",
                        q.capacity,
                        QueueConfig::MAX_CAPACITY
                    ),
                ));
            }
            let (max, what) = match q.storage {
                Storage::Memory => (
                    QueueConfig::MAX_MEMORY_BYTES,
                    "a memory queue holds every byte in memory",
                ),
                Storage::Log => (
                    QueueConfig::MAX_BYTES,
                    "the log queue also keeps every entry in memory",
                ),
                Storage::Redis => (
                    QueueConfig::MAX_MEMORY_BYTES,
                    "Redis holds every byte in memory",
                ),
            };
            if q.storage == Storage::Redis && self.store.redis.url.is_empty() {
                return Err(Finding::new(
                    at!(name, "storage"),
                    "storage: redis needs store.redis.url (redis://host:port[/db])".to_string(),
                ));
            }
            if q.max_bytes > max {
                return Err(Finding::new(
                    at!(name, "max_bytes"),
                    format!(
                        "{} is more than the maximum of {} for storage {} ({what})",
                        format_size(q.max_bytes),
                        format_size(max),
                        q.storage.label()
                    ),
                ));
            }
        }
        let r = &self.store.redis;
        let url_ok =
            r.url.is_empty() || r.url.starts_with("redis://") || r.url.starts_with("unix://");
        if !url_ok {
            return Err(Finding::new(
                at!("store", "redis", "url"),
                format!("{:?} is not a redis:// or unix:// URL", r.url),
            ));
        }
        if r.lease < Duration::from_secs(1) || r.lease > Duration::from_secs(600) {
            return Err(Finding::new(
                at!("store", "redis", "lease"),
                "must be within 1s..10m".to_string(),
            ));
        }
        if r.timeout.is_zero() || r.timeout * 2 > r.lease {
            return Err(Finding::new(
                at!("store", "redis", "timeout"),
                "must be above 0 and at most half of store.redis.lease".to_string(),
            ));
        }
        if self.store.segment_size < (1 << 20) || self.store.segment_size > (1 << 30) {
            return Err(Finding::new(
                at!("store", "segment_size"),
                format!(
                    "{} is outside 1MiB..1GiB",
                    format_size(self.store.segment_size)
                ),
            ));
        }
        if self.hedging.min_delay > self.hedging.max_delay {
            return Err(Finding::new(
                at!("hedging", "min_delay"),
                format!(
                    "{} is longer than hedging.max_delay ({})",
                    super::units::format_duration(self.hedging.min_delay),
                    super::units::format_duration(self.hedging.max_delay)
                ),
            ));
        }
        let body = self.limits.max_buffered_body;
        if body > Limits::MAX_BUFFERED_BODY {
            return Err(Finding::new(
                at!("limits", "max_buffered_body"),
                format!(
                    "{} is more than the maximum of {} (every request in flight may hold a \
                     body this size in memory)",
                    format_size(body),
                    format_size(Limits::MAX_BUFFERED_BODY)
                ),
            ));
        }
        Ok(())
    }

    fn check_listeners(&self, warnings: &mut Vec<Finding>) -> Result<(), Finding> {
        if self.listen.is_empty() {
            return Err(Finding::new(
                at!("listen"),
                "at least one address is needed",
            ));
        }
        for (i, l) in self.listen.iter().enumerate() {
            if self.listen[..i].iter().any(|o| o.addr == l.addr) {
                return Err(Finding::new(
                    at!("listen"; i),
                    format!("`{}` is listed twice", l.addr),
                ));
            }
            if l.tls && self.tls.is_none() {
                return Err(Finding::new(
                    at!("listen"; i),
                    format!(
                        "`{}` has `tls: true` but there is no `tls` block (cert and key, or acme)",
                        l.addr
                    ),
                ));
            }
        }
        if self.tls.is_some() && !self.listen.iter().any(|l| l.tls) {
            warnings.push(Finding::new(
                at!("tls"),
                "a `tls` block is configured but every listener says `tls: false`",
            ));
        }
        Ok(())
    }

    fn check_tls(&self, warnings: &mut Vec<Finding>) -> Result<(), Finding> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        match (&tls.cert, &tls.key) {
            (Some(_), None) => {
                return Err(Finding::new(at!("tls", "cert"), "tls.key is missing"));
            }
            (None, Some(_)) => {
                return Err(Finding::new(at!("tls", "key"), "tls.cert is missing"));
            }
            (None, None) if tls.acme.is_none() => {
                return Err(Finding::new(
                    at!("tls"),
                    "tls needs `cert` and `key`, or an `acme` block",
                ));
            }
            _ => {}
        }
        if let Some(acme) = &tls.acme {
            if acme.domains.is_empty() {
                return Err(Finding::new(
                    at!("tls", "acme", "domains"),
                    "must list at least one domain",
                ));
            }
            for (i, d) in acme.domains.iter().enumerate() {
                let why = if d.starts_with("*.") {
                    "is a wildcard, which ACME issues only through the DNS-01 challenge; weir \
                     answers HTTP-01"
                } else if !is_host_name(d) || d.parse::<std::net::IpAddr>().is_ok() {
                    "is not a DNS name"
                } else {
                    continue;
                };
                return Err(Finding::new(
                    at!("tls", "acme", "domains"; i),
                    format!("`{d}` {why}"),
                ));
            }
            if let Some(dir) = &acme.directory {
                if !(dir.starts_with("https://") || dir.starts_with("http://")) {
                    return Err(Finding::new(
                        at!("tls", "acme", "directory"),
                        format!("`{dir}` is not an http(s):// URL of an ACME directory"),
                    ));
                }
            }
            if acme.cache_dir.is_none() {
                return Err(Finding::new(
                    at!("tls", "acme", "cache_dir"),
                    "required (the directory where the ACME account, certificate and key are kept)",
                ));
            }
            if self.listen.iter().all(|l| l.tls) {
                warnings.push(Finding::new(at!("tls", "acme"), ACME_NEEDS_PLAIN_LISTENER));
            }
        }
        Ok(())
    }

    fn check_upstreams(&self, warnings: &mut Vec<Finding>) -> Result<(), Finding> {
        let registered = self
            .clusters
            .get(DEFAULT_CLUSTER)
            .is_some_and(|c| c.registry.is_some() || c.dns.is_some());
        if self.upstreams.is_empty() && !registered {
            return Err(Finding::new(at!("upstreams"), "no upstreams configured"));
        }
        check_node_list(&self.upstreams, &["upstreams"], warnings)
    }

    fn check_clusters(&self, warnings: &mut Vec<Finding>) -> Result<(), Finding> {
        for (name, c) in &self.clusters {
            let here = |key: &str| at!("clusters", name, key);
            if !is_cluster_name(name) {
                return Err(Finding::new(
                    at!("clusters", name),
                    format!("`{name}` is not a cluster name (1-64 letters, digits, `-`, `_`, `.`)"),
                ));
            }
            if name == DEFAULT_CLUSTER && !c.upstreams.is_empty() {
                return Err(Finding::new(
                    here("upstreams"),
                    "the default cluster's nodes are the top-level `upstreams`; list them there",
                ));
            }
            if name != DEFAULT_CLUSTER
                && c.upstreams.is_empty()
                && c.registry.is_none()
                && c.dns.is_none()
            {
                return Err(Finding::new(
                    at!("clusters", name),
                    format!(
                        "cluster `{name}` has no nodes: give it `upstreams`, a `registry` or `dns`"
                    ),
                ));
            }
            if let Some(d) = &c.dns {
                let at_dns = |key: &str| at!("clusters", name, "dns", key);
                match (&d.name, &d.srv) {
                    (Some(_), Some(_)) | (None, None) => return Err(Finding::new(
                        at!("clusters", name, "dns"),
                        "give either `name` (with `port`: A/AAAA records) or `srv` (SRV records)",
                    )),
                    (Some(n), None) => {
                        if !is_host_name(n.trim_end_matches('.')) {
                            return Err(Finding::new(
                                at_dns("name"),
                                format!("`{n}` is not a host name"),
                            ));
                        }
                        if d.port.is_none_or(|p| p == 0) {
                            return Err(Finding::new(
                                at!("clusters", name, "dns"),
                                "`name` needs a `port` (1-65535); SRV records carry their own",
                            ));
                        }
                    }
                    (None, Some(s)) => {
                        if !is_host_name(
                            s.trim_end_matches('.')
                                .trim_start_matches('_')
                                .replace("._", ".")
                                .as_str(),
                        ) {
                            return Err(Finding::new(
                                at_dns("srv"),
                                format!("`{s}` is not an SRV name (_service._proto.name)"),
                            ));
                        }
                        if d.port.is_some() {
                            return Err(Finding::new(
                                at_dns("port"),
                                "SRV records carry their own ports; remove `port`",
                            ));
                        }
                    }
                }
                let (lo, hi) = (DnsConfig::MIN_REFRESH, DnsConfig::MAX_REFRESH);
                if d.refresh < lo || d.refresh > hi {
                    return Err(Finding::new(
                        at_dns("refresh"),
                        format!("must be between {lo:?} and {hi:?}"),
                    ));
                }
                d.server_addr()
                    .map_err(|why| Finding::new(at_dns("server"), why))?;
            }
            check_node_list(&c.upstreams, &["clusters", name, "upstreams"], warnings)?;
            if let Some(r) = &c.registry {
                let (lo, hi) = (RegistryConfig::MIN_LIVENESS, RegistryConfig::MAX_LIVENESS);
                if r.liveness < lo || r.liveness > hi {
                    return Err(Finding::new(
                        at!("clusters", name, "registry", "liveness"),
                        format!("must be between {lo:?} and {hi:?}"),
                    ));
                }
                if r.storage == RegistryStorage::Redis && self.store.redis.url.is_empty() {
                    return Err(Finding::new(
                        at!("clusters", name, "registry", "storage"),
                        "storage: redis needs store.redis.url (redis://host:port[/db])",
                    ));
                }
            }
            if let Some(h) = &c.health_check {
                let at_check = |key: &str| at!("clusters", name, "health_check", key);
                let (lo, hi) = (HealthCheck::MIN_INTERVAL, HealthCheck::MAX_INTERVAL);
                if h.interval < lo || h.interval > hi {
                    return Err(Finding::new(
                        at_check("interval"),
                        format!("must be between {lo:?} and {hi:?}"),
                    ));
                }
                if h.timeout > h.interval {
                    return Err(Finding::new(
                        at_check("timeout"),
                        "must not be longer than the interval",
                    ));
                }
                if h.kind == CheckKind::Http {
                    if !h.path.starts_with('/')
                        || http::uri::PathAndQuery::try_from(h.path.as_str()).is_err()
                    {
                        return Err(Finding::new(
                            at_check("path"),
                            format!("`{}` is not a request path (it starts with `/`)", h.path),
                        ));
                    }
                    if !(100..=599).contains(&h.expect) {
                        return Err(Finding::new(
                            at_check("expect"),
                            format!("{} is not an HTTP status (100-599)", h.expect),
                        ));
                    }
                }
            }
            if c.retries.max_attempts.is_some_and(|m| m > 100) {
                return Err(Finding::new(
                    at!("clusters", name, "retries", "max_attempts"),
                    "at most 100",
                ));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let here = || at!("routes"; i);
            if r.cluster != DEFAULT_CLUSTER && !self.clusters.contains_key(&r.cluster) {
                return Err(Finding::new(
                    here(),
                    format!("no cluster named `{}` (see `clusters`)", r.cluster),
                ));
            }
            if r.host.is_none() && r.path_prefix.is_none() {
                return Err(Finding::new(
                    here(),
                    "a route needs `host`, `path_prefix` or both (a catch-all is the default cluster)",
                ));
            }
            if let Some(h) = &r.host {
                let bare = h.strip_prefix("*.").unwrap_or(h);
                if !is_host_name(bare) && bare.parse::<std::net::IpAddr>().is_err() {
                    return Err(Finding::new(
                        here(),
                        format!(
                            "`{h}` is not a host name (a leading `*.` matches every name below)"
                        ),
                    ));
                }
            }
            if let Some(p) = &r.path_prefix {
                if !p.starts_with('/') {
                    return Err(Finding::new(
                        here(),
                        format!("path_prefix `{p}` must start with `/`"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One cluster's static nodes: no URL twice, a usable Host, a warning for unchecked TLS.
fn check_node_list(
    nodes: &[super::Upstream],
    at: &[&str],
    warnings: &mut Vec<Finding>,
) -> Result<(), Finding> {
    let key = |i: usize| {
        let mut k: Vec<Key> = at.iter().map(|n| Key::Name(n.to_string())).collect();
        k.push(Key::Index(i));
        k
    };
    {
        for (i, u) in nodes.iter().enumerate() {
            if nodes[..i].iter().any(|o| o.url == u.url) {
                return Err(Finding::new(
                    key(i),
                    format!("upstream `{}` is listed twice", u.url),
                ));
            }
            // `upstream_host: rewrite` sends this as the Host header.
            let host = host_port(&u.host, u.port);
            if http::HeaderValue::from_str(&host).is_err() {
                return Err(Finding::new(
                    key(i),
                    format!("`{host}` is not a valid Host header"),
                ));
            }
            if u.scheme == Scheme::Https && !u.tls_verify {
                warnings.push(Finding::new(
                    key(i),
                    format!(
                        "upstream {}: tls_verify: false, its certificate is not checked (anyone on the path can impersonate it)",
                        u.url
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl Config {
    fn check_response_headers(&self) -> Result<(), Finding> {
        for (i, (name, value)) in self.response_headers.iter().enumerate() {
            let here = || at!("response_headers", name);
            check_header(name, value).map_err(|why| Finding::new(here(), why))?;
            let earlier = &self.response_headers[..i];
            if earlier.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                return Err(Finding::new(
                    here(),
                    format!("response header `{name}` is set twice"),
                ));
            }
        }
        Ok(())
    }
}

/// A listen address (`host:port`, IPv6 in brackets) on loopback: `localhost` or a loopback IP.
pub fn is_loopback_listen(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_print_in_yaml_terms() {
        let f = Finding::new(at!("upstreams"; 2), "x");
        assert_eq!(f.path(), "upstreams[2]");
        let f = Finding::new(at!("tls", "acme", "cache_dir"), "x");
        assert_eq!(f.to_string(), "tls.acme.cache_dir: x");
    }

    #[test]
    fn loopback_listen_addresses() {
        for a in [
            "127.0.0.1:9100",
            "127.3.2.1:1",
            "[::1]:9100",
            "localhost:9100",
            "LOCALHOST:1",
        ] {
            assert!(is_loopback_listen(a), "{a}");
        }
        for a in [
            "0.0.0.0:9100",
            "[::]:9100",
            "10.0.0.1:9100",
            "admin.example:9100",
        ] {
            assert!(!is_loopback_listen(a), "{a}");
        }
    }

    #[test]
    fn an_admin_listener_off_loopback_is_warned() {
        let mut c = Config::embedded_default();
        let mut w = Vec::new();
        c.check_admin(&mut w);
        assert!(w.is_empty(), "{w:?}");
        c.admin.listen = Some("0.0.0.0:9100".into());
        c.check_admin(&mut w);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].path(), "admin.listen");
        assert!(w[0].message.contains("set admin.token"), "{}", w[0]);
    }
}
