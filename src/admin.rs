//! The admin listener: `GET /` (live status page), `GET /status.json`, `GET /metrics`
//! (Prometheus text), `GET /healthz`, `GET /queue`, `DELETE /queue/dead`, and the registry
//! (`PUT`/`DELETE /registry/{cluster}/{id}`, `GET /registry[/{cluster}]`).
//! Bound to loopback by default; it is for operators, not clients.
//!
//! Two checks run before a request is routed ([`Access`]):
//!
//! - **Host** (DNS rebinding): a web page the operator's browser opens may point a name it
//!   controls at 127.0.0.1 and read the admin API as its own origin. Such a request carries that
//!   name in `Host`, so only requests naming this listener are answered: `localhost`, a
//!   loopback address, the address the connection arrived on, the listener's own host, or one of
//!   `admin.hosts`; others get `421 Misdirected Request`. The port is not compared: a browser
//!   always sends the port it connected to, so it tells nothing about the page, and a tunnel
//!   (`ssh -L 8080:localhost:9100`) changes it. A request without `Host` (HTTP/1.0) comes from
//!   no browser and is answered.
//! - **Token**: with `admin.token` set, every method but GET and HEAD (`DELETE /queue/dead`)
//!   needs `Authorization: Bearer <token>`, compared in constant time; else `401`.

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::config::Admin;
use crate::discovery::RegistryError;
use crate::proxy::Gateway;
use crate::status::{self, Started};

const JSON: &str = "application/json";

pub struct AdminApp {
    gateway: Arc<Gateway>,
    started: Started,
    access: Access,
}

impl AdminApp {
    /// The admin settings are the ones the gateway started with (`admin` changes only with
    /// `weir run -u`).
    pub fn new(gateway: Arc<Gateway>) -> AdminApp {
        let access = Access::new(&gateway.runtime().config.admin);
        AdminApp {
            gateway,
            started: Started::now(),
            access,
        }
    }

    /// `GET /queue`: depth, capacity, oldest age and dead letters of each queue.
    fn queue_status(&self) -> Vec<u8> {
        let state = self.gateway.runtime();
        let q = &self.gateway.queues;
        let body = serde_json::json!({
            "deferred": q.deferred.status(state.config.deferred_queue.enabled),
            "upfront": q.upfront.status(state.config.upfront_queue.enabled),
        });
        body.to_string().into_bytes()
    }

