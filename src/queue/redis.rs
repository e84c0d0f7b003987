//! `storage: redis`: one queue shared by a fleet of weir instances, in a Redis stream.
//!
//! - **Push.** A Lua script checks the fleet-wide capacity (entries: `XLEN`; bytes: a counter
//!   key) and `XADD`s the entry's record (the queue log's binary push record) in one step; the
//!   client is answered only after Redis replied. Redis unreachable or slower than
//!   `store.redis.timeout`: `503 Queue Unavailable`.
//! - **Delivery lease (FIFO across the fleet).** One instance at a time delivers: the holder of
//!   `<stream>:lease` (`SET NX PX`, renewed every third of `store.redis.lease`; the others ask
//!   for it every second, so a lease given up at shutdown is taken at once). The holder
//!   reads the stream in order into its local queue and delivers as any queue does; an entry
//!   leaves the stream (`XDEL`) only after a node answered (or it was dead-lettered). The
//!   stream order is the order in which Redis accepted the pushes.
//! - **Reclaiming.** An instance that dies (kill -9) leaves its lease to expire: the next holder
//!   starts reading at the stream's head, so the entries the dead one had read and not delivered
//!   are delivered by the new holder (the role `XAUTOCLAIM` plays for consumer groups). Attempts
//!   and the last error live in `<stream>:meta` so that they survive the hand-over.
//! - **Lease lost while alive** (Redis unreachable for longer than the lease): the instance stops
//!   dispatching before its lease can have expired and drops what it had read; a delivery that
//!   was already in flight may then be delivered again by the next holder (at least once).
//!
//! The Redis client runs on its own thread and runtime, started on first use in the serving
//! process (a daemon forks after weir is built).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::journal::{decode, encode_push};
use super::{lock, Queue, QueueId, QueuedRequest};
use crate::config::RedisSettings;

/// Entries read ahead into the local queue.
const READ_AHEAD: usize = 64;
/// How often the lease holder looks for entries other instances pushed.
const POLL: Duration = Duration::from_millis(100);

const PUSH: &str = r#"
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local b = tonumber(redis.call('GET', KEYS[2]) or '0')
if b + tonumber(ARGV[3]) > tonumber(ARGV[2]) then return 0 end
redis.call('INCRBY', KEYS[2], ARGV[3])
return redis.call('XADD', KEYS[1], '*', 's', ARGV[3], 'r', ARGV[4])
"#;

const REMOVE: &str = r#"
local n = redis.call('XDEL', KEYS[1], ARGV[1])
if n == 1 then redis.call('DECRBY', KEYS[2], ARGV[2]) end
redis.call('HDEL', KEYS[3], ARGV[1])
return n
"#;

const LEASE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not cur then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

