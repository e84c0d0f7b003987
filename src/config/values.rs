//! The config's value types: each reads itself from what it is written as (one scalar, a list
//! or a map) and prints itself back in a form that reads to the same value.
//!
//! Why checks run inside deserialization: serde_yaml attaches a line only to errors raised
//! while a value is being read, so every check that needs just that value (a URL, an address,
//! a status) runs in its visitor, and the operator gets `weir.yaml:12: upstreams[1]: ...`.
//! Rules that involve several values are in validate.rs. The parsers are plain functions
//! returning `Err(reason)`, shared with the sq.properties reader.
//!
//! A field whose Rust type is a plain `Vec`, `usize` or `Option` but whose file form is special
//! gets a `with` module here (`#[serde(with = "values::positive")]`); the other value types
//! implement `Deserialize`/`Serialize` themselves.

use std::cell::Cell;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Unexpected, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::{
    AccessLog, Algorithm, ErrorLog, Fsync, Listener, Scheme, Storage, Upstream, UpstreamHost,
};

// === the scalar reader ===

/// Reads one scalar (string, number or bool, as written) through `parse`, so that a bad value
/// is reported at its own line. `null_as` says what an explicit `~`/`null` means, if anything.
pub(crate) struct Scalar<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
    null_as: Option<&'static str>,
}

impl<T> Clone for Scalar<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Scalar<T> {}

impl<T> Scalar<T> {
    pub(crate) fn new(expecting: &'static str, parse: fn(&str) -> Result<T, String>) -> Self {
        Scalar {
            expecting,
            parse,
            null_as: None,
        }
    }

    pub(crate) fn null_as(mut self, s: &'static str) -> Self {
        self.null_as = Some(s);
        self
    }

    /// Reads one value with this scalar's rules.
    pub(crate) fn read<'de, D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
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

/// A [`Scalar`] as a seed, for list elements and map keys and values.
impl<'de, T> DeserializeSeed<'de> for Scalar<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        self.read(d)
    }
}

/// Reads a list whose every element is read by `item`; `~` is the empty list.
fn read_list<'de, D: Deserializer<'de>, T>(d: D, item: Scalar<T>) -> Result<Vec<T>, D::Error> {
    struct V<T>(Scalar<T>);
    impl<'de, T> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a list of {}", self.0.expecting)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Vec<T>, E> {
            Ok(Vec::new())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = seq.next_element_seed(self.0)? {
                out.push(v);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V(item))
}

// === numbers ===

/// `0` or more.
pub mod count {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>, T: FromStr>(d: D) -> Result<T, D::Error> {
        Scalar::new("a whole number", parse::<T>).read(d)
    }

    pub fn serialize<S: Serializer, T: Serialize>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn parse<T: FromStr>(s: &str) -> Result<T, String> {
        s.trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a whole number (0 or more)"))
    }
}

/// `1` or more.
pub mod positive {
    use super::*;

    pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr + PartialEq + From<u8>,
    {
        Scalar::new("a whole number of at least 1", parse::<T>).read(d)
    }

    pub fn serialize<S: Serializer, T: Serialize>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn parse<T: FromStr + PartialEq + From<u8>>(s: &str) -> Result<T, String> {
        match s.trim().parse::<T>() {
            Ok(n) if n != T::from(0) => Ok(n),
            _ => Err(format!("`{s}` is not a whole number of at least 1")),
        }
    }
}

/// A whole number of at least 1, or `auto` (`None`).
pub mod positive_or_auto {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        Scalar::new("a whole number of at least 1, or auto", |s| {
            match s.trim() {
                "auto" => Ok(None),
                t => positive::parse::<usize>(t)
                    .map(Some)
                    .map_err(|e| format!("{e} (or auto)")),
            }
        })
        .null_as("auto")
        .read(d)
    }

    pub fn serialize<S: Serializer>(v: &Option<usize>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_u64(*n as u64),
            None => s.serialize_str("auto"),
        }
    }
}

/// HTTP statuses (100-599).
pub mod statuses {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
        read_list(d, Scalar::new("an HTTP status (100-599)", parse))
    }

    pub fn serialize<S: Serializer>(v: &[u16], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    fn parse(s: &str) -> Result<u16, String> {
        match s.trim().parse::<u16>() {
            Ok(n @ 100..=599) => Ok(n),
            _ => Err(format!("`{s}` is not an HTTP status (100-599)")),
        }
    }
}

// === keywords ===

