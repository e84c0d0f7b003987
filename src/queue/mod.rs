//! The deferred and upfront queues: what weir does when it cannot (or should not yet) proxy.
//!
//! A queued request is kept whole (method, raw target, the headers an upstream would get, the
//! body) in a bounded store behind the [`RequestQueue`] trait; [`memory::MemoryQueue`] is the
//! lock-free in-memory store (crossbeam `ArrayQueue`), and a durable backend can implement the
//! same trait later without the proxy noticing.
//!
//! Guarantees:
//!
//! - **Bounded, never blocking.** A push either takes a slot at once or is refused (`Queue
//!   Full`); capacity counts every entry until it has left for good, including entries the
//!   replay is delivering.
//! - **FIFO.** The replay ([`replay`]) takes entries in queue order and keeps a taken entry
//!   (the head) until it is delivered or dead-lettered: a failed delivery never lets anything
//!   behind it overtake (with `replay_concurrency: 1`; above 1, dispatch is in queue order).
//! - **No silent loss.** An entry leaves by delivery, by expiry (TTL, `max_attempts`, or a
//!   non-replay-safe failure after it was sent) into the bounded dead-letter list, or by an
//!   operator's purge; each of these is counted and logged with the queue id the client got.
//!   At shutdown the entries still queued are counted, logged one by one, and exportable.

pub mod delivery;
pub mod handover;
pub mod journal;
pub mod memory;
pub mod redis;
pub mod replay;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prometheus::{Gauge, IntCounter, IntGauge};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::forward::Client;
use crate::metrics::Metrics;
use journal::LogStore;
use memory::MemoryQueue;

/// Which queue: the label of its metrics and its name in `GET /queue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    /// Requests every node failed for.
    Deferred,
    /// Requests accepted without being proxied (`202 Request Queued`).
    Upfront,
}

impl QueueKind {
    pub fn label(self) -> &'static str {
        match self {
            QueueKind::Deferred => "deferred",
            QueueKind::Upfront => "upfront",
        }
    }
}

/// The id a client gets in `X-Weir-Queue-Id`: 16 hex digits, a random per-process prefix and a
/// sequence number, so ids stay unique across restarts and upgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u64);

impl std::fmt::Display for QueueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A request waiting in a queue. Cheap to clone: the byte fields are reference-counted.
#[derive(Debug, Clone)]
pub struct QueuedRequest {
    pub id: QueueId,
    pub method: http::Method,
    /// The request target exactly as the client sent it.
    pub target: Bytes,
    /// The client's header lines (`name: value\r\n`) without the framing headers
    /// (`Content-Length`, `Expect`): each delivery builds its head from them with the same
    /// forwarding policy as a live attempt ([`crate::forward::prepare`]) and sets the length.
    pub headers: Bytes,
    /// The client's side of the forwarding headers and the request's ids, captured when it
    /// arrived.
    pub client: Client,
    pub body: Bytes,
    pub enqueued: Instant,
    pub enqueued_unix_ms: u64,
    /// Deliveries tried so far.
    pub attempts: u32,
    /// May be sent again after it reached a node (idempotent method or `Idempotency-Key`).
    pub replay_safe: bool,
    pub last_error: Option<Box<str>>,
    /// The cluster its route chose when it arrived; `None`: `default`.
    pub cluster: Option<std::sync::Arc<str>>,
}

impl QueuedRequest {
    /// What the entry counts against `max_bytes`: its bytes and a fixed overhead.
    pub fn size(&self) -> usize {
        128 + self.target.len() + self.headers.len() + self.body.len()
    }

