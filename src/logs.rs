//! The access log (one JSON line per request) and the ServiceQ-shaped error log (stderr by
//! default, or a file, or off).
//!
//! Request threads never write files: they format their line straight into the log's shared
//! buffer (no allocation per line: the buffer and its spare are reused), and one writer thread
//! per log swaps the buffer out and writes it in one go. A line wakes the writer only while it
//! waits for lines; after each write it pauses 2 ms, so a busy log is written in large batches
//! with no wake-up per line. If the writer falls behind (more than [`MAX_PENDING`] bytes waiting), lines are
//! dropped and counted rather than stalling requests; the count is reported in the log itself.
//! The access line's timestamp is formatted once per second per thread.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{AccessLog, ErrorLog};

/// Bytes of lines that may wait for the writer; beyond, lines are dropped (and counted).
pub const MAX_PENDING: usize = 8 << 20;
/// After writing a batch the writer lets lines gather this long before it takes the next one:
/// under load one write (and no wake-up) carries many lines; an idle log's first line is
/// written at once.
const BATCH_PAUSE: Duration = Duration::from_millis(2);
/// A spare buffer larger than this after a burst is given back.
const KEEP_CAPACITY: usize = 1 << 20;

/// Forks this process went through (counted in the child by a `pthread_atfork` handler).
static FORKS: AtomicU32 = AtomicU32::new(0);
static COUNT_FORKS: Once = Once::new();

extern "C" fn forked_child() {
    FORKS.fetch_add(1, Ordering::AcqRel);
}

/// A background thread that runs in the process that uses it. Pingora's daemon mode (`-d`)
/// forks after weir is built, and a thread started before a fork does not exist in the child:
/// [`Worker::ensure`] starts it on first use, and again after a fork.
pub struct Worker {
    name: String,
    run: Arc<dyn Fn() + Send + Sync>,
    /// `FORKS + 1` when the thread was started (0: not started).
    started: AtomicU32,
    starting: Mutex<()>,
}

impl Worker {
    /// A worker that runs `run` on its thread (not started yet).
    pub fn new(name: String, run: impl Fn() + Send + Sync + 'static) -> Worker {
        COUNT_FORKS.call_once(|| {
            // SAFETY: registers a plain function that only increments an atomic.
            unsafe {
                libc::pthread_atfork(None, None, Some(forked_child));
            }
        });
        Worker {
            name,
            run: Arc::new(run),
            started: AtomicU32::new(0),
            starting: Mutex::new(()),
        }
    }

    /// Starts the thread unless it runs in this process already. Cheap when it does.
    pub fn ensure(&self) -> io::Result<()> {
        let now = FORKS.load(Ordering::Acquire).wrapping_add(1);
        if self.started.load(Ordering::Acquire) == now {
            return Ok(());
        }
        let _g = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        if self.started.load(Ordering::Acquire) == now {
            return Ok(());
        }
        let run = self.run.clone();
        std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || run())?;
        self.started.store(now, Ordering::Release);
        Ok(())
    }
}

/// One log destination served by a writer thread.
pub struct LogSink {
    shared: Arc<Shared>,
    worker: Worker,
}

/// What request threads and the writer share.
struct Shared {
    /// Lines waiting for the writer, each ending in `\n`.
    buf: Mutex<Vec<u8>>,
    wake: Condvar,
    dropped: AtomicU64,
    reopen: AtomicBool,
    /// The writer waits for lines (set and cleared under the buffer's lock): only then does a
    /// line wake it, so a writer busy writing a batch costs the request threads no wake-up.
    waiting: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }
}

