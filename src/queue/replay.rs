//! Replay: delivers a queue's entries in order once a node answers again.
//!
//! - **Order.** Entries are taken in queue order and dispatched in that order; an entry whose
//!   delivery failed goes back in front of everything taken after it. With
//!   `replay_concurrency: 1` (the default) the head is delivered before anything behind it is
//!   even sent.
//! - **Backoff while down.** A failed delivery (every node it was allowed to try failed) closes
//!   the gate for an exponentially growing, jittered delay (100 ms doubling to 5 s): a dead
//!   cluster sees a handful of attempts per minute, not a hot loop. Live traffic reaching a node
//!   opens the gate early (at most once a second).
//! - **Paced drain.** Once deliveries succeed they are spaced `1 / replay_rate` apart, with at
//!   most `replay_concurrency` in flight, so a returning node is not flattened by the backlog.
//! - **Expiry.** An entry older than `ttl`, one that failed `max_attempts` times, or one that
//!   failed after it may have reached a node while it is not replay-safe, goes to the dead
//!   letters. Every outcome is logged with the queue id.
//! - **Shutdown.** On the shutdown signal the replay goes on for the grace period, then stops
//!   and reports (log + metric) every entry left.
//!
//! Time comes from tokio's clock, so tests run with paused time and no sleeps.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use super::{Queue, QueuedRequest, ReplayResult};

/// First backoff delay after a failed delivery.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest backoff delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// The replay stops this long before the grace period ends, so that its report is written
/// before Pingora shuts the runtimes down.
const REPORT_MARGIN: Duration = Duration::from_millis(200);
/// How often a successor looks whether its predecessor released its queue log.
const ADOPT_POLL: Duration = Duration::from_millis(100);
/// Live traffic may cut a backoff short at most this often.
const RECOVERY_PROBE_EVERY: Duration = Duration::from_secs(1);

/// How one delivery (possibly several nodes) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// A node answered with a status that is not a failure status.
    Delivered { status: u16, node: String },
    /// Every node the delivery could try failed. `sent`: the request may have reached a node.
    Failed { error: String, sent: bool },
}

/// Sends one queued request through the gateway's routing.
#[async_trait]
pub trait Deliver: Send + Sync + 'static {
    async fn deliver(&self, req: &QueuedRequest) -> Delivery;
}

/// The queue's replay settings, read afresh before every dispatch (reloads apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplaySettings {
    /// Deliveries per second during a drain (0 = unpaced).
    pub rate: u32,
    pub concurrency: usize,
    /// 0 = unlimited.
    pub max_attempts: u32,
    pub ttl: Duration,
    pub replay_unsafe: bool,
    /// How long to keep replaying after the shutdown signal.
    pub grace: Duration,
}

/// Exponential backoff with jitter: the n-th delay is drawn from [d/2, d] with
/// d = min(cap, base * 2^n).
pub struct Backoff {
    failures: u32,
    base: Duration,
    cap: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, rng: fastrand::Rng) -> Backoff {
        Backoff {
            failures: 0,
            base,
            cap,
            rng,
        }
    }

    /// The delay after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32 << self.failures.min(16);
        self.failures = self.failures.saturating_add(1);
        let ceiling = self.base.saturating_mul(factor).min(self.cap);
        ceiling.mul_f64(0.5 + 0.5 * self.rng.f64())
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Spaces dispatches `1 / rate` apart (no burst).
pub struct Pacer {
    next: Option<Instant>,
}

impl Pacer {
    pub fn new() -> Pacer {
        Pacer { next: None }
    }

    /// `Ok` when a dispatch may happen now (and books it), else the instant it may.
    pub fn try_acquire(&mut self, now: Instant, rate: u32) -> Result<(), Instant> {
        if rate == 0 {
            return Ok(());
        }
        let interval = Duration::from_secs(1) / rate;
        match self.next {
            Some(at) if now < at => Err(at),
            _ => {
                self.next = Some(now + interval);
                Ok(())
            }
        }
    }
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer::new()
    }
}

/// The replay of one queue.
pub struct Replay<D: Deliver> {
    pub queue: Arc<Queue>,
    pub deliver: Arc<D>,
    pub settings: Arc<dyn Fn() -> ReplaySettings + Send + Sync>,
    /// Where a successor process (zero-downtime upgrade) takes the queue over at shutdown.
    pub handover: Option<std::path::PathBuf>,
}