    /// The header lines as (name, value) pairs.
    pub fn header_lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .split(|&b| b == b'\n')
            .filter_map(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let colon = line.iter().position(|&b| b == b':')?;
                let (name, value) = line.split_at(colon);
                Some((name, value[1..].trim_ascii()))
            })
            .filter(|(name, _)| !name.is_empty())
    }

    /// The serialisable form (for export to a successor process or a durable backend).
    pub fn export(&self) -> ExportedRequest {
        ExportedRequest {
            id: self.id.to_string(),
            method: self.method.as_str().to_string(),
            target: String::from_utf8_lossy(&self.target).into_owned(),
            headers: self
                .header_lines()
                .map(|(n, v)| {
                    (
                        String::from_utf8_lossy(n).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect(),
            body: self.body.to_vec(),
            enqueued_unix_ms: self.enqueued_unix_ms,
            attempts: self.attempts,
            replay_safe: self.replay_safe,
            last_error: self.last_error.as_deref().map(str::to_string),
            client_ip: self.client.ip.map(|ip| ip.to_string()),
            tls: self.client.tls,
            request_id: String::from_utf8_lossy(self.client.request_id.as_bytes()).into_owned(),
            traceparent: String::from_utf8_lossy(self.client.traceparent.as_bytes()).into_owned(),
            trace_started_here: self.client.trace_started_here,
            cluster: self.cluster.as_deref().map(str::to_string),
        }
    }
}

/// A queued request in serialisable form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedRequest {
    pub id: String,
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub enqueued_unix_ms: u64,
    pub attempts: u32,
    pub replay_safe: bool,
    pub last_error: Option<String>,
    #[serde(default)]
    pub client_ip: Option<String>,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub traceparent: String,
    #[serde(default)]
    pub trace_started_here: bool,
    /// `None` (or absent, from an older weir): the default cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

/// Why a push was refused.
#[derive(Debug)]
pub enum PushError {
    /// No room (entries or bytes): `503 Queue Full`.
    Full(QueuedRequest),
    /// The store could not take it (a write failed): `503 Queue Unavailable`.
    Unavailable(QueuedRequest, String),
}

impl PushError {
    pub fn into_request(self) -> QueuedRequest {
        match self {
            PushError::Full(r) | PushError::Unavailable(r, _) => r,
        }
    }
}

/// The in-memory side of a queue (every storage keeps its entries there for the replay).
/// Implementations must be safe to push from many threads at once; only the replay takes.
pub trait RequestQueue: Send + Sync {
    /// Reserves room for an entry of `size` bytes; false when full. Never blocks.
    fn reserve(&self, size: usize) -> bool;
    /// Gives back a reservation that was not used.
    fn release(&self, size: usize);
    /// Counts an entry of `size` bytes whatever the limits (recovered entries).
    fn admit(&self, size: usize);
    /// Adds at the tail (room was reserved, or the entry is recovered and counted anyway).
    fn insert(&self, req: QueuedRequest);
    /// Takes the head for delivery. It keeps its room until [`RequestQueue::finish`].
    fn take(&self) -> Option<QueuedRequest>;
    /// A taken entry of `size` bytes has left for good (delivered, dead-lettered, exported).
    fn finish(&self, size: usize);
    /// Entries occupying room (waiting or taken and not finished).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes occupied.
    fn bytes(&self) -> usize;
    fn capacity(&self) -> usize;
    fn max_bytes(&self) -> usize;
}

/// A request given up on, kept for the operator.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub method: String,
    pub target: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Why it was given up on: `ttl`, `max_attempts` or `not_replay_safe`.
    pub reason: &'static str,
    pub enqueued_unix_ms: u64,
    pub dead_unix_ms: u64,
}

/// What `GET /queue` shows for one queue.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    pub enabled: bool,
    pub depth: usize,
    pub capacity: usize,
    pub oldest_age_seconds: f64,
    pub dead_letter_capacity: usize,
    pub dead_letters: Vec<DeadLetter>,
    pub storage: &'static str,
    pub bytes: usize,
    pub max_bytes: usize,
}

/// Metric handles of one queue, resolved once.
struct QueueMetrics {
    enqueued: IntCounter,
    /// delivered, failed_attempt, expired, dead_letter
    replayed: [IntCounter; 4],
    depth: IntGauge,
    oldest_age: Gauge,
    dead_letters: IntGauge,
    remaining_at_shutdown: IntGauge,
    store_up: IntGauge,
}

/// Replay outcomes, indexing `weir_deferred_replayed_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayResult {
    Delivered = 0,
    FailedAttempt = 1,
    Expired = 2,
    DeadLetter = 3,
}

