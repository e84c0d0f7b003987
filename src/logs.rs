//! The access log (one JSON line per request) and the ServiceQ-shaped error log (stderr by
//! default, or a file, or off).
//!
//! Request threads never write files: they hand a finished line to a bounded channel, and one
//! writer thread per log batches the lines into its file. If the writer falls behind, lines are
//! dropped and counted rather than stalling requests; the count is reported in the log itself.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use crate::config::{AccessLog, ErrorLog};

const CHANNEL_LINES: usize = 65_536;

enum Message {
    Line(String),
    Reopen,
}

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
    tx: Sender<Message>,
    dropped: Arc<AtomicU64>,
    worker: Worker,
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
        let (tx, rx) = bounded(CHANNEL_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        let worker = Worker::new(format!("weir-{name}-log"), move || {
            let first = parked.lock().unwrap_or_else(|e| e.into_inner()).take();
            match first.map_or_else(|| target.open(), Ok) {
                Ok(out) => write_loop(rx.clone(), &target, out, d.clone()),
                Err(e) => log::error!("cannot open the {} log: {e}", target.describe()),
            }
        });
        Ok(LogSink {
            tx,
            dropped,
            worker,
        })
    }

    /// Queues one line (without its newline).
    pub fn write(&self, line: String) {
        if let Err(e) = self.worker.ensure() {
            log::error!("cannot start a log writer: {e}");
        }
        match self.tx.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reopens the file (log rotation, SIGUSR1).
    pub fn reopen(&self) {
        let _ = self.worker.ensure();
        let _ = self.tx.send(Message::Reopen);
    }
}

fn write_loop(
    rx: Receiver<Message>,
    target: &Target,
    out: Box<dyn Write + Send>,
    dropped: Arc<AtomicU64>,
) {
    let mut w = BufWriter::with_capacity(64 * 1024, out);
    let mut reported = 0;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        // Drain whatever is queued before paying for a flush.
        while let Some(msg) = next {
            match msg {
                Message::Line(line) => {
                    let _ = w.write_all(line.as_bytes());
                    let _ = w.write_all(b"\n");
                }
                Message::Reopen => {
                    let _ = w.flush();
                    // stdout and stderr are not rotated by renaming: nothing to reopen.
                    if let Target::File(_) = target {
                        match target.open() {
                            Ok(f) => w = BufWriter::with_capacity(64 * 1024, f),
                            Err(e) => log::error!("cannot reopen log file: {e}"),
                        }
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        let lost = dropped.load(Ordering::Relaxed);
        if lost != reported {
            let _ = writeln!(
                w,
                "{{\"weir_log\":\"lines dropped because the log writer fell behind\",\"total\":{lost}}}"
            );
            reported = lost;
        }
        let _ = w.flush();
    }
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
            sink.write(format!(
                "weir: {now} Error detected on {on} [Code: {code}, {name}]"
            ));
        }
    }

    pub fn reopen(&self) {
        for sink in [&self.access, &self.error].into_iter().flatten() {
            sink.reopen();
        }
    }
}
