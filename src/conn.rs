//! Client connections: what one client may hold of weir, enforced below Pingora's HTTP code.
//!
//! Every accepted connection is counted ([`Connections`]: `limits.max_connections`,
//! `limits.max_connections_per_client`) and its stream wrapped in a [`ClientConn`], which keeps
//! the client's deadlines where the bytes are read:
//!
//! - the request head must be in within `timeouts.client_head` of the connection's accept, or of
//!   the first byte of a later request on it: 408 and close (a connection that sent nothing is
//!   closed silently);
//! - a request body must be in by `timeouts.client_body + bytes / limits.min_body_rate` after its
//!   head, a minimum rate with an allowance, so a trickling client is cut while a slow but
//!   honest upload is not; the read fails and the proxy answers 408 ([`ClientConn::timed_out`]).
//!
//! The proxy tells the connection where its request is ([`ClientConn::head_done`],
//! [`ClientConn::body_done`], [`ClientConn::request_done`]), reaching it through
//! [`ClientConn::of`]. Until a request head is complete the only writer is Pingora itself, and
//! only to refuse (400 for a head it cannot parse, 405 for CONNECT): `ClientConn` answers those
//! in weir's format instead (JSON body, request id, the operator's response headers), with an
//! access log line and the metrics any refused request gets.
//!
//! HTTP/2 connections are counted but not timed here: their streams share one connection.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::forward::ids;
use crate::logs::Logs;
use crate::metrics::{Metrics, Outcome, Rejection};
use crate::runtime::Runtime;

/// The body of every answer weir writes itself: ServiceQ's `sq_msg` key.
pub fn answer_body(message: &str) -> Bytes {
    Bytes::from(format!("{{\"sq_msg\":\"{message}\"}}"))
}

// === counting ===

/// Counts per client address, sharded so that threads seldom meet on one lock.
pub struct PerClient {
    shards: Box<[Mutex<HashMap<IpAddr, usize>>]>,
}

const SHARDS: usize = 16;

impl Default for PerClient {
    fn default() -> Self {
        PerClient {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl PerClient {
    fn shard(&self, ip: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        let h = match ip {
            IpAddr::V4(a) => u32::from(a) as usize,
            IpAddr::V6(a) => {
                let b = a.octets();
                b.iter()
                    .fold(0usize, |h, &x| h.wrapping_mul(31).wrapping_add(x as usize))
            }
        };
        let m = &self.shards[(h ^ (h >> 8)) % SHARDS];
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one unit for `ip` if it holds fewer than `limit`.
    pub fn try_take(&self, ip: IpAddr, limit: usize) -> bool {
        let mut m = self.shard(ip);
        let n = m.entry(ip).or_insert(0);
        if *n >= limit {
            if *n == 0 {
                m.remove(&ip);
            }
            return false;
        }
        *n += 1;
        true
    }

    pub fn give_back(&self, ip: IpAddr) {
        let mut m = self.shard(ip);
        if let Some(n) = m.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }

    /// What `ip` holds now.
    pub fn held(&self, ip: IpAddr) -> usize {
        self.shard(ip).get(&ip).copied().unwrap_or(0)
    }
}

/// The open client connections of every listener.
#[derive(Default)]
pub struct Connections {
    open: AtomicUsize,
    per_client: PerClient,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    PerClient,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::PerClient => "per_client",
        }
    }
}

/// One open connection; dropping it gives the connection back.
pub struct ConnPermit {
    conns: Arc<Connections>,
    /// Set when the connection counts against its client's limit.
    client: Option<IpAddr>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.conns.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.client {
            self.conns.per_client.give_back(ip);
        }
    }
}

impl Connections {
    /// Admits a connection from `ip` under `max` in all and `per_client` from one address
    /// (0 = no per-client limit).
    pub fn admit(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        max: usize,
        per_client: usize,
    ) -> Result<ConnPermit, Refusal> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::MaxConnections);
        }
        let mut permit = ConnPermit {
            conns: self.clone(),
            client: None,
        };
        if let (Some(ip), true) = (ip, per_client > 0) {
            if !self.per_client.try_take(ip, per_client) {
                return Err(Refusal::PerClient);
            }
            permit.client = Some(ip);
        }
        Ok(permit)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

