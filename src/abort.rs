//! The attempt watch: ends attempts in flight on a stalled node (abort on stall) and those
//! past one of their deadlines (`timeouts.first_byte`, `timeouts.body_idle`, `timeouts.request`
//! for the whole attempt). It is the only limit on an attempt's reads: the node peers carry no
//! Pingora per-read timeout (one timer per read, see docs/perf.md).
//!
//! Pingora has no cancel handle for an attempt in flight; its upstream loop waits only on the
//! node's socket and the client. What reaches it from outside is the socket itself:
//! `connected_to_upstream` sees its descriptor, weir keeps a **duplicate** of it here, and
//! `shutdown(SHUT_RDWR)` on the duplicate makes the pending read return end-of-file at once
//! (Pingora raises `ConnectionClosed`, and the connection is not pooled). The duplicate keeps
//! the descriptor number from being reused by another connection while the attempt is
//! registered; the registration ends before the connection can go back to the pool (at a
//! response without a body, or with the body's last byte), after which a shutdown could hit a
//! pooled connection another request is using.
//!
//! A background task sweeps the registries every few milliseconds (`Runtime::watch`). Each
//! entry has its deadlines; a registry remembers the earliest one, so a sweep with nothing
//! due costs one atomic read. On a node the router judges stalled, every attempt registered
//! as abortable (replay-safe, body kept or none, another node left) that has no response
//! header yet and is older than the abort age is shut down too — each only if the retry
//! budget grants the attempt that follows (an abort that could not be sent again would turn a
//! late answer into none). The shutdown is flagged with its reason, which the request's error
//! hook reads: the error alone looks like a node that closed a connection.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{
    AtomicU64, AtomicU8, AtomicUsize, Ordering::AcqRel, Ordering::Acquire, Ordering::Relaxed,
};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why weir ended an attempt in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// Its node stalled; it goes again elsewhere.
    Stall = 1,
    /// No response header within `timeouts.first_byte` of the request going out.
    FirstByte = 2,
    /// The response body paused longer than `timeouts.body_idle`.
    BodyIdle = 3,
    /// The whole attempt outlived `timeouts.request`.
    Deadline = 4,
    /// Its hedge answered first; this attempt lost.
    HedgeLost = 5,
}

impl AbortReason {
    fn from_bits(bits: u8) -> Option<AbortReason> {
        Some(match bits & REASON {
            1 => AbortReason::Stall,
            2 => AbortReason::FirstByte,
            3 => AbortReason::BodyIdle,
            4 => AbortReason::Deadline,
            5 => AbortReason::HedgeLost,
            _ => return None,
        })
    }

    /// The error's explanation.
    pub fn explain(self) -> &'static str {
        match self {
            AbortReason::Stall => "attempt aborted: node stalled",
            AbortReason::FirstByte => "attempt timed out: no response header (timeouts.first_byte)",
            AbortReason::BodyIdle => "attempt timed out: response body idle (timeouts.body_idle)",
            AbortReason::Deadline => "attempt timed out: whole attempt (timeouts.request)",
            AbortReason::HedgeLost => "attempt cancelled: its hedge answered first",
        }
    }

    /// For the three deadlines, the index of their `kind` in `weir_attempt_timeouts_total`
    /// (first_byte, body_idle, attempt).
    pub fn deadline_index(self) -> Option<usize> {
        match self {
            AbortReason::FirstByte => Some(0),
            AbortReason::BodyIdle => Some(1),
            AbortReason::Deadline => Some(2),
            _ => None,
        }
    }
}

const REASON: u8 = 0x0f;
/// The response header arrived: no more aborts on stall, the body deadlines run.
const HEADER: u8 = 0x80;
/// Not yet known (the request's body is still streaming to the node).
const UNSENT: u64 = u64::MAX;

/// What an attempt is watched for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Terms {
    /// May be aborted when its node stalls (before its response header).
    pub stall: bool,
    pub first_byte: Option<Duration>,
    pub body_idle: Option<Duration>,
    /// The whole attempt.
    pub deadline: Option<Duration>,
}

impl Terms {
    pub fn any(&self) -> bool {
        self.stall
            || self.first_byte.is_some()
            || self.body_idle.is_some()
            || self.deadline.is_some()
    }
}