/// Reads one of `names` (as written) into the matching value.
fn keyword<T: Copy>(s: &str, table: &[(&str, T)]) -> Result<T, String> {
    let t = s.trim();
    table
        .iter()
        .find(|(name, _)| *name == t)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            format!("`{s}` is not one of: {}", names.join(", "))
        })
}

impl<'de> Deserialize<'de> for Algorithm {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Scalar::new("feedback or serviceq", |s| {
            keyword(
                s,
                &[
                    ("feedback", Algorithm::Feedback),
                    ("serviceq", Algorithm::Serviceq),
                ],
            )
        })
        .read(d)
    }
}

impl<'de> Deserialize<'de> for UpstreamHost {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Scalar::new("keep or rewrite", |s| {
            keyword(
                s,
                &[
                    ("keep", UpstreamHost::Keep),
                    ("rewrite", UpstreamHost::Rewrite),
                ],
            )
        })
        .read(d)
    }
}

impl<'de> Deserialize<'de> for Storage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Scalar::new("log, memory or redis", |s| {
            keyword(
                s,
                &[
                    ("log", Storage::Log),
                    ("memory", Storage::Memory),
                    ("redis", Storage::Redis),
                ],
            )
        })
        .read(d)
    }
}

/// The queue log's fsync policy: `always`, `never`, or an interval such as `5ms`.
pub mod fsync {
    use super::*;
    use crate::config::units::{format_duration, parse_duration};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Fsync, D::Error> {
        Scalar::new("always, never, or an interval such as 5ms", |s| {
            match s.trim() {
                "always" => Ok(Fsync::Always),
                "never" => Ok(Fsync::Never),
                t => match parse_duration(t) {
                    Ok(d) if d.is_zero() => Ok(Fsync::Always),
                    Ok(d) if d > std::time::Duration::from_secs(60) => Err(format!(
                        "an fsync interval of {t} could lose a minute of buffered requests on a \
                     power loss; at most 60s (or never)"
                    )),
                    Ok(d) => Ok(Fsync::Interval(d)),
                    Err(e) => Err(format!("`{s}` is not always, never, or an interval ({e})")),
                },
            }
        })
        .read(d)
    }

    pub fn serialize<S: Serializer>(f: &Fsync, s: S) -> Result<S::Ok, S::Error> {
        match f {
            Fsync::Always => s.serialize_str("always"),
            Fsync::Never => s.serialize_str("never"),
            Fsync::Interval(d) => s.serialize_str(&format_duration(*d)),
        }
    }
}

/// A directory, or `auto` for the default.
pub mod path_or_auto {
    use super::*;
    use std::path::PathBuf;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        Scalar::new("a directory, or auto", |s| match s.trim() {
            "auto" => Ok(None),
            "" => Err("an empty path (say auto for the default)".to_string()),
            t => Ok(Some(PathBuf::from(t))),
        })
        .null_as("auto")
        .read(d)
    }

    pub fn serialize<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.serialize_str(&p.to_string_lossy()),
            None => s.serialize_str("auto"),
        }
    }
}

/// The log level, one of error, warn, info, debug, trace.
pub mod level {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Scalar::new("a log level", |s| {
            keyword(
                s,
                &[
                    ("error", "error"),
                    ("warn", "warn"),
                    ("info", "info"),
                    ("debug", "debug"),
                    ("trace", "trace"),
                ],
            )
            .map(String::from)
        })
        .read(d)
    }

    pub fn serialize<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v)
    }
}

// === paths and logs ===

impl<'de> Deserialize<'de> for AccessLog {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Scalar::new("off, stdout or a file path", |s| match s.trim() {
            "off" => Ok(AccessLog::Off),
            "stdout" => Ok(AccessLog::Stdout),
            "" => Err("the access log needs off, stdout or a file path".to_string()),
            p => Ok(AccessLog::File(PathBuf::from(p))),
        })
        .null_as("off")
        .read(d)
    }
}

impl Serialize for AccessLog {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AccessLog::Off => s.serialize_str("off"),
            AccessLog::Stdout => s.serialize_str("stdout"),
            AccessLog::File(p) => p.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ErrorLog {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Scalar::new("stderr, off or a file path", |s| match s.trim() {
            "stderr" => Ok(ErrorLog::Stderr),
            "off" => Ok(ErrorLog::Off),
            "" => Err("the error log needs stderr, off or a file path".to_string()),
            p => Ok(ErrorLog::File(PathBuf::from(p))),
        })
        .null_as("off")
        .read(d)
    }
}

