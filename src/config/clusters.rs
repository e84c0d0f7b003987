//! Named clusters and the routes that pick one per request (`clusters:`, `routes:`).
//!
//! The top-level `upstreams` list is the cluster `default`; `clusters.default` may add the
//! dynamic parts (a registry, health checks) to it but not nodes of its own. Every other
//! cluster has static `upstreams`, a `registry` its nodes register in, or both. A cluster's
//! `timeouts` and `retries` override the top-level values key by key; what it does not set
//! follows them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{units, Retries, Timeouts, Upstream};

/// The cluster the top-level `upstreams` form, and where unmatched requests go.
pub const DEFAULT_CLUSTER: &str = "default";

/// One named cluster.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a cluster map: upstreams, registry, health_check, timeouts, retries"
)]
pub struct ClusterConfig {
    /// Static nodes (the `default` cluster's are the top-level `upstreams`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<Upstream>,
    /// Nodes may register themselves on the admin listener (`PUT /registry/{cluster}/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryConfig>,
    /// Nodes found in DNS (A/AAAA of `name`, or the SRV records of `srv`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
    /// Active health checks of every node of the cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(skip_serializing_if = "ClusterTimeouts::is_empty")]
    pub timeouts: ClusterTimeouts,
    #[serde(skip_serializing_if = "ClusterRetries::is_empty")]
    pub retries: ClusterRetries,
}

/// `registry:` of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a registry map with liveness"
)]
pub struct RegistryConfig {
    /// An entry not renewed (PUT again) for this long expires and leaves routing.
    #[serde(with = "units::positive_duration")]
    pub liveness: Duration,
    /// Where entries live: in this process (`memory`), or in Redis (`redis`, `store.redis`),
    /// shared by every weir instance that uses the same Redis and key.
    pub storage: RegistryStorage,
}

/// `registry.storage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "`memory` or `redis`")]
pub enum RegistryStorage {
    #[default]
    Memory,
    Redis,
}

impl RegistryConfig {
    pub const MIN_LIVENESS: Duration = Duration::from_secs(1);
    pub const MAX_LIVENESS: Duration = Duration::from_secs(3600);
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            liveness: Duration::from_secs(30),
            storage: RegistryStorage::Memory,
        }
    }
}

/// `dns:` of a cluster: `{name, port}` (A and AAAA records) or `{srv}` (SRV records, with
/// their ports and weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a dns map: name and port, or srv; refresh, server, scheme"
)]
pub struct DnsConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub srv: Option<String>,
    /// Records are looked up again when their TTL runs out, and at least this often.
    #[serde(with = "units::positive_duration")]
    pub refresh: Duration,
    /// The DNS server (`ip` or `ip:port`); default: the system's (/etc/resolv.conf).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// How the nodes found are spoken to.
    pub scheme: super::Scheme,
}

impl DnsConfig {
    pub const MIN_REFRESH: Duration = Duration::from_secs(1);
    pub const MAX_REFRESH: Duration = Duration::from_secs(3600);

    /// The server as a socket address (port 53 when not given); `Err` with the reason.
    pub fn server_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        let Some(s) = &self.server else {
            return Ok(None);
        };
        if let Ok(a) = s.parse::<std::net::SocketAddr>() {
            return Ok(Some(a));
        }
        s.parse::<std::net::IpAddr>()
            .map(|ip| Some(std::net::SocketAddr::new(ip, 53)))
            .map_err(|_| format!("`{s}` is not an IP address or ip:port"))
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            name: None,
            port: None,
            srv: None,
            refresh: Duration::from_secs(30),
            server: None,
            scheme: super::Scheme::Http,
        }
    }
}

/// What a health check probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "`tcp` or `http`")]
pub enum CheckKind {
    /// A TCP (and, for https nodes, TLS) connect.
    Tcp,
    /// A `GET path` that must answer `expect`.
    #[default]
    Http,
}

/// `health_check:` of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a health_check map: kind, path, expect, interval, timeout"
)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// The path an `http` check requests.
    pub path: String,
    /// The status an `http` check expects.
    pub expect: u16,
    /// Time between two probes of one node.
    #[serde(with = "units::positive_duration")]
    pub interval: Duration,
    /// A probe that has not succeeded within this long failed.
    #[serde(with = "units::positive_duration")]
    pub timeout: Duration,
}

impl HealthCheck {
    pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
    pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            kind: CheckKind::Http,
            path: "/healthz".into(),
            expect: 200,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
        }
    }
}