/// One queue: its store, the entries the replay holds, the dead letters, and the wake-up the
/// replay waits on.
pub struct Queue {
    pub kind: QueueKind,
    store: Box<dyn RequestQueue>,
    /// The durable log behind the memory side (`storage: log`).
    durable: Option<LogStore>,
    /// The fleet's stream (`storage: redis`); the memory side holds what this instance read.
    redis: Option<std::sync::Arc<redis::RedisStore>>,
    /// Entries taken by the replay and not finished, in queue order (replay and admin only;
    /// the push path never touches it).
    held: Mutex<VecDeque<QueuedRequest>>,
    dead: Mutex<VecDeque<DeadLetter>>,
    dead_capacity: usize,
    /// Woken on every push and when live traffic shows a node answering again.
    wake: Notify,
    recovered: AtomicBool,
    /// This process is a successor still taking a queue over: it must not offer to itself.
    pub(crate) receiving_handover: AtomicBool,
    /// What is left was reported (the replay's shutdown, or the exit report).
    reported: AtomicBool,
    next_seq: AtomicU64,
    id_prefix: u64,
    metrics: QueueMetrics,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Queue {
    /// A memory queue of `capacity` entries (and at most `max_bytes`); the dead-letter list
    /// holds as many entries.
    pub fn memory(kind: QueueKind, capacity: usize, max_bytes: usize, metrics: &Metrics) -> Queue {
        Queue::with_store(
            kind,
            Box::new(MemoryQueue::new(capacity, max_bytes)),
            None,
            metrics,
        )
    }

    /// A queue kept in `log` (with `recovered`, what the log held, in order, at its head).
    pub fn logged(
        kind: QueueKind,
        capacity: usize,
        max_bytes: usize,
        log: LogStore,
        recovered: Vec<QueuedRequest>,
        metrics: &Metrics,
    ) -> Queue {
        let q = Queue::with_store(
            kind,
            Box::new(MemoryQueue::new(capacity, max_bytes)),
            Some(log),
            metrics,
        );
        q.restore(recovered);
        q
    }

    /// A queue kept in a Redis stream shared by a fleet.
    pub fn shared(
        kind: QueueKind,
        capacity: usize,
        max_bytes: usize,
        redis: std::sync::Arc<redis::RedisStore>,
        metrics: &Metrics,
    ) -> std::sync::Arc<Queue> {
        let mut q = Queue::with_store(
            kind,
            Box::new(MemoryQueue::new(capacity, max_bytes)),
            None,
            metrics,
        );
        q.redis = Some(redis.clone());
        let q = std::sync::Arc::new(q);
        redis.attach(std::sync::Arc::downgrade(&q));
        q
    }

    /// The Redis stream, if the queue is one.
    pub fn redis(&self) -> Option<&redis::RedisStore> {
        self.redis.as_deref()
    }

    /// Kept outside this process (a log or Redis): nothing to hand over on an upgrade.
    pub fn is_durable(&self) -> bool {
        self.durable.is_some() || self.redis.is_some()
    }

    /// Whether the replay may dispatch now (a shared queue: only with the delivery lease).
    pub fn may_deliver(&self) -> bool {
        self.redis.as_ref().is_none_or(|r| r.may_deliver())
    }

    /// How often the delivery lease was lost (the replay drops what it had read when it grows).
    pub fn revocations(&self) -> u64 {
        self.redis.as_ref().map_or(0, |r| r.revocations())
    }

    /// An entry read from the shared stream joins the local queue.
    pub(crate) fn feed(&self, req: QueuedRequest) {
        self.store.admit(req.size());
        self.store.insert(req);
        self.wake.notify_one();
    }

    /// Entries waiting here for the replay (a shared queue: what this instance read).
    pub(crate) fn local_len(&self) -> usize {
        self.store.len()
    }

    /// Drops what was read from the shared stream and not taken (the lease was lost).
    pub(crate) fn drop_unread_local(&self, redis: &redis::RedisStore) {
        while let Some(r) = self.store.take() {
            self.store.finish(r.size());
            redis.forget(r.id);
        }
    }

    /// Drops a taken entry here without it leaving the shared stream (the lease was lost).
    fn forget(&self, id: QueueId) {
        let mut held = lock(&self.held);
        if let Some(pos) = held.iter().position(|r| r.id == id) {
            if let Some(r) = held.remove(pos) {
                self.store.finish(r.size());
            }
        }
        if let Some(r) = &self.redis {
            r.forget(id);
        }
    }

    /// Gives the shared stream's lease up (shutdown).
    pub async fn close(&self) {
        if let Some(r) = &self.redis {
            r.stop().await;
        }
    }

    /// Puts entries a failed hand-over drained back, in order (they were accepted once: over
    /// capacity if need be).
    pub fn put_back(&self, entries: Vec<QueuedRequest>) {
        self.restore(entries);
    }

    /// Puts recovered or adopted entries in the queue, in arrival order with what it holds
    /// (over capacity if need be: they were accepted once and are never dropped).
    fn restore(&self, mut entries: Vec<QueuedRequest>) {
        if entries.is_empty() {
            return;
        }
        let n = entries.len();
        for r in &entries {
            self.store.admit(r.size());
        }
        let mut all = Vec::new();
        while let Some(r) = self.store.take() {
            all.push(r);
        }
        all.append(&mut entries);
        all.sort_by_key(|r| r.enqueued_unix_ms);
        let over = self.len() > self.capacity() && n > 0;
        for r in all {
            self.store.insert(r);
        }
        if over {
            log::warn!(
                "queue={} holds {} entries, more than its capacity {}: recovered entries are kept",
                self.kind.label(),
                self.len(),
                self.capacity()
            );
        }
        self.wake.notify_one();
    }

    pub fn with_store(
        kind: QueueKind,
        store: Box<dyn RequestQueue>,
        durable: Option<LogStore>,
        metrics: &Metrics,
    ) -> Queue {
        let label = kind.label();
        let m = QueueMetrics {
            enqueued: metrics.queue_enqueued.with_label_values(&[label]),
            replayed: ["delivered", "failed_attempt", "expired", "dead_letter"]
                .map(|r| metrics.queue_replayed.with_label_values(&[label, r])),
            depth: metrics.queue_depth.with_label_values(&[label]),
            oldest_age: metrics.queue_oldest_age.with_label_values(&[label]),
            dead_letters: metrics.queue_dead_letters.with_label_values(&[label]),
            remaining_at_shutdown: metrics
                .queue_remaining_at_shutdown
                .with_label_values(&[label]),
            store_up: metrics.queue_store_up.with_label_values(&[label]),
        };
        Queue {
            kind,
            dead_capacity: store.capacity().clamp(1, 100_000),
            store,
            durable,
            redis: None,
            held: Mutex::new(VecDeque::new()),
            dead: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            recovered: AtomicBool::new(false),
            receiving_handover: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            next_seq: AtomicU64::new(1),
            id_prefix: (fastrand::u64(..) & 0xff_ffff) << 40,
            metrics: m,
        }
    }

    /// A fresh queue id.
    pub fn new_id(&self) -> QueueId {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed) & ((1 << 40) - 1);
        QueueId(self.id_prefix | seq)
    }