/// An entry taken from the queue, with its position for re-insertion.
#[derive(Clone)]
struct Taken {
    order: u64,
    req: QueuedRequest,
}

impl<D: Deliver> Replay<D> {
    /// Runs until the shutdown signal plus the grace period; then reports what is left.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>, rng: fastrand::Rng) {
        super::mark_serving();
        if let Some(r) = self.queue.redis() {
            r.start();
        }
        let queue = &self.queue;
        let label = queue.kind.label();
        let mut waiting: VecDeque<Taken> = VecDeque::new();
        let mut inflight: JoinSet<(Taken, Delivery)> = JoinSet::new();
        // A copy of each entry in flight, so that a delivery task that dies still gives its
        // entry back (as a failed attempt) instead of losing it.
        let mut in_delivery: HashMap<tokio::task::Id, Taken> = HashMap::new();
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP, rng);
        let mut gate: Option<Instant> = None;
        let mut last_probe: Option<Instant> = None;
        let mut pacer = Pacer::new();
        let mut order = 0u64;
        let mut stop_at: Option<Instant> = None;
        let mut revocations = queue.revocations();
        // Shutting down with a successor waiting: no new deliveries until the queue is handed
        // over (after the ones in flight finish, so nothing is both delivered and handed over).
        let mut handing_over = false;
        let mut successor = false;
        if *shutdown.borrow() {
            stop_at = Some(Instant::now() + (self.settings)().grace.saturating_sub(REPORT_MARGIN));
        }
        // A successor whose predecessor still holds its queue log: nothing is delivered until
        // the predecessor exits and its entries (older than ours) are adopted, for at most the
        // hand-over window.
        let mut adopting = !queue.adopt_exited().await;
        let adopt_until = Instant::now() + super::handover::WINDOW;
        if adopting {
            log::info!(
                "queue={label} waiting for the previous process to release its queue log \
                 before delivering"
            );
        }

        loop {
            let s = (self.settings)();
            let now = Instant::now();
            if stop_at.is_some_and(|t| now >= t) {
                break;
            }
            let concurrency = s.concurrency.max(1);
            if handing_over && inflight.is_empty() && queue.is_durable() {
                // A durable queue stays where it is: the successor adopts the log once this
                // process exits. Nothing more is delivered from here.
                queue.sync().await;
                log::warn!(
                    "queue={label} stopped delivering for the successor: {} queued requests \
                     stay in the queue's {} for it",
                    queue.len(),
                    if queue.redis().is_some() {
                        "Redis stream"
                    } else {
                        "log"
                    }
                );
                break;
            }
            if handing_over && inflight.is_empty() {
                handing_over = false;
                // Every entry `waiting` holds is in the queue's held list, which the
                // hand-over drains.
                waiting.clear();
                successor = self.hand_over().await;
                continue;
            }
            // A shared queue whose lease was lost: what was read here stays in the stream for
            // the next holder.
            let lost = queue.revocations();
            if lost != revocations {
                revocations = lost;
                for t in waiting.drain(..) {
                    queue.forget(t.req.id);
                }
            }
            let holding = (adopting && now < adopt_until) || !queue.may_deliver();
            // Take eagerly: the held head is what `oldest_age` and the admin view show.
            while !handing_over && !holding && waiting.len() + inflight.len() < concurrency {
                let Some(req) = queue.take() else { break };
                order += 1;
                waiting.push_back(Taken { order, req });
            }
            // Expiry before anything is sent again.
            waiting.retain(|t| {
                let expired = now.saturating_duration_since(t.req.enqueued) >= s.ttl;
                let exhausted = s.max_attempts > 0 && t.req.attempts >= s.max_attempts;
                if expired {
                    queue.dead_letter(&t.req, "ttl");
                } else if exhausted {
                    queue.dead_letter(&t.req, "max_attempts");
                }
                !(expired || exhausted)
            });
            let mut wake_at: Option<Instant> = waiting.iter().map(|t| t.req.enqueued + s.ttl).min();
            match gate {
                _ if handing_over || !queue.may_deliver() => {}
                Some(at) if now < at => wake_at = earliest(wake_at, at),
                _ => {
                    gate = None;
                    while inflight.len() < concurrency && !waiting.is_empty() {
                        if let Err(at) = pacer.try_acquire(now, s.rate) {
                            wake_at = earliest(wake_at, at);
                            break;
                        }
                        let Some(taken) = waiting.pop_front() else {
                            break;
                        };
                        let deliver = self.deliver.clone();
                        let copy = taken.clone();
                        let handle = inflight.spawn(async move {
                            let d = deliver.deliver(&taken.req).await;
                            (taken, d)
                        });
                        in_delivery.insert(handle.id(), copy);
                    }
                }
            }
            if stop_at.is_some() && waiting.is_empty() && inflight.is_empty() && queue.is_empty() {
                break;
            }

            tokio::select! {
                Some(done) = inflight.join_next_with_id(), if !inflight.is_empty() => {
                    let (mut taken, delivery) = match done {
                        Ok((id, result)) => {
                            in_delivery.remove(&id);
                            result
                        }
                        Err(e) => {
                            let Some(taken) = in_delivery.remove(&e.id()) else { continue };
                            let error = format!("delivery task failed: {e}");
                            (taken, Delivery::Failed { error, sent: true })
                        }
                    };
                    match delivery {
                        Delivery::Delivered { status, node } => {
                            log::info!(
                                "queue={label} id={} {} {} delivered to {node}: status {status} \
                                 (attempt {})",
                                taken.req.id,
                                taken.req.method,
                                String::from_utf8_lossy(&taken.req.target),
                                taken.req.attempts + 1
                            );
                            queue.count(ReplayResult::Delivered);
                            queue.finish(taken.req.id);
                            backoff.reset();
                        }
                        Delivery::Failed { error, sent } => {
                            taken.req.attempts += 1;
                            log::warn!(
                                "queue={label} id={} {} {} delivery attempt {} failed: {error}",
                                taken.req.id,
                                taken.req.method,
                                String::from_utf8_lossy(&taken.req.target),
                                taken.req.attempts
                            );
                            taken.req.last_error = Some(error.into_boxed_str());
                            queue.count(ReplayResult::FailedAttempt);
                            queue.update(&taken.req);
                            if sent && !(taken.req.replay_safe || s.replay_unsafe) {
                                queue.dead_letter(&taken.req, "not_replay_safe");
                            } else {
                                let pos = waiting
                                    .iter()
                                    .position(|t| t.order > taken.order)
                                    .unwrap_or(waiting.len());
                                waiting.insert(pos, taken);
                                let delay = backoff.next_delay();
                                gate = Some(Instant::now() + delay);
                            }
                        }
                    }
                }
                _ = queue.wake.notified() => {
                    if queue.take_recovery() && gate.is_some() {
                        let now = Instant::now();
                        if last_probe.is_none_or(|t| now >= t + RECOVERY_PROBE_EVERY) {
                            last_probe = Some(now);
                            gate = None;
                        }
                    }
                }
                _ = sleep_until(wake_at.unwrap_or(now)), if wake_at.is_some() => {}
                _ = shutdown.changed(), if stop_at.is_none() => {
                    let grace = s.grace;
                    log::info!(
                        "queue={label} shutting down: replaying for up to {grace:?} more ({} queued)",
                        queue.len()
                    );
                    stop_at = Some(Instant::now() + grace.saturating_sub(REPORT_MARGIN));
                    handing_over = self.handover.as_deref().is_some_and(|p| p.exists())
                        && !queue.receiving_handover.load(std::sync::atomic::Ordering::Acquire);
                }
                _ = sleep_until(stop_at.unwrap_or(now)), if stop_at.is_some() => break,
                _ = tokio::time::sleep(ADOPT_POLL), if adopting => {
                    adopting = !queue.adopt_exited().await;
                }
            }
        }
        // Deliveries still in flight are abandoned; their entries stay held and are reported.
        inflight.abort_all();
        while inflight.join_next().await.is_some() {}
        if successor && !queue.is_empty() {
            // Requests buffered by this process during its grace period follow the others.
            self.hand_over().await;
        }
        queue.sync().await;
        queue.close().await;
        queue.report_remaining();
    }

    /// Gives every queued request to the successor; on any failure they are put back, in
    /// order, and this process goes on as if there were no successor. True when handed over.
    async fn hand_over(&self) -> bool {
        let Some(path) = self.handover.as_deref() else {
            return false;
        };
        let queue = &self.queue;
        let label = queue.kind.label();
        let entries = queue.drain();
        match super::handover::offer(path, queue.kind, &entries).await {
            Ok(n) => {
                log::warn!("queue={label} handed {n} queued requests over to the successor");
                true
            }
            Err(e) => {
                log::warn!(
                    "queue={label} no hand-over ({e}); keeping {} requests",
                    entries.len()
                );
                queue.put_back(entries);
                false
            }
        }
    }
}

fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::queue::tests::request;
    use crate::queue::QueueKind;
    use std::sync::Mutex;

    /// A cluster that is down until `up_at` (paused tokio time) and records what it got.
    struct FakeCluster {
        up_at: Instant,
        /// (target, when) of every attempt.
        attempts: Mutex<Vec<(String, Instant)>>,
        /// Targets delivered, in order.
        delivered: Mutex<Vec<String>>,
        latency: Duration,
        sent_on_failure: bool,
    }

    impl FakeCluster {
        fn new(up_after: Duration) -> Arc<FakeCluster> {
            Arc::new(FakeCluster {
                up_at: Instant::now() + up_after,
                attempts: Mutex::new(Vec::new()),
                delivered: Mutex::new(Vec::new()),
                latency: Duration::from_millis(1),
                sent_on_failure: false,
            })
        }
    }

    #[async_trait]
    impl Deliver for FakeCluster {
        async fn deliver(&self, req: &QueuedRequest) -> Delivery {
            let target = String::from_utf8_lossy(&req.target).into_owned();
            self.attempts
                .lock()
                .unwrap()
                .push((target.clone(), Instant::now()));
            tokio::time::sleep(self.latency).await;
            if Instant::now() >= self.up_at {
                self.delivered.lock().unwrap().push(target);
                Delivery::Delivered {
                    status: 200,
                    node: "fake".into(),
                }
            } else {
                Delivery::Failed {
                    error: "connect refused".into(),
                    sent: self.sent_on_failure,
                }
            }
        }
    }

    fn settings(rate: u32, concurrency: usize) -> ReplaySettings {
        ReplaySettings {
            rate,
            concurrency,
            max_attempts: 0,
            ttl: Duration::from_secs(24 * 3600),
            replay_unsafe: false,
            grace: Duration::from_secs(5),
        }
    }

    struct Harness {
        queue: Arc<Queue>,
        shutdown: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(cluster: Arc<FakeCluster>, s: ReplaySettings, capacity: usize) -> Harness {
        let metrics = Metrics::new();
        let queue = Arc::new(Queue::memory(
            QueueKind::Deferred,
            capacity,
            1 << 30,
            &metrics,
        ));
        let (tx, rx) = watch::channel(false);
        let replay = Replay {
            queue: queue.clone(),
            deliver: cluster,
            settings: Arc::new(move || s),
            handover: None,
        };
        let task = tokio::spawn(async move { replay.run(rx, fastrand::Rng::with_seed(1)).await });
        Harness {
            queue,
            shutdown: tx,
            task,
        }
    }

    fn push(q: &Queue, method: &str, target: &str) {
        q.put_back(vec![request(q, method, target)]);
    }

    #[tokio::test(start_paused = true)]
    async fn head_is_delivered_before_anything_behind_it_after_an_outage() {
        let cluster = FakeCluster::new(Duration::from_secs(3));
        let h = start(cluster.clone(), settings(200, 1), 16);
        push(&h.queue, "POST", "/1");
        push(&h.queue, "PUT", "/2");
        push(&h.queue, "DELETE", "/3");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(*cluster.delivered.lock().unwrap(), ["/1", "/2", "/3"]);
        // While down only the head was tried.
        let attempts = cluster.attempts.lock().unwrap().clone();
        let before_up: Vec<&str> = attempts
            .iter()
            .filter(|(_, at)| *at < cluster.up_at)
            .map(|(t, _)| t.as_str())
            .collect();
        assert!(before_up.iter().all(|t| *t == "/1"), "{before_up:?}");
        assert_eq!(h.queue.len(), 0);
        drop(h.shutdown);
        let _ = h.task.await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_cluster_gets_few_attempts_with_growing_gaps() {
        let cluster = FakeCluster::new(Duration::from_secs(3600));
        let h = start(cluster.clone(), settings(200, 1), 16);
        push(&h.queue, "POST", "/1");
        tokio::time::sleep(Duration::from_secs(60)).await;
        let attempts = cluster.attempts.lock().unwrap().clone();
        // 100ms doubling to a 5s cap (jitter halves at most): ~ 6 + 55/5..55/2.5 attempts.
        assert!(
            (8..=30).contains(&attempts.len()),
            "{} attempts in 60 s",
            attempts.len()
        );
        let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1].1 - w[0].1).collect();
        assert!(gaps
            .iter()
            .all(|g| *g <= BACKOFF_CAP + Duration::from_millis(2)));
        assert!(gaps.last().is_some_and(|g| *g >= BACKOFF_CAP / 2));
        h.task.abort();
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(BACKOFF_BASE, BACKOFF_CAP, fastrand::Rng::with_seed(3));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        for (n, d) in delays.iter().enumerate() {
            let ceiling = (BACKOFF_BASE * (1 << n)).min(BACKOFF_CAP);
            assert!(*d >= ceiling / 2 && *d <= ceiling, "delay {n}: {d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= BACKOFF_BASE);
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_is_paced_at_the_replay_rate() {
        let cluster = FakeCluster::new(Duration::ZERO);
        let h = start(cluster.clone(), settings(10, 4), 64);
        let t0 = Instant::now();
        for i in 0..20 {
            push(&h.queue, "POST", &format!("/{i}"));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let attempts = cluster.attempts.lock().unwrap().clone();
        assert_eq!(attempts.len(), 20);
        // 10/s: the 20th dispatch is ~1.9 s after the first, never earlier.
        let last = attempts.last().map(|(_, at)| *at - t0).unwrap_or_default();
        assert!(
            last >= Duration::from_millis(1900) && last < Duration::from_millis(2100),
            "{last:?}"
        );
        let delivered = cluster.delivered.lock().unwrap().clone();
        let expected: Vec<String> = (0..20).map(|i| format!("/{i}")).collect();
        assert_eq!(delivered, expected, "dispatched in queue order");
        h.task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_moves_the_head_to_the_dead_letters() {
        let cluster = FakeCluster::new(Duration::from_secs(3600));
        let mut s = settings(200, 1);
        s.ttl = Duration::from_secs(2);
        let h = start(cluster.clone(), s, 16);
        push(&h.queue, "POST", "/old");
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let dead = h.queue.dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].target.as_str(), dead[0].reason), ("/old", "ttl"));
        assert!(dead[0].attempts >= 2);
        assert_eq!(h.queue.len(), 0);
        h.task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn max_attempts_dead_letters_and_the_next_entry_moves_up() {
        let cluster = FakeCluster::new(Duration::from_secs(3600));
        let mut s = settings(200, 1);
        s.max_attempts = 3;
        let h = start(cluster.clone(), s, 16);
        push(&h.queue, "POST", "/a");
        push(&h.queue, "POST", "/b");
        tokio::time::sleep(Duration::from_secs(30)).await;
        let dead: Vec<(String, u32)> = h
            .queue
            .dead_letters()
            .into_iter()
            .map(|d| (d.target, d.attempts))
            .collect();
        assert_eq!(dead, [("/a".to_string(), 3), ("/b".to_string(), 3)]);
        h.task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_may_have_been_processed_is_not_sent_twice() {
        let mut c = FakeCluster::new(Duration::from_secs(3600));
        Arc::get_mut(&mut c).expect("unique").sent_on_failure = true;
        let h = start(c.clone(), settings(200, 1), 16);
        push(&h.queue, "POST", "/once");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(c.attempts.lock().unwrap().len(), 1);
        assert_eq!(h.queue.dead_letters()[0].reason, "not_replay_safe");
        h.task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_keeps_replaying_for_the_grace_period_then_reports_the_rest() {
        let cluster = FakeCluster::new(Duration::from_secs(2));
        let h = start(cluster.clone(), settings(1, 1), 16);
        for i in 0..10 {
            push(&h.queue, "POST", &format!("/{i}"));
        }
        h.shutdown.send_replace(true);
        let started = Instant::now();
        let _ = h.task.await;
        let took = Instant::now() - started;
        assert!(
            // The grace period less the margin left for the report.
            took == Duration::from_secs(5) - REPORT_MARGIN,
            "{took:?}"
        );
        let delivered = cluster.delivered.lock().unwrap().len();
        assert!(
            (2..=4).contains(&delivered),
            "{delivered} delivered in the grace period"
        );
        // Reported, and left in place (a durable log keeps them for the next start).
        assert_eq!(h.queue.len(), 10 - delivered);
    }
}