/// State shared by an entry and its guard.
#[derive(Debug)]
struct Shared {
    /// `HEADER` and the abort reason (0 = none).
    state: AtomicU8,
    /// Nanoseconds after the start when the whole request had gone to the node.
    sent: AtomicU64,
    /// Nanoseconds after the start of the last response byte read.
    progress: AtomicU64,
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Aborted on a stalled node.
    pub stalled: usize,
    /// Abortable on a stalled node, but the budget refused the retry (each counted once).
    pub refused: usize,
    /// Past `first_byte`, `body_idle`, `request` (the whole attempt).
    pub timed_out: [usize; 3],
}

impl std::ops::AddAssign for Swept {
    fn add_assign(&mut self, o: Swept) {
        self.stalled += o.stalled;
        self.refused += o.refused;
        for (a, b) in self.timed_out.iter_mut().zip(o.timed_out) {
            *a += b;
        }
    }
}

/// The watched attempts in flight on one node. Shared by the runtimes of a reload that keep
/// the node, so a sweep of the current runtime reaches attempts started before the reload.
#[derive(Debug)]
pub struct AbortRegistry {
    entries: Mutex<Vec<Entry>>,
    /// `entries.len()`, readable without the lock.
    len: AtomicUsize,
    next_id: AtomicUsize,
    /// Nanoseconds after `epoch` of the earliest deadline of any entry (may be early, never
    /// late): sweeps before it have nothing to time out.
    next_due: AtomicU64,
    epoch: Instant,
}

impl Default for AbortRegistry {
    fn default() -> Self {
        AbortRegistry {
            entries: Mutex::new(Vec::new()),
            len: AtomicUsize::new(0),
            next_id: AtomicUsize::new(0),
            next_due: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
        }
    }
}

#[derive(Debug)]
struct Entry {
    id: usize,
    fd: OwnedFd,
    started: Instant,
    terms: Terms,
    shared: Arc<Shared>,
    /// A sweep found it abortable but the budget refused; counted once.
    refused: bool,
}

/// An attempt's registration; dropping it deregisters the attempt and closes the duplicate.
#[derive(Debug)]
pub struct AbortGuard {
    registry: Arc<AbortRegistry>,
    id: usize,
    started: Instant,
    terms: Terms,
    shared: Arc<Shared>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX - 1)
}

impl Entry {
    /// The deadline that is due at `age`, if any.
    fn due(&self, age: Duration, state: u8) -> Option<AbortReason> {
        let t = &self.terms;
        if t.deadline.is_some_and(|d| age >= d) {
            return Some(AbortReason::Deadline);
        }
        let at = |offset: u64, limit: Duration| age >= Duration::from_nanos(offset) + limit;
        if state & HEADER == 0 {
            let sent = self.shared.sent.load(Relaxed);
            if sent != UNSENT && t.first_byte.is_some_and(|fb| at(sent, fb)) {
                return Some(AbortReason::FirstByte);
            }
        } else if let Some(idle) = t.body_idle {
            if at(self.shared.progress.load(Relaxed), idle) {
                return Some(AbortReason::BodyIdle);
            }
        }
        None
    }

    /// The earliest time (after the start) a deadline may fall due.
    fn next_due(&self, state: u8) -> Option<Duration> {
        let t = &self.terms;
        let phase = if state & HEADER == 0 {
            let sent = self.shared.sent.load(Relaxed);
            (sent != UNSENT)
                .then_some(t.first_byte)
                .flatten()
                .map(|fb| Duration::from_nanos(sent) + fb)
        } else {
            let progress = self.shared.progress.load(Relaxed);
            t.body_idle
                .map(|idle| Duration::from_nanos(progress) + idle)
        };
        match (t.deadline, phase) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Flags the abort (unless the attempt moved on meanwhile) and shuts the socket down.
    fn abort(&self, from: u8, reason: AbortReason) -> bool {
        let to = from | reason as u8;
        if self
            .shared
            .state
            .compare_exchange(from, to, AcqRel, Acquire)
            .is_err()
        {
            return false;
        }
        // SAFETY: `self.fd` is weir's own open duplicate of the attempt's socket; shutting it
        // down acts on the socket both descriptors refer to and touches no memory.
        unsafe {
            libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR);
        }
        true
    }
}

