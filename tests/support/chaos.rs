//! The chaos soak driver, shared by `tests/chaos.rs` (60 s in the suite) and `scripts/chaos`
//! (10 min): real loopback nodes behind the real weir binary (deferred queue on), a seeded
//! fault scheduler, bounded client workers, and an account of every request at the end.
//!
//! **Faults.** Every 0.5–2 s the scheduler picks a healthy node (at most two are faulted at
//! once) and a fault that lasts 1–4 s: crash (`down`, later `up`), hang, hold (a pause,
//! released at the end), reset, close without a response, a slow answer (`delay`) or garbage;
//! once in each round of 14 faults (shuffled, so every kind comes up in a short run too)
//! every node goes down together for 2–5 s, so deferrable requests are buffered and the queue
//! fills and drains while the run goes on.
//!
//! **Clients.** Normal workers keep a keep-alive connection (a fresh one now and then) and
//! send GETs, POSTs (Content-Length and chunked, md5-checked bodies), deferrable POSTs (with
//! and without `Idempotency-Key`) and deferrable PUTs. Slow workers use raw sockets: heads and
//! bodies trickled in within the limits (served like anyone else), a head that never ends and
//! a body that stalls (both must get `408` or be closed) and uploads abandoned half way.
//! Every request carries a unique id in its path, in `X-Chaos-Id` and in `X-Request-Id`, and
//! its body is a function of that id, so each node delivery can be checked byte for byte.
//!
//! **The rules** (from the README: retries only when nothing was sent or the request is
//! replay-safe, queueing only when replay-safe or nothing reached a node). A *delivery* is a
//! request a node read completely, whatever it did next (a hung or resetting node still read
//! it). "Replay-safe" is an idempotent method (GET, PUT) or an `Idempotency-Key`.
//!
//! | client saw | replay-safe request | other requests (POST without a key) |
//! |---|---|---|
//! | 2xx from a node (echo checked: id, target, body md5) | ≥ 1 delivery, one on the answering node | exactly 1, on the answering node |
//! | `503 Request Buffered` (deferrable paths only) | ≥ 1 delivery once the queue drained | delivered: exactly 1; a dead letter (`not_replay_safe`: its replay failed after it may have reached a node): at most 1 |
//! | `502` / `503 Service Unavailable` / `504` | any number (retries on other nodes) | at most 1 |
//! | `503 Queue Full` | any number | 0 (only queued when nothing reached a node) |
//! | `429 Request Discarded`, `408 Request Timeout` | 0 | 0 |
//!
//! Never: a response with another request's id, a weir answer outside that table (or without
//! weir's JSON body), a delivered body that differs from what the client sent, a delivery of
//! a request whose head or body never completed, a request left unanswered (connection closed
//! without a response, or nothing within [`CLIENT_DEADLINE`]), a second delivery of a request
//! that is not replay-safe, a buffered request delivered after one that was buffered later
//! (FIFO; checked for pairs where one was answered before the other was sent, since two
//! requests buffered at the same moment may be queued either way). Slow clients whose request never completes must get `408` (and a
//! close) or be closed. weir announces every close (`Connection: close`) and its keep-alive
//! timeout is far longer than a client's pause here, so a connection that was left open and
//! is found closed when the next request goes out is a violation too; that request is sent
//! again on a fresh connection under the same id (so one that had in fact been delivered
//! shows up as a duplicate) and accounted as usual.
//!
//! **Resources.** weir's RSS (`VmRSS`) and open descriptors are sampled every second. RSS
//! must not grow more than 10 % (or `Settings::rss_floor_kib`, 4 MiB, for a small process)
//! from minute 2 (20 s in the 60 s run) to the end. Levels are compared, not samples: the
//! median over 30 s (20 s) from there against the median over the load's last 30 s (20 s),
//! since RSS swings by several MiB as the faults change what is in flight and the allocator
//! hands pages back. A drop is not a leak and is only reported, like the range of samples.
//! The descriptor count must come back to its value before the load: pooled node connections
//! stay idle for up to 60 s by design, so the check closes them from the nodes' side
//! (down/up) and awaits weir letting go of them (bounded poll).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::wire::{header, Headers, Wire};
use crate::support::{md5_hex, Gateway, Received, Upstream};

/// Bound on one exchange: beyond it a request counts as hung. The longest legitimate wait is
/// a replay-safe request retried over four hung nodes (4 × the 2 s attempt timeout).
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

