//! Abort on stall: the attempts in flight on one node that weir may end early and send again.
//!
//! Pingora has no cancel handle for an attempt in flight; its upstream loop waits only on the
//! node's socket and the client. What reaches it from outside is the socket itself:
//! `connected_to_upstream` sees its descriptor, weir keeps a **duplicate** of it here, and
//! `shutdown(SHUT_RDWR)` on the duplicate makes the pending read return end-of-file at once
//! (Pingora raises `ConnectionClosed`, and the connection is not pooled). The duplicate keeps
//! the descriptor number from being reused by another connection while the attempt is
//! registered; it is closed when the attempt's response header arrives or the attempt ends,
//! after which an abort could hit a pooled connection another request is using.
//!
//! Only attempts that may be sent again register (replay-safe, body kept or none), and only
//! before their response header. A background task sweeps the registries every few milliseconds
//! (`Runtime::abort_stalled`):
//! on a node the router judges stalled, every registered attempt older than the abort age is
//! shut down and flagged, each only if the retry budget grants the attempt that follows (an
//! abort that could not be sent again would turn a late answer into none); the request's error
//! hook reads the flag, so that the abort is
//! counted as the stall it is, not as a node that closed a connection.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The abortable attempts in flight on one node. Shared by the runtimes of a reload that keep
/// the node, so a sweep of the current runtime reaches attempts started before the reload.
#[derive(Debug, Default)]
pub struct AbortRegistry {
    entries: Mutex<Vec<Entry>>,
    /// `entries.len()`, readable without the lock (most sweeps find nothing to do).
    len: AtomicUsize,
    next_id: AtomicUsize,
}

#[derive(Debug)]
struct Entry {
    id: usize,
    fd: OwnedFd,
    started: Instant,
    aborted: Arc<AtomicBool>,
    /// A sweep found it abortable but the budget refused; counted once.
    refused: bool,
}

/// An attempt's registration; dropping it deregisters the attempt and closes the duplicate.
#[derive(Debug)]
pub struct AbortGuard {
    registry: Arc<AbortRegistry>,
    id: usize,
    aborted: Arc<AtomicBool>,
}

impl AbortRegistry {
    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the attempt on socket `fd`, started at `started`. `None` when the descriptor
    /// cannot be duplicated (out of descriptors): the attempt then simply cannot be aborted.
    pub fn register(self: &Arc<Self>, fd: RawFd, started: Instant) -> Option<AbortGuard> {
        // SAFETY: `fd` is the live socket Pingora hands to `connected_to_upstream`, open for
        // the duration of this call; it is only borrowed to duplicate it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let fd = borrowed.try_clone_to_owned().ok()?;
        let id = self.next_id.fetch_add(1, Relaxed);
        let aborted = Arc::new(AtomicBool::new(false));
        let mut entries = self.lock();
        entries.push(Entry {
            id,
            fd,
            started,
            aborted: aborted.clone(),
            refused: false,
        });
        self.len.store(entries.len(), Relaxed);
        Some(AbortGuard {
            registry: self.clone(),
            id,
            aborted,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.len.load(Relaxed) == 0
    }

    /// Aborts every registered attempt started at least `min_age` before `now` for which
    /// `grant` allows another attempt (the retry budget); returns how many were aborted and
    /// how many were refused a grant for the first time. Each aborted one is deregistered (its
    /// duplicate closed); a refused one stays and may be granted on a later sweep.
    pub fn abort_older_than(
        &self,
        now: Instant,
        min_age: Duration,
        mut grant: impl FnMut() -> bool,
    ) -> (usize, usize) {
        let mut entries = self.lock();
        let before = entries.len();
        let mut refused = 0;
        entries.retain_mut(|e| {
            if now.saturating_duration_since(e.started) < min_age {
                return true;
            }
            if !grant() {
                if !e.refused {
                    e.refused = true;
                    refused += 1;
                }
                return true;
            }
            e.aborted.store(true, Relaxed);
            // SAFETY: `e.fd` is weir's own open duplicate of the attempt's socket; shutting it
            // down acts on the socket both descriptors refer to and touches no memory.
            unsafe {
                libc::shutdown(e.fd.as_raw_fd(), libc::SHUT_RDWR);
            }
            false
        });
        self.len.store(entries.len(), Relaxed);
        (before - entries.len(), refused)
    }
}

impl AbortGuard {
    /// weir shut this attempt's connection down because its node stalled.
    pub fn aborted(&self) -> bool {
        self.aborted.load(Relaxed)
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        let mut entries = self.registry.lock();
        if let Some(i) = entries.iter().position(|e| e.id == self.id) {
            entries.swap_remove(i);
        }
        self.registry.len.store(entries.len(), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn an_abort_wakes_a_blocked_read_with_end_of_file_and_only_old_attempts_go() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let registry = Arc::new(AbortRegistry::default());
        let t0 = Instant::now();
        let guard = registry.register(client.as_raw_fd(), t0).unwrap();
        assert!(!registry.is_empty());
        let yes = || true;
        assert_eq!(
            registry.abort_older_than(t0, Duration::from_millis(10), yes),
            (0, 0)
        );
        assert!(!guard.aborted());
        // The node never answers: a read would block forever; the abort ends it.
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            client.read(&mut buf).map_err(|e| e.kind())
        });
        let later = t0 + Duration::from_millis(10);
        let ms10 = Duration::from_millis(10);
        // Refused by the budget: left in place, counted once.
        assert_eq!(registry.abort_older_than(later, ms10, || false), (0, 1));
        assert_eq!(registry.abort_older_than(later, ms10, || false), (0, 0));
        assert!(!guard.aborted());
        assert_eq!(registry.abort_older_than(later, ms10, yes), (1, 0));
        assert!(guard.aborted());
        assert!(registry.is_empty());
        assert_eq!(reader.join().unwrap(), Ok(0));
        drop(guard);
        assert!(registry.is_empty());
    }

    #[test]
    fn dropping_a_guard_deregisters_it() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let registry = Arc::new(AbortRegistry::default());
        let a = registry
            .register(client.as_raw_fd(), Instant::now())
            .unwrap();
        let b = registry
            .register(client.as_raw_fd(), Instant::now())
            .unwrap();
        drop(a);
        assert!(!registry.is_empty());
        drop(b);
        assert!(registry.is_empty());
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            registry.abort_older_than(far, Duration::ZERO, || true),
            (0, 0)
        );
    }
}