impl AbortRegistry {
    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the attempt on socket `fd`, started at `started`, watched for `terms`.
    /// `sent`: the whole request goes out at once (no body, or weir's copy); otherwise
    /// [`AbortGuard::sent`] starts the first-byte clock. `None` when the descriptor cannot be
    /// duplicated (out of descriptors): the attempt is then not sent, since nothing else bounds
    /// its reads.
    pub fn register(
        self: &Arc<Self>,
        fd: RawFd,
        started: Instant,
        terms: Terms,
        sent: bool,
    ) -> Option<AbortGuard> {
        // SAFETY: `fd` is the live socket Pingora hands to `connected_to_upstream`, open for
        // the duration of this call; it is only borrowed to duplicate it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let fd = borrowed.try_clone_to_owned().ok()?;
        let id = self.next_id.fetch_add(1, Relaxed);
        let shared = Arc::new(Shared {
            state: AtomicU8::new(0),
            sent: AtomicU64::new(if sent {
                nanos(started.elapsed())
            } else {
                UNSENT
            }),
            progress: AtomicU64::new(0),
        });
        let entry = Entry {
            id,
            fd,
            started,
            terms,
            shared: shared.clone(),
            refused: false,
        };
        if let Some(due) = entry.next_due(0) {
            self.due_by(started + due);
        }
        let mut entries = self.lock();
        entries.push(entry);
        self.len.store(entries.len(), Relaxed);
        Some(AbortGuard {
            registry: self.clone(),
            id,
            started,
            terms,
            shared,
        })
    }

    fn due_by(&self, at: Instant) {
        let at = nanos(at.saturating_duration_since(self.epoch));
        self.next_due.fetch_min(at, Relaxed);
    }

    pub fn is_empty(&self) -> bool {
        self.len.load(Relaxed) == 0
    }

    /// One sweep at `now`: ends every attempt past one of its deadlines, and, when the node is
    /// judged stalled (`stall_age`: the abort age), every abortable attempt without a response
    /// header that is at least that old, each only if `grant` allows the retry that follows.
    /// Ended attempts are deregistered (their duplicates closed); a refused one stays and may
    /// be granted on a later sweep.
    pub fn sweep(
        &self,
        now: Instant,
        stall_age: Option<Duration>,
        mut grant: impl FnMut() -> bool,
    ) -> Swept {
        let mut swept = Swept::default();
        if self.is_empty() {
            return swept;
        }
        let now_nanos = nanos(now.saturating_duration_since(self.epoch));
        if stall_age.is_none() && now_nanos < self.next_due.load(Relaxed) {
            return swept;
        }
        let mut entries = self.lock();
        let mut next_due = u64::MAX;
        entries.retain_mut(|e| {
            let state = e.shared.state.load(Acquire);
            if state & REASON != 0 {
                // Ended from elsewhere (a hedge won).
                return false;
            }
            let age = now.saturating_duration_since(e.started);
            if let Some(reason) = e.due(age, state) {
                if e.abort(state, reason) {
                    if let Some(i) = reason.deadline_index() {
                        swept.timed_out[i] += 1;
                    }
                    return false;
                }
                // The attempt moved on (its header came) meanwhile: next sweep.
                next_due = now_nanos;
                return true;
            }
            let stall_due =
                state & HEADER == 0 && e.terms.stall && stall_age.is_some_and(|min| age >= min);
            if stall_due {
                if !grant() {
                    if !e.refused {
                        e.refused = true;
                        swept.refused += 1;
                    }
                } else if e.abort(state, AbortReason::Stall) {
                    swept.stalled += 1;
                    return false;
                }
            }
            if let Some(due) = e.next_due(state) {
                let due = nanos((e.started + due).saturating_duration_since(self.epoch));
                next_due = next_due.min(due);
            }
            true
        });
        self.len.store(entries.len(), Relaxed);
        // Entries registered during the sweep lowered `next_due` themselves, under the lock
        // this sweep held; store the minimum over what is left.
        self.next_due.store(next_due, Relaxed);
        swept
    }

