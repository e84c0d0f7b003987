//! Request formats: which requests a queue may take (`Q_REQUEST_FORMATS`).
//!
//! Grammar, one entry per list item (or comma separated in sq.properties):
//!
//! - `ALL`: every request;
//! - `METHOD`: every request with that method (case-insensitive);
//! - `METHOD /route`: that method on exactly that path (the query string is ignored);
//! - `METHOD /route/*`: that method on `/route` and everything below it;
//! - any of the above followed by ` !`: **excludes** the matching requests, even when another
//!   entry includes them (`POST /orders !, POST` = every POST except /orders). `ALL` may also
//!   stand for the method in a route or exclusion entry (`ALL /health !`).
//!
//! A request matches when some including entry matches it and no excluding entry does. ServiceQ
//! instead let `!` disable only its own entry, matched methods case-sensitively and compared the
//! query string too; weir follows the documented intent. Paths compare byte for byte (no
//! percent-decoding), as weir forwards them.
//!
//! [`RequestFormats::matches`] runs on the request path and never allocates.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
use serde::{Serialize, Serializer};

use super::values::Scalar;

/// The method part of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MethodPattern {
    Any,
    /// Upper-cased token.
    Exactly(Box<str>),
}

/// The route part of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RoutePattern {
    Any,
    /// The path, exactly.
    Exactly(Box<str>),
    /// `/route/*`, stored as `/route` (without the trailing `/*`); `/*` is stored as the empty
    /// string and matches every path.
    Below(Box<str>),
}

/// One parsed entry of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFormat {
    method: MethodPattern,
    route: RoutePattern,
    exclude: bool,
}

/// The list of request formats of one queue.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(transparent)]
pub struct RequestFormats {
    entries: Vec<RequestFormat>,
}

// === impl RequestFormat ===

impl RequestFormat {
    /// Parses one (untrimmed) entry.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid request format `{}`: {why}", entry.trim());
        let mut words: Vec<&str> = entry.split_whitespace().collect();
        if words.is_empty() {
            return Err("invalid request format: empty entry".to_string());
        }
        let exclude = words.last() == Some(&"!");
        if exclude {
            words.pop();
        }
        let (method, route) = match words.as_slice() {
            [method] => (*method, None),
            [method, route] => (*method, Some(*route)),
            [] => return Err(bad("`!` needs a method before it (e.g. `POST /orders !`)")),
            _ => {
                return Err(bad(
                    "expected `ALL`, `METHOD`, `METHOD /route` or `METHOD /route/*`, \
                     optionally followed by ` !`",
                ))
            }
        };

        let method = if method.eq_ignore_ascii_case("ALL") {
            MethodPattern::Any
        } else if method.ends_with('!') && route.is_none() {
            return Err(bad("put a space before `!` to exclude (e.g. `GET !`)"));
        } else if method.bytes().all(is_tchar) {
            MethodPattern::Exactly(method.to_ascii_uppercase().into_boxed_str())
        } else {
            return Err(bad(&format!("`{method}` is not a valid HTTP method token")));
        };

        let route = match route {
            None => RoutePattern::Any,
            Some(r) if !r.starts_with('/') => {
                return Err(bad(&format!("the route `{r}` must start with `/`")))
            }
            Some(r) if r.contains('?') => {
                return Err(bad(
                    "a route cannot carry a query string (the query is ignored when matching)",
                ))
            }
            Some(r) if r.len() > 1 && r.ends_with('!') => {
                return Err(bad(
                    "put a space before `!` to exclude (e.g. `POST /orders !`)",
                ))
            }
            Some(r) => match r.strip_suffix("/*") {
                Some(prefix) if !prefix.contains('*') => RoutePattern::Below(prefix.into()),
                _ if r.contains('*') => {
                    return Err(bad(
                        "`*` is only allowed as a final `/*` (e.g. `GET /api/*`)",
                    ))
                }
                _ => RoutePattern::Exactly(r.into()),
            },
        };
        Ok(RequestFormat {
            method,
            route,
            exclude,
        })
    }

    /// Whether this entry's method and route match (ignoring whether it includes or excludes).
    fn covers(&self, method: &str, path: &str) -> bool {
        let method_ok = match &self.method {
            MethodPattern::Any => true,
            MethodPattern::Exactly(m) => m.eq_ignore_ascii_case(method),
        };
        method_ok
            && match &self.route {
                RoutePattern::Any => true,
                RoutePattern::Exactly(r) => **r == *path,
                RoutePattern::Below(prefix) => match path.strip_prefix(&**prefix) {
                    Some(rest) => rest.is_empty() || rest.starts_with('/'),
                    None => false,
                },
            }
    }
}

impl fmt::Display for RequestFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.method {
            MethodPattern::Any => f.write_str("ALL")?,
            MethodPattern::Exactly(m) => f.write_str(m)?,
        }
        match &self.route {
            RoutePattern::Any => {}
            RoutePattern::Exactly(r) => write!(f, " {r}")?,
            RoutePattern::Below(prefix) => write!(f, " {prefix}/*")?,
        }
        if self.exclude {
            f.write_str(" !")?;
        }
        Ok(())
    }
}

