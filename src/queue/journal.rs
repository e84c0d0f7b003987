//! The durable queue store: an append-only log under `server.data_dir`.
//!
//! Layout: `<data_dir>/<queue>/` holds one *generation* per process that wrote it:
//! `<gen>.lock` (an `flock` held for the process's life) and segments `<gen>-<n>.log`. A
//! record is `length u32 LE | crc32 u32 LE | payload`, the payload a push (the whole entry),
//! a removal (id) or an update (id, attempts, last error). The queue itself stays in memory
//! (the replay reads from there); the log is written before a push is acknowledged.
//!
//! - **Acknowledged after the write.** A push waits until its record was written to the file
//!   (so it survives the process being killed) and, with `fsync: always`, synced (pushes that
//!   wait together share one `fdatasync`: group commit). With `fsync: <interval>` the writer
//!   syncs at most that long after a write; `never` leaves it to the kernel.
//! - **Recovery.** On start, every generation whose lock is free (its process is gone) is
//!   read in order; a torn or corrupt record ends its segment: the file is truncated there,
//!   with a warning. The live entries (pushed, not removed) are re-written into this process's
//!   own generation, synced, and only then the old files deleted; a crash in between leaves
//!   the same entry in two generations, which recovery counts once (by queue id).
//! - **Upgrades.** A successor finds its predecessor's generation locked and adopts it once
//!   the predecessor exits (polled), so nothing is written by two processes at once.
//! - **Space.** A segment is closed at `store.segment_size`; closed segments are deleted, oldest
//!   first, as soon as every entry pushed into them has left. A push is refused when the files
//!   would exceed `max_bytes` (`503 Queue Full`).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant as StdInstant, SystemTime};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::oneshot;

use super::{unix_ms, QueueId, QueuedRequest};
use crate::config::Fsync;

const PUSH: u8 = 1;
const REMOVE: u8 = 2;
const UPDATE: u8 = 3;
/// Largest record accepted on recovery (a body is at most `limits.max_buffered_body`, 1 GiB).
const MAX_RECORD: u32 = (1 << 30) + (1 << 20);
/// Records written in one go at most.
const BATCH: usize = 1024;