enum Target {
    Stdout,
    Stderr,
    File(PathBuf),
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Stdout => "stdout".into(),
            Target::Stderr => "stderr".into(),
            Target::File(p) => p.display().to_string(),
        }
    }

    fn open(&self) -> io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            Target::Stdout => Box::new(io::stdout()),
            Target::Stderr => Box::new(io::stderr()),
            Target::File(path) => Box::new(open_append(path)?),
        })
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogSink {
    fn start(name: &str, target: Target) -> io::Result<LogSink> {
        // Opened now (a file that cannot be opened stops the start); the thread takes it when it
        // starts, and opens it again (appending) only if it has to start again after a fork.
        let parked = Mutex::new(Some(target.open()?));
        let shared = Arc::new(Shared {
            buf: Mutex::new(Vec::with_capacity(64 * 1024)),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
            reopen: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
        });
        let for_writer = shared.clone();
        let worker = Worker::new(format!("weir-{name}-log"), move || {
            let first = parked.lock().unwrap_or_else(|e| e.into_inner()).take();
            match first.map_or_else(|| target.open(), Ok) {
                Ok(out) => write_loop(&for_writer, &target, out),
                Err(e) => log::error!("cannot open the {} log: {e}", target.describe()),
            }
        });
        Ok(LogSink { shared, worker })
    }

    /// Appends one line: `f` writes it (without its newline) into the shared buffer.
    pub fn write_with(&self, f: impl FnOnce(&mut Vec<u8>)) {
        if let Err(e) = self.worker.ensure() {
            log::error!("cannot start a log writer: {e}");
        }
        let wake = {
            let mut buf = self.shared.lock();
            if buf.len() > MAX_PENDING {
                drop(buf);
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            f(&mut buf);
            buf.push(b'\n');
            self.shared.waiting.swap(false, Ordering::Relaxed)
        };
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Queues one line (without its newline).
    pub fn write(&self, line: &str) {
        self.write_with(|b| b.extend_from_slice(line.as_bytes()));
    }

    /// Queues one access line.
    pub fn write_access(&self, r: &AccessRecord<'_>) {
        self.write_with(|b| r.write_json(b));
    }

    /// Reopens the file (log rotation, SIGUSR1).
    pub fn reopen(&self) {
        let _ = self.worker.ensure();
        self.shared.reopen.store(true, Ordering::Release);
        // Taken under the lock, so the writer cannot miss it between its check and its wait.
        let _g = self.shared.lock();
        self.shared.wake.notify_one();
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

fn write_loop(shared: &Shared, target: &Target, mut out: Box<dyn Write + Send>) {
    let mut spare: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut reported = 0;
    loop {
        {
            let mut buf = shared.lock();
            while buf.is_empty() && !shared.reopen.load(Ordering::Acquire) {
                shared.waiting.store(true, Ordering::Relaxed);
                buf = shared
                    .wake
                    .wait_timeout(buf, Duration::from_secs(1))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            shared.waiting.store(false, Ordering::Relaxed);
            std::mem::swap(&mut *buf, &mut spare);
        }
        // A reopen asked for before this swap comes first: every line queued after the
        // signal goes to the new file.
        if shared.reopen.swap(false, Ordering::AcqRel) {
            let _ = out.flush();
            // stdout and stderr are not rotated by renaming: nothing to reopen.
            if let Target::File(_) = target {
                match target.open() {
                    Ok(f) => out = f,
                    Err(e) => log::error!("cannot reopen log file: {e}"),
                }
            }
        }
        let _ = out.write_all(&spare);
        spare.clear();
        if spare.capacity() > KEEP_CAPACITY {
            spare.shrink_to(KEEP_CAPACITY);
        }
        let lost = shared.dropped.load(Ordering::Relaxed);
        if lost != reported {
            let _ = writeln!(
                out,
                "{{\"weir_log\":\"lines dropped because the log writer fell behind\",\"total\":{lost}}}"
            );
            reported = lost;
        }
        let _ = out.flush();
        std::thread::sleep(BATCH_PAUSE);
    }
}

/// One access-log line's values, borrowed from the request.
pub struct AccessRecord<'a> {
    pub id: &'a str,
    pub traceparent: &'a str,
    pub client: Option<IpAddr>,
    pub method: &'a [u8],
    /// The request target as the client sent it (any bytes; invalid UTF-8 is replaced).
    pub target: &'a [u8],
    pub status: u16,
    pub outcome: &'static str,
    pub upstream: Option<&'a str>,
    pub attempts: usize,
    pub elapsed: Duration,
}

impl AccessRecord<'_> {
    /// The JSON line (without newline): `{"ts", "id", "traceparent", "client", "method",
    /// "target", "status", "outcome", "upstream", "attempts", "duration_ms"}`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ts\":\"");
        write_timestamp(out, SystemTime::now());
        out.extend_from_slice(b"\",\"id\":");
        json_str(out, self.id.as_bytes());
        out.extend_from_slice(b",\"traceparent\":");
        json_str(out, self.traceparent.as_bytes());
        out.extend_from_slice(b",\"client\":");
        match self.client {
            Some(ip) => {
                out.push(b'"');
                let _ = write!(out, "{ip}");
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"method\":");
        json_str(out, self.method);
        out.extend_from_slice(b",\"target\":");
        json_str(out, self.target);
        let _ = write!(out, ",\"status\":{},\"outcome\":", self.status);
        json_str(out, self.outcome.as_bytes());
        out.extend_from_slice(b",\"upstream\":");
        match self.upstream {
            Some(u) => json_str(out, u.as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        // Milliseconds with microsecond precision, printed as serde_json prints the f64
        // (shortest form, at least one decimal).
        let micros = (self.elapsed.as_secs_f64() * 1e6).round() as u64;
        let _ = write!(
            out,
            ",\"attempts\":{},\"duration_ms\":{}.",
            self.attempts,
            micros / 1000
        );
        let frac = micros % 1000;
        match frac {
            0 => out.push(b'0'),
            f if f % 100 == 0 => {
                let _ = write!(out, "{}", f / 100);
            }
            f if f % 10 == 0 => {
                let _ = write!(out, "{:02}", f / 10);
            }
            f => {
                let _ = write!(out, "{f:03}");
            }
        }
        out.push(b'}');
    }
}

/// `bytes` as a JSON string: `"`, `\` and control characters escaped, invalid UTF-8 replaced
/// with U+FFFD (as `String::from_utf8_lossy` does).
fn json_str(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    for chunk in bytes.utf8_chunks() {
        let valid = chunk.valid().as_bytes();
        let mut start = 0;
        for (i, &b) in valid.iter().enumerate() {
            let esc: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0c => b"\\f",
                0..=0x1f => b"",
                _ => continue,
            };
            out.extend_from_slice(&valid[start..i]);
            if esc.is_empty() {
                let _ = write!(out, "\\u{b:04x}");
            } else {
                out.extend_from_slice(esc);
            }
            start = i + 1;
        }
        out.extend_from_slice(&valid[start..]);
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
    out.push(b'"');
}

thread_local! {
    /// The second last formatted on this thread and its `YYYY-MM-DDTHH:MM:SS.` prefix.
    static TS: RefCell<(u64, [u8; 20])> = const { RefCell::new((u64::MAX, [0; 20])) };
}

/// `now` as RFC 3339 UTC with milliseconds (`2026-12-03T13:30:10.823Z`); the date and time are
/// formatted once per second per thread.
fn write_timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let millis = since.subsec_millis();
    TS.with(|ts| {
        let mut ts = ts.borrow_mut();
        if ts.0 != secs {
            let t = chrono::DateTime::<chrono::Utc>::from(UNIX_EPOCH + Duration::from_secs(secs));
            let mut prefix = [0u8; 20];
            let mut w = &mut prefix[..];
            let _ = write!(w, "{}", t.format("%Y-%m-%dT%H:%M:%S."));
            *ts = (secs, prefix);
        }
        out.extend_from_slice(&ts.1);
    });
    let _ = write!(out, "{millis:03}Z");
}

/// The gateway's two logs.
pub struct Logs {
    pub access: Option<LogSink>,
    pub error: Option<LogSink>,
}

impl Logs {
    pub fn start(access: &AccessLog, error: &ErrorLog) -> io::Result<Logs> {
        let access = match access {
            AccessLog::Off => None,
            AccessLog::Stdout => Some(LogSink::start("access", Target::Stdout)?),
            AccessLog::File(p) => Some(LogSink::start("access", Target::File(p.clone()))?),
        };
        let error = match error {
            ErrorLog::Off => None,
            ErrorLog::Stderr => Some(LogSink::start("error", Target::Stderr)?),
            ErrorLog::File(p) => Some(LogSink::start("error", Target::File(p.clone()))?),
        };
        Ok(Logs { access, error })
    }

    pub fn off() -> Logs {
        Logs {
            access: None,
            error: None,
        }
    }

    /// A ServiceQ-shaped error line:
    /// `weir: 2026/11/24 06:25:46 Error detected on http://10.0.0.2:8080 [Code: 702, UPSTREAM_TIMED_OUT]`.
    pub fn error_line(&self, on: &str, code: u16, name: &str) {
        if let Some(sink) = &self.error {
            let now = chrono::Local::now().format("%Y/%m/%d %H:%M:%S");
            sink.write_with(|b| {
                let _ = write!(
                    b,
                    "weir: {now} Error detected on {on} [Code: {code}, {name}]"
                );
            });
        }
    }

    pub fn reopen(&self) {
        for sink in [&self.access, &self.error].into_iter().flatten() {
            sink.reopen();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(target: &[u8], elapsed: Duration) -> Vec<u8> {
        let mut out = Vec::new();
        AccessRecord {
            id: "3f2a",
            traceparent: "00-aa-bb-01",
            client: Some("203.0.113.7".parse().expect("ip")),
            method: b"POST",
            target,
            status: 503,
            outcome: "buffered",
            upstream: Some("http://10.0.0.1:80"),
            attempts: 2,
            elapsed,
        }
        .write_json(&mut out);
        out
    }

    #[test]
    fn an_access_line_is_json_with_the_fields_serde_would_write() {
        let target = b"/a\"b\\c\n\x01\x7f\xff\xfe/\xc3\xa9";
        let line = record(target, Duration::from_micros(2422));
        let v: serde_json::Value = serde_json::from_slice(&line).expect("valid JSON");
        assert_eq!(v["target"], String::from_utf8_lossy(target).as_ref());
        assert_eq!(v["client"], "203.0.113.7");
        assert_eq!(v["status"], 503);
        assert_eq!(v["upstream"], "http://10.0.0.1:80");
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["duration_ms"], 2.422);
        let ts = v["ts"].as_str().expect("ts");
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
        assert_eq!(ts.len(), 24, "{ts}");
        let keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut want = vec![
            "ts",
            "id",
            "traceparent",
            "client",
            "method",
            "target",
            "status",
            "outcome",
            "upstream",
            "attempts",
            "duration_ms",
        ];
        want.sort();
        let mut got = keys.clone();
        got.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn durations_print_as_serde_json_prints_the_milliseconds() {
        for micros in (0..200_000u64).chain([999_999, 1_000_000, 86_400_000_000, 123_456_789]) {
            let line = record(b"/", Duration::from_micros(micros));
            let text = String::from_utf8(line).expect("utf-8");
            let got = text
                .split("\"duration_ms\":")
                .nth(1)
                .and_then(|r| r.strip_suffix('}'))
                .expect("duration");
            let want = serde_json::to_string(&((micros as f64) / 1e3)).expect("f64");
            assert_eq!(got, want, "{micros} µs");
        }
    }

    #[test]
    fn the_cached_timestamp_follows_the_clock() {
        let mut a = Vec::new();
        let t = UNIX_EPOCH + Duration::from_millis(1_764_768_610_823);
        write_timestamp(&mut a, t);
        write_timestamp(&mut a, t + Duration::from_millis(5));
        write_timestamp(&mut a, t + Duration::from_millis(1_200));
        assert_eq!(
            String::from_utf8(a).expect("utf-8"),
            "2025-12-03T13:30:10.823Z2025-12-03T13:30:10.828Z2025-12-03T13:30:12.023Z"
        );
    }
}