/// weir's settings for the soak, over the test base config.
const GATEWAY_YAML: &str = "\
server: {threads: 2}
timeouts: {connect: 500ms, request: 2s, client_head: 3s, client_body: 2s}
limits: {concurrency_peak: 16, min_body_rate: 1KiB/s}
deferred_queue:
  enabled: true
  formats: [POST /chaos/defer/*, PUT /chaos/defer/*]
  capacity: 256
  replay_rate: 200/s
";

/// What a soak run does.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long clients send requests.
    pub load: Duration,
    pub seed: u64,
    pub nodes: usize,
    /// Normal client workers (keep-alive).
    pub clients: usize,
    /// Raw-socket slow clients.
    pub slow_clients: usize,
    /// Bound on requests sent in all.
    pub max_requests: u64,
    /// RSS must not grow 10 % from its level (median) over `rss_from..rss_from + rss_window`
    /// to its level over the load's last `rss_window`.
    pub rss_from: Duration,
    pub rss_window: Duration,
    /// Growth below this is never a violation (allocator granularity on a small process).
    pub rss_floor_kib: u64,
    /// Print a progress line every this often (none if zero).
    pub progress: Duration,
}

impl Settings {
    /// The soak for `seconds` of load: RSS is compared from minute 2 (or a third of a
    /// shorter run, at least 10 s in).
    pub fn for_seconds(seconds: u64, seed: u64) -> Settings {
        let rss_from = if seconds >= 360 {
            Duration::from_secs(120)
        } else {
            Duration::from_secs((seconds / 3).max(10))
        };
        Settings {
            load: Duration::from_secs(seconds),
            seed,
            nodes: 4,
            clients: 16,
            slow_clients: 4,
            max_requests: seconds * 1500,
            rss_from,
            rss_window: Duration::from_secs(if seconds >= 360 {
                30
            } else {
                (seconds / 3).min(20)
            }),
            rss_floor_kib: 4 * 1024,
            progress: Duration::ZERO,
        }
    }
}

/// The seed from `CHAOS_SEED` (decimal or 0x-hex), else `default`, else one drawn now (the
/// run prints it either way).
pub fn seed_from_env(default: Option<u64>) -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(s) if !s.trim().is_empty() => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("CHAOS_SEED={s:?} is not a number"))
        }
        _ => default.unwrap_or_else(|| fastrand::u64(..)),
    }
}

// === impl Kind ===

/// What a client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Get,
    Post,
    ChunkedPost,
    DeferPost,
    DeferPostKey,
    DeferPut,
    TrickledHead,
    TrickledBody,
    SlowHead,
    StalledBody,
    Abandoned,
}

const KINDS: [Kind; 11] = [
    Kind::Get,
    Kind::Post,
    Kind::ChunkedPost,
    Kind::DeferPost,
    Kind::DeferPostKey,
    Kind::DeferPut,
    Kind::TrickledHead,
    Kind::TrickledBody,
    Kind::SlowHead,
    Kind::StalledBody,
    Kind::Abandoned,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Get => "get",
            Kind::Post => "post",
            Kind::ChunkedPost => "chunked",
            Kind::DeferPost => "post",
            Kind::DeferPostKey => "post-key",
            Kind::DeferPut => "put",
            Kind::TrickledHead => "trickled-head",
            Kind::TrickledBody => "trickled-body",
            Kind::SlowHead => "slow-head",
            Kind::StalledBody => "stalled-body",
            Kind::Abandoned => "abandoned",
        }
    }

    fn label(self) -> String {
        if self.deferrable() {
            format!("defer/{}", self.name())
        } else {
            self.name().to_string()
        }
    }

    fn method(self) -> &'static str {
        match self {
            Kind::Get | Kind::TrickledHead | Kind::SlowHead => "GET",
            Kind::DeferPut => "PUT",
            _ => "POST",
        }
    }

    /// Matches `deferred_queue.formats`.
    fn deferrable(self) -> bool {
        matches!(
            self,
            Kind::ChunkedPost
                | Kind::DeferPost
                | Kind::DeferPostKey
                | Kind::DeferPut
                | Kind::TrickledBody
                | Kind::StalledBody
                | Kind::Abandoned
        )
    }

    fn replay_safe(self) -> bool {
        matches!(
            self,
            Kind::Get | Kind::TrickledHead | Kind::SlowHead | Kind::DeferPut | Kind::DeferPostKey
        )
    }

    /// The request never completes: it must never reach a node.
    fn incomplete(self) -> bool {
        matches!(self, Kind::SlowHead | Kind::StalledBody | Kind::Abandoned)
    }

    fn path(self, id: u64) -> String {
        if self.deferrable() {
            format!("/chaos/defer/{}/{id}", self.name())
        } else {
            format!("/chaos/{}/{id}", self.name())
        }
    }

    fn from_path(path: &str) -> Option<(Kind, u64)> {
        let (prefix, id) = path.rsplit_once('/')?;
        let id = id.parse().ok()?;
        KINDS
            .iter()
            .find(|k| k.path(id) == path && prefix.starts_with("/chaos/"))
            .map(|k| (*k, id))
    }
}

/// The body a request with this id carries (what the client meant to send in full).
fn body_for(seed: u64, kind: Kind, id: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let len = match kind {
        Kind::Get | Kind::TrickledHead | Kind::SlowHead => 0,
        Kind::TrickledBody => rng.usize(2048..6144),
        Kind::StalledBody => rng.usize(1500..3000),
        Kind::Abandoned => rng.usize(2000..8000),
        _ => match rng.u8(0..100) {
            0..=69 => rng.usize(0..2048),
            70..=94 => rng.usize(2048..16384),
            _ => rng.usize(64 * 1024..100 * 1024),
        },
    };
    let mut body = vec![0u8; len];
    rng.fill(&mut body);
    body
}

fn request_id(seed: u64, id: u64) -> String {
    format!("chaos-{seed:x}-{id}")
}

/// The request head (and, for chunked, the framing) a client sends.
fn head(kind: Kind, seed: u64, id: u64, body_len: usize, chunked: bool) -> String {
    let mut h = format!(
        "{} {} HTTP/1.1\r\nHost: chaos.test\r\nX-Chaos-Id: {id}\r\nX-Request-Id: {}\r\n",
        kind.method(),
        kind.path(id),
        request_id(seed, id)
    );
    if kind == Kind::DeferPostKey {
        let _ = write!(h, "Idempotency-Key: key-{id}\r\n");
    }
    if chunked {
        h.push_str("Transfer-Encoding: chunked\r\n");
    } else if kind.method() != "GET" {
        let _ = write!(h, "Content-Length: {body_len}\r\n");
    }
    h.push_str("\r\n");
    h
}

fn chunked(body: &[u8], rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut rest = body;
    while !rest.is_empty() {
        let n = rng.usize(1..=rest.len().min(8192));
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

// === impl Outcome ===

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the client got.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A 2xx from a node, its echo checked.
    Node { status: u16, node: String },
    /// One of weir's own answers (status, sq_msg).
    Weir {
        status: u16,
        msg: String,
        queue_id: Option<String>,
    },
    /// The connection closed before any response byte.
    Closed,
    /// The client gave up on purpose (an abandoned upload).
    Abandoned,
    /// Not an answer: an I/O error, a deadline passed, or an answer that breaks the rules.
    Broken(String),
}

impl Outcome {
    fn short(&self) -> String {
        match self {
            Outcome::Node { status, .. } => format!("{status} from a node"),
            Outcome::Weir { status, msg, .. } => format!("{status} {msg}"),
            Outcome::Closed => "closed".into(),
            Outcome::Abandoned => "abandoned".into(),
            Outcome::Broken(_) => "broken".into(),
        }
    }
}

/// The answers weir may give, by status.
const WEIR_ANSWERS: [(u16, &str); 7] = [
    (408, "Request Timeout"),
    (429, "Request Discarded"),
    (502, "Bad Gateway"),
    (503, "Service Unavailable"),
    (503, "Queue Full"),
    (503, "Request Buffered"),
    (504, "Gateway Timeout"),
];

struct Sent<'a> {
    kind: Kind,
    id: u64,
    rid: &'a str,
    body: &'a [u8],
}

/// Checks a complete response against the request it answers.
fn judge(sent: &Sent<'_>, status: u16, headers: &Headers, body: &[u8]) -> Outcome {
    let rid = header(headers, "x-request-id").unwrap_or("");
    // A head weir never parsed has no id of the client's: weir's 408 carries its own.
    if rid != sent.rid && sent.kind != Kind::SlowHead {
        return Outcome::Broken(format!(
            "{status} carries X-Request-Id {rid:?}, not {:?}",
            sent.rid
        ));
    }
    if (200..300).contains(&status) {
        let Some(node) = header(headers, "x-node") else {
            return Outcome::Broken(format!("{status} without X-Node"));
        };
        let echo: serde_json::Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return Outcome::Broken(format!("{status} echo is not JSON: {e}")),
        };
        let path = sent.kind.path(sent.id);
        let md5 = md5_hex(sent.body);
        if echo["target"] != path.as_str()
            || echo["body_md5"] != md5.as_str()
            || echo["body_len"] != sent.body.len()
        {
            return Outcome::Broken(format!(
                "{status} echo {} {} ({} bytes, md5 {}) for {path} ({} bytes, md5 {md5})",
                echo["method"],
                echo["target"],
                echo["body_len"],
                echo["body_md5"],
                sent.body.len()
            ));
        }
        return Outcome::Node {
            status,
            node: node.to_string(),
        };
    }
    if header(headers, "x-node").is_some() {
        return Outcome::Broken(format!("a node answered {status}, which no node does here"));
    }
    let msg = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["sq_msg"].as_str().map(str::to_string));
    let Some(msg) = msg else {
        return Outcome::Broken(format!(
            "{status} without weir's JSON body: {:?}",
            String::from_utf8_lossy(body)
        ));
    };
    if !WEIR_ANSWERS.contains(&(status, msg.as_str())) {
        return Outcome::Broken(format!("unexpected answer {status} {msg:?}"));
    }
    let queue_id = header(headers, "x-weir-queue-id").map(str::to_string);
    let deferrable_only = msg == "Request Buffered" || msg == "Queue Full";
    if deferrable_only && !sent.kind.deferrable() {
        return Outcome::Broken(format!("{status} {msg} for a request outside the formats"));
    }
    if msg == "Request Buffered" && queue_id.is_none() {
        return Outcome::Broken("503 Request Buffered without X-Weir-Queue-Id".into());
    }
    if msg == "Request Timeout" && !sent.kind.incomplete() {
        return Outcome::Broken("408 for a request the client sent whole and promptly".into());
    }
    Outcome::Weir {
        status,
        msg,
        queue_id,
    }
}

/// One request and what became of it.
#[derive(Debug, Clone)]
struct Record {
    kind: Kind,
    id: u64,
    outcome: Outcome,
    /// When the request went out, and when its answer was in.
    sent: Instant,
    answered: Instant,
}

/// Every request sent, and counters the workers share.
#[derive(Default)]
struct Ledger {
    records: Mutex<Vec<Record>>,
    next_id: AtomicU64,
    /// Keep-alive connections weir had closed when the next request went out (sent again),
    /// by the answer the connection carried last.
    stale_resends: Mutex<BTreeMap<String, u64>>,
    /// Slow clients' connections left open more than 10 s after their 408.
    open_after_408: AtomicU64,
}

impl Ledger {
    fn record(&self, r: Record) {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(r);
    }

    /// The next id, or `None` once `max` were handed out.
    fn take_id(&self, max: u64) -> Option<u64> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        (id <= max).then_some(id)
    }
}

// === impl Tally (what nodes received) ===

#[derive(Debug, Default, Clone)]
struct Deliveries {
    /// The nodes that received it, each with its place in that node's arrival order.
    nodes: Vec<String>,
    arrivals: Vec<u64>,
    bad_body: usize,
}

#[derive(Default)]
struct Tally {
    by_id: HashMap<u64, Deliveries>,
    nudges: u64,
    /// Requests each node received so far.
    arrivals: HashMap<String, u64>,
    /// Requests a node received that carry no usable chaos id, or an id that contradicts
    /// their path.
    unidentified: Vec<String>,
}

impl Tally {
    fn fold(&mut self, seed: u64, node: &str, received: Vec<Received>) {
        for r in received {
            if r.target == "/chaos/nudge" {
                self.nudges += 1;
                continue;
            }
            let header_id = r.header("x-chaos-id").and_then(|v| v.parse::<u64>().ok());
            match Kind::from_path(&r.target) {
                Some((kind, id)) if header_id == Some(id) => {
                    let arrival = self.arrivals.entry(node.to_string()).or_default();
                    *arrival += 1;
                    let entry = self.by_id.entry(id).or_default();
                    entry.nodes.push(node.to_string());
                    entry.arrivals.push(*arrival);
                    if r.body != body_for(seed, kind, id) {
                        entry.bad_body += 1;
                    }
                }
                _ => self.unidentified.push(format!(
                    "{} {} (X-Chaos-Id {:?}) at {node}",
                    r.method,
                    r.target,
                    r.header("x-chaos-id")
                )),
            }
        }
    }
}

fn fold_all(nodes: &[Upstream], tally: &Mutex<Tally>, seed: u64) {
    for n in nodes {
        let got = n.take_requests();
        if !got.is_empty() {
            tally
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .fold(seed, n.name(), got);
        }
    }
}

// === impl clients ===

fn pick(rng: &mut fastrand::Rng, table: &[(Kind, u32)]) -> Kind {
    let total: u32 = table.iter().map(|(_, w)| w).sum();
    let mut x = rng.u32(0..total);
    for (k, w) in table {
        if x < *w {
            return *k;
        }
        x -= w;
    }
    table[0].0
}

const NORMAL_MIX: [(Kind, u32); 6] = [
    (Kind::Get, 30),
    (Kind::Post, 15),
    (Kind::ChunkedPost, 7),
    (Kind::DeferPost, 22),
    (Kind::DeferPostKey, 10),
    (Kind::DeferPut, 16),
];

const SLOW_MIX: [(Kind, u32); 5] = [
    (Kind::TrickledHead, 20),
    (Kind::TrickledBody, 20),
    (Kind::SlowHead, 20),
    (Kind::StalledBody, 20),
    (Kind::Abandoned, 20),
];

/// Reads one response (bounded) after the request went out: `Closed` when the peer closed
/// before sending a byte.
async fn read_answer(wire: &mut Wire, sent: &Sent<'_>, deadline: Instant) -> (Outcome, bool) {
    let work = async {
        let mut byte = [0u8; 1];
        if wire.stream.peek(&mut byte).await? == 0 {
            return Ok::<_, io::Error>(None);
        }
        let head = wire.read_response_head().await?;
        let body = wire.read_response_body(sent.kind.method(), &head).await?;
        Ok(Some((head, body)))
    };
    match tokio::time::timeout_at(deadline, work).await {
        Err(_) => (
            Outcome::Broken(format!("no answer within {CLIENT_DEADLINE:?}")),
            false,
        ),
        Ok(Ok(None)) => (Outcome::Closed, false),
        Ok(Err(e)) if is_reset(&e) => (Outcome::Closed, false),
        Ok(Err(e)) => (Outcome::Broken(format!("reading the answer: {e}")), false),
        Ok(Ok(Some((head, body)))) => {
            let keep = !header(&head.headers, "connection")
                .is_some_and(|v| v.to_ascii_lowercase().contains("close"));
            (judge(sent, head.status, &head.headers, &body), keep)
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

async fn connect(addr: SocketAddr) -> io::Result<Wire> {
    let stream = tokio::time::timeout(CLIENT_DEADLINE, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(Wire::new(stream))
}

struct Worker {
    addr: SocketAddr,
    seed: u64,
    ledger: Arc<Ledger>,
    max_requests: u64,
    until: Instant,
    rng: fastrand::Rng,
}

impl Worker {
    async fn run_normal(mut self) {
        // The connection, and the last answer it carried.
        let mut conn: Option<(Wire, String)> = None;
        while Instant::now() < self.until {
            let Some(id) = self.ledger.take_id(self.max_requests) else {
                break;
            };
            let kind = pick(&mut self.rng, &NORMAL_MIX);
            let body = body_for(self.seed, kind, id);
            let is_chunked = kind == Kind::ChunkedPost;
            let mut bytes = head(kind, self.seed, id, body.len(), is_chunked).into_bytes();
            if is_chunked {
                bytes.extend(chunked(&body, &mut self.rng));
            } else {
                bytes.extend_from_slice(&body);
            }
            let rid = request_id(self.seed, id);
            let sent = Sent {
                kind,
                id,
                rid: &rid,
                body: &body,
            };
            if self.rng.u8(0..10) == 0 {
                conn = None;
            }
            let started = Instant::now();
            let deadline = started + CLIENT_DEADLINE;
            let outcome = loop {
                let reused = conn.as_ref().map(|(_, last)| last.clone());
                let mut wire = match conn.take() {
                    Some((w, _)) => w,
                    None => match connect(self.addr).await {
                        Ok(w) => w,
                        Err(e) => break Outcome::Broken(format!("connect: {e}")),
                    },
                };
                let written = tokio::time::timeout_at(deadline, wire.write_all(&bytes)).await;
                let (outcome, keep) = match written {
                    Err(_) => (Outcome::Broken("write timed out".into()), false),
                    Ok(Err(e)) if is_reset(&e) => (Outcome::Closed, false),
                    Ok(Err(e)) => (Outcome::Broken(format!("write: {e}")), false),
                    Ok(Ok(())) => read_answer(&mut wire, &sent, deadline).await,
                };
                if let (Outcome::Closed, Some(last)) = (&outcome, reused) {
                    // weir closed the idle keep-alive connection: send again on a new one.
                    *lock(&self.ledger.stale_resends).entry(last).or_default() += 1;
                    continue;
                }
                if keep {
                    conn = Some((wire, outcome.short()));
                }
                break outcome;
            };
            self.ledger.record(Record {
                kind,
                id,
                outcome,
                sent: started,
                answered: Instant::now(),
            });
            tokio::time::sleep(Duration::from_millis(self.rng.u64(2..15))).await;
        }
    }

    async fn run_slow(mut self) {
        while Instant::now() < self.until {
            let Some(id) = self.ledger.take_id(self.max_requests) else {
                break;
            };
            let kind = pick(&mut self.rng, &SLOW_MIX);
            let started = Instant::now();
            let outcome = match connect(self.addr).await {
                Ok(wire) => self.slow_one(wire, kind, id).await,
                Err(e) => Outcome::Broken(format!("connect: {e}")),
            };
            self.ledger.record(Record {
                kind,
                id,
                outcome,
                sent: started,
                answered: Instant::now(),
            });
            tokio::time::sleep(Duration::from_millis(self.rng.u64(10..100))).await;
        }
    }

    async fn slow_one(&mut self, mut wire: Wire, kind: Kind, id: u64) -> Outcome {
        let body = body_for(self.seed, kind, id);
        let head = head(kind, self.seed, id, body.len(), false);
        let rid = request_id(self.seed, id);
        let sent = Sent {
            kind,
            id,
            rid: &rid,
            body: &body,
        };
        let deadline = Instant::now() + CLIENT_DEADLINE;
        let pieces = |bytes: &[u8], n: usize| -> Vec<Vec<u8>> {
            bytes
                .chunks(bytes.len().div_ceil(n).max(1))
                .map(<[u8]>::to_vec)
                .collect()
        };
        let sending: io::Result<()> = async {
            match kind {
                // The whole head in four pieces over ~0.5 s (the limit is 3 s).
                Kind::TrickledHead => {
                    for p in pieces(head.as_bytes(), 4) {
                        wire.write_all(&p).await?;
                        tokio::time::sleep(Duration::from_millis(150)).await;
                    }
                }
                // The head at once, the body in six pieces over ~0.6 s (~5 KiB/s).
                Kind::TrickledBody => {
                    wire.write_all(head.as_bytes()).await?;
                    for p in pieces(&body, 6) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        wire.write_all(&p).await?;
                    }
                }
                // Slowloris: part of a head, then nothing.
                Kind::SlowHead => {
                    let cut = head.len() - 2 - self.rng.usize(1..10);
                    wire.write_all(&head.as_bytes()[..cut]).await?;
                }
                // R-U-Dead-Yet: the head and a third of the body, then nothing.
                Kind::StalledBody => {
                    wire.write_all(head.as_bytes()).await?;
                    wire.write_all(&body[..body.len() / 3]).await?;
                }
                Kind::Abandoned => {
                    wire.write_all(head.as_bytes()).await?;
                    let part = self.rng.usize(0..body.len() - 1);
                    wire.write_all(&body[..part]).await?;
                    tokio::time::sleep(Duration::from_millis(self.rng.u64(0..800))).await;
                    if self.rng.bool() {
                        let _ = wire.stream.set_zero_linger();
                    }
                }
                _ => unreachable!("not a slow kind: {kind:?}"),
            }
            Ok(())
        }
        .await;
        if kind == Kind::Abandoned {
            return Outcome::Abandoned;
        }
        if let Err(e) = sending {
            if !(kind.incomplete() && is_reset(&e)) {
                return Outcome::Broken(format!("sending: {e}"));
            }
        }
        let (outcome, _) = read_answer(&mut wire, &sent, deadline).await;
        if kind.incomplete() && matches!(outcome, Outcome::Weir { status: 408, .. }) {
            // A 408 for a request that never completed ends the connection.
            let mut byte = [0u8; 1];
            let closed =
                tokio::time::timeout(Duration::from_secs(10), wire.stream.read(&mut byte)).await;
            if !matches!(closed, Ok(Ok(0)) | Ok(Err(_))) {
                self.ledger.open_after_408.fetch_add(1, Ordering::Relaxed);
            }
        }
        outcome
    }
}

// === impl faults ===

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    Crash,
    Hang,
    Hold,
    Reset,
    Close,
    Delay,
    Garbage,
    AllDown,
}

/// One round of faults: every kind, crashes most often, shuffled. Drawing rounds rather than
/// independent picks puts every kind in even a short run.
const ROUND: [Fault; 14] = [
    Fault::Crash,
    Fault::Crash,
    Fault::Crash,
    Fault::Hang,
    Fault::Hang,
    Fault::Hold,
    Fault::Hold,
    Fault::Reset,
    Fault::Reset,
    Fault::Close,
    Fault::Delay,
    Fault::Delay,
    Fault::Garbage,
    Fault::AllDown,
];

/// The faults still to apply in this round (taken from the back).
struct Deck(Vec<Fault>);

impl Deck {
    fn next(&mut self, rng: &mut fastrand::Rng) -> Fault {
        if self.0.is_empty() {
            self.0 = ROUND.to_vec();
            rng.shuffle(&mut self.0);
        }
        self.0[self.0.len() - 1]
    }

    fn used(&mut self) {
        self.0.pop();
    }
}

async fn apply(node: &Upstream, fault: Fault, rng: &mut fastrand::Rng) {
    match fault {
        Fault::Crash | Fault::AllDown => node.down().await,
        Fault::Hang => node.hang(),
        Fault::Hold => node.hold(),
        Fault::Reset => node.reset(),
        Fault::Close => node.close(),
        Fault::Delay => node.delay(Duration::from_millis(rng.u64(100..1500))),
        Fault::Garbage => node.garbage(),
    }
}

async fn restore(node: &Upstream) {
    node.answer();
    node.release();
    node.up().await;
}

/// What the scheduler did: counts per fault, and a timestamped line per change (UTC, like
/// weir's logs, kept with them when a run finds a violation).
#[derive(Default)]
struct FaultLog {
    applied: BTreeMap<Fault, u64>,
    lines: Vec<String>,
}

impl FaultLog {
    fn note(&mut self, what: String) {
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
        self.lines.push(format!("{now} {what}"));
    }
}

/// Applies faults until `until`, then restores every node.
async fn schedule_faults(nodes: Arc<Vec<Upstream>>, seed: u64, until: Instant) -> FaultLog {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut log = FaultLog::default();
    let mut active: Vec<Option<Instant>> = vec![None; nodes.len()];
    let mut deck = Deck(Vec::new());
    let mut next_fault = Instant::now() + Duration::from_millis(rng.u64(500..2000));
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        for (i, slot) in active.iter_mut().enumerate() {
            if slot.is_some_and(|end| end <= now) {
                restore(&nodes[i]).await;
                log.note(format!("{} restored", nodes[i].url()));
                *slot = None;
            }
        }
        if now >= next_fault {
            let fault = deck.next(&mut rng);
            let ends = now + Duration::from_millis(rng.u64(1000..4000));
            if fault == Fault::AllDown {
                // One late in the run would leave its whole drain to the accounting.
                if until.saturating_duration_since(now) > Duration::from_secs(8) {
                    let ends = now + Duration::from_millis(rng.u64(2000..5000));
                    for (i, slot) in active.iter_mut().enumerate() {
                        if slot.is_some() {
                            restore(&nodes[i]).await;
                        }
                        nodes[i].down().await;
                        // Nodes come back one by one, up to a second apart.
                        *slot = Some(ends + Duration::from_millis(rng.u64(0..1000)));
                    }
                    log.note("every node down".into());
                    *log.applied.entry(fault).or_insert(0) += 1;
                }
                deck.used();
            } else {
                // At most two nodes faulted at once; otherwise the fault waits for the next turn.
                let healthy: Vec<usize> =
                    (0..nodes.len()).filter(|i| active[*i].is_none()).collect();
                if healthy.len() + 2 > nodes.len() {
                    let i = healthy[rng.usize(0..healthy.len())];
                    apply(&nodes[i], fault, &mut rng).await;
                    active[i] = Some(ends);
                    log.note(format!("{} {fault:?}", nodes[i].url()));
                    *log.applied.entry(fault).or_insert(0) += 1;
                    deck.used();
                }
            }
            next_fault = now + Duration::from_millis(rng.u64(500..2000));
        }
        let wake = active
            .iter()
            .flatten()
            .copied()
            .chain([next_fault, until])
            .min()
            .unwrap_or(until);
        tokio::time::sleep_until(wake.max(Instant::now() + Duration::from_millis(10))).await;
    }
    for node in nodes.iter() {
        restore(node).await;
    }
    log.note("every node restored".into());
    log
}

// === impl resources ===

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

fn sample(pid: u32, t0: Instant) -> Option<Sample> {
    Some(Sample {
        at: t0.elapsed(),
        rss_kib: rss_kib(pid)?,
        fds: fd_count(pid)?,
    })
}

// === the run ===

/// What a run found.
pub struct Report {
    pub settings: Settings,
    pub violations: Vec<String>,
    pub table: String,
}

impl Report {
    pub fn print(&self) {
        println!("{}", self.table);
    }

    /// Panics with the violations (after the table is printed).
    pub fn assert_clean(&self) {
        assert!(
            self.violations.is_empty(),
            "chaos soak (seed {:#x}): {} violation(s); first ones:\n{}",
            self.settings.seed,
            self.violations.len(),
            self.violations
                .iter()
                .take(30)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Runs one soak and accounts for every request.
pub async fn run(settings: Settings) -> Report {
    let seed = settings.seed;
    println!(
        "chaos soak: seed {seed:#x}, {} s of load, {} nodes, {} clients + {} slow clients",
        settings.load.as_secs(),
        settings.nodes,
        settings.clients,
        settings.slow_clients
    );
    let mut nodes = Vec::new();
    for i in 0..settings.nodes {
        nodes.push(Upstream::start(&format!("n{i}")).await);
    }
    let nodes = Arc::new(nodes);
    let gw = Gateway::builder()
        .upstreams(nodes.iter())
        .yaml(GATEWAY_YAML)
        .start()
        .await;
    let pid = gw.pid();
    let t0 = Instant::now();
    let baseline = sample(pid, t0).expect("weir's /proc entry");
    let mut violations = Vec::new();

    // Resource sampler and the fold of what nodes received, both until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(vec![baseline]));
    let sampler = {
        let (stop, samples) = (stop.clone(), samples.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Some(s) = sample(pid, t0) {
                    samples.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                }
            }
        })
    };
    let tally = Arc::new(Mutex::new(Tally::default()));
    let folder = {
        let (stop, nodes, tally) = (stop.clone(), nodes.clone(), tally.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                fold_all(&nodes, &tally, seed);
            }
        })
    };

    let until = Instant::now() + settings.load;
    let scheduler = tokio::spawn(schedule_faults(nodes.clone(), seed, until));
    let ledger = Arc::new(Ledger::default());
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..settings.clients + settings.slow_clients {
        let worker = Worker {
            addr: gw.addr(),
            seed,
            ledger: ledger.clone(),
            max_requests: settings.max_requests,
            until,
            rng: fastrand::Rng::with_seed(seed ^ ((w as u64 + 1) << 32)),
        };
        if w < settings.clients {
            workers.spawn(worker.run_normal());
        } else {
            workers.spawn(worker.run_slow());
        }
    }
    if !settings.progress.is_zero() {
        let (stop, ledger, samples) = (stop.clone(), ledger.clone(), samples.clone());
        let every = settings.progress;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if stop.load(Ordering::Relaxed) || Instant::now() >= until {
                    break;
                }
                let done = ledger.records.lock().map(|r| r.len()).unwrap_or(0);
                let last = samples.lock().ok().and_then(|s| s.last().copied());
                if let Some(s) = last {
                    println!(
                        "  {:>4} s: {done} requests, weir RSS {:.1} MiB, {} fds",
                        s.at.as_secs(),
                        s.rss_kib as f64 / 1024.0,
                        s.fds
                    );
                }
            }
        });
    }

    // Every worker ends within a deadline of the load's end.
    let joined =
        tokio::time::timeout_at(until + CLIENT_DEADLINE + Duration::from_secs(15), async {
            while workers.join_next().await.is_some() {}
        })
        .await;
    if joined.is_err() {
        violations.push("client workers still running 45 s after the load ended".into());
        workers.abort_all();
    }
    let load_end = t0.elapsed();
    let faults = scheduler.await.unwrap_or_default();

    // Drain: every node answers; the queue is done once each entry was delivered or given up.
    let drained = drain(&gw).await;
    if let Err(e) = &drained {
        violations.push(e.clone());
    }
    let drain_end = t0.elapsed();
    let queue = gw.admin_get("/queue").await.json();
    let dead_targets: HashMap<String, String> = queue["deferred"]["dead_letters"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|d| {
                    (
                        d["target"].as_str().unwrap_or("").to_string(),
                        d["reason"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let metrics = gw.metrics().await;

    // Descriptors: close pooled node connections from the nodes' side, await weir's count.
    for n in nodes.iter() {
        n.down().await;
        n.up().await;
    }
    let fd_deadline = Instant::now() + Duration::from_secs(30);
    let fds_after = loop {
        let fds = fd_count(pid).unwrap_or(usize::MAX);
        if fds <= baseline.fds || Instant::now() >= fd_deadline {
            break fds;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if fds_after > baseline.fds {
        violations.push(format!(
            "descriptor leak: weir holds {fds_after} fds 30 s after the load, {} before it",
            baseline.fds
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let _ = folder.await;
    fold_all(&nodes, &tally, seed);
    if let Some(s) = sample(pid, t0) {
        samples.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    }

    // weir is still there and never panicked.
    let mut gw = gw;
    if gw.wait_exit(Duration::from_millis(1)).await {
        violations.push("weir exited during the soak".into());
    }
    if gw.stderr_text().contains("panicked") {
        violations.push("weir's stderr shows a panic".into());
    }
    for (what, name, labels) in [
        ("in-flight requests", "weir_inflight_requests", &[][..]),
        ("client connections", "weir_client_connections", &[][..]),
    ] {
        let v = metrics.sum_or_zero(name, labels);
        if v != 0.0 {
            violations.push(format!("{what} after the drain: {name} = {v}"));
        }
    }

    let records = std::mem::take(&mut *ledger.records.lock().unwrap_or_else(|e| e.into_inner()));
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (last, n) in lock(&ledger.stale_resends).iter() {
        violations.push(format!(
            "{n} keep-alive connection(s) left open after {last} were closed when the next \
             request went out"
        ));
    }
    if records.len() < 100 {
        violations.push(format!("only {} requests were sent", records.len()));
    }
    let mut account = Account::new(&records, &tally, &dead_targets);
    violations.append(&mut account.violations);
    let resources = resources(
        &settings, &samples, baseline, fds_after, load_end, drain_end,
    );
    violations.extend(resources.violation.clone());

    let table = render(
        &settings,
        &faults.applied,
        &account,
        &tally,
        &ledger,
        &metrics,
        &resources,
        &violations,
    );
    if !violations.is_empty() {
        keep_logs(&gw, seed, &faults);
    }
    Report {
        settings,
        violations,
        table,
    }
}

/// Copies weir's logs out of the tempdir (deleted with the gateway) to look at a failure.
fn keep_logs(gw: &Gateway, seed: u64, faults: &FaultLog) {
    let dir = std::env::temp_dir().join(format!("weir-chaos-{seed:x}"));
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("faults.log"), faults.lines.join("\n") + "\n");
        for f in ["stdout.log", "stderr.log", "weir.yaml"] {
            let _ = std::fs::copy(gw.dir().join(f), dir.join(f));
        }
        println!("weir's logs kept in {}", dir.display());
    }
}

/// Waits (bounded) until the deferred queue is empty and every entry it took was delivered or
/// given up on. Live GETs nudge a replay sitting in its backoff (they open its gate early).
async fn drain(gw: &Gateway) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let _ =
            crate::support::client::send(gw.addr(), &crate::support::Request::get("/chaos/nudge"))
                .await;
        let m = gw.metrics().await;
        let q = [("queue", "deferred")];
        let enqueued = m.sum_or_zero("weir_deferred_enqueued_total", &q);
        let finished: f64 = ["delivered", "dead_letter", "expired"]
            .iter()
            .map(|r| {
                m.sum_or_zero(
                    "weir_deferred_replayed_total",
                    &[("queue", "deferred"), ("result", r)],
                )
            })
            .sum();
        let depth = m.sum_or_zero("weir_deferred_queue_depth", &q);
        if depth == 0.0 && finished >= enqueued {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err(format!(
                "the queue did not drain within 90 s: depth {depth}, enqueued {enqueued}, \
                 finished {finished}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// === the account ===

#[derive(Default)]
struct Account {
    /// kind → outcome class → count.
    classes: BTreeMap<Kind, BTreeMap<&'static str, u64>>,
    /// "status message" → count.
    statuses: BTreeMap<String, u64>,
    buffered: u64,
    buffered_delivered: u64,
    buffered_dead: u64,
    /// Dead letters no node had read in full (cut off mid-request, e.g. by a crash).
    dead_unseen: u64,
    /// Replay-safe requests delivered more than once (allowed).
    safe_duplicates: u64,
    /// Requests not replay-safe delivered more than once (never allowed).
    unsafe_duplicates: u64,
    /// Requests answered with an error that a node nevertheless received (allowed: the
    /// node read it, then failed).
    error_but_delivered: u64,
    deliveries: u64,
    /// Replays whose order was checked, and those out of order.
    ordered_replays: u64,
    order_violations: u64,
    slowest: BTreeMap<Kind, Duration>,
    violations: Vec<String>,
}

const CLASSES: [&str; 10] = [
    "2xx",
    "buffered",
    "502",
    "503 unavail",
    "503 full",
    "504",
    "408",
    "429",
    "closed",
    "abandoned",
];

impl Account {
    fn new(records: &[Record], tally: &Tally, dead_targets: &HashMap<String, String>) -> Account {
        let mut a = Account::default();
        for u in &tally.unidentified {
            a.violations
                .push(format!("a node received an unknown request: {u}"));
        }
        let mut seen_queue_ids = HashMap::new();
        let mut replays: HashMap<String, Vec<(u64, &Record)>> = HashMap::new();
        for r in records {
            let empty = Deliveries::default();
            let d = tally.by_id.get(&r.id).unwrap_or(&empty);
            let n = d.nodes.len();
            a.deliveries += n as u64;
            let slowest = a.slowest.entry(r.kind).or_default();
            *slowest = (*slowest).max(r.answered - r.sent);
            let mut problems: Vec<String> = Vec::new();
            let mut bad = |msg: String| problems.push(msg);
            if d.bad_body > 0 {
                bad(format!(
                    "{} delivery(ies) with a body other than the client's",
                    d.bad_body
                ));
            }
            if n > 1 {
                if r.kind.replay_safe() {
                    a.safe_duplicates += 1;
                } else {
                    a.unsafe_duplicates += 1;
                    bad(format!(
                        "not replay-safe, delivered {n} times ({:?})",
                        d.nodes
                    ));
                }
            }
            if r.kind.incomplete() && n > 0 {
                bad(format!(
                    "never completed by the client, yet delivered {n} times"
                ));
            }
            let class = match &r.outcome {
                Outcome::Node { status, node } => {
                    *a.statuses
                        .entry(format!("{status} from a node"))
                        .or_default() += 1;
                    if !d.nodes.contains(node) {
                        bad(format!(
                            "{status} from {node}, which never received it ({:?})",
                            d.nodes
                        ));
                    }
                    if r.kind.incomplete() {
                        bad(format!("{status} for a request the client never completed"));
                    }
                    "2xx"
                }
                Outcome::Weir {
                    status,
                    msg,
                    queue_id,
                } => {
                    *a.statuses.entry(format!("{status} {msg}")).or_default() += 1;
                    let class = match (*status, msg.as_str()) {
                        (503, "Request Buffered") => "buffered",
                        (503, "Queue Full") => "503 full",
                        (503, _) => "503 unavail",
                        (502, _) => "502",
                        (504, _) => "504",
                        (408, _) => "408",
                        _ => "429",
                    };
                    if n > 0 && matches!(class, "502" | "503 unavail" | "504") {
                        a.error_but_delivered += 1;
                    }
                    match class {
                        "buffered" => {
                            a.buffered += 1;
                            if let Some(q) = queue_id {
                                if let Some(other) = seen_queue_ids.insert(q.clone(), r.id) {
                                    bad(format!("queue id {q} also given to id {other}"));
                                }
                            }
                            let dead = dead_targets.get(&r.kind.path(r.id));
                            match dead {
                                Some(_) => a.buffered_dead += 1,
                                None => a.buffered_delivered += 1,
                            }
                            if let Some(reason) = dead {
                                if r.kind.replay_safe() || reason != "not_replay_safe" {
                                    bad(format!("dead letter ({reason})"));
                                }
                            }
                            match (dead.is_some(), n) {
                                // Its replay failed after the request may have reached the
                                // node (the node may have been cut off mid-request).
                                (true, 0) => a.dead_unseen += 1,
                                (true, 1) => {}
                                (false, 0) => bad("buffered, never delivered".into()),
                                (false, 1) => {}
                                _ if r.kind.replay_safe() => {}
                                _ => bad(format!("buffered, delivered {n} times")),
                            }
                        }
                        "408" | "429" if n > 0 => {
                            bad(format!("answered {status} {msg} yet delivered {n} times"))
                        }
                        "503 full" if n > 0 && !r.kind.replay_safe() => {
                            bad(format!("answered Queue Full yet delivered {n} times"))
                        }
                        _ => {}
                    }
                    if r.kind.incomplete() && class != "408" {
                        bad(format!(
                            "{status} {msg} for a request the client never completed"
                        ));
                    }
                    class
                }
                Outcome::Closed => {
                    *a.statuses.entry("closed, no answer".into()).or_default() += 1;
                    if !matches!(r.kind, Kind::SlowHead | Kind::StalledBody) {
                        bad("connection closed without an answer".into());
                    }
                    "closed"
                }
                Outcome::Abandoned => "abandoned",
                Outcome::Broken(why) => {
                    *a.statuses.entry("broken".into()).or_default() += 1;
                    bad(why.clone());
                    "violation"
                }
            };
            *a.classes
                .entry(r.kind)
                .or_default()
                .entry(class)
                .or_default() += 1;
            let what = format!("{} {} (id {})", r.kind.method(), r.kind.path(r.id), r.id);
            for p in problems {
                a.violations.push(format!("{what}: {p}"));
            }
            // A buffered request that is not replay-safe reached no node before it was
            // queued: its one delivery is the replay's.
            if class == "buffered" && !r.kind.replay_safe() && n == 1 {
                replays
                    .entry(d.nodes[0].clone())
                    .or_default()
                    .push((d.arrivals[0], r));
            }
        }
        a.check_order(replays);
        a
    }

    /// The queue is FIFO: of two buffered requests, the one answered `Request Buffered`
    /// before the other was even sent is delivered first. (Requests buffered at the same
    /// moment may be queued either way round, so only such clearly ordered pairs count.)
    /// Each node sees the replays in delivery order, so the check runs per node.
    fn check_order(&mut self, replays: HashMap<String, Vec<(u64, &Record)>>) {
        for (node, mut list) in replays {
            list.sort_by_key(|(arrival, _)| *arrival);
            // The latest-sent request delivered so far on this node.
            let mut latest: Option<&Record> = None;
            for (_, r) in list {
                if let Some(earlier) = latest {
                    if r.answered < earlier.sent {
                        self.order_violations += 1;
                        self.violations.push(format!(
                            "out of order at {node}: id {} was buffered before id {} was sent, \
                             yet delivered after it",
                            r.id, earlier.id
                        ));
                    }
                }
                if latest.is_none_or(|l| r.sent > l.sent) {
                    latest = Some(r);
                }
                self.ordered_replays += 1;
            }
        }
    }
}

// === resources and the printout ===

struct Resources {
    /// RSS levels (medians over `rss_window`): at `rss_from`, and over the load's last window.
    level_ref: Option<u64>,
    level_end: Option<u64>,
    rss_max_after: u64,
    rss_min_after: u64,
    fds_base: usize,
    fds_peak: usize,
    fds_after: usize,
    trend: Vec<Sample>,
    violation: Option<String>,
}

/// The median RSS of the samples taken in `from..=to`.
fn level(samples: &[Sample], from: Duration, to: Duration) -> Option<u64> {
    let mut v: Vec<u64> = samples
        .iter()
        .filter(|s| s.at >= from && s.at <= to)
        .map(|s| s.rss_kib)
        .collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

fn resources(
    settings: &Settings,
    samples: &[Sample],
    baseline: Sample,
    fds_after: usize,
    load_end: Duration,
    drain_end: Duration,
) -> Resources {
    // Levels, not single samples: RSS swings by several MiB as the faults change what is in
    // flight and the allocator hands pages back, so a sample says little on its own.
    let w = settings.rss_window;
    let level_ref = level(samples, settings.rss_from, settings.rss_from + w);
    let level_end = level(samples, load_end.saturating_sub(w), load_end);
    let after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= settings.rss_from && s.at <= drain_end)
        .collect();
    let rss_max_after = after.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let rss_min_after = after.iter().map(|s| s.rss_kib).min().unwrap_or(0);
    // Growth is what a leak looks like; a drop is reported, not checked.
    let violation = match (level_ref, level_end) {
        (Some(r), Some(e)) => {
            let allowed = (r / 10).max(settings.rss_floor_kib);
            (e > r + allowed).then(|| {
                format!(
                    "RSS grew from {r} KiB (median at {}..{} s) to {e} KiB (median of the \
                     load's last {} s), more than {allowed} KiB",
                    settings.rss_from.as_secs(),
                    (settings.rss_from + w).as_secs(),
                    w.as_secs()
                )
            })
        }
        _ => Some(format!(
            "too few RSS samples: none between {:?} and {:?}, or in the load's last {w:?}",
            settings.rss_from,
            settings.rss_from + w
        )),
    };
    if let Ok(path) = std::env::var("CHAOS_SAMPLES") {
        let csv: String = samples
            .iter()
            .map(|s| format!("{:.1},{},{}\n", s.at.as_secs_f64(), s.rss_kib, s.fds))
            .collect();
        let _ = std::fs::write(path, format!("seconds,rss_kib,fds\n{csv}"));
    }
    let fds_peak = samples
        .iter()
        .filter(|s| s.at <= load_end)
        .map(|s| s.fds)
        .max()
        .unwrap_or(0);
    // About a dozen points of the trend for the printout.
    let step = (samples.len() / 12).max(1);
    let mut trend: Vec<Sample> = samples.iter().step_by(step).copied().collect();
    if let Some(last) = samples.last() {
        if trend.last().map(|s| s.at) != Some(last.at) {
            trend.push(*last);
        }
    }
    Resources {
        level_ref,
        level_end,
        rss_max_after,
        rss_min_after,
        fds_base: baseline.fds,
        fds_peak,
        fds_after,
        trend,
        violation,
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[allow(clippy::too_many_arguments)]
fn render(
    settings: &Settings,
    faults: &BTreeMap<Fault, u64>,
    a: &Account,
    tally: &Tally,
    ledger: &Ledger,
    metrics: &crate::support::Metrics,
    r: &Resources,
    violations: &[String],
) -> String {
    let mut t = String::new();
    let total: u64 = a.classes.values().flat_map(|c| c.values()).sum();
    let _ = writeln!(
        t,
        "\n=== chaos soak: seed {:#x}, {} s of load, {total} requests ===",
        settings.seed,
        settings.load.as_secs()
    );
    let list: Vec<String> = faults.iter().map(|(f, n)| format!("{f:?} {n}")).collect();
    let _ = writeln!(t, "faults applied: {}", list.join(", "));
    let _ = write!(t, "\n{:<20}{:>7}", "kind", "sent");
    for c in CLASSES {
        let _ = write!(t, "{c:>12}");
    }
    let _ = writeln!(t, "{:>10}{:>10}", "broken", "slowest");
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    for (kind, classes) in &a.classes {
        let sent: u64 = classes.values().sum();
        let _ = write!(t, "{:<20}{sent:>7}", kind.label());
        for c in CLASSES.iter().chain(["violation"].iter()) {
            let n = classes.get(c).copied().unwrap_or(0);
            *totals.entry(c).or_default() += n;
            let _ = write!(
                t,
                "{n:>width$}",
                width = if *c == "violation" { 10 } else { 12 }
            );
        }
        let slowest = a.slowest.get(kind).copied().unwrap_or_default();
        let _ = writeln!(t, "{:>9.1}s", slowest.as_secs_f64());
    }
    let _ = write!(t, "{:<20}{total:>7}", "all");
    for c in CLASSES.iter().chain(["violation"].iter()) {
        let n = totals.get(c).copied().unwrap_or(0);
        let _ = write!(
            t,
            "{n:>width$}",
            width = if *c == "violation" { 10 } else { 12 }
        );
    }
    let _ = writeln!(t);
    let _ = writeln!(t, "\nby answer:");
    for (s, n) in &a.statuses {
        let _ = writeln!(t, "  {s:<32}{n:>8}");
    }
    let m = |name: &str, labels: &[(&str, &str)]| metrics.sum_or_zero(name, labels) as u64;
    let q = ("queue", "deferred");
    let _ = writeln!(
        t,
        "\nbuffered: {} (503 Request Buffered) -> delivered {}, dead letters {} ({} of them \
         never read in full by a node) \
         (weir: enqueued {}, replayed delivered {}, failed attempts {}, dead letters {}); \
         FIFO checked over {} replays: {} out of order",
        a.buffered,
        a.buffered_delivered,
        a.buffered_dead,
        a.dead_unseen,
        m("weir_deferred_enqueued_total", &[q]),
        m(
            "weir_deferred_replayed_total",
            &[q, ("result", "delivered")]
        ),
        m(
            "weir_deferred_replayed_total",
            &[q, ("result", "failed_attempt")]
        ),
        m(
            "weir_deferred_replayed_total",
            &[q, ("result", "dead_letter")]
        ),
        a.ordered_replays,
        a.order_violations,
    );
    let _ = writeln!(
        t,
        "deliveries at nodes: {} for {} ids; replay-safe ids delivered more than once: {} \
         (allowed); other ids delivered more than once: {}; error answers whose request a node \
         had read: {} (allowed, at most once when not replay-safe); nudges {}; unknown {}",
        a.deliveries,
        tally.by_id.len(),
        a.safe_duplicates,
        a.unsafe_duplicates,
        a.error_but_delivered,
        tally.nudges,
        tally.unidentified.len()
    );
    let _ = writeln!(
        t,
        "keep-alive connections found closed and the request sent again: {}; slow clients left \
         open after their 408: {}",
        {
            let by: Vec<String> = lock(&ledger.stale_resends)
                .iter()
                .map(|(k, v)| format!("{v} after {k}"))
                .collect();
            let n: u64 = lock(&ledger.stale_resends).values().sum();
            format!("{n} ({})", by.join(", "))
        },
        ledger.open_after_408.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        t,
        "weir: retries {}, rejected concurrency {}, client_timeout {}, queue_full {}",
        m("weir_retries_total", &[]),
        m("weir_rejected_total", &[("reason", "concurrency")]),
        m("weir_rejected_total", &[("reason", "client_timeout")]),
        m("weir_rejected_total", &[("reason", "queue_full")]),
    );
    match (r.level_ref, r.level_end) {
        (Some(rf), Some(end)) => {
            let _ = writeln!(
                t,
                "\nRSS: {:.1} MiB at {}..{} s, {:.1} MiB over the load's last {} s (medians; \
                 {:+.1} %, growth limit 10 %, at least {:.0} MiB); samples from {} s: \
                 {:.1}..{:.1} MiB",
                mib(rf),
                settings.rss_from.as_secs(),
                (settings.rss_from + settings.rss_window).as_secs(),
                mib(end),
                settings.rss_window.as_secs(),
                (end as f64 / rf as f64 - 1.0) * 100.0,
                mib(settings.rss_floor_kib),
                settings.rss_from.as_secs(),
                mib(r.rss_min_after),
                mib(r.rss_max_after),
            );
        }
        _ => {
            let _ = writeln!(t, "\nRSS: too few samples");
        }
    }
    let _ = writeln!(
        t,
        "fds: {} before the load, peak {} during it, {} after it",
        r.fds_base, r.fds_peak, r.fds_after
    );
    let trend: Vec<String> = r
        .trend
        .iter()
        .map(|s| format!("{}s {:.1}MiB/{}fd", s.at.as_secs(), mib(s.rss_kib), s.fds))
        .collect();
    let _ = writeln!(t, "trend: {}", trend.join("  "));
    let _ = writeln!(t, "\nviolations: {}", violations.len());
    for v in violations.iter().take(30) {
        let _ = writeln!(t, "  {v}");
    }
    t
}