impl Serialize for RequestFormat {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RequestFormats {
    /// A list of entries, or one comma-separated string as in `Q_REQUEST_FORMATS`; `[]`, `""`
    /// and `~` mean no request. A bad list entry is reported at its own line.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
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
                let entry = Scalar::new(
                    "a request format such as `POST /orders`",
                    RequestFormat::parse,
                );
                let mut entries = Vec::new();
                while let Some(e) = seq.next_element_seed(entry)? {
                    entries.push(e);
                }
                Ok(RequestFormats { entries })
            }
        }
        d.deserialize_any(V)
    }
}

/// RFC 9110 token characters, the alphabet of method names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The path of a raw request target: the query is dropped, and an absolute-form target
/// (`http://host/path`) is reduced to its path.
fn path_of(target: &str) -> &str {
    let target = match target.find('?') {
        Some(q) => &target[..q],
        None => target,
    };
    if target.starts_with('/') {
        return target;
    }
    match target.find("://") {
        Some(scheme_end) => {
            let after = &target[scheme_end + 3..];
            match after.find('/') {
                Some(slash) => &after[slash..],
                None => "/",
            }
        }
        None => target,
    }
}

// === impl RequestFormats ===

impl RequestFormats {
    /// Every request (the meaning of an absent `Q_REQUEST_FORMATS`).
    pub fn all() -> Self {
        RequestFormats {
            entries: vec![RequestFormat {
                method: MethodPattern::Any,
                route: RoutePattern::Any,
                exclude: false,
            }],
        }
    }

    /// No request at all (the meaning of an empty `Q_REQUEST_FORMATS=`).
    pub fn none() -> Self {
        RequestFormats::default()
    }