    /// The registry API: `PUT`/`DELETE /registry/{cluster}/{id}`, `GET /registry/{cluster}`,
    /// `GET /registry`.
    async fn registry(
        &self,
        method: &http::Method,
        path: &str,
        session: &mut ServerSession,
    ) -> (StatusCode, &'static str, Vec<u8>) {
        let rest = path.strip_prefix("/registry").unwrap_or("");
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let parts: Vec<&str> = match rest.is_empty() {
            true => Vec::new(),
            false => rest.split('/').collect(),
        };
        let runtime = self.gateway.runtime();
        let discovery = &self.gateway.discovery;
        let registry = &discovery.registry;
        let json =
            |status: StatusCode, v: serde_json::Value| (status, JSON, v.to_string().into_bytes());
        let refused = |e: RegistryError| match e {
            RegistryError::NoRegistry(m) => {
                json(StatusCode::NOT_FOUND, serde_json::json!({ "error": m }))
            }
            RegistryError::Bad(m) => {
                json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": m }))
            }
            RegistryError::Unavailable(m) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "error": format!("registry unavailable: {m}") }),
            ),
        };
        match (method.as_str(), parts.as_slice()) {
            ("GET" | "HEAD", []) => json(StatusCode::OK, registry.counts(&runtime)),
            ("GET" | "HEAD", [cluster]) => match registry.list(&runtime, cluster) {
                Ok(v) => json(StatusCode::OK, v),
                Err(e) => refused(e),
            },
            ("PUT", [cluster, id]) => {
                let mut body = Vec::new();
                loop {
                    match session.read_request_body().await {
                        Ok(Some(chunk)) => {
                            if body.len() + chunk.len() > crate::discovery::registry::MAX_BODY {
                                return json(
                                    StatusCode::PAYLOAD_TOO_LARGE,
                                    serde_json::json!({ "error": "a registry entry is at most 16 KiB" }),
                                );
                            }
                            body.extend_from_slice(&chunk);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            return json(
                                StatusCode::BAD_REQUEST,
                                serde_json::json!({ "error": format!("reading the body: {e}") }),
                            )
                        }
                    }
                }
                match registry.put(&runtime, cluster, id, &body).await {
                    Ok((entry, changed)) => {
                        if changed {
                            discovery.rebuild();
                        }
                        json(StatusCode::OK, entry)
                    }
                    Err(e) => refused(e),
                }
            }
            ("DELETE", [cluster, id]) => match registry.delete(&runtime, cluster, id).await {
                Ok(removed) => {
                    if removed {
                        discovery.rebuild();
                    }
                    (StatusCode::NO_CONTENT, JSON, Vec::new())
                }
                Err(e) => refused(e),
            },
            (_, [] | [_] | [_, _]) => json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({ "error": "method not allowed: GET /registry[/{cluster}], PUT or DELETE /registry/{cluster}/{id}" }),
            ),
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": "not found" }),
            ),
        }
    }

    fn route(&self, method: &http::Method, path: &str) -> (StatusCode, &'static str, Vec<u8>) {
        match (method.as_str(), path) {
            ("GET", "/metrics") => {
                self.gateway.refresh_gauges();
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.gateway.metrics.encode(),
                )
            }
            ("GET", "/healthz") => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            ("GET", "/") => (
                StatusCode::OK,
                "text/html; charset=utf-8",
                status::PAGE.as_bytes().to_vec(),
            ),
            ("GET", "/status.json") => (
                StatusCode::OK,
                JSON,
                status::status_json(&self.gateway, &self.started),
            ),
            ("GET", "/queue") => (StatusCode::OK, JSON, self.queue_status()),
            ("DELETE", "/queue/dead") => {
                let q = &self.gateway.queues;
                let deferred = q.deferred.purge_dead();
                let upfront = q.upfront.purge_dead();
                let body = serde_json::json!({
                    "purged": deferred + upfront,
                    "deferred": deferred,
                    "upfront": upfront,
                });
                (StatusCode::OK, JSON, body.to_string().into_bytes())
            }
            (_, "/metrics" | "/healthz" | "/queue" | "/queue/dead" | "/" | "/status.json") => (
                StatusCode::METHOD_NOT_ALLOWED,
                JSON,
                br#"{"error":"method not allowed"}"#.to_vec(),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                JSON,
                br#"{"error":"not found"}"#.to_vec(),
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let local_ip = session
            .server_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let mut hosts = req.headers.get_all(http::header::HOST).iter();
        let host = match (req.uri.authority(), hosts.next(), hosts.next()) {
            (Some(authority), _, _) => Some(Ok(authority.as_str().as_bytes())),
            (None, Some(h), None) => Some(Ok(h.as_bytes())),
            (None, None, _) => None,
            (None, Some(_), Some(_)) => Some(Err(())),
        };
        let method = req.method.clone();
        let needs_token = !matches!(method, http::Method::GET | http::Method::HEAD);
        let authorization = req.headers.get(http::header::AUTHORIZATION);
        let (status, content_type, body) = if !self.access.host_allowed(host, local_ip) {
            let named = match host {
                Some(Ok(h)) => String::from_utf8_lossy(h).into_owned(),
                _ => "(several)".to_string(),
            };
            let body = serde_json::json!({
                "error": format!(
                    "misdirected request: the admin API does not answer to Host `{named}` \
                     (DNS rebinding protection); use localhost, a loopback address or the \
                     address it listens on, or add the name to admin.hosts"
                ),
            });
            (
                StatusCode::MISDIRECTED_REQUEST,
                JSON,
                body.to_string().into_bytes(),
            )
        } else if needs_token && !self.access.authorized(authorization.map(|v| v.as_bytes())) {
            let body = serde_json::json!({
                "error": format!(
                    "unauthorized: {method} needs `Authorization: Bearer <admin.token>`"
                ),
            });
            (
                StatusCode::UNAUTHORIZED,
                JSON,
                body.to_string().into_bytes(),
            )
        } else {
            let path = req.uri.path().to_string();
            if path == "/registry" || path.starts_with("/registry/") {
                self.registry(&method, &path, session).await
            } else {
                self.route(&method, &path)
            }
        };
        let mut resp = Response::builder().status(status);
        if status != StatusCode::NO_CONTENT {
            resp = resp
                .header(http::header::CONTENT_TYPE, content_type)
                .header(http::header::CONTENT_LENGTH, body.len());
        }
        let mut resp = resp
            // Live values: a cached copy is a wrong one.
            .header(http::header::CACHE_CONTROL, "no-store");
        if status == StatusCode::UNAUTHORIZED {
            resp = resp.header(
                http::header::WWW_AUTHENTICATE,
                "Bearer realm=\"weir admin\"",
            );
        }
        resp.body(body)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}

/// Who the admin API answers (see the module docs).
#[derive(Debug)]
struct Access {
    token: Option<Box<[u8]>>,
    /// Lower-cased host names (or IP literals) besides localhost and loopback addresses: the
    /// listener's own host when it is a specific address, and `admin.hosts`.
    names: Vec<String>,
}

impl Access {
    fn new(admin: &Admin) -> Access {
        let mut names = admin.hosts.clone();
        if let Some(own) = admin.listen.as_deref().and_then(host_of) {
            let unspecified = own.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified());
            if !unspecified {
                names.push(own.to_ascii_lowercase());
            }
        }
        Access {
            token: admin
                .token
                .as_ref()
                .map(|t| t.as_bytes().to_vec().into_boxed_slice()),
            names,
        }
    }

    /// Whether the request's `Host` (or absolute-form authority) names this listener: `None`
    /// when the request has none, `Err` when it has several.
    fn host_allowed(&self, host: Option<Result<&[u8], ()>>, local_ip: Option<IpAddr>) -> bool {
        let raw = match host {
            None => return true,
            Some(Err(())) => return false,
            Some(Ok(raw)) => raw,
        };
        let Some(host) = std::str::from_utf8(raw).ok().and_then(host_of) else {
            return false;
        };
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        if host == "localhost" {
            return true;
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            let ip = ip.to_canonical();
            return ip.is_loopback()
                || local_ip.is_some_and(|l| l.to_canonical() == ip)
                || self
                    .names
                    .iter()
                    .any(|n| n.parse::<IpAddr>().is_ok_and(|n| n.to_canonical() == ip));
        }
        self.names.contains(&host)
    }

    /// Whether a request that changes something may: no token configured, or `Authorization:
    /// Bearer <token>` with that token.
    fn authorized(&self, authorization: Option<&[u8]>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let Some(value) = authorization else {
            return false;
        };
        let Some((scheme, credentials)) = split_once(value, b' ') else {
            return false;
        };
        scheme.eq_ignore_ascii_case(b"bearer") && constant_time_eq(credentials.trim_ascii(), token)
    }
}

