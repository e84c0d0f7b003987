//! Fuzz targets: one entry function per target, each taking arbitrary bytes through the code a
//! real input takes and asserting what must hold of the outcome, not only that nothing panics.
//! `fuzz/` drives them with libFuzzer (`scripts/fuzz`, nightly); `tests/fuzz_smoke.rs` replays
//! the committed corpus and bounded mutations of it on stable, in the normal test suite.
//!
//! - [`properties`]: an sq.properties file. An error names a line of the input, and the line
//!   of the key it is about; a config read is valid and converts to YAML that reads back equal
//!   (`weir convert`).
//! - [`yaml`]: a native YAML file. An error's line is within the input; a config read is valid
//!   and prints as YAML that reads back equal (`weir check`); locating keys never panics.
//! - [`formats`]: `Q_REQUEST_FORMATS`. A list prints in canonical entries that parse back to an
//!   equal list (comma-separated, one per item, and as YAML), and `matches` agrees with the
//!   documented grammar on arbitrary methods and targets.
//! - [`request_head`]: bytes from a client, read by Pingora's HTTP/1 server session as the
//!   proxy reads them, then weir's own request handling: the refusals of `respond::malformed`,
//!   body framing and capture, the client's ids, the forwarding policy (live and replayed from
//!   a queued entry) and the admin listener's Host and token checks.
//! - [`registry_entry`]: the body of a `PUT /registry/{cluster}/{id}`. A body is refused with a
//!   reason, or its normalised fields say the same node again when checked once more, and the
//!   node's URL is an upstream URL that parses to that host, port and scheme.
//!
//! A broken invariant panics with what was broken. Upstream names are not resolved on a thread
//! that ran a target (see [`crate::config::values`]), so a run touches no network.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use pingora::apps::http_app::ServeHttp;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::admin::AdminApp;
use crate::config::formats::{RequestFormat, RequestFormats};
use crate::config::properties::KEYS;
use crate::config::values::resolve_offline;
use crate::config::{properties, yaml, Config, ConfigError, ConfigWarning, Key, UpstreamHost};
use crate::conn::HEAD_NOTE;
use crate::forward::{self, ids, trace, Client};
use crate::logs::Logs;
use crate::metrics::Metrics;
use crate::proxy::{body, defer, respond, Gateway};
use crate::queue::{QueueId, QueuedRequest};
use crate::runtime::Runtime;

/// The largest body [`request_head`] reads: bigger declared lengths are only judged.
const MAX_BODY: usize = 64 * 1024;

// === properties ===

/// An sq.properties file (see the module docs).
pub fn properties(data: &[u8]) {
    resolve_offline(true);
    let text = String::from_utf8_lossy(data);
    let path = Path::new("fuzz.properties");
    // The reader skips a byte order mark before counting lines.
    let lines: Vec<&str> = text
        .strip_prefix('\u{feff}')
        .unwrap_or(&text)
        .lines()
        .collect();
    match properties::parse(path, &text) {
        Err(e) => {
            check_error(&e, path, lines.len());
            if let Some(n) = e.line {
                check_properties_line(&e.message, n, &lines);
            }
        }
        Ok(loaded) => {
            check_warnings(&loaded.warnings, lines.len());
            for w in &loaded.warnings {
                if let Some(n) = w.line {
                    check_properties_line(&w.message, n, &lines);
                }
            }
            assert!(
                loaded.warnings.windows(2).all(|w| w[0].line <= w[1].line),
                "warnings out of line order: {:?}",
                loaded.warnings
            );
            check_config(&loaded.config);
        }
    }
}