    /// Parses a list of entries; the error names the first bad entry.
    pub fn parse_list(entries: &[String]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| RequestFormat::parse(e))
            .collect::<Result<Vec<_>, _>>()
            .map(|entries| RequestFormats { entries })
    }

    /// Parses the comma-separated form of `Q_REQUEST_FORMATS`; an empty (or blank) string is
    /// [`RequestFormats::none`].
    pub fn parse_csv(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(RequestFormats::none());
        }
        s.split(',')
            .map(|e| {
                RequestFormat::parse(e).map_err(|err| {
                    if e.trim().is_empty() {
                        format!("{err} (two commas in a row, or a comma at an end, in `{s}`)")
                    } else {
                        err
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|entries| RequestFormats { entries })
    }

    /// Whether a request with this method and raw target (path plus optional `?query`) may be
    /// queued. Does not allocate.
    pub fn matches(&self, method: &str, target: &str) -> bool {
        let path = path_of(target);
        let mut included = false;
        for entry in &self.entries {
            if entry.covers(method, path) {
                if entry.exclude {
                    return false;
                }
                included = true;
            }
        }
        included
    }

    /// The entries in their canonical written form (`POST /orders !`).
    pub fn entries(&self) -> Vec<String> {
        self.entries.iter().map(ToString::to_string).collect()
    }

    /// True when no request can match.
    pub fn is_none(&self) -> bool {
        !self.entries.iter().any(|e| !e.exclude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(s: &str) -> RequestFormats {
        RequestFormats::parse_csv(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn all_matches_every_request() {
        let f = csv("ALL");
        assert!(f.matches("GET", "/"));
        assert!(f.matches("POST", "/orders?x=1"));
        assert_eq!(f, RequestFormats::all());
    }

    #[test]
    fn a_bare_method_matches_every_route_of_that_method() {
        let f = csv("POST,PUT");
        assert!(f.matches("POST", "/a"));
        assert!(f.matches("PUT", "/b/c?d"));
        assert!(!f.matches("GET", "/a"));
        assert!(!f.matches("DELETE", "/a"));
    }

    #[test]
    fn methods_match_case_insensitively() {
        let f = csv("post,Put /x");
        assert!(f.matches("POST", "/anything"));
        assert!(f.matches("post", "/anything"));
        assert!(f.matches("PUT", "/x"));
        assert_eq!(f.entries(), vec!["POST", "PUT /x"]);
    }

    #[test]
    fn a_route_matches_its_path_exactly_and_ignores_the_query() {
        let f = csv("POST /orders");
        assert!(f.matches("POST", "/orders"));
        assert!(f.matches("POST", "/orders?id=7&x=y"));
        assert!(!f.matches("POST", "/orders/7"));
        assert!(!f.matches("POST", "/orders/"));
        assert!(!f.matches("POST", "/Orders"));
        assert!(!f.matches("POST", "/order"));
        assert!(!f.matches("GET", "/orders"));
    }

    #[test]
    fn a_route_ending_in_slash_star_matches_the_route_and_below() {
        let f = csv("POST /api/*");
        assert!(f.matches("POST", "/api"));
        assert!(f.matches("POST", "/api/"));
        assert!(f.matches("POST", "/api/v1/orders?x"));
        assert!(!f.matches("POST", "/apis"));
        assert!(!f.matches("POST", "/ap"));
        assert!(!f.matches("GET", "/api/v1"));
        let everything = csv("PUT /*");
        assert!(everything.matches("PUT", "/"));
        assert!(everything.matches("PUT", "/deep/path"));
    }

    #[test]
    fn an_excluded_entry_wins_over_an_including_one_in_any_order() {
        for s in ["POST /orders !,POST", "POST, POST /orders !"] {
            let f = csv(s);
            assert!(!f.matches("POST", "/orders"), "{s}");
            assert!(!f.matches("POST", "/orders?id=1"), "{s}");
            assert!(f.matches("POST", "/payments"), "{s}");
            assert!(f.matches("POST", "/orders/7"), "{s}");
            assert!(!f.matches("GET", "/payments"), "{s}");
        }
    }

    #[test]
    fn exclusions_alone_match_nothing() {
        let f = csv("POST /orders !");
        assert!(!f.matches("POST", "/payments"));
        assert!(!f.matches("POST", "/orders"));
        assert!(f.is_none());
    }

    #[test]
    fn exclusions_can_cover_a_method_or_a_route_of_every_method() {
        let f = csv("ALL, GET !, ALL /health !, DELETE /admin/* !");
        assert!(f.matches("POST", "/orders"));
        assert!(!f.matches("GET", "/orders"));
        assert!(!f.matches("POST", "/health"));
        assert!(!f.matches("DELETE", "/admin/users/1"));
        assert!(f.matches("DELETE", "/users/1"));
        assert_eq!(
            f.entries(),
            vec!["ALL", "GET !", "ALL /health !", "DELETE /admin/* !"]
        );
    }

    #[test]
    fn entries_are_trimmed() {
        let f = csv("  POST   /orders  ,  PUT  ");
        assert!(f.matches("POST", "/orders"));
        assert!(f.matches("PUT", "/x"));
        assert_eq!(f.entries(), vec!["POST /orders", "PUT"]);
    }

    #[test]
    fn an_empty_value_matches_nothing() {
        for s in ["", "   "] {
            let f = csv(s);
            assert_eq!(f, RequestFormats::none());
            assert!(!f.matches("POST", "/"));
            assert!(f.entries().is_empty());
        }
        assert!(!RequestFormats::parse_list(&[])
            .map(|f| f.matches("GET", "/"))
            .unwrap_or(true));
    }

    #[test]
    fn absolute_form_targets_match_on_their_path() {
        let f = csv("POST /orders");
        assert!(f.matches("POST", "http://shop.example/orders?x=1"));
        assert!(!f.matches("POST", "http://shop.example"));
        assert!(csv("POST /").matches("POST", "http://shop.example"));
    }

    #[test]
    fn parse_list_reads_one_entry_per_item() {
        let list: Vec<String> = ["POST", "PUT /a/*", "PUT /a/secret !"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let f = RequestFormats::parse_list(&list).unwrap_or_else(|e| panic!("{e}"));
        assert!(f.matches("POST", "/"));
        assert!(f.matches("PUT", "/a/b"));
        assert!(!f.matches("PUT", "/a/secret"));
        assert_eq!(f.entries(), list);
    }

    #[test]
    fn invalid_entries_are_errors_naming_the_entry() {
        for (input, needle) in [
            ("FOO BAR BAZ", "`FOO BAR BAZ`"),
            ("POST orders", "must start with `/`"),
            ("PO(ST", "`PO(ST` is not a valid HTTP method token"),
            ("GET /a?b=c", "query string"),
            ("GET /a*", "final `/*`"),
            ("GET /*/x", "final `/*`"),
            ("POST /orders!", "space before `!`"),
            ("POST!", "space before `!`"),
            ("!", "needs a method"),
            ("POST /a ! extra", "`POST /a ! extra`"),
        ] {
            let err = RequestFormats::parse_csv(input).unwrap_err();
            assert!(err.contains(needle), "{input}: {err}");
        }
    }

    #[test]
    fn an_empty_entry_in_a_list_is_an_error() {
        let err = RequestFormats::parse_csv("POST,,PUT").unwrap_err();
        assert!(err.contains("empty entry"), "{err}");
        assert!(RequestFormats::parse_csv("POST,").is_err());
        assert!(RequestFormats::parse_list(&[String::new()]).is_err());
    }

    #[test]
    fn lowercase_method_tokens_are_fine() {
        let f = csv("purge");
        assert!(f.matches("PURGE", "/cache"));
    }

    #[test]
    fn serializes_as_the_list_of_entries() {
        let f = csv("post /orders !, post");
        assert_eq!(
            serde_json::to_string(&f).unwrap_or_default(),
            r#"["POST /orders !","POST"]"#
        );
    }
}