// === the connection ===

/// Where the connection's current request is.
const IDLE: u8 = 0;
const HEAD: u8 = 1;
const BODY: u8 = 2;
const EXCHANGE: u8 = 3;
/// Not tracked (HTTP/2).
const OFF: u8 = 4;

/// How much of a request head is kept to name a request refused before it was parsed.
pub(crate) const HEAD_NOTE: usize = 256;

/// What a connection needs from the gateway, shared by all of them.
pub struct ConnShared {
    pub metrics: Arc<Metrics>,
    pub logs: Arc<Logs>,
}

/// The deadlines of one connection, fixed at accept from the runtime then in force.
#[derive(Clone, Copy)]
struct Deadlines {
    head: Duration,
    body: Duration,
    /// Bytes per second; 0 = no minimum (and no body deadline).
    rate: usize,
}

/// A client connection's stream with its deadlines and its pre-request answers.
pub struct ClientConn {
    inner: Stream,
    phase: AtomicU8,
    timed_out: AtomicBool,
    deadlines: Deadlines,
    // Touched only by the reading and writing side (which has `&mut self`).
    seen: u8,
    started: Instant,
    body_bytes: u64,
    deadline: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
    note: Vec<u8>,
    outbox: Option<(Vec<u8>, usize)>,
    /// Writes since the current response's status line (HTTP/1 only; `None` for HTTP/2).
    response_writes: Option<u32>,
    runtime: Arc<Runtime>,
    shared: Arc<ConnShared>,
    client: Option<IpAddr>,
    _permit: ConnPermit,
}

impl fmt::Debug for ClientConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConn")
            .field("inner", &self.inner)
            .field("phase", &self.phase.load(Ordering::Relaxed))
            .finish()
    }
}

impl ClientConn {
    /// Wraps an accepted stream; the head deadline runs from now.
    pub fn new(
        inner: Stream,
        permit: ConnPermit,
        runtime: Arc<Runtime>,
        shared: Arc<ConnShared>,
        client: Option<IpAddr>,
    ) -> ClientConn {
        let t = &runtime.config.timeouts;
        let deadlines = Deadlines {
            head: t.client_head,
            body: t.client_body,
            rate: runtime.config.limits.min_body_rate,
        };
        let h2 = matches!(inner.selected_alpn_proto(), Some(ALPN::H2));
        let phase = if h2 { OFF } else { HEAD };
        let now = Instant::now();
        ClientConn {
            inner,
            phase: AtomicU8::new(phase),
            timed_out: AtomicBool::new(false),
            deadlines,
            seen: phase,
            started: now,
            body_bytes: 0,
            deadline: (phase == HEAD).then(|| now + deadlines.head),
            sleep: None,
            note: Vec::new(),
            outbox: None,
            response_writes: (!h2).then_some(0),
            runtime,
            shared,
            client,
            _permit: permit,
        }
    }

    /// Writes response bytes. Pingora buffers a `Content-Length` response's body until about
    /// 1.4 KiB have built up or the body is complete, so a node that sends its body in small
    /// pieces would have them held back (a trickle of bytes would reach the client only at
    /// the end). Everything after the first write of a response (its header, coalesced with
    /// what follows) is flushed at once: the client gets what the node sent when it sent it.
    fn write_response(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        status_line: bool,
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let (Some(n), Poll::Ready(Ok(_))) = (&mut self.response_writes, &written) {
            *n = if status_line { 1 } else { n.saturating_add(1) };
            if *n >= 2 {
                // Best effort: a flush the socket cannot take now completes with the next
                // write or Pingora's own flush at the body's end.
                let _ = Pin::new(&mut self.inner).poll_flush(cx);
            }
        }
        written
    }

    /// The connection of an HTTP/1 session (none for HTTP/2, or a stream weir did not wrap).
    pub fn of(session: &ServerSession) -> Option<&ClientConn> {
        session.stream()?.as_any().downcast_ref::<ClientConn>()
    }

    /// The request head is in; its body (if `body`) is read from now on.
    pub fn head_done(&self, body: bool) {
        self.set_phase(if body { BODY } else { EXCHANGE });
    }