    /// Accepts `req` or gives it back: full, or (with a durable store) not written. With a
    /// durable store it resolves once the record is written (see `log.rs`).
    pub async fn push(&self, req: QueuedRequest) -> Result<QueueId, PushError> {
        let id = req.id;
        let size = req.size();
        if let Some(r) = &self.redis {
            return match r.push(&req).await {
                Ok(()) => {
                    self.metrics.enqueued.inc();
                    Ok(id)
                }
                Err(redis::RedisPushError::Full) => Err(PushError::Full(req)),
                Err(redis::RedisPushError::Unavailable(e)) => Err(PushError::Unavailable(req, e)),
            };
        }
        if let Some(log) = &self.durable {
            if !log.has_room(size) {
                return Err(PushError::Full(req));
            }
        }
        if !self.store.reserve(size) {
            return Err(PushError::Full(req));
        }
        if let Some(log) = &self.durable {
            if let Err(e) = log.append(&req).await {
                self.store.release(size);
                return Err(PushError::Unavailable(req, e));
            }
        }
        self.store.insert(req);
        self.metrics.enqueued.inc();
        self.wake.notify_one();
        Ok(id)
    }

    /// The durable log, if the queue has one.
    pub fn log(&self) -> Option<&LogStore> {
        self.durable.as_ref()
    }