const READ: &str = r#"
local es = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
local out = {}
for _, e in ipairs(es) do
  local f = e[2]
  local rec = ''
  for j = 1, #f, 2 do if f[j] == 'r' then rec = f[j + 1] end end
  out[#out + 1] = {e[1], rec, redis.call('HGET', KEYS[2], e[1]) or ''}
end
return out
"#;

enum Op {
    Remove { sid: String, size: usize },
    Update { sid: String, meta: Vec<u8> },
}

/// Why a push did not get into the stream.
pub enum RedisPushError {
    Full,
    Unavailable(String),
}

/// A queue's stream in Redis.
pub struct RedisStore {
    settings: RedisSettings,
    stream: String,
    bytes_key: String,
    meta_key: String,
    lease_key: String,
    /// This instance in the lease.
    me: String,
    capacity: usize,
    max_bytes: usize,
    conn: tokio::sync::OnceCell<ConnectionManager>,
    connected: Notify,
    worker: crate::logs::Worker,
    queue: Arc<OnceLock<Weak<Queue>>>,
    ops: mpsc::UnboundedSender<Op>,
    ops_rx: Mutex<Option<mpsc::UnboundedReceiver<Op>>>,
    /// Stream ids of the entries read here, by queue id.
    sids: Mutex<HashMap<QueueId, String>>,
    /// Removals sent and not yet confirmed (not to be read again).
    removing: Mutex<HashSet<String>>,
    /// Last seen fleet-wide depth and bytes.
    depth: AtomicUsize,
    bytes: AtomicUsize,
    /// 0: not yet known, 1: answered the last command, 2: did not.
    up: AtomicU8,
    /// Until when this instance may dispatch (lease renewed at t: t + lease - timeout).
    lease_until: Mutex<Option<Instant>>,
    /// Bumped when the lease was lost: the replay drops what it had read.
    revoked: AtomicU64,
    stopping: AtomicBool,
    wake: Notify,
}

impl RedisStore {
    /// The stream of queue `label` (`<key>:<label>`); nothing connects until it is used.
    pub fn open(
        settings: &RedisSettings,
        label: &str,
        capacity: usize,
        max_bytes: usize,
    ) -> Result<Arc<RedisStore>, String> {
        redis::Client::open(settings.url.as_str())
            .map_err(|e| format!("store.redis.url {:?}: {e}", settings.url))?;
        let stream = format!("{}:{label}", settings.key);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let me = format!("{host}-{}-{:08x}", std::process::id(), fastrand::u32(..));
        let (tx, rx) = mpsc::unbounded_channel();
        let slot: Arc<OnceLock<Weak<RedisStore>>> = Arc::new(OnceLock::new());
        let for_worker = slot.clone();
        let store = Arc::new(RedisStore {
            settings: settings.clone(),
            bytes_key: format!("{stream}:bytes"),
            meta_key: format!("{stream}:meta"),
            lease_key: format!("{stream}:lease"),
            stream,
            me,
            capacity,
            max_bytes,
            conn: tokio::sync::OnceCell::new(),
            connected: Notify::new(),
            worker: crate::logs::Worker::new(format!("weir redis {label}"), move || {
                if let Some(store) = for_worker.get().and_then(Weak::upgrade) {
                    store.run();
                }
            }),
            queue: Arc::new(OnceLock::new()),
            ops: tx,
            ops_rx: Mutex::new(Some(rx)),
            sids: Mutex::new(HashMap::new()),
            removing: Mutex::new(HashSet::new()),
            depth: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            up: AtomicU8::new(0),
            lease_until: Mutex::new(None),
            revoked: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            wake: Notify::new(),
        });
        let _ = slot.set(Arc::downgrade(&store));
        Ok(store)
    }

    /// The queue the reader feeds (set once, right after the queue is built).
    pub fn attach(&self, queue: Weak<Queue>) {
        let _ = self.queue.set(queue);
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Fleet-wide depth as last seen.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Whether Redis answered the last command.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire) == 1
    }

    /// Whether any command reached (or failed to reach) Redis yet.
    pub fn contacted(&self) -> bool {
        self.up.load(Ordering::Acquire) != 0
    }

    /// The lease is held and cannot have expired yet: deliveries may be dispatched.
    pub fn may_deliver(&self) -> bool {
        lock(&self.lease_until).is_some_and(|t| Instant::now() < t)
    }

    /// How many times the lease was lost.
    pub fn revocations(&self) -> u64 {
        self.revoked.load(Ordering::Acquire)
    }

    /// Starts the client thread (connection, lease, reading) in this process, if not yet.
    pub fn start(&self) {
        if let Err(e) = self.worker.ensure() {
            log::error!(
                "queue stream {}: cannot start the Redis client: {e}",
                self.stream
            );
        }
    }

    /// The connection (waits for the client thread to create it).
    async fn conn(&self) -> ConnectionManager {
        self.start();
        loop {
            let notified = self.connected.notified();
            if let Some(c) = self.conn.get() {
                return c.clone();
            }
            notified.await;
        }
    }

    fn mark(&self, ok: bool) {
        let was = self.up.swap(if ok { 1 } else { 2 }, Ordering::AcqRel);
        if was != 2 && !ok {
            log::error!(
                "queue stream {}: Redis {} unreachable; queue answers are 503 Queue \
                 Unavailable until it is back",
                self.stream,
                self.settings.url
            );
        } else if was != 1 && ok {
            log::info!(
                "queue stream {}: Redis {} reachable",
                self.stream,
                self.settings.url
            );
        }
    }

    /// Runs `script` bounded by the timeout; marks Redis up or down.
    async fn call(&self, script: &Script, keys: &[&str], args: &[&[u8]]) -> Result<Value, String> {
        let mut conn = match tokio::time::timeout(self.settings.timeout, self.conn()).await {
            Ok(c) => c,
            Err(_) => {
                self.mark(false);
                return Err("the Redis client did not start in time".into());
            }
        };
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        let r =
            tokio::time::timeout(self.settings.timeout, inv.invoke_async::<Value>(&mut conn)).await;
        match r {
            Ok(Ok(v)) => {
                self.mark(true);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.mark(!e.is_io_error() && !e.is_connection_dropped());
                Err(format!("redis: {e}"))
            }
            Err(_) => {
                self.mark(false);
                Err(format!(
                    "redis: no answer within {:?}",
                    self.settings.timeout
                ))
            }
        }
    }

    /// Adds `req` at the fleet queue's tail; resolves once Redis has it.
    pub async fn push(&self, req: &QueuedRequest) -> Result<(), RedisPushError> {
        let size = req.size().to_string();
        let v = self
            .call(
                &script(0),
                &[&self.stream, &self.bytes_key],
                &[
                    self.capacity.to_string().as_bytes(),
                    self.max_bytes.to_string().as_bytes(),
                    size.as_bytes(),
                    &encode_push(req),
                ],
            )
            .await
            .map_err(RedisPushError::Unavailable)?;
        match v {
            Value::Int(0) => Err(RedisPushError::Full),
            _ => {
                self.depth.fetch_add(1, Ordering::AcqRel);
                self.wake.notify_one();
                Ok(())
            }
        }
    }

    /// A read entry left for good: out of the stream (retried until Redis confirms).
    pub fn remove(&self, id: QueueId, size: usize) {
        if let Some(sid) = lock(&self.sids).remove(&id) {
            lock(&self.removing).insert(sid.clone());
            let _ = self.ops.send(Op::Remove { sid, size });
        }
    }

    /// A read entry is dropped here without leaving the stream (the lease was lost).
    pub fn forget(&self, id: QueueId) {
        lock(&self.sids).remove(&id);
    }

    /// Attempts and last error of a read entry, kept for whoever delivers it next.
    pub fn update(&self, req: &QueuedRequest) {
        if let Some(sid) = lock(&self.sids).get(&req.id).cloned() {
            let mut meta = req.attempts.to_string().into_bytes();
            meta.push(b'\n');
            meta.extend_from_slice(req.last_error.as_deref().unwrap_or("").as_bytes());
            let _ = self.ops.send(Op::Update { sid, meta });
        }
    }

    /// Stops reading, lets the removals finish (bounded) and gives the lease up, so that another
    /// instance delivers at once.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        *lock(&self.lease_until) = None;
        let end = Instant::now() + self.settings.timeout * 2;
        while !lock(&self.removing).is_empty() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let me = self.me.clone();
        let _ = self
            .call(&script(3), &[&self.lease_key], &[me.as_bytes()])
            .await;
    }

    /// The client thread: connection, then the lease and reading loop and the writer.
    fn run(self: Arc<Self>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                log::error!("queue stream {}: no runtime for Redis: {e}", self.stream);
                return;
            }
        };
        rt.block_on(async move {
            let conn = match crate::discovery::shared::connection_manager(&self.settings) {
                Ok(c) => c,
                Err(e) => {
                    log::error!("queue stream {}: {e}", self.stream);
                    return;
                }
            };
            let _ = self.conn.set(conn);
            self.connected.notify_waiters();
            let rx = lock(&self.ops_rx).take();
            if let Some(rx) = rx {
                tokio::spawn(self.clone().write(rx));
            }
            self.read_loop().await;
        });
    }

    /// Applies removals and updates in order; a removal that fails is retried.
    async fn write(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Op>) {
        while let Some(op) = rx.recv().await {
            loop {
                let r = match &op {
                    Op::Remove { sid, size } => {
                        self.call(
                            &script(1),
                            &[&self.stream, &self.bytes_key, &self.meta_key],
                            &[sid.as_bytes(), size.to_string().as_bytes()],
                        )
                        .await
                    }
                    Op::Update { sid, meta } => {
                        let mut conn = self.conn().await;
                        let cmd = redis::cmd("HSET")
                            .arg(&self.meta_key)
                            .arg(sid)
                            .arg(&meta[..])
                            .to_owned();
                        match tokio::time::timeout(
                            self.settings.timeout,
                            cmd.query_async::<Value>(&mut conn),
                        )
                        .await
                        {
                            Ok(Ok(v)) => Ok(v),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("timeout".into()),
                        }
                    }
                };
                match r {
                    Ok(v) => {
                        if let Op::Remove { sid, .. } = &op {
                            lock(&self.removing).remove(sid);
                            if v == Value::Int(1) {
                                let _ = self.depth.fetch_update(
                                    Ordering::AcqRel,
                                    Ordering::Acquire,
                                    |d| Some(d.saturating_sub(1)),
                                );
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        log::warn!("queue stream {}: {e}; retrying", self.stream);
                        tokio::time::sleep(POLL * 5).await;
                    }
                }
            }
        }
    }

    /// Holds or waits for the lease; while held, reads the stream into the local queue.
    async fn read_loop(self: Arc<Self>) {
        let renew_every = self.settings.lease / 3;
        // Waiting instances ask at least every second: a released lease is taken at once.
        let ask_every = renew_every.min(Duration::from_secs(1));
        let mut held = false;
        let mut cursor = String::from("-");
        let mut next_renew = Instant::now();
        loop {
            let Some(queue) = self.queue.get().and_then(Weak::upgrade) else {
                tokio::time::sleep(POLL).await;
                continue;
            };
            if self.stopping.load(Ordering::Acquire) {
                // Stay: the removals and the lease release run on this thread's runtime.
                tokio::time::sleep(POLL).await;
                continue;
            }
            let now = Instant::now();
            if now >= next_renew {
                next_renew = now + if held { renew_every } else { ask_every };
                let ms = self.settings.lease.as_millis().to_string();
                let me = self.me.clone();
                match self
                    .call(
                        &script(2),
                        &[&self.lease_key],
                        &[me.as_bytes(), ms.as_bytes()],
                    )
                    .await
                {
                    Ok(Value::Int(1 | 2)) if !self.stopping.load(Ordering::Acquire) => {
                        if !held {
                            log::info!(
                                "queue stream {}: this instance ({}) holds the delivery lease",
                                self.stream,
                                self.me
                            );
                            cursor = "-".into();
                        }
                        held = true;
                        *lock(&self.lease_until) =
                            Some(now + self.settings.lease - self.settings.timeout);
                    }
                    _ => {
                        if held {
                            log::warn!(
                                "queue stream {}: delivery lease lost; what this instance read \
                                 stays in the stream for the next holder",
                                self.stream
                            );
                            *lock(&self.lease_until) = None;
                            self.revoked.fetch_add(1, Ordering::AcqRel);
                            queue.drop_unread_local(&self);
                        }
                        held = false;
                    }
                }
                self.refresh().await;
            }
            if held && queue.local_len() < READ_AHEAD {
                match self.read(&cursor, READ_AHEAD - queue.local_len()).await {
                    Ok(entries) if !entries.is_empty() => {
                        for (sid, req) in entries {
                            cursor = format!("({sid}");
                            lock(&self.sids).insert(req.id, sid);
                            queue.feed(req);
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => log::warn!("queue stream {}: read failed: {e}", self.stream),
                }
            }
            let wait = if held { POLL } else { ask_every };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(next_renew.min(Instant::now() + wait)) => {}
            }
        }
    }

    /// Up to `n` entries after `cursor`, skipping ones being removed.
    async fn read(&self, cursor: &str, n: usize) -> Result<Vec<(String, QueuedRequest)>, String> {
        let v = self
            .call(
                &script(4),
                &[&self.stream, &self.meta_key],
                &[cursor.as_bytes(), n.to_string().as_bytes()],
            )
            .await?;
        let Value::Array(items) = v else {
            return Err(format!("unexpected reply {v:?}"));
        };
        let mut out = Vec::new();
        for item in items {
            let Value::Array(parts) = item else { continue };
            let [sid, rec, meta] = &parts[..] else {
                continue;
            };
            let sid = text(sid);
            if lock(&self.removing).contains(&sid) {
                continue;
            }
            let Value::BulkString(rec) = rec else {
                continue;
            };
            match decode(rec) {
                Ok(mut req) => {
                    let meta = text(meta);
                    if let Some((attempts, error)) = meta.split_once('\n') {
                        req.attempts = attempts.parse().unwrap_or(req.attempts);
                        req.last_error =
                            (!error.is_empty()).then(|| error.to_string().into_boxed_str());
                    }
                    out.push((sid, req));
                }
                Err(e) => {
                    log::error!(
                        "queue stream {}: entry {sid} is not a weir record ({e}); left in place",
                        self.stream
                    );
                }
            }
        }
        Ok(out)
    }

    /// Fleet-wide depth and bytes.
    async fn refresh(&self) {
        let Ok(mut conn) = tokio::time::timeout(self.settings.timeout, self.conn()).await else {
            return;
        };
        let mut p = redis::pipe();
        p.cmd("XLEN")
            .arg(&self.stream)
            .cmd("GET")
            .arg(&self.bytes_key);
        if let Ok(Ok((n, b))) = tokio::time::timeout(
            self.settings.timeout,
            p.query_async::<(usize, Option<usize>)>(&mut conn),
        )
        .await
        {
            self.depth.store(n, Ordering::Release);
            self.bytes.store(b.unwrap_or(0), Ordering::Release);
            self.mark(true);
        }
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        _ => String::new(),
    }
}

/// The scripts, compiled once: push, remove, lease, release, read.
fn script(i: usize) -> Script {
    static SCRIPTS: OnceLock<[Script; 5]> = OnceLock::new();
    SCRIPTS.get_or_init(|| {
        [
            Script::new(PUSH),
            Script::new(REMOVE),
            Script::new(LEASE),
            Script::new(RELEASE),
            Script::new(READ),
        ]
    })[i]
        .clone()
}