impl Serialize for ErrorLog {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ErrorLog::Stderr => s.serialize_str("stderr"),
            ErrorLog::Off => s.serialize_str("off"),
            ErrorLog::File(p) => p.serialize(s),
        }
    }
}

// === addresses ===

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
    } else if looks_like_ipv4(host) && host.parse::<Ipv4Addr>().is_err() {
        return Err(bad(&format!(
            "`{host}` is not an IPv4 address (four numbers 0-255, e.g. 127.0.0.1)"
        )));
    } else if !is_host_name(host) {
        return Err(bad(&format!("`{host}` is not an IP address or host name")));
    }
    port.parse::<u16>()
        .map_err(|_| bad(&format!("`{port}` is not a port number (0-65535)")))?;
    Ok(s.to_string())
}

/// A DNS name (letters, digits, `-`, `_`, dot-separated) or an IP literal. A name whose last
/// label is all digits is neither (RFC 3696 §2: no top-level domain is numeric), so
/// `999.1.1.1` or `10.1` is refused here rather than handed to the resolver.
pub fn is_host_name(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok()
        || !host.is_empty()
            && !looks_like_ipv4(host)
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
}

/// Dot-separated with an all-digit last label: an IPv4 address or nothing at all.
fn looks_like_ipv4(host: &str) -> bool {
    let last = host.rsplit('.').next().unwrap_or("");
    !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit())
}

/// `deserialize_with` for [`Listener::addr`].
pub fn listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Scalar::new("host:port", check_listen_addr).read(d)
}

/// `host:port`, or `off` (also `~`) for none.
pub mod addr_or_off {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Scalar::new("host:port or off", |s| match s.trim() {
            "off" => Ok(None),
            a => check_listen_addr(a).map(Some),
        })
        .null_as("off")
        .read(d)
    }

    pub fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.as_deref().unwrap_or("off"))
    }
}

/// `admin.token`: a bearer token, or `off` (also `~`) for none.
pub mod token_or_off {
    use super::*;

    /// Shorter tokens are refused: they can be guessed.
    pub const MIN_LEN: usize = 16;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Scalar::new("a token of 16 or more visible characters, or off", parse)
            .null_as("off")
            .read(d)
    }

    pub fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.as_deref().unwrap_or("off"))
    }

    pub fn parse(s: &str) -> Result<Option<String>, String> {
        if s == "off" {
            return Ok(None);
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the admin token must be visible ASCII characters, without spaces (it is sent \
                 as `Authorization: Bearer <token>`)"
                    .to_string(),
            );
        }
        if s.len() < MIN_LEN {
            return Err(format!(
                "the admin token has {} characters; use at least {MIN_LEN} (e.g. the output of \
                 `openssl rand -hex 16`)",
                s.len()
            ));
        }
        Ok(Some(s.to_string()))
    }
}

/// `admin.hosts`: host names or IP addresses (no port), kept lower-cased.
pub mod host_names {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        read_list(d, Scalar::new("a host name or IP address", parse))
    }

    pub fn serialize<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn parse(s: &str) -> Result<String, String> {
        let t = s.trim();
        let bare = t
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .unwrap_or(t);
        if is_host_name(bare) {
            Ok(bare.to_ascii_lowercase())
        } else {
            Err(format!(
                "`{s}` is not a host name or IP address (write it without a port)"
            ))
        }
    }
}