    /// The storage's name (`GET /queue`, logs).
    pub fn storage(&self) -> &'static str {
        if self.redis.is_some() {
            "redis"
        } else if self.durable.is_some() {
            "log"
        } else {
            "memory"
        }
    }

    /// Takes over a predecessor's log once it has exited (upgrade); true when nothing is left
    /// to wait for.
    pub async fn adopt_exited(&self) -> bool {
        let Some(log) = &self.durable else {
            return true;
        };
        if !log.adopting() {
            return true;
        }
        let entries = log.adopt_exited().await;
        self.restore(entries);
        !log.adopting()
    }

    /// Writes and syncs the durable log (shutdown, upgrade).
    pub async fn sync(&self) {
        if let Some(log) = &self.durable {
            log.sync().await;
        }
    }

    pub fn bytes(&self) -> usize {
        match &self.redis {
            Some(r) => r.bytes(),
            None => self.store.bytes(),
        }
    }

    pub fn max_bytes(&self) -> usize {
        self.store.max_bytes()
    }

    /// Entries in the queue (a shared queue: fleet-wide, as last seen).
    pub fn len(&self) -> usize {
        match &self.redis {
            Some(r) => r.depth().max(self.store.len()),
            None => self.store.len(),
        }
    }

    /// Nothing here for this process's replay.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.store.capacity()
    }

    /// Live traffic reached a node: a replay waiting out its backoff may try now.
    pub fn signal_recovery(&self) {
        if !self.store.is_empty() && !self.recovered.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    fn take_recovery(&self) -> bool {
        self.recovered.swap(false, Ordering::AcqRel)
    }

    /// Takes the next entry for the replay; it stays visible (held) until finished.
    fn take(&self) -> Option<QueuedRequest> {
        let req = self.store.take()?;
        lock(&self.held).push_back(req.clone());
        Some(req)
    }

    /// Records a changed held entry (attempts, last error).
    fn update(&self, req: &QueuedRequest) {
        if let Some(slot) = lock(&self.held).iter_mut().find(|r| r.id == req.id) {
            *slot = req.clone();
        }
        if let Some(log) = &self.durable {
            log.update(req);
        }
        if let Some(r) = &self.redis {
            r.update(req);
        }
    }

    /// A held entry left the queue (delivered or dead-lettered).
    fn finish(&self, id: QueueId) {
        let mut held = lock(&self.held);
        if let Some(pos) = held.iter().position(|r| r.id == id) {
            if let Some(r) = held.remove(pos) {
                self.store.finish(r.size());
                if let Some(redis) = &self.redis {
                    redis.remove(id, r.size());
                }
            }
            if let Some(log) = &self.durable {
                log.remove(id);
            }
        }
    }

    fn count(&self, result: ReplayResult) {
        self.metrics.replayed[result as usize].inc();
    }

    /// Moves a held entry to the dead letters (dropping the oldest dead letter, logged, when
    /// the list is full).
    fn dead_letter(&self, req: &QueuedRequest, reason: &'static str) {
        let letter = DeadLetter {
            id: req.id.to_string(),
            method: req.method.as_str().to_string(),
            target: String::from_utf8_lossy(&req.target).into_owned(),
            attempts: req.attempts,
            last_error: req.last_error.as_deref().map(str::to_string),
            reason,
            enqueued_unix_ms: req.enqueued_unix_ms,
            dead_unix_ms: unix_ms(SystemTime::now()),
        };
        log::warn!(
            "queue={} id={} {} {} dead-lettered ({reason}) after {} attempts; last error: {}",
            self.kind.label(),
            letter.id,
            letter.method,
            letter.target,
            letter.attempts,
            letter.last_error.as_deref().unwrap_or("none"),
        );
        {
            let mut dead = lock(&self.dead);
            if dead.len() >= self.dead_capacity {
                if let Some(old) = dead.pop_front() {
                    log::error!(
                        "queue={} dead-letter list full ({}): dropping the oldest, id={} {} {}",
                        self.kind.label(),
                        self.dead_capacity,
                        old.id,
                        old.method,
                        old.target
                    );
                }
            }
            dead.push_back(letter);
        }
        self.count(if reason == "ttl" {
            ReplayResult::Expired
        } else {
            ReplayResult::DeadLetter
        });
        self.finish(req.id);
    }

    /// Purges the dead letters (`DELETE /queue/dead`); returns how many.
    pub fn purge_dead(&self) -> usize {
        let purged: Vec<DeadLetter> = lock(&self.dead).drain(..).collect();
        for d in &purged {
            log::info!(
                "queue={} id={} {} {} purged from the dead letters by the operator",
                self.kind.label(),
                d.id,
                d.method,
                d.target
            );
        }
        purged.len()
    }

    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        lock(&self.dead).iter().cloned().collect()
    }

    /// Age of the oldest entry (the head the replay holds), zero when empty.
    pub fn oldest_age(&self) -> Duration {
        lock(&self.held)
            .front()
            .map(|r| r.enqueued.elapsed())
            .unwrap_or(Duration::ZERO)
    }

    pub fn status(&self, enabled: bool) -> QueueStatus {
        QueueStatus {
            enabled,
            depth: self.len(),
            capacity: self.capacity(),
            oldest_age_seconds: self.oldest_age().as_secs_f64(),
            dead_letter_capacity: self.dead_capacity,
            dead_letters: self.dead_letters(),
            storage: self.storage(),
            bytes: self.bytes(),
            max_bytes: self.store.max_bytes(),
        }
    }

    /// Sets the state gauges (called before a scrape).
    pub fn refresh_gauges(&self) {
        self.metrics.depth.set(self.len() as i64);
        self.metrics.oldest_age.set(self.oldest_age().as_secs_f64());
        self.metrics.dead_letters.set(lock(&self.dead).len() as i64);
        let up = self
            .redis
            .as_ref()
            .is_none_or(|r| r.is_up() || !r.contacted());
        self.metrics.store_up.set(up as i64);
    }

    /// Empties the memory side, in queue order (held entries first), for a hand-over; the
    /// replay must be stopped. A durable log is not touched.
    pub fn drain(&self) -> Vec<QueuedRequest> {
        let mut out: Vec<QueuedRequest> = lock(&self.held).drain(..).collect();
        while let Some(req) = self.store.take() {
            out.push(req);
        }
        for r in &out {
            self.store.finish(r.size());
        }
        out
    }

    /// Logs every entry still queued and sets `weir_deferred_remaining_at_shutdown`. A durable
    /// log keeps them for the next start (or the successor); a memory queue loses them.
    pub fn report_remaining(&self) -> usize {
        self.reported.store(true, Ordering::Release);
        let remaining = self.len();
        self.metrics.remaining_at_shutdown.set(remaining as i64);
        if remaining == 0 {
            log::info!("queue={} empty at shutdown", self.kind.label());
            return 0;
        }
        let fate = match &self.durable {
            _ if self.redis.is_some() => format!(
                "they stay in the Redis stream {} for the fleet",
                self.redis.as_ref().map_or("", |r| r.stream())
            ),
            Some(log) => format!(
                "they stay in the queue log ({}) and are delivered after the next start",
                log.dir().display()
            ),
            None => "the memory queue does not survive the process".to_string(),
        };
        let level = if self.is_durable() {
            log::Level::Warn
        } else {
            log::Level::Error
        };
        log::log!(
            level,
            "queue={} {remaining} queued requests remain at shutdown; {fate}",
            self.kind.label(),
        );
        let held: Vec<QueuedRequest> = lock(&self.held).iter().cloned().collect();
        let mut rest = Vec::new();
        while let Some(r) = self.store.take() {
            rest.push(r);
        }
        for req in held.iter().chain(rest.iter()) {
            log::log!(
                level,
                "queue={} id={} {} {} remains undelivered at shutdown (attempts {}, last error: {})",
                self.kind.label(),
                req.id,
                req.method,
                String::from_utf8_lossy(&req.target),
                req.attempts,
                req.last_error.as_deref().unwrap_or("none")
            );
        }
        // Back in place: a report changes nothing (SIGINT may be followed by more work).
        for r in rest {
            self.store.insert(r);
        }
        remaining
    }
}