/// A cluster's own timeouts; an absent key follows the top-level `timeouts`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a map of timeouts: connect, request, first_byte, body_idle"
)]
pub struct ClusterTimeouts {
    #[serde(
        with = "units::inherited_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub connect: Option<Duration>,
    #[serde(
        with = "units::inherited_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub request: Option<Duration>,
    #[serde(
        with = "units::inherited_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub first_byte: Option<Duration>,
    #[serde(
        with = "units::inherited_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub body_idle: Option<Duration>,
}

impl ClusterTimeouts {
    pub fn is_empty(&self) -> bool {
        *self == ClusterTimeouts::default()
    }

    /// `base` with this cluster's keys in place of its own.
    pub fn over(&self, base: &Timeouts) -> Timeouts {
        let mut t = base.clone();
        if let Some(d) = self.connect {
            t.connect = d;
        }
        if let Some(d) = self.request {
            t.request = Some(d);
        }
        if let Some(d) = self.first_byte {
            t.first_byte = Some(d);
        }
        if let Some(d) = self.body_idle {
            t.body_idle = Some(d);
        }
        t
    }
}

/// A cluster's own retry rules; an absent key follows the top-level `retries`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a map of retry rules: max_attempts, gap"
)]
pub struct ClusterRetries {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(
        with = "units::inherited_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub gap: Option<Duration>,
}

impl ClusterRetries {
    pub fn is_empty(&self) -> bool {
        *self == ClusterRetries::default()
    }

    /// `base` with this cluster's keys in place of its own.
    pub fn over(&self, base: &Retries) -> Retries {
        let mut r = base.clone();
        if let Some(m) = self.max_attempts {
            r.max_attempts = m;
        }
        if let Some(g) = self.gap {
            r.gap = g;
        }
        r
    }
}

/// One entry of `routes:`: a request whose Host and path match goes to `cluster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a route map: host and/or path_prefix, and cluster"
)]
pub struct Route {
    /// The request's host (without port, case-insensitive); `*.example.com` matches every
    /// name below example.com.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The request path starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    pub cluster: String,
}

impl Route {
    /// Whether a request for `host` (lowercase, without port) and `path` matches.
    pub fn matches(&self, host: &str, path: &str) -> bool {
        let host_ok = match self.host.as_deref() {
            None => true,
            Some(want) => match want.strip_prefix("*.") {
                Some(suffix) => {
                    host.len() > suffix.len() + 1
                        && host.ends_with(suffix)
                        && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                }
                None => want.eq_ignore_ascii_case(host),
            },
        };
        host_ok
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path.starts_with(p))
    }
}

/// Whether `name` may name a cluster (a metric label and a URL path segment).
pub fn is_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, prefix: Option<&str>) -> Route {
        Route {
            host: host.map(Into::into),
            path_prefix: prefix.map(Into::into),
            cluster: "api".into(),
        }
    }

    #[test]
    fn routes_match_host_wildcards_and_path_prefixes() {
        let r = route(Some("api.example.com"), None);
        assert!(r.matches("api.example.com", "/"));
        assert!(!r.matches("www.example.com", "/"));
        let w = route(Some("*.example.com"), None);
        assert!(w.matches("a.example.com", "/x"));
        assert!(w.matches("a.b.example.com", "/x"));
        assert!(!w.matches("example.com", "/x"));
        assert!(!w.matches("badexample.com", "/x"));
        let p = route(None, Some("/api/"));
        assert!(p.matches("any", "/api/v1"));
        assert!(!p.matches("any", "/apix"));
        let both = route(Some("api.example.com"), Some("/v2/"));
        assert!(both.matches("api.example.com", "/v2/x"));
        assert!(!both.matches("api.example.com", "/v1/x"));
        assert!(!both.matches("other", "/v2/x"));
    }

    #[test]
    fn cluster_overrides_follow_the_top_level_keys_they_do_not_set() {
        let base = Timeouts::default();
        let t = ClusterTimeouts {
            connect: Some(Duration::from_millis(100)),
            ..Default::default()
        }
        .over(&base);
        assert_eq!(t.connect, Duration::from_millis(100));
        assert_eq!(t.request, base.request);
        let r = ClusterRetries {
            max_attempts: Some(2),
            gap: None,
        }
        .over(&Retries::default());
        assert_eq!(r.max_attempts, 2);
        assert_eq!(r.gap, Retries::default().gap);
    }
}