    /// The request body is in.
    pub fn body_done(&self) {
        let _ = self
            .phase
            .compare_exchange(BODY, EXCHANGE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The request is over; the connection waits for the next head (untimed until its first
    /// byte: the keep-alive timeout covers the wait).
    pub fn request_done(&self) {
        self.set_phase(IDLE);
        self.timed_out.store(false, Ordering::Release);
    }

    /// A body read failed because the client was too slow (answered 408).
    pub fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Acquire)
    }

    fn set_phase(&self, to: u8) {
        let _ = self
            .phase
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                (p != OFF).then_some(to)
            });
    }

    /// The proxy moved the request on: start the new phase's clock.
    fn enter(&mut self, phase: u8) {
        self.seen = phase;
        self.deadline = None;
        match phase {
            IDLE => self.note.clear(),
            BODY if self.deadlines.rate > 0 => {
                self.started = Instant::now();
                self.body_bytes = 0;
                self.deadline = Some(self.started + self.deadlines.body);
            }
            _ => {}
        }
    }

    /// `bytes` were read in the current phase.
    fn received(&mut self, bytes: &[u8]) {
        match self.seen {
            // The first byte of the next request: its head is timed from now.
            IDLE if self
                .phase
                .compare_exchange(IDLE, HEAD, Ordering::AcqRel, Ordering::Acquire)
                .is_ok() =>
            {
                self.seen = HEAD;
                self.started = Instant::now();
                self.deadline = Some(self.started + self.deadlines.head);
                self.keep_note(bytes);
            }
            HEAD => self.keep_note(bytes),
            BODY if self.deadlines.rate > 0 => {
                self.body_bytes += bytes.len() as u64;
                let earned =
                    Duration::from_secs_f64(self.body_bytes as f64 / self.deadlines.rate as f64);
                self.deadline = Some(self.started + self.deadlines.body + earned);
            }
            _ => {}
        }
    }

    fn keep_note(&mut self, bytes: &[u8]) {
        let room = HEAD_NOTE.saturating_sub(self.note.len());
        self.note.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// A read is pending: fail it once the phase's deadline has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(deadline) = self.deadline else {
            return Poll::Pending;
        };
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let what = if self.seen == HEAD {
            if !self.note.is_empty() {
                // A partial head: the client is told, then the connection closes.
                self.refuse(408, "Request Timeout", Rejection::ClientTimeout);
                let _ = self.poll_outbox(cx);
            }
            "the request head took too long"
        } else {
            self.timed_out.store(true, Ordering::Release);
            "the request body arrived too slowly"
        };
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
    }

    /// Puts weir's answer `status` in place of whatever Pingora was about to write, and counts
    /// and logs the refused request.
    fn refuse(&mut self, status: u16, message: &str, why: Rejection) {
        if self.outbox.is_some() {
            return;
        }
        let body = answer_body(message);
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        let id = ids::new_request_id();
        let mut out = Vec::with_capacity(256 + body.len());
        out.extend_from_slice(
            format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\
                 x-request-id: ",
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &self.runtime.response_headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        self.outbox = Some((out, 0));

        let elapsed = self.started.elapsed();
        let metrics = &self.shared.metrics;
        metrics.rejected(why);
        metrics.request_done(status, Outcome::Rejected, elapsed.as_secs_f64());
        if let Some(sink) = &self.shared.logs.access {
            self.write_access(sink, status, id.to_str().unwrap_or(""), elapsed);
        }
    }

    /// The access log line of a request refused before its head was parsed: method and target
    /// as far as they can be read.
    fn write_access(&self, sink: &crate::logs::LogSink, status: u16, id: &str, elapsed: Duration) {
        let (method, target) = request_line_of(&self.note);
        sink.write_access(&crate::logs::AccessRecord {
            id,
            traceparent: "",
            client: self.client,
            method: method.as_bytes(),
            target: target.as_bytes(),
            status,
            outcome: Outcome::Rejected.label(),
            upstream: None,
            attempts: 0,
            elapsed,
        });
    }

    /// Writes what is left of weir's own answer.
    fn poll_outbox(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some((out, sent)) = &mut self.outbox else {
            return Poll::Ready(Ok(()));
        };
        while *sent < out.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &out[*sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Method and target of a request line, as far as `head` has them (empty when unreadable).
pub(crate) fn request_line_of(head: &[u8]) -> (String, String) {
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(&[]);
    let mut parts = line.split(|&b| b == b' ');
    let method = parts
        .next()
        .filter(|m| !m.is_empty() && m.iter().all(|b| b.is_ascii_alphabetic()))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default();
    let target = parts
        .next()
        .map(|t| String::from_utf8_lossy(&t[..t.len().min(200)]).into_owned())
        .unwrap_or_default();
    (method, target)
}

/// The status of a response head Pingora is writing (`HTTP/1.1 400 ...`).
pub(crate) fn status_of(head: &[u8]) -> Option<u16> {
    let code = head.get(9..12)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

impl AsyncRead for ClientConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let phase = this.phase.load(Ordering::Acquire);
        if phase == OFF {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if phase != this.seen {
            this.enter(phase);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let filled = buf.filled();
                if filled.len() > before {
                    this.received(&filled[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => this.poll_deadline(cx),
            other => other,
        }
    }
}

impl AsyncWrite for ClientConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.outbox.is_none() {
            let phase = this.phase.load(Ordering::Acquire);
            let before_request = phase == HEAD || phase == IDLE;
            let status_line = buf.starts_with(b"HTTP/1.");
            if !(before_request && status_line) {
                return this.write_response(cx, buf, status_line);
            }
            // Pingora refusing a request weir never saw: answered in weir's format.
            match status_of(buf).unwrap_or(400) {
                405 => this.refuse(405, "Method Not Allowed", Rejection::BadRequest),
                408 => this.refuse(408, "Request Timeout", Rejection::ClientTimeout),
                _ => this.refuse(400, "Bad Request", Rejection::BadRequest),
            }
        }
        // Pingora's own bytes are dropped while weir's answer goes out in their place.
        match this.poll_outbox(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_outbox(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_outbox(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[async_trait]
impl Shutdown for ClientConn {
    async fn shutdown(&mut self) {
        // weir's own answer goes out first, within a bound: the client may not be reading.
        let drained = std::future::poll_fn(|cx| self.poll_outbox(cx));
        let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
        self.inner.shutdown().await;
    }
}

impl UniqueID for ClientConn {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ClientConn {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ClientConn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ClientConn {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for ClientConn {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for ClientConn {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_client_counts_stop_at_the_limit_and_forget_idle_clients() {
        let p = PerClient::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert!(p.try_take(ip, 2));
        assert!(p.try_take(ip, 2));
        assert!(!p.try_take(ip, 2));
        p.give_back(ip);
        assert_eq!(p.held(ip), 1);
        p.give_back(ip);
        assert_eq!(p.held(ip), 0);
        assert!(p.shard(ip).is_empty());
    }

    #[test]
    fn connections_refuse_beyond_both_limits() {
        let c = Arc::new(Connections::default());
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        let p1 = c.admit(a, 3, 1);
        assert!(p1.is_ok());
        assert_eq!(c.admit(a, 3, 1).err(), Some(Refusal::PerClient));
        let p2 = c.admit(b, 3, 1);
        let p3 = c.admit(None, 3, 1);
        assert!(p2.is_ok() && p3.is_ok());
        assert_eq!(c.admit(None, 3, 1).err(), Some(Refusal::MaxConnections));
        drop((p1, p2, p3));
        assert_eq!(c.open(), 0);
        assert!(c.admit(a, 3, 1).is_ok());
    }

    #[test]
    fn request_lines_are_read_as_far_as_they_go() {
        assert_eq!(
            request_line_of(b"GET /a?b HTTP/1.1\r\nHost: x"),
            ("GET".into(), "/a?b".into())
        );
        assert_eq!(request_line_of(b"PO"), ("PO".into(), String::new()));
        assert_eq!(
            request_line_of(b"\x16\x03\x01"),
            (String::new(), String::new())
        );
        assert_eq!(status_of(b"HTTP/1.1 405 Method Not Allowed"), Some(405));
        assert_eq!(status_of(b"HTTP/1.1"), None);
    }
}