/// What a message says about its line `n` of an sq.properties file.
fn check_properties_line(message: &str, n: usize, lines: &[&str]) {
    let line = lines[n - 1];
    // `KEY: why` and `KEY=value needs ...` are reported at the line that sets KEY.
    let key = KEYS.iter().find(|k| {
        message
            .strip_prefix(**k)
            .is_some_and(|rest| rest.starts_with([':', '=']))
    });
    if let Some(key) = key {
        assert!(
            line.starts_with(&format!("{key}=")),
            "`{message}` reported at line {n}, which does not set {key}: {line:?}"
        );
    }
    let named = match message.strip_prefix("unknown key `") {
        Some(rest) => rest.strip_suffix('`'),
        None => message
            .strip_prefix("duplicate key `")
            .and_then(|rest| rest.rsplit_once("` (first set on line"))
            .map(|(key, _)| key),
    };
    if let Some(key) = named {
        assert!(
            line.starts_with(&format!("{key}=")),
            "`{message}` reported at line {n}: {line:?}"
        );
    }
    if message.starts_with("expected KEY=value") {
        assert!(!line.contains('='), "`{message}` at line {n}: {line:?}");
    }
}

// === yaml ===

/// A native YAML config file (see the module docs).
pub fn yaml(data: &[u8]) {
    resolve_offline(true);
    let text = String::from_utf8_lossy(data);
    let path = Path::new("fuzz.yaml");
    let lines = text.lines().count();
    match yaml::parse(path, &text) {
        // The YAML parser's lines end at `\r` too, and its scanner may have read one line past
        // the end of the text when it fails.
        Err(e) => check_error(&e, path, yaml_lines(&text) + 1),
        Ok(loaded) => {
            check_warnings(&loaded.warnings, lines);
            check_config(&loaded.config);
        }
    }
    let at = |keys: &[&str], index: Option<usize>| {
        let mut at: Vec<Key> = keys.iter().map(|k| Key::Name(k.to_string())).collect();
        at.extend(index.map(Key::Index));
        at
    };
    for key in [
        at(&["upstreams"], Some(1)),
        at(&["tls", "acme", "domains"], Some(0)),
        at(&["listen"], Some(0)),
        at(&["response_headers", "Server"], None),
        at(&["deferred_queue", "capacity"], None),
    ] {
        if let Some(n) = yaml::locate(&text, &key) {
            assert!(
                (1..=lines).contains(&n),
                "locate {key:?}: line {n} of {lines}"
            );
        }
    }
    let _ = crate::config::is_properties(path, &text);
}

/// The last line a position in `text` can be on, as YAML counts lines: a line ends at `\r\n`,
/// `\r`, `\n` (and YAML 1.1's NEL, LS and PS), and the end of the text may begin one more.
fn yaml_lines(text: &str) -> usize {
    let unix = text.replace("\r\n", "\n");
    let breaks = unix
        .chars()
        .filter(|c| matches!(c, '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}'))
        .count();
    breaks + 1
}

/// An error points into its file: the file's name, a line within the input (`last_line`: the
/// position just past the end counts for YAML), a reason.
fn check_error(e: &ConfigError, path: &Path, last_line: usize) {
    assert_eq!(e.file, path);
    assert!(!e.message.trim().is_empty(), "an error without a reason");
    let shown = e.to_string();
    match e.line {
        Some(n) => {
            assert!(
                (1..=last_line).contains(&n),
                "line {n} outside 1..={last_line}: {shown}"
            );
            assert!(
                shown.starts_with(&format!("{}:{n}: ", path.display())),
                "{shown}"
            );
        }
        None => assert!(
            shown.starts_with(&format!("{}: ", path.display())),
            "{shown}"
        ),
    }
}

fn check_warnings(warnings: &[ConfigWarning], lines: usize) {
    for w in warnings {
        assert!(!w.message.is_empty());
        if let Some(n) = w.line {
            assert!(
                (1..=lines).contains(&n),
                "warning at line {n} of {lines}: {w:?}"
            );
        }
    }
}