impl<'de> Deserialize<'de> for Listener {
    /// `host:port`, or the map `{addr, tls}` (the derived reader).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Listener;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("host:port or {addr: host:port, tls: true|false}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Listener, E> {
                let addr = check_listen_addr(v).map_err(E::custom)?;
                Ok(Listener { addr, tls: false })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Listener, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Listener, A::Error> {
                Listener::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Listener {
    /// Always the map, so that `tls` is explicit in printed configs.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Listener::serialize(self, s)
    }
}

/// `listen:` is one listener or a list of them.
pub mod listeners {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Listener>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<Listener>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("host:port, {addr: host:port, tls: bool}, or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let addr = check_listen_addr(v).map_err(E::custom)?;
                Ok(vec![Listener { addr, tls: false }])
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Listener::deserialize(MapAccessDeserializer::new(map)).map(|l| vec![l])
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(l) = seq.next_element::<Listener>()? {
                    out.push(l);
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }

    pub fn serialize<S: Serializer>(v: &[Listener], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }
}

// === upstreams ===

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
    let url = format!("{scheme_name}://{}", host_port(&host, port));
    let addr = match offline_address(&host, port) {
        Some(addr) => addr,
        None => (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve upstream `{url}`: {e}"))?
            .next()
            .ok_or_else(|| format!("cannot resolve upstream `{url}`: no address"))?,
    };
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

thread_local! {
    /// Set on a fuzzing thread (the `fuzzing` module): upstream names are not resolved, so that a
    /// fuzz run neither waits on nor talks to DNS.
    static OFFLINE: Cell<bool> = const { Cell::new(false) };
}

/// Makes [`parse_upstream`] on this thread resolve without the system resolver (`true`): an
/// IP literal is its own address and a name stands for 192.0.2.1 (TEST-NET-1).
pub(crate) fn resolve_offline(on: bool) {
    OFFLINE.with(|o| o.set(on));
}

fn offline_address(host: &str, port: u16) -> Option<SocketAddr> {
    OFFLINE.with(Cell::get).then(|| {
        let ip = host
            .parse::<IpAddr>()
            .unwrap_or(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
        SocketAddr::new(ip, port)
    })
}

/// `host:port` as a Host header says it (IPv6 in brackets).
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum UpstreamKey {
    Url,
    Weight,
    TlsVerify,
    Ca,
    Sni,
}

impl<'de> Deserialize<'de> for Upstream {
    /// A URL, or a map with `url` and the optional `weight`, `tls_verify`, `ca`, `sni`.
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
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Upstream, A::Error> {
                let mut url: Option<Upstream> = None;
                let (mut weight, mut tls_verify, mut ca, mut sni) = (None, None, None, None);
                fn once<T, E: de::Error>(
                    slot: &mut Option<T>,
                    v: T,
                    name: &'static str,
                ) -> Result<(), E> {
                    match slot.replace(v) {
                        Some(_) => Err(E::duplicate_field(name)),
                        None => Ok(()),
                    }
                }
                while let Some(key) = map.next_key::<UpstreamKey>()? {
                    match key {
                        UpstreamKey::Url => {
                            let u = map
                                .next_value_seed(Scalar::new("an upstream URL", parse_upstream))?;
                            once(&mut url, u, "url")?
                        }
                        UpstreamKey::Weight => {
                            let w = map.next_value_seed(Scalar::new(
                                "a whole number of at least 1",
                                positive::parse::<u32>,
                            ))?;
                            once(&mut weight, w, "weight")?
                        }
                        UpstreamKey::TlsVerify => {
                            once(&mut tls_verify, map.next_value::<bool>()?, "tls_verify")?
                        }
                        UpstreamKey::Ca => once(&mut ca, map.next_value::<PathBuf>()?, "ca")?,
                        UpstreamKey::Sni => once(&mut sni, map.next_value::<String>()?, "sni")?,
                    }
                }
                let mut u = url.ok_or_else(|| de::Error::missing_field("url"))?;
                u.weight = weight.unwrap_or(u.weight);
                u.tls_verify = tls_verify.unwrap_or(u.tls_verify);
                u.ca = ca;
                u.sni = sni;
                Ok(u)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Upstream {
    /// The URL alone when every option is at its default, else the map.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let plain = self.weight == 1 && self.tls_verify && self.ca.is_none() && self.sni.is_none();
        if plain {
            return s.serialize_str(&self.url);
        }
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("url", &self.url)?;
        m.serialize_entry("weight", &self.weight)?;
        m.serialize_entry("tls_verify", &self.tls_verify)?;
        if let Some(ca) = &self.ca {
            m.serialize_entry("ca", ca)?;
        }
        if let Some(sni) = &self.sni {
            m.serialize_entry("sni", sni)?;
        }
        m.end()
    }
}

// === headers ===

/// `response_headers:` is a map, kept in file order; names and values as written (checked in
/// validate.rs, which sq.properties' headers go through too).
pub mod headers {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
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
                let text = Scalar::new("a header name or value", |s| Ok(s.to_string()));
                let mut out = Vec::new();
                while let Some(name) = map.next_key_seed(text)? {
                    out.push((name, map.next_value_seed(text)?));
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }

    pub fn serialize<S: Serializer>(v: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(v.len()))?;
        for (name, value) in v {
            m.serialize_entry(name, value)?;
        }
        m.end()
    }
}

/// Checks a response header name and value.
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{name}` is not a valid header name"))?;
    http::HeaderValue::from_str(value)
        .map_err(|_| format!("the value of header `{name}` is not a valid header value"))?;
    Ok(())
}