fn split_once(v: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = v.iter().position(|&b| b == sep)?;
    Some((&v[..i], &v[i + 1..]))
}

/// Compares `given` with `secret` in a time that depends on `secret`'s length only, not on
/// where the first difference is.
fn constant_time_eq(given: &[u8], secret: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != secret.len());
    for (i, s) in secret.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(!s);
        diff |= g ^ s;
    }
    std::hint::black_box(diff) == 0
}

/// The host of `host[:port]` or `[v6][:port]` (without brackets); `None` when it is not that.
fn host_of(authority: &str) -> Option<&str> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        v6.parse::<std::net::Ipv6Addr>().ok()?;
        match after {
            "" => (v6, None),
            p => (v6, Some(p.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    (port_ok && host_ok).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(listen: &str, token: Option<&str>, hosts: &[&str]) -> Access {
        Access::new(&Admin {
            listen: Some(listen.to_string()),
            token: token.map(str::to_string),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        })
    }

    fn allowed(a: &Access, host: &str, local: &str) -> bool {
        a.host_allowed(Some(Ok(host.as_bytes())), local.parse().ok())
    }

    #[test]
    fn loopback_names_and_the_listener_itself_are_answered() {
        let a = access("127.0.0.1:9100", None, &[]);
        for h in [
            "127.0.0.1:9100",
            "127.0.0.1",
            "localhost:9100",
            "LocalHost",
            "localhost.:8080",
            "[::1]:9100",
            "127.9.9.9:1",
        ] {
            assert!(allowed(&a, h, "127.0.0.1"), "{h}");
        }
        assert!(a.host_allowed(None, None), "no Host (HTTP/1.0)");
    }

    #[test]
    fn other_names_are_misdirected() {
        let a = access("127.0.0.1:9100", None, &[]);
        for h in [
            "evil.example",
            "evil.example:9100",
            "localhost.evil.example",
            "10.0.0.5:9100",
            "",
            ":9100",
            "127.0.0.1:x",
            "[::1",
            "a b",
            "127.0.0.1@evil",
        ] {
            assert!(!allowed(&a, h, "127.0.0.1"), "{h}");
        }
        assert!(!a.host_allowed(Some(Err(())), None), "several Host headers");
        assert!(!a.host_allowed(Some(Ok(b"\xff")), None));
    }

    #[test]
    fn a_specific_listener_address_its_connection_address_and_admin_hosts_are_answered() {
        let a = access("10.0.0.5:9100", None, &["weir-1.internal"]);
        assert!(allowed(&a, "10.0.0.5:9100", "10.0.0.5"));
        assert!(allowed(&a, "WEIR-1.internal:9100", "10.0.0.5"));
        assert!(!allowed(&a, "weir-2.internal:9100", "10.0.0.5"));
        // Bound to every interface: the address the request came in on.
        let any = access("0.0.0.0:9100", None, &[]);
        assert!(allowed(&any, "192.168.1.7:9100", "192.168.1.7"));
        assert!(allowed(&any, "192.168.1.7:9100", "::ffff:192.168.1.7"));
        assert!(!allowed(&any, "192.168.1.8:9100", "192.168.1.7"));
        assert!(!allowed(&any, "0.0.0.0:9100", "192.168.1.7"));
        let named = access("admin.internal:9100", None, &[]);
        assert!(allowed(&named, "admin.internal", "10.0.0.5"));
    }

    #[test]
    fn the_token_is_needed_only_when_configured() {
        let open = access("127.0.0.1:9100", None, &[]);
        assert!(open.authorized(None));
        let t = "0123456789abcdef0123";
        let a = access("127.0.0.1:9100", Some(t), &[]);
        assert!(a.authorized(Some(format!("Bearer {t}").as_bytes())));
        assert!(a.authorized(Some(format!("bearer  {t} ").as_bytes())));
        for bad in [
            String::new(),
            t.to_string(),
            format!("Basic {t}"),
            format!("Bearer {t}x"),
            format!("Bearer {}", &t[..t.len() - 1]),
            "Bearer ".to_string(),
        ] {
            assert!(!a.authorized(Some(bad.as_bytes())), "{bad:?}");
        }
        assert!(!a.authorized(None));
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abd", b"abc"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abcd", b"abc"));
        assert!(!constant_time_eq(b"", b"abc"));
    }
}