/// A config a reader accepted is valid, and its printed form (`weir check`, `weir convert`)
/// reads back to the same config.
fn check_config(c: &Config) {
    if let Err(f) = c.validate() {
        panic!("a config that was read does not validate: {f}");
    }
    let printed = c.to_yaml();
    match yaml::parse(Path::new("printed.yaml"), &printed) {
        Ok(back) => assert!(
            back.config == *c,
            "the printed config reads back different:\n{printed}\nread: {:?}\nwas:  {c:?}",
            back.config
        ),
        Err(e) => panic!("the printed config does not read back: {e}\n{printed}"),
    }
}

// === formats ===

/// `Q_REQUEST_FORMATS`: the first line is the list (comma-separated, and split at `;` for a
/// list of items); each further line a `METHOD TARGET` to match.
pub fn formats(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let spec = lines.next().unwrap_or("");
    let mut probes: Vec<(&str, &str)> = lines
        .take(32)
        .map(|l| l.split_once(' ').unwrap_or((l, "/")))
        .collect();
    probes.extend([("POST", "/"), ("GET", "/health?x"), ("post", "http://a/b")]);

    match RequestFormats::parse_csv(spec) {
        Ok(f) => check_formats(&f, &probes, true),
        Err(e) => assert!(e.starts_with("invalid request format"), "{e}"),
    }
    let items: Vec<String> = spec.split(';').map(str::to_string).collect();
    match RequestFormats::parse_list(&items) {
        Ok(f) => check_formats(&f, &probes, false),
        Err(e) => assert!(e.starts_with("invalid request format"), "{e}"),
    }
    for (method, target) in &probes {
        assert!(RequestFormats::all().matches(method, target));
        assert!(!RequestFormats::none().matches(method, target));
    }
}

fn check_formats(f: &RequestFormats, probes: &[(&str, &str)], from_csv: bool) {
    let entries = f.entries();
    for e in &entries {
        let again = RequestFormat::parse(e).map(|p| p.to_string());
        assert_eq!(again.as_deref(), Ok(e.as_str()), "canonical entry {e:?}");
    }
    let back = RequestFormats::parse_list(&entries);
    assert_eq!(back.as_ref(), Ok(f), "entries {entries:?}");
    if from_csv {
        let csv = entries.join(", ");
        assert_eq!(RequestFormats::parse_csv(&csv).as_ref(), Ok(f), "{csv:?}");
    }
    let printed = serde_yaml::to_string(f).unwrap_or_default();
    match serde_yaml::from_str::<RequestFormats>(&printed) {
        Ok(read) => assert_eq!(&read, f, "as YAML: {printed}"),
        Err(e) => panic!("request formats printed as YAML do not read back: {e}\n{printed}"),
    }
    for (method, target) in probes {
        let got = f.matches(method, target);
        assert_eq!(
            got,
            documented_match(&entries, method, target),
            "{entries:?} on {method} {target:?}"
        );
        assert!(
            !(got && f.is_none()),
            "{entries:?} matched {method} {target}"
        );
    }
}

/// The grammar of `formats.rs`, read off the canonical entries: some including entry covers
/// the request and no excluding entry does. Methods compare case-insensitively; a route is the
/// path exactly, or with `/*` the path and everything below it; the query is ignored and an
/// absolute-form target stands for its path.
fn documented_match(entries: &[String], method: &str, target: &str) -> bool {
    let before_query = target.split('?').next().unwrap_or("");
    let path = if before_query.starts_with('/') {
        before_query
    } else if let Some((_, rest)) = before_query.split_once("://") {
        rest.find('/').map_or("/", |i| &rest[i..])
    } else {
        before_query
    };
    let covers = |entry: &[&str]| {
        let method_ok = entry[0] == "ALL" || entry[0].eq_ignore_ascii_case(method);
        let route_ok = match entry.get(1) {
            None => true,
            Some(route) => match route.strip_suffix("/*") {
                Some(prefix) => path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
                None => path == *route,
            },
        };
        method_ok && route_ok
    };
    let parsed: Vec<(Vec<&str>, bool)> = entries
        .iter()
        .map(|e| {
            let mut words: Vec<&str> = e.split(' ').collect();
            let exclude = words.last() == Some(&"!");
            if exclude {
                words.pop();
            }
            (words, exclude)
        })
        .collect();
    parsed.iter().any(|(w, ex)| !ex && covers(w)) && !parsed.iter().any(|(w, ex)| *ex && covers(w))
}