/// The queues the exit report covers (set once, by the server).
static AT_EXIT: std::sync::OnceLock<std::sync::Arc<Queues>> = std::sync::OnceLock::new();

/// The process whose replay runs: only it reports at exit (a daemon's parent exits too).
static SERVING_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// This process serves the queues (its replay started).
pub(crate) fn mark_serving() {
    SERVING_PID.store(std::process::id(), Ordering::Release);
}

extern "C" fn exit_report() {
    if SERVING_PID.load(Ordering::Acquire) != std::process::id() {
        return;
    }
    if let Some(q) = AT_EXIT.get() {
        for queue in [&q.deferred, &q.upfront] {
            if !queue.reported.load(Ordering::Acquire) {
                queue.report_remaining();
            }
        }
    }
}

/// Reports what `queues` hold when the process exits without the replay's own report
/// (Pingora's fast stop on SIGINT ends the process with `exit`, which runs this).
pub fn report_at_exit(queues: std::sync::Arc<Queues>) {
    if AT_EXIT.set(queues).is_ok() {
        // SAFETY: registers a plain function with no arguments; it only reads a static.
        unsafe {
            libc::atexit(exit_report);
        }
    }
}

/// Both queues of a gateway.
pub struct Queues {
    pub deferred: std::sync::Arc<Queue>,
    pub upfront: std::sync::Arc<Queue>,
}