    /// Ends the registered attempt `id` for `reason` (a hedge that answered first ends the
    /// attempt it raced). `false` when it is gone or already answered.
    pub fn end(&self, id: usize, reason: AbortReason) -> bool {
        let mut entries = self.lock();
        let Some(i) = entries.iter().position(|e| e.id == id) else {
            return false;
        };
        let state = entries[i].shared.state.load(Acquire);
        if state & (REASON | HEADER) != 0 || !entries[i].abort(state, reason) {
            return false;
        }
        entries.swap_remove(i);
        self.len.store(entries.len(), Relaxed);
        true
    }
}

impl AbortGuard {
    /// Why weir ended this attempt, if it did.
    pub fn reason(&self) -> Option<AbortReason> {
        AbortReason::from_bits(self.shared.state.load(Acquire))
    }

    /// The registration's id (for [`AbortRegistry::end`]).
    pub fn id(&self) -> usize {
        self.id
    }

    /// The whole request (its streamed body) has gone to the node: the first-byte clock runs.
    pub fn sent(&self) {
        let at = Instant::now();
        self.shared
            .sent
            .store(nanos(at.saturating_duration_since(self.started)), Relaxed);
        if let Some(fb) = self.terms.first_byte {
            self.registry.due_by(at + fb);
        }
    }

    /// The response header arrived. From now on there are no aborts on stall and the body's
    /// deadlines run; `Err` when weir had already ended the attempt (its connection is shut).
    pub fn header(&self) -> Result<(), AbortReason> {
        self.progress();
        if let Some(idle) = self.terms.body_idle {
            self.registry.due_by(Instant::now() + idle);
        }
        let before = self.shared.state.fetch_or(HEADER, AcqRel);
        match AbortReason::from_bits(before) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    /// A piece of the response body arrived.
    pub fn progress(&self) {
        self.shared
            .progress
            .store(nanos(self.started.elapsed()), Relaxed);
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

    const MS: Duration = Duration::from_millis(1);

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    const STALL: Terms = Terms {
        stall: true,
        first_byte: None,
        body_idle: None,
        deadline: None,
    };

    #[test]
    fn an_abort_wakes_a_blocked_read_with_end_of_file_and_only_old_attempts_go() {
        let (mut client, _server) = pair();
        let registry = Arc::new(AbortRegistry::default());
        let t0 = Instant::now();
        let guard = registry
            .register(client.as_raw_fd(), t0, STALL, true)
            .unwrap();
        assert!(!registry.is_empty());
        let yes = || true;
        assert_eq!(registry.sweep(t0, Some(10 * MS), yes), Swept::default());
        assert_eq!(guard.reason(), None);
        // The node never answers: a read would block forever; the abort ends it.
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            client.read(&mut buf).map_err(|e| e.kind())
        });
        let later = t0 + 10 * MS;
        // Not judged stalled: nothing happens.
        assert_eq!(registry.sweep(later, None, yes), Swept::default());
        // Refused by the budget: left in place, counted once.
        let refused = registry.sweep(later, Some(10 * MS), || false);
        assert_eq!((refused.stalled, refused.refused), (0, 1));
        assert_eq!(registry.sweep(later, Some(10 * MS), || false).refused, 0);
        assert_eq!(guard.reason(), None);
        assert_eq!(registry.sweep(later, Some(10 * MS), yes).stalled, 1);
        assert_eq!(guard.reason(), Some(AbortReason::Stall));
        assert!(registry.is_empty());
        assert_eq!(reader.join().unwrap(), Ok(0));
        // The header that comes too late learns the attempt was ended.
        assert_eq!(guard.header(), Err(AbortReason::Stall));
        drop(guard);
        assert!(registry.is_empty());
    }