// === request heads ===

/// What the request target needs besides the bytes: a gateway and its admin app, built once
/// from a fixed config, and a runtime per thread.
struct Fixture {
    gateway: Gateway,
    admin: AdminApp,
}

const FIXTURE_YAML: &str = "\
listen: 127.0.0.1:5252
upstreams:
  - http://127.0.0.1:9
  - http://[::1]:8080
admin:
  listen: 127.0.0.1:9100
  token: fuzz-admin-token-0123456789
  hosts: [metrics.internal]
log: {access: off, error_file: off}
deferred_queue: {formats: [POST, PUT /orders/*, ALL /health !]}
upfront_queue: {enabled: true, formats: [POST /events]}
response_headers: {Server: weir}
";
const ADMIN_TOKEN: &str = "fuzz-admin-token-0123456789";
const ADMIN_HOSTS: [&str; 2] = ["metrics.internal", "127.0.0.1"];

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let config = yaml::parse(Path::new("fixture.yaml"), FIXTURE_YAML)
            .unwrap_or_else(|e| panic!("the fuzz fixture's config: {e}"))
            .config;
        let metrics = Metrics::new();
        let runtime = Runtime::build(config, &metrics)
            .unwrap_or_else(|e| panic!("the fuzz fixture's runtime: {e}"));
        let gateway = Gateway::new(runtime, metrics, Arc::new(Logs::off()));
        let admin = AdminApp::new(Arc::new(gateway.clone()));
        Fixture { gateway, admin }
    })
}

thread_local! {
    static TOKIO: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    TOKIO.with(|cell| {
        let mut rt = cell.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("a tokio runtime for fuzzing: {e}"))
        });
        rt.block_on(f)
    })
}

/// A client connection that has sent `input` and then closed; what weir writes is kept.
#[derive(Debug)]
struct Wire {
    input: Bytes,
    written: Vec<u8>,
}

impl Wire {
    fn stream(input: &[u8]) -> Box<Wire> {
        Box::new(Wire {
            input: Bytes::copy_from_slice(input),
            written: Vec::new(),
        })
    }
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = this.input.len().min(buf.remaining());
        buf.put_slice(&this.input.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[async_trait]
impl Shutdown for Wire {
    async fn shutdown(&mut self) {}
}

impl UniqueID for Wire {
    fn id(&self) -> UniqueIDType {
        0
    }
}

impl Ssl for Wire {}

impl GetTimingDigest for Wire {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}

impl GetProxyDigest for Wire {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for Wire {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        None
    }
}

impl Peek for Wire {}

/// Bytes a client sent (see the module docs).
pub fn request_head(data: &[u8]) {
    let fx = fixture();
    // What a connection keeps of a head Pingora refuses, to log it.
    let (method, target) = crate::conn::request_line_of(&data[..data.len().min(HEAD_NOTE)]);
    assert!(
        method.bytes().all(|b| b.is_ascii_alphabetic()),
        "{method:?}"
    );
    assert!(target.chars().count() <= 200, "{target:?}");
    let _ = crate::conn::status_of(data);
    block_on(async {
        proxied(fx, data).await;
        admin(fx, data).await;
    });
}

/// The proxy's side: Pingora reads the head, then weir's request handling runs on it.
async fn proxied(fx: &Fixture, data: &[u8]) {
    let mut session = Session::new_h1(Wire::stream(data));
    if !matches!(session.downstream_session.read_request().await, Ok(true)) {
        return;
    }
    let req = session.req_header().clone();
    if let Some(answer) = respond::malformed(&req) {
        assert!(matches!(answer.status, 400 | 501), "{}", answer.status);
        return;
    }
    // Refused otherwise: an HTTP/1.1 request without Host; a coding besides chunked alone.
    assert!(req.version != http::Version::HTTP_11 || req.headers.contains_key("host"));
    let codings: Vec<&[u8]> = req
        .headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|c| c.trim_ascii())
        .filter(|c| !c.is_empty())
        .collect();
    let chunked = !codings.is_empty();
    assert!(
        codings.is_empty() || (codings.len() == 1 && codings[0].eq_ignore_ascii_case(b"chunked")),
        "{codings:?}"
    );

    // Exactly one usable framing: chunked alone, or a Content-Length weir reads, or none.
    let declared = body::content_length(&session);
    let has_body = body::has_body(&session);
    let has_cl = req.headers.contains_key(http::header::CONTENT_LENGTH);
    if chunked {
        assert!(declared.is_none() && has_body, "chunked: {:?}", req.headers);
    } else if has_cl {
        let Some(len) = declared else {
            panic!(
                "Pingora frames the body with a Content-Length weir cannot read: {:?}",
                req.headers.get_all(http::header::CONTENT_LENGTH)
            );
        };
        assert_eq!(has_body, len > 0, "{:?}", req.headers);
    } else {
        assert!(declared.is_none() && !has_body, "{:?}", req.headers);
    }

    // The body as the request path reads it, against what Pingora's reader alone yields.
    let captured = match declared {
        Some(len) if len <= MAX_BODY => match body::capture(&mut session, len).await {
            Ok(copy) => {
                assert_eq!(copy.len(), len, "a body copy of another length");
                assert_eq!(
                    pingora_body(data).await,
                    Some(copy.to_vec()),
                    "the body copy"
                );
                copy
            }
            Err(_) => {
                let read = pingora_body(data).await;
                assert!(
                    read.is_none_or(|b| b.len() < len),
                    "a complete body was refused"
                );
                Bytes::new()
            }
        },
        Some(_) => Bytes::new(),
        None => match defer::read_body(&mut session, MAX_BODY).await {
            Ok(Some(b)) => {
                assert!(chunked || b.is_empty(), "a body without framing");
                b
            }
            _ => Bytes::new(),
        },
    };

    // The client's ids.
    let client = crate::proxy::client_of(&session);
    check_ids(&req.headers, &client);
    let remote = Client::capture(
        &req.headers,
        Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))),
        true,
    );
    check_ids(&req.headers, &remote);

    // Queue and ACME decisions on the target.
    let runtime = fx.gateway.runtime();
    let target = String::from_utf8_lossy(req.raw_path());
    let method = req.method.as_str();
    let _ = runtime
        .config
        .deferred_queue
        .formats
        .matches(method, &target);
    let _ = runtime
        .config
        .upfront_queue
        .formats
        .matches(method, &target);
    let _ = crate::proxy::retry::is_idempotent(&req.method);
    assert!(fx.gateway.acme.challenge_answer(&target).is_none());

    // The forwarding policy, live.
    let mut live = None;
    for (mode, node) in [(UpstreamHost::Keep, 0), (UpstreamHost::Rewrite, 1)] {
        for c in [&client, &remote] {
            let mut up = req.clone();
            let nodes = &runtime.cluster(0).nodes;
            if let Err(e) = forward::prepare(&mut up, &nodes[node], mode, c) {
                panic!("the forwarding policy failed on a request it was given: {e}");
            }
            let host = nodes[node].host_header.clone();
            check_forwarded(&req, &up, mode, &host, c);
            if mode == UpstreamHost::Keep && c.ip.is_some() {
                live = Some(up);
            }
        }
    }

    // The same request queued, then replayed.
    let lines = defer::header_lines(&req);
    let queued = QueuedRequest {
        id: QueueId(0),
        method: req.method.clone(),
        target: Bytes::copy_from_slice(req.raw_path()),
        headers: lines,
        client: remote.clone(),
        body: captured,
        enqueued: tokio::time::Instant::now(),
        enqueued_unix_ms: 0,
        attempts: 0,
        replay_safe: false,
        last_error: None,
        cluster: None,
    };
    check_queued_lines(&req, &queued);
    let replay =
        match crate::queue::delivery::request_head(&queued, &runtime, &runtime.cluster(0).nodes[0])
        {
            Ok(head) => head,
            Err(e) => panic!("a queued request's head cannot be rebuilt: {e}"),
        };
    if let Some(live) = live {
        check_replay(&req, &live, &replay, &queued);
    }
}

/// The body of the request in `data` as Pingora's own reader frames it (`None`: cut short).
async fn pingora_body(data: &[u8]) -> Option<Vec<u8>> {
    let mut session = ServerSession::new_http1(Wire::stream(data));
    if !matches!(session.read_request().await, Ok(true)) {
        return None;
    }
    let mut body = Vec::new();
    while let Some(chunk) = session.read_request_body().await.ok()? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_BODY {
            return None;
        }
    }
    Some(body)
}

/// The ids weir sends upstream: a client's acceptable `X-Request-Id` and single valid
/// `traceparent` are kept; otherwise weir's own, which are acceptable and valid.
fn check_ids(headers: &HeaderMap, c: &Client) {
    assert!(
        ids::acceptable_request_id(&c.request_id),
        "{:?}",
        c.request_id
    );
    if let Some(id) = headers.get(ids::X_REQUEST_ID) {
        if ids::acceptable_request_id(id) {
            assert_eq!(&c.request_id, id);
        }
    }
    assert!(
        trace::valid_traceparent(c.traceparent.as_bytes()),
        "{:?}",
        c.traceparent
    );
    let parents: Vec<&HeaderValue> = headers.get_all(trace::TRACEPARENT).iter().collect();
    let kept = parents.len() == 1 && trace::valid_traceparent(parents[0].as_bytes());
    assert_eq!(c.trace_started_here, !kept);
    if kept {
        assert_eq!(&c.traceparent, parents[0]);
    }
}

/// Names a `Connection` header lists (the ones the policy removes).
fn nominated(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect()
}

fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a [u8]> {
    headers.get_all(name).iter().map(|v| v.as_bytes()).collect()
}

/// The forwarding policy's contract (interface.md, Headers): hop-by-hop headers and those
/// `Connection` names removed; `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Request-Id` and
/// `traceparent` set; `Host` kept as the client sent it, or the node's; the rest untouched.
fn check_forwarded(
    req: &RequestHeader,
    up: &RequestHeader,
    mode: UpstreamHost,
    node_host: &HeaderValue,
    c: &Client,
) {
    let gone = nominated(&req.headers);
    let set_here = |name: &str| {
        matches!(
            name,
            "x-forwarded-for" | "x-forwarded-proto" | ids::X_REQUEST_ID | trace::TRACEPARENT
        ) || (name == "host" && mode == UpstreamHost::Rewrite)
    };
    assert_eq!(up.method, req.method);
    assert_eq!(up.raw_path(), req.raw_path());
    // An upgrade request keeps the client's (first) `Upgrade`, named by a `Connection` of
    // weir's own.
    let upgrade = forward::is_upgrade(&req.headers);
    if upgrade {
        let first = req.headers.get("upgrade").map(|v| v.as_bytes());
        assert_eq!(
            values(&up.headers, "upgrade"),
            first.into_iter().collect::<Vec<_>>()
        );
        assert_eq!(values(&up.headers, "connection"), [&b"upgrade"[..]]);
    }
    for name in up.headers.keys() {
        if upgrade && matches!(name.as_str(), "upgrade" | "connection") {
            continue;
        }
        assert!(!forward::is_hop_by_hop(name.as_str()), "{name} forwarded");
        if !set_here(name.as_str()) {
            assert!(
                !gone.contains(name),
                "{name} named by Connection, forwarded"
            );
            assert!(req.headers.contains_key(name), "{name} appeared");
        }
    }
    assert_eq!(
        values(&up.headers, ids::X_REQUEST_ID),
        [c.request_id.as_bytes()]
    );
    assert_eq!(
        values(&up.headers, trace::TRACEPARENT),
        [c.traceparent.as_bytes()]
    );
    let proto: &[u8] = if c.tls { b"https" } else { b"http" };
    assert_eq!(values(&up.headers, "x-forwarded-proto"), [proto]);

    let xff = "x-forwarded-for";
    let before: Vec<&[u8]> = match gone.iter().any(|n| n == xff) {
        true => Vec::new(),
        false => values(&req.headers, xff),
    };
    match c.ip {
        Some(ip) => {
            let mut expected = Vec::new();
            for v in before.iter().filter(|v| !v.trim_ascii().is_empty()) {
                expected.extend_from_slice(v);
                expected.extend_from_slice(b", ");
            }
            expected.extend_from_slice(ip.to_string().as_bytes());
            assert_eq!(values(&up.headers, xff), [&expected[..]]);
        }
        None => assert_eq!(values(&up.headers, xff), before),
    }
    match mode {
        UpstreamHost::Rewrite => assert_eq!(values(&up.headers, "host"), [node_host.as_bytes()]),
        UpstreamHost::Keep => assert_eq!(
            values(&up.headers, "host"),
            values(&req.headers, "host"),
            "Host not kept as the client sent it"
        ),
    }
    for name in req.headers.keys() {
        let n = name.as_str();
        let touched = set_here(n) || n == "host" || n == trace::TRACESTATE;
        if !touched && !forward::is_hop_by_hop(n) && !gone.contains(name) {
            assert_eq!(
                values(&up.headers, n),
                values(&req.headers, n),
                "{n} changed"
            );
        }
    }
    if c.trace_started_here {
        assert!(!up.headers.contains_key(trace::TRACESTATE));
    }
}

/// Framing and expectation: each delivery sets its own.
const FRAMING: [&str; 3] = ["content-length", "expect", "transfer-encoding"];

/// A queued entry's header lines read back as the client's headers, less the framing.
fn check_queued_lines(req: &RequestHeader, q: &QueuedRequest) {
    let read: Vec<(&[u8], &[u8])> = q.header_lines().collect();
    let mut expected: Vec<(&[u8], &[u8])> = Vec::new();
    let authority = req.uri.authority().map(|a| a.as_str().as_bytes());
    if let (false, Some(a)) = (req.headers.contains_key("host"), authority) {
        expected.push((b"host", a));
    }
    for (name, value) in req.headers.iter() {
        if !FRAMING.contains(&name.as_str()) {
            expected.push((name.as_str().as_bytes(), value.as_bytes()));
        }
    }
    assert_eq!(read, expected, "queued header lines");
}

/// A replay sends what a live attempt sent (the forwarding module's promise), with its own
/// framing: a Content-Length of the kept body.
fn check_replay(
    req: &RequestHeader,
    live: &RequestHeader,
    replay: &RequestHeader,
    q: &QueuedRequest,
) {
    assert_eq!(replay.method, live.method);
    assert_eq!(replay.raw_path(), live.raw_path());
    let host_from_uri = !req.headers.contains_key("host") && req.uri.authority().is_some();
    let comparable = |h: &RequestHeader| {
        let mut v: Vec<(String, Vec<u8>)> = h
            .headers
            .iter()
            .filter(|(n, _)| !FRAMING.contains(&n.as_str()))
            .filter(|(n, _)| !(host_from_uri && n.as_str() == "host"))
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        comparable(replay),
        comparable(live),
        "replayed head differs from live"
    );
    let body_method = matches!(q.method.as_str(), "POST" | "PUT" | "PATCH");
    let cl = values(&replay.headers, "content-length");
    if !q.body.is_empty() || body_method {
        assert_eq!(cl, [q.body.len().to_string().as_bytes()]);
    } else {
        assert!(cl.is_empty());
    }
    assert!(!replay.headers.contains_key("transfer-encoding"));
}

/// The admin listener's side: Host (DNS rebinding) and token checks before routing.
async fn admin(fx: &Fixture, data: &[u8]) {
    let mut session = ServerSession::new_http1(Wire::stream(data));
    if !matches!(session.read_request().await, Ok(true)) {
        return;
    }
    let resp = fx.admin.response(&mut session).await;
    let req = session.req_header();
    let status = resp.status().as_u16();
    assert!(matches!(status, 200 | 401 | 404 | 405 | 421), "{status}");
    let length = resp.headers().get(http::header::CONTENT_LENGTH);
    assert_eq!(
        length.map(|v| v.as_bytes()),
        Some(resp.body().len().to_string().as_bytes())
    );
    let hosts: Vec<&[u8]> = values(&req.headers, "host");
    let host = match (req.uri.authority(), hosts.len()) {
        (Some(a), _) => Some(a.as_str().as_bytes()),
        (None, 0) => None,
        (None, 1) => Some(hosts[0]),
        (None, _) => {
            assert_eq!(status, 421, "several Host headers answered");
            return;
        }
    };
    if status != 421 {
        if let Some(h) = host {
            assert!(
                admin_host_named(h),
                "the admin API answered Host {:?}",
                String::from_utf8_lossy(h)
            );
        }
    }
    let changes = !matches!(req.method, http::Method::GET | http::Method::HEAD);
    if changes && status != 421 {
        let auth = req
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let bearer = auth
            .and_then(|a| a.get(..7).map(|s| (s, &a[7..])))
            .is_some_and(|(scheme, cred)| {
                scheme.eq_ignore_ascii_case(b"bearer ")
                    && cred.trim_ascii() == ADMIN_TOKEN.as_bytes()
            });
        assert_eq!(
            status == 401,
            !bearer,
            "{} {:?}: {status}",
            req.method,
            auth
        );
    }
}

/// Whether a Host names the admin listener: localhost, a loopback address, or a configured
/// name (the port is not compared; a trailing dot is the same name).
fn admin_host_named(raw: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(raw) else {
        return false;
    };
    let host = match s.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, _)) => v6,
            None => return false,
        },
        None => s.split(':').next().unwrap_or(""),
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    host == "localhost"
        || ADMIN_HOSTS.contains(&host.as_str())
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

// === registry_entry ===

pub fn registry_entry(data: &[u8]) {
    use crate::discovery::registry::check_entry;
    use crate::discovery::RegistryError;
    resolve_offline(true);
    match check_entry(data) {
        Err(RegistryError::Bad(why)) => assert!(!why.is_empty(), "a refusal without a reason"),
        Err(other) => panic!("a body check answered {other:?}"),
        Ok((url, weight, fields)) => {
            assert!((1..=1000).contains(&weight), "weight {weight}");
            let u = crate::config::values::parse_upstream(&url)
                .unwrap_or_else(|e| panic!("a registered node's URL {url:?} does not parse: {e}"));
            assert_eq!(u.url, url, "the URL is already normalised");
            assert_eq!(
                fields.get("host").and_then(|h| h.as_str()),
                Some(u.host.as_str())
            );
            assert_eq!(
                fields.get("port").and_then(|p| p.as_u64()),
                Some(u64::from(u.port))
            );
            // The stored entry (as Redis keeps it, as GET lists it) checks again to the same.
            let again = serde_json::Value::Object(fields.clone()).to_string();
            match check_entry(again.as_bytes()) {
                Ok((url2, weight2, fields2)) => {
                    assert_eq!((url2, weight2), (url, weight));
                    assert_eq!(fields2, fields, "normalising is idempotent");
                }
                Err(e) => panic!("a stored entry {again:?} is refused: {e:?}"),
            }
        }
    }
}