impl Queues {
    /// Memory queues (tests, and `storage: memory` for both).
    pub fn memory(deferred_capacity: usize, upfront_capacity: usize, metrics: &Metrics) -> Queues {
        let bytes = 256 << 20;
        Queues {
            deferred: std::sync::Arc::new(Queue::memory(
                QueueKind::Deferred,
                deferred_capacity,
                bytes,
                metrics,
            )),
            upfront: std::sync::Arc::new(Queue::memory(
                QueueKind::Upfront,
                upfront_capacity,
                bytes,
                metrics,
            )),
        }
    }

    /// The queues as configured: a log under `server.data_dir/<queue>` (recovering what an
    /// earlier process left there) or memory. `upgrade`: a predecessor may still hold its log.
    pub fn open(
        config: &crate::config::Config,
        metrics: &Metrics,
        upgrade: bool,
    ) -> Result<Queues, String> {
        use std::sync::Arc;
        let open =
            |kind: QueueKind, q: &crate::config::QueueConfig| -> Result<Arc<Queue>, String> {
                match q.storage {
                    crate::config::Storage::Memory => Ok(Arc::new(Queue::memory(
                        kind,
                        q.capacity,
                        q.max_bytes,
                        metrics,
                    ))),
                    crate::config::Storage::Redis => {
                        let store = redis::RedisStore::open(
                            &config.store.redis,
                            kind.label(),
                            q.capacity,
                            q.max_bytes,
                        )
                        .map_err(|e| format!("{}_queue: {e}", kind.label()))?;
                        Ok(Queue::shared(kind, q.capacity, q.max_bytes, store, metrics))
                    }
                    crate::config::Storage::Log => {
                        let dir = config.server.data_dir().join(kind.label());
                        let (log, recovered) = LogStore::open(
                            &dir,
                            config.store.fsync,
                            config.store.segment_size,
                            q.max_bytes,
                            upgrade,
                        )
                        .map_err(|e| format!("{}_queue: {e}", kind.label()))?;
                        if !recovered.is_empty() {
                            log::warn!(
                                "queue={} recovered {} queued requests from {}",
                                kind.label(),
                                recovered.len(),
                                dir.display()
                            );
                        }
                        Ok(Arc::new(Queue::logged(
                            kind,
                            q.capacity,
                            q.max_bytes,
                            log,
                            recovered,
                            metrics,
                        )))
                    }
                }
            };
        Ok(Queues {
            deferred: open(QueueKind::Deferred, &config.deferred_queue)?,
            upfront: open(QueueKind::Upfront, &config.upfront_queue)?,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn request(q: &Queue, method: &str, target: &str) -> QueuedRequest {
        QueuedRequest {
            id: q.new_id(),
            method: http::Method::from_bytes(method.as_bytes()).expect("method"),
            target: Bytes::copy_from_slice(target.as_bytes()),
            headers: Bytes::from_static(b"host: example\r\nx-a: 1\r\n"),
            client: Client::capture(&http::HeaderMap::new(), None, false),
            body: Bytes::from_static(b"body"),
            enqueued: Instant::now(),
            enqueued_unix_ms: 0,
            attempts: 0,
            replay_safe: false,
            last_error: None,
            cluster: None,
        }
    }

    #[tokio::test]
    async fn a_full_queue_gives_the_request_back_and_counts_taken_entries() {
        let m = Metrics::new();
        let q = Queue::memory(QueueKind::Deferred, 2, 1 << 20, &m);
        assert!(q.push(request(&q, "POST", "/1")).await.is_ok());
        assert!(q.push(request(&q, "POST", "/2")).await.is_ok());
        assert!(q.push(request(&q, "POST", "/3")).await.is_err());
        let head = q.take().expect("head");
        // Taken but not finished: still occupies its slot.
        assert!(q.push(request(&q, "POST", "/4")).await.is_err());
        q.finish(head.id);
        assert!(q.push(request(&q, "POST", "/5")).await.is_ok());
        assert_eq!(q.len(), 2);
    }

    #[tokio::test]
    async fn max_bytes_refuses_what_does_not_fit_and_frees_on_finish() {
        let m = Metrics::new();
        let one = request(
            &Queue::memory(QueueKind::Deferred, 1, 1 << 20, &m),
            "POST",
            "/a",
        );
        let q = Queue::memory(QueueKind::Deferred, 100, one.size() * 2, &m);
        assert!(q.push(request(&q, "POST", "/a")).await.is_ok());
        assert!(q.push(request(&q, "POST", "/b")).await.is_ok());
        assert!(matches!(
            q.push(request(&q, "POST", "/c")).await,
            Err(PushError::Full(_))
        ));
        assert_eq!(q.bytes(), one.size() * 2);
        let head = q.take().expect("head");
        q.finish(head.id);
        assert!(q.push(request(&q, "POST", "/d")).await.is_ok());
    }

    #[tokio::test]
    async fn drain_exports_held_entries_first_in_queue_order() {
        let m = Metrics::new();
        let q = Queue::memory(QueueKind::Deferred, 4, 1 << 20, &m);
        for t in ["/1", "/2", "/3"] {
            assert!(q.push(request(&q, "PUT", t)).await.is_ok());
        }
        let _head = q.take();
        let out = q.drain();
        let targets: Vec<&[u8]> = out.iter().map(|r| &r.target[..]).collect();
        assert_eq!(targets, [b"/1", b"/2", b"/3"]);
        assert_eq!(q.len(), 0);
    }

    #[tokio::test]
    async fn dead_letters_are_bounded_and_purged() {
        let m = Metrics::new();
        let q = Queue::memory(QueueKind::Upfront, 1, 1 << 20, &m);
        for t in ["/1", "/2"] {
            assert!(q.push(request(&q, "POST", t)).await.is_ok());
            let r = q.take().expect("taken");
            q.dead_letter(&r, "ttl");
        }
        let dead = q.dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].target, "/2");
        assert_eq!(q.purge_dead(), 1);
        assert!(q.dead_letters().is_empty());
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn queue_ids_are_distinct_16_hex_digits() {
        let m = Metrics::new();
        let q = Queue::memory(QueueKind::Deferred, 1, 1 << 20, &m);
        let (a, b) = (q.new_id(), q.new_id());
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 16);
    }
}