    #[test]
    fn dropping_a_guard_deregisters_it() {
        let (client, _server) = pair();
        let registry = Arc::new(AbortRegistry::default());
        let a = registry
            .register(client.as_raw_fd(), Instant::now(), STALL, true)
            .unwrap();
        let b = registry
            .register(client.as_raw_fd(), Instant::now(), STALL, true)
            .unwrap();
        drop(a);
        assert!(!registry.is_empty());
        drop(b);
        assert!(registry.is_empty());
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            registry.sweep(far, Some(Duration::ZERO), || true),
            Swept::default()
        );
    }

    #[test]
    fn no_abort_on_stall_once_the_header_came() {
        let (client, _server) = pair();
        let registry = Arc::new(AbortRegistry::default());
        let t0 = Instant::now();
        let guard = registry
            .register(client.as_raw_fd(), t0, STALL, true)
            .unwrap();
        assert_eq!(guard.header(), Ok(()));
        let swept = registry.sweep(t0 + Duration::from_secs(1), Some(MS), || true);
        assert_eq!(swept, Swept::default());
        assert_eq!(guard.reason(), None);
    }

    #[test]
    fn the_first_byte_clock_starts_when_the_request_was_sent() {
        let (client, _server) = pair();
        let registry = Arc::new(AbortRegistry::default());
        let terms = Terms {
            first_byte: Some(100 * MS),
            ..Terms::default()
        };
        let t0 = Instant::now();
        let guard = registry
            .register(client.as_raw_fd(), t0, terms, false)
            .unwrap();
        // The body is still streaming: no first-byte deadline yet.
        assert_eq!(
            registry.sweep(t0 + 500 * MS, None, || true),
            Swept::default()
        );
        guard.sent();
        let sent = Instant::now();
        assert_eq!(
            registry.sweep(sent + 99 * MS, None, || true),
            Swept::default()
        );
        assert_eq!(
            registry.sweep(sent + 100 * MS, None, || true).timed_out,
            [1, 0, 0]
        );
        assert_eq!(guard.reason(), Some(AbortReason::FirstByte));
        assert_eq!(
            guard.reason().and_then(AbortReason::deadline_index),
            Some(0)
        );
    }

    #[test]
    fn a_steady_body_keeps_within_its_idle_budget_and_a_silent_one_does_not() {
        let (client, _server) = pair();
        let registry = Arc::new(AbortRegistry::default());
        let terms = Terms {
            first_byte: Some(Duration::from_secs(5)),
            body_idle: Some(50 * MS),
            ..Terms::default()
        };
        let t0 = Instant::now();
        let guard = registry
            .register(client.as_raw_fd(), t0, terms, true)
            .unwrap();
        guard.header().unwrap();
        // The idle deadline (earlier than the first-byte one) is what the registry waits for.
        let next = registry.next_due.load(Relaxed);
        assert!(Duration::from_nanos(next) < Duration::from_secs(1));
        let mut now = Instant::now();
        for _ in 0..5 {
            now += 40 * MS;
            // A piece arrived 40 ms after the last one: within 50 ms.
            guard
                .shared
                .progress
                .store(nanos(now.saturating_duration_since(t0)), Relaxed);
            assert_eq!(registry.sweep(now, None, || true), Swept::default());
        }
        assert_eq!(
            registry.sweep(now + 50 * MS, None, || true).timed_out,
            [0, 1, 0]
        );
        assert_eq!(guard.reason(), Some(AbortReason::BodyIdle));
    }

    #[test]
    fn the_whole_attempt_deadline_holds_in_any_phase_and_a_hedge_ends_its_rival() {
        let (client, _server) = pair();
        let registry = Arc::new(AbortRegistry::default());
        let terms = Terms {
            deadline: Some(200 * MS),
            body_idle: Some(Duration::from_secs(10)),
            ..Terms::default()
        };
        let t0 = Instant::now();
        let a = registry
            .register(client.as_raw_fd(), t0, terms, true)
            .unwrap();
        let b = registry
            .register(client.as_raw_fd(), t0, terms, true)
            .unwrap();
        a.header().unwrap();
        assert_eq!(
            registry.sweep(t0 + 199 * MS, None, || true),
            Swept::default()
        );
        // b's hedge answered first; an answered attempt cannot be ended that way.
        assert!(registry.end(b.id(), AbortReason::HedgeLost));
        assert!(!registry.end(a.id(), AbortReason::HedgeLost));
        assert_eq!(b.reason(), Some(AbortReason::HedgeLost));
        assert_eq!(
            registry.sweep(t0 + 200 * MS, None, || true).timed_out,
            [0, 0, 1]
        );
        assert_eq!(a.reason(), Some(AbortReason::Deadline));
        assert!(registry.is_empty());
    }
}