/// What the writer thread is asked to do.
enum Op {
    Push {
        id: u64,
        record: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
    Remove(u64),
    Update(Vec<u8>),
    Sync(oneshot::Sender<()>),
    Adopt(Vec<Vec<u8>>, Vec<u64>, oneshot::Sender<Result<(), String>>),
}

/// An open queue log (this process's generation).
pub struct LogStore {
    dir: PathBuf,
    gen: String,
    ops: Sender<Op>,
    /// The writer thread, started on first use (after a daemon's fork).
    worker: crate::logs::Worker,
    /// Bytes in this generation's segments on disk.
    disk: Arc<AtomicU64>,
    max_bytes: u64,
    /// Generations another process held when this one started (an upgrade's predecessor).
    waiting: Mutex<Vec<String>>,
    _lock: File,
}

/// Why the log could not be opened.
pub type OpenError = String;

impl LogStore {
    /// Opens `dir` (created if missing), takes over every generation whose process is gone and
    /// returns their live entries in queue order. A generation another process holds is an
    /// error unless `upgrade` (then it is adopted when that process exits).
    pub fn open(
        dir: &Path,
        fsync: Fsync,
        segment_size: usize,
        max_bytes: usize,
        upgrade: bool,
    ) -> Result<(LogStore, Vec<QueuedRequest>), OpenError> {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let gen = format!(
            "g{:013}-{:07}-{:04x}",
            unix_ms(SystemTime::now()),
            std::process::id(),
            fastrand::u16(..)
        );
        let lock = lock_file(&dir.join(format!("{gen}.lock")))
            .map_err(|e| format!("cannot lock {}: {e}", dir.display()))?
            .ok_or_else(|| format!("{}: generation {gen} is locked", dir.display()))?;
        let mut orphans = Vec::new();
        let mut live = Vec::new();
        for other in generations(dir)? {
            if other == gen {
                continue;
            }
            match lock_file(&dir.join(format!("{other}.lock"))) {
                Ok(Some(l)) => orphans.push((other, l)),
                Ok(None) if upgrade => live.push(other),
                Ok(None) => {
                    return Err(format!(
                        "{} is in use by another running weir (generation {other}); give each \
                         instance its own server.data_dir, or use storage: redis to share a queue",
                        dir.display()
                    ))
                }
                Err(e) => return Err(format!("{}: {e}", dir.display())),
            }
        }
        let recovered = recover(dir, orphans.iter().map(|(g, _)| g.as_str()));
        let (tx, rx) = crossbeam_channel::unbounded();
        let disk = Arc::new(AtomicU64::new(0));
        let mut writer = Writer::new(
            dir.to_path_buf(),
            gen.clone(),
            fsync,
            segment_size,
            disk.clone(),
        )?;
        // Re-write what was recovered into this generation before the old files go.
        for r in &recovered.entries {
            writer.append(r.id.0, &encode_push(r))?;
        }
        writer.sync()?;
        for (g, lock) in orphans {
            remove_generation(dir, &g);
            drop(lock);
        }
        // The writer moves into its thread on first use: in the process that serves (a
        // daemon forks after this). It cannot follow a second fork; nothing writes before one.
        let parked = Mutex::new(Some((writer, rx)));
        let shown = dir.display().to_string();
        let worker = crate::logs::Worker::new(format!("weir queue log {shown}"), move || {
            let taken = parked.lock().unwrap_or_else(|e| e.into_inner()).take();
            match taken {
                Some((writer, rx)) => writer.run(rx),
                None => log::error!("queue log {shown}: the writer cannot restart after a fork"),
            }
        });
        for w in &recovered.warnings {
            log::warn!("queue log {}: {w}", dir.display());
        }
        Ok((
            LogStore {
                dir: dir.to_path_buf(),
                gen,
                ops: tx,
                worker,
                disk,
                max_bytes: max_bytes as u64,
                waiting: Mutex::new(live),
                _lock: lock,
            },
            recovered.entries,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts the writer thread in this process if it does not run yet.
    fn start(&self) -> Result<(), String> {
        self.worker
            .ensure()
            .map_err(|e| format!("cannot start the queue log writer: {e}"))
    }

    /// Bytes on disk in this generation.
    pub fn disk_bytes(&self) -> u64 {
        self.disk.load(Ordering::Acquire)
    }

    /// Whether a record of `size` bytes fits under `max_bytes`.
    pub fn has_room(&self, size: usize) -> bool {
        self.disk_bytes() + size as u64 + 8 <= self.max_bytes
    }

    /// Writes `req`'s record; resolves once it is written (and synced, with `fsync: always`).
    pub async fn append(&self, req: &QueuedRequest) -> Result<(), String> {
        let (done, wait) = oneshot::channel();
        self.start()?;
        self.ops
            .send(Op::Push {
                id: req.id.0,
                record: encode_push(req),
                done,
            })
            .map_err(|_| "the queue log writer stopped".to_string())?;
        wait.await
            .map_err(|_| "the queue log writer stopped".to_string())?
    }

    /// The entry left the queue for good.
    pub fn remove(&self, id: QueueId) {
        let _ = self.start();
        let _ = self.ops.send(Op::Remove(id.0));
    }

    /// The entry's attempts or last error changed.
    pub fn update(&self, req: &QueuedRequest) {
        let mut p = vec![UPDATE];
        p.extend_from_slice(&req.id.0.to_le_bytes());
        p.extend_from_slice(&req.attempts.to_le_bytes());
        put(&mut p, req.last_error.as_deref().unwrap_or("").as_bytes());
        let _ = self.start();
        let _ = self.ops.send(Op::Update(p));
    }

    /// Writes and syncs everything sent so far.
    pub async fn sync(&self) {
        let (tx, rx) = oneshot::channel();
        let _ = self.start();
        if self.ops.send(Op::Sync(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Whether a predecessor's generation is still waiting to be adopted.
    pub fn adopting(&self) -> bool {
        !self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Adopts the generations whose process has exited since this one started: their live
    /// entries, written into this generation first (then their files are deleted).
    pub async fn adopt_exited(&self) -> Vec<QueuedRequest> {
        let gone: Vec<(String, File)> = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let mut gone = Vec::new();
            waiting.retain(|g| match lock_file(&self.dir.join(format!("{g}.lock"))) {
                Ok(Some(l)) => {
                    gone.push((g.clone(), l));
                    false
                }
                _ => true,
            });
            gone
        };
        if gone.is_empty() {
            return Vec::new();
        }
        let recovered = recover(&self.dir, gone.iter().map(|(g, _)| g.as_str()));
        for w in &recovered.warnings {
            log::warn!("queue log {}: {w}", self.dir.display());
        }
        let records = recovered.entries.iter().map(encode_push).collect();
        let ids = recovered.entries.iter().map(|r| r.id.0).collect();
        let (tx, rx) = oneshot::channel();
        let _ = self.start();
        let written = match self.ops.send(Op::Adopt(records, ids, tx)) {
            Ok(()) => rx.await.unwrap_or_else(|_| Err("writer stopped".into())),
            Err(_) => Err("writer stopped".into()),
        };
        match written {
            Ok(()) => {
                for (g, _) in &gone {
                    remove_generation(&self.dir, g);
                }
            }
            Err(e) => {
                // The files stay: the next start recovers them.
                log::error!(
                    "queue log {}: cannot adopt {} entries of the previous process: {e}; they \
                     stay in its files for the next start",
                    self.dir.display(),
                    recovered.entries.len()
                );
                return Vec::new();
            }
        }
        log::warn!(
            "queue log {}: took over {} queued requests from the previous process",
            self.dir.display(),
            recovered.entries.len()
        );
        recovered.entries
    }

    /// This generation's name (for tests and logs).
    pub fn generation(&self) -> &str {
        &self.gen
    }
}

/// `flock(LOCK_EX | LOCK_NB)` on `path` (created if missing): `None` when another process
/// holds it.
fn lock_file(path: &Path) -> std::io::Result<Option<File>> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    // SAFETY: flock on a file descriptor this function owns; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(Some(f))
    } else {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

/// The generations in `dir`, oldest first (names start with the start time).
fn generations(dir: &Path) -> Result<Vec<String>, String> {
    let mut gens: Vec<String> = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let gen = if let Some(g) = name.strip_suffix(".lock") {
            g.to_string()
        } else if let Some((g, _)) = name.strip_suffix(".log").and_then(|n| n.rsplit_once('-')) {
            g.to_string()
        } else {
            continue;
        };
        if gen.starts_with('g') && !gens.contains(&gen) {
            gens.push(gen);
        }
    }
    gens.sort();
    Ok(gens)
}

/// A generation's segments, in order.
fn segments(dir: &Path, gen: &str) -> Vec<(u32, PathBuf)> {
    let mut out = Vec::new();
    let prefix = format!("{gen}-");
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".log"))
                .and_then(|n| n.parse::<u32>().ok())
            {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    out
}

fn remove_generation(dir: &Path, gen: &str) {
    for (_, path) in segments(dir, gen) {
        if let Err(e) = fs::remove_file(&path) {
            log::warn!("cannot remove {}: {e}", path.display());
        }
    }
    let _ = fs::remove_file(dir.join(format!("{gen}.lock")));
}

/// What reading generations found.
pub struct Recovered {
    pub entries: Vec<QueuedRequest>,
    pub warnings: Vec<String>,
}

/// Reads `gens` (oldest first): the entries pushed and not removed, once each, in arrival
/// order. Torn or corrupt tails are truncated.
fn recover<'a>(dir: &Path, gens: impl Iterator<Item = &'a str>) -> Recovered {
    let mut order: Vec<Option<QueuedRequest>> = Vec::new();
    let mut index: HashMap<u64, usize> = HashMap::new();
    let mut warnings = Vec::new();
    for gen in gens {
        for (_, path) in segments(dir, gen) {
            let mut data = Vec::new();
            if let Err(e) = File::open(&path).and_then(|mut f| f.read_to_end(&mut data)) {
                warnings.push(format!("cannot read {}: {e}", path.display()));
                continue;
            }
            let mut at = 0usize;
            let mut bad: Option<String> = None;
            while at < data.len() {
                match record_at(&data, at) {
                    Ok((payload, next)) => {
                        if let Err(e) = apply(payload, &mut order, &mut index) {
                            bad = Some(e);
                            break;
                        }
                        at = next;
                    }
                    Err(e) => {
                        bad = Some(e);
                        break;
                    }
                }
            }
            if let Some(reason) = bad {
                warnings.push(format!(
                    "{}: {reason} at byte {at} of {}; truncated there (the entries before it \
                     are kept)",
                    path.display(),
                    data.len()
                ));
                if let Err(e) = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(at as u64))
                {
                    warnings.push(format!("cannot truncate {}: {e}", path.display()));
                }
            }
        }
    }
    let mut entries: Vec<QueuedRequest> = order.into_iter().flatten().collect();
    // Arrival order (stable: ties keep log order), also across generations.
    entries.sort_by_key(|r| r.enqueued_unix_ms);
    Recovered { entries, warnings }
}

/// The record at `at`: its payload and where the next one starts.
pub fn record_at(data: &[u8], at: usize) -> Result<(&[u8], usize), String> {
    let head = data
        .get(at..at + 8)
        .ok_or_else(|| "a torn record header".to_string())?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len == 0 || len > MAX_RECORD {
        return Err(format!("a record length of {len}"));
    }
    let end = at + 8 + len as usize;
    let payload = data
        .get(at + 8..end)
        .ok_or_else(|| "a torn record".to_string())?;
    if crc32fast::hash(payload) != crc {
        return Err("a checksum mismatch".to_string());
    }
    Ok((payload, end))
}

fn apply(
    payload: &[u8],
    order: &mut Vec<Option<QueuedRequest>>,
    index: &mut HashMap<u64, usize>,
) -> Result<(), String> {
    let mut r = Reader(payload);
    match r.u8()? {
        PUSH => {
            let req = decode_push(&mut r)?;
            if let std::collections::hash_map::Entry::Vacant(v) = index.entry(req.id.0) {
                v.insert(order.len());
                order.push(Some(req));
            }
        }
        REMOVE => {
            let id = r.u64()?;
            if let Some(i) = index.get(&id) {
                order[*i] = None;
            }
        }
        UPDATE => {
            let id = r.u64()?;
            let attempts = r.u32()?;
            let error = r.bytes()?;
            if let Some(Some(req)) = index.get(&id).and_then(|i| order.get_mut(*i)) {
                req.attempts = attempts;
                req.last_error = (!error.is_empty())
                    .then(|| String::from_utf8_lossy(error).into_owned().into_boxed_str());
            }
        }
        t => return Err(format!("an unknown record type {t}")),
    }
    Ok(())
}

fn put(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// The payload of a push record.
pub fn encode_push(req: &QueuedRequest) -> Vec<u8> {
    let mut p = Vec::with_capacity(96 + req.size());
    p.push(PUSH);
    p.extend_from_slice(&req.id.0.to_le_bytes());
    p.extend_from_slice(&req.enqueued_unix_ms.to_le_bytes());
    p.extend_from_slice(&req.attempts.to_le_bytes());
    let flags = u8::from(req.replay_safe)
        | u8::from(req.client.tls) << 1
        | u8::from(req.client.trace_started_here) << 2;
    p.push(flags);
    put(&mut p, req.method.as_str().as_bytes());
    put(&mut p, &req.target);
    put(&mut p, &req.headers);
    let ip = req.client.ip.map(|ip| ip.to_string()).unwrap_or_default();
    put(&mut p, ip.as_bytes());
    put(&mut p, req.client.request_id.as_bytes());
    put(&mut p, req.client.traceparent.as_bytes());
    put(&mut p, req.last_error.as_deref().unwrap_or("").as_bytes());
    put(&mut p, &req.body);
    // Optional trailing field (a log written before clusters ends at the body).
    if let Some(c) = &req.cluster {
        put(&mut p, c.as_bytes());
    }
    p
}

/// A push record's payload back to its entry.
pub fn decode(payload: &[u8]) -> Result<QueuedRequest, String> {
    let mut r = Reader(payload);
    match r.u8()? {
        PUSH => decode_push(&mut r),
        t => Err(format!("record type {t} where a push was expected")),
    }
}

/// `payload` framed as a record (length, checksum, payload).
pub fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("a short record".to_string());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

fn decode_push(r: &mut Reader<'_>) -> Result<QueuedRequest, String> {
    let id = r.u64()?;
    let enqueued_unix_ms = r.u64()?;
    let attempts = r.u32()?;
    let flags = r.u8()?;
    let method = http::Method::from_bytes(r.bytes()?).map_err(|_| "a bad method".to_string())?;
    let target = Bytes::copy_from_slice(r.bytes()?);
    let headers = Bytes::copy_from_slice(r.bytes()?);
    let ip = std::str::from_utf8(r.bytes()?)
        .ok()
        .and_then(|s| s.parse().ok());
    let request_id = r.bytes()?;
    let traceparent = r.bytes()?;
    let error = r.bytes()?;
    let body = Bytes::copy_from_slice(r.bytes()?);
    let cluster = match r.0.is_empty() {
        true => None,
        false => Some(std::sync::Arc::from(
            std::str::from_utf8(r.bytes()?).map_err(|_| "a bad cluster name".to_string())?,
        )),
    };
    let client = super::handover::restore_client(
        request_id,
        traceparent,
        ip,
        flags & 2 != 0,
        flags & 4 != 0,
    );
    Ok(QueuedRequest {
        id: QueueId(id),
        method,
        target,
        headers,
        client,
        body,
        enqueued: super::handover::enqueued_at(enqueued_unix_ms),
        enqueued_unix_ms,
        attempts,
        replay_safe: flags & 1 != 0,
        last_error: (!error.is_empty())
            .then(|| String::from_utf8_lossy(error).into_owned().into_boxed_str()),
        cluster,
    })
}

/// A closed or open segment of this generation.
struct Segment {
    path: PathBuf,
    bytes: u64,
    /// Entries pushed into it that have not left.
    live: u64,
}

/// The writer thread's state.
struct Writer {
    dir: PathBuf,
    gen: String,
    fsync: Fsync,
    segment_size: u64,
    disk: Arc<AtomicU64>,
    file: File,
    current: u32,
    segments: BTreeMap<u32, Segment>,
    /// Live entry -> the segment its push is in.
    home: HashMap<u64, u32>,
    buf: Vec<u8>,
    dirty_since: Option<StdInstant>,
}

impl Writer {
    fn new(
        dir: PathBuf,
        gen: String,
        fsync: Fsync,
        segment_size: usize,
        disk: Arc<AtomicU64>,
    ) -> Result<Writer, String> {
        let path = dir.join(format!("{gen}-{:08}.log", 1));
        let file = open_segment(&path)?;
        let mut segments = BTreeMap::new();
        segments.insert(
            1,
            Segment {
                path,
                bytes: 0,
                live: 0,
            },
        );
        Ok(Writer {
            dir,
            gen,
            fsync,
            segment_size: segment_size as u64,
            disk,
            file,
            current: 1,
            segments,
            home: HashMap::new(),
            buf: Vec::with_capacity(1 << 16),
            dirty_since: None,
        })
    }

    /// Frames `payload` into the buffer (a push also records where it lives).
    fn frame(&mut self, payload: &[u8]) {
        frame(&mut self.buf, payload);
    }

    fn note_push(&mut self, id: u64) {
        if self.home.insert(id, self.current).is_none() {
            if let Some(s) = self.segments.get_mut(&self.current) {
                s.live += 1;
            }
        }
    }

    fn note_remove(&mut self, id: u64) {
        if let Some(seg) = self.home.remove(&id) {
            if let Some(s) = self.segments.get_mut(&seg) {
                s.live = s.live.saturating_sub(1);
            }
        }
    }

    /// Appends one push record at once (recovery's re-write).
    fn append(&mut self, id: u64, payload: &[u8]) -> Result<(), String> {
        self.frame(payload);
        self.note_push(id);
        self.flush()
    }

    /// Writes the buffer to the current segment.
    fn flush(&mut self) -> Result<(), String> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let n = self.buf.len() as u64;
        let result = self.file.write_all(&self.buf);
        self.buf.clear();
        result.map_err(|e| format!("cannot write the queue log: {e}"))?;
        if let Some(s) = self.segments.get_mut(&self.current) {
            s.bytes += n;
        }
        self.disk.fetch_add(n, Ordering::AcqRel);
        self.dirty_since.get_or_insert_with(StdInstant::now);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), String> {
        self.flush()?;
        if self.dirty_since.take().is_some() {
            self.file
                .sync_data()
                .map_err(|e| format!("cannot sync the queue log: {e}"))?;
        }
        Ok(())
    }

    /// Closes the current segment when it is full, and deletes the oldest closed segments
    /// nothing live is left in.
    fn maintain(&mut self) {
        let full = self
            .segments
            .get(&self.current)
            .is_some_and(|s| s.bytes >= self.segment_size);
        if full {
            let _ = self.sync();
            let next = self.current + 1;
            let path = self.dir.join(format!("{}-{next:08}.log", self.gen));
            match open_segment(&path) {
                Ok(f) => {
                    self.file = f;
                    self.current = next;
                    self.segments.insert(
                        next,
                        Segment {
                            path,
                            bytes: 0,
                            live: 0,
                        },
                    );
                }
                Err(e) => log::error!("queue log: {e}; writing on in the current segment"),
            }
        }
        while let Some((&n, s)) = self.segments.iter().next() {
            if n == self.current || s.live > 0 {
                break;
            }
            if let Err(e) = fs::remove_file(&s.path) {
                log::warn!("cannot remove {}: {e}", s.path.display());
            }
            self.disk.fetch_sub(s.bytes, Ordering::AcqRel);
            self.segments.remove(&n);
        }
    }

    fn run(mut self, ops: Receiver<Op>) {
        let mut waiting: Vec<oneshot::Sender<Result<(), String>>> = Vec::new();
        let mut syncs: Vec<oneshot::Sender<()>> = Vec::new();
        loop {
            let first = match (self.fsync, self.dirty_since) {
                (Fsync::Interval(every), Some(since)) => {
                    let left = every.saturating_sub(since.elapsed());
                    match ops.recv_timeout(left) {
                        Ok(op) => Some(op),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match ops.recv() {
                    Ok(op) => Some(op),
                    Err(_) => break,
                },
            };
            let mut failed: Option<String> = None;
            for op in first.into_iter().chain(ops.try_iter().take(BATCH)) {
                match op {
                    Op::Push { id, record, done } => {
                        self.frame(&record);
                        self.note_push(id);
                        waiting.push(done);
                    }
                    Op::Remove(id) => {
                        let mut p = vec![REMOVE];
                        p.extend_from_slice(&id.to_le_bytes());
                        self.frame(&p);
                        self.note_remove(id);
                    }
                    Op::Update(p) => self.frame(&p),
                    Op::Sync(tx) => syncs.push(tx),
                    Op::Adopt(records, ids, done) => {
                        for (r, id) in records.iter().zip(ids) {
                            self.frame(r);
                            self.note_push(id);
                        }
                        let r = self.sync();
                        let _ = done.send(r);
                    }
                }
                if self.buf.len() >= 1 << 20 {
                    if let Err(e) = self.flush() {
                        failed = Some(e);
                    }
                }
            }
            if let Err(e) = self.flush() {
                failed = Some(e);
            }
            let must_sync = match self.fsync {
                Fsync::Always => !waiting.is_empty(),
                Fsync::Interval(every) => self.dirty_since.is_some_and(|t| t.elapsed() >= every),
                Fsync::Never => false,
            } || !syncs.is_empty();
            if must_sync && failed.is_none() {
                if let Err(e) = self.sync() {
                    failed = Some(e);
                }
            }
            if let Some(e) = &failed {
                log::error!("queue log {}: {e}", self.dir.display());
            }
            for done in waiting.drain(..) {
                let _ = done.send(failed.clone().map_or(Ok(()), Err));
            }
            for tx in syncs.drain(..) {
                let _ = tx.send(());
            }
            self.maintain();
            if self.fsync == Fsync::Never {
                self.dirty_since = None;
            }
        }
        let _ = self.sync();
    }
}

fn open_segment(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

#[cfg(test)]
mod tests;
