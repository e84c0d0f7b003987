//! Error-feedback routing: which upstream node takes the next attempt of a request.
//!
//! Pure logic, no I/O: the proxy reports `start`/`finish` of every attempt, the clock is
//! injected, and `select` turns the current state into a weighted random choice among the nodes
//! this request has not tried yet.
//!
//! ## Feedback (the default)
//!
//! Each node carries three signals.
//!
//! * **Error score** `e`: +1 per failed attempt (capped at 3.6), ×0.8 per success, and halved
//!   every `decay_half_life` with no traffic at all. It enters as the health factor
//!   `h(e) = 1 / (1 + (e/0.9)^4)`: h(1) = 0.396, h(2) = 0.039, h(3.6) = 0.0039. With n = 8 a
//!   dead node's share after e failures is therefore at or under ServiceQ's for every e (0.054
//!   vs 0.067 after one failure, 0.00056 vs 0.0014 after 99), while the cap means that two
//!   half-lives of silence bring any node back to e = 0.9, h = 0.5: at least half its fair
//!   share, without needing a lucky request to succeed first.
//! * **Latency**: a peak EWMA of time-to-response-header on successful attempts (a slower
//!   sample replaces the estimate, a faster one pulls it down with a 300 ms time constant over
//!   elapsed time). Failures never feed it, so a node that refuses fast does not look fast.
//!   Without fresh samples, the excess of a node's estimate over its peers' mean fades with the
//!   same time constant, so a node that was slow (or whose stuck requests completed late after
//!   a hang) wins its traffic back through time alone.
//! * **Outstanding work**: attempts in flight, and the time of the node's last progress (a
//!   finish, or going from idle to busy). A node with k attempts in flight and no progress for
//!   max(250 µs, 4 × latency / k) (latency: the lower of its own estimate and the fastest
//!   node's), or while the other nodes finished max(8, 3 per node) attempts, is *stalled*:
//!   while any untried node is not, it gets no new
//!   attempts at all (its weight is scaled by 10⁻⁹). Every request sent to a hung node holds a
//!   client for a whole timeout, so the hang must cost as few requests as possible; a false
//!   alarm costs nothing but a brief shift of traffic, since the first completion clears it.
//!
//! Node i is chosen with probability proportional to
//! `configured_weight_i × h(e_i) / (latency_i × (inflight_i + 1))` (Finagle's and Linkerd's
//! "peak EWMA × pending" cost). A node without a latency sample yet is costed at the mean of
//! those that have one (1 ms if none). Retries choose among untried nodes by the same weights.
//! Nodes of weight 0 are taken only when no untried node of positive weight is left.
//!
//! ## Serviceq
//!
//! ServiceQ's formula, bit for bit: an integer counter per node (+1 per failure, 0 on any
//! success, no decay); first attempt with weight `ceil(Em / (1 + e_i))` where
//! `Em = max_i floor((1 + e_i)^1.5)`, multiplied by the configured weight; later attempts walk
//! round-robin from the first choice.
//!
//! ## Cost
//!
//! `select`, `start` and `finish` take no lock and allocate nothing: each node's state is a few
//! atomics on its own cache line (scores are packed with their timestamp and updated by CAS),
//! and the weighted draw computes each weight once into a stack buffer of running sums and
//! binary-searches the drawn point. Above 1024 nodes it makes two passes instead (sum, then walk
//! to the point); if a concurrent update shrinks the weights between them, the last eligible
//! node is taken.

pub mod budget;
mod clock;
mod node;
pub mod quantile;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

pub use crate::config::Algorithm;
pub use budget::{BudgetTerms, RetryBudget};
pub use clock::{Clock, ManualClock, SystemClock};
pub use node::{Outcome, SCORE_CAP};
pub use quantile::TtfbQuantile;

use node::NodeState;

/// Score scale at which the health factor is one half.
const HEALTH_KNEE: f64 = 0.9;
/// Minimum time without progress before a busy node counts as stalled (µs).
const STALL_FLOOR_US: f64 = 250.0;
/// A busy node is stalled after this many expected answer intervals without progress.
const STALL_FACTOR: f64 = 4.0;
/// Attempts the other nodes finish (at least) while a busy node finishes none before it counts
/// as stalled; scaled up to 3 per node for larger clusters.
const STALL_PEER_COMPLETIONS: u64 = 8;
/// Weight multiplier of a stalled node: chosen only when every alternative is stalled too.
const STALLED_PENALTY: f64 = 1e-9;
/// Latency assumed when no node has a sample yet (µs).
const DEFAULT_LATENCY_US: f64 = 1_000.0;
/// Above this many tried nodes, membership is looked up in a bitmap rather than the slice.
const TRIED_SCAN_MAX: usize = 8;
/// Nodes the tried-bitmap covers (bits); beyond it the slice is scanned.
const TRIED_BITMAP_WORDS: usize = 64;

/// The health factor `h(e) = 1 / (1 + (e/0.9)^4)` of the feedback algorithm, in (0, 1].
pub fn health_factor(score: f64) -> f64 {
    let x = score / HEALTH_KNEE;
    let x2 = x * x;
    1.0 / (1.0 + x2 * x2)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterSettings {
    pub algorithm: Algorithm,
    /// Time for a feedback error score to halve (0 = forget at once).
    pub decay_half_life: Duration,
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            algorithm: Algorithm::Feedback,
            decay_half_life: Duration::from_secs(10),
        }
    }
}

struct Slot {
    /// Shared with the router this one was reloaded from, so attempts started there still
    /// finish into the state this router sees.
    state: Arc<NodeState>,
    weight: u32,
}

/// Picks the node for each attempt; shared by all worker threads.
pub struct Router {
    slots: Vec<Slot>,
    settings: RouterSettings,
    inv_half_life_us: f64,
    clock: Arc<dyn Clock>,
    /// Attempts finished on any node (shared with routers built from this one on reload).
    completions: Arc<AtomicU64>,
    /// Its nodes are health-checked: one that fails its check is passed over while another
    /// is not.
    health_checked: bool,
}

// === impl Router ===

impl Router {
    pub fn new(weights: &[u32], settings: RouterSettings, clock: Arc<dyn Clock>) -> Router {
        let states = weights.iter().map(|_| Arc::new(NodeState::default()));
        Router::build(weights, states, settings, clock)
    }

    /// For config reload: node i continues old node `carry[i]` (scores, latency, in-flight)
    /// when that is `Some` and in range; other nodes start fresh. Carried nodes share their
    /// live state with `old`, so attempts started on `old` before the swap still finish into
    /// it. An old node carried twice is shared by the first and copied (without in-flight)
    /// into the others. `clock` must be `old`'s clock (or share its origin): the carried
    /// timestamps are on its time line.
    pub fn with_carried_state(
        weights: &[u32],
        settings: RouterSettings,
        clock: Arc<dyn Clock>,
        old: &Router,
        carry: &[Option<usize>],
    ) -> Router {
        let mut taken = vec![false; old.slots.len()];
        let states = (0..weights.len()).map(|i| {
            let from = carry.get(i).copied().flatten();
            match from.and_then(|j| old.slots.get(j).map(|s| (j, s))) {
                Some((j, slot)) if !taken[j] => {
                    taken[j] = true;
                    Arc::clone(&slot.state)
                }
                Some((_, slot)) => Arc::new(slot.state.snapshot()),
                None => Arc::new(NodeState::default()),
            }
        });
        let mut router = Router::build(weights, states, settings, clock);
        router.completions = Arc::clone(&old.completions);
        router
    }

    fn build(
        weights: &[u32],
        states: impl Iterator<Item = Arc<NodeState>>,
        settings: RouterSettings,
        clock: Arc<dyn Clock>,
    ) -> Router {
        let half_life_us = settings.decay_half_life.as_secs_f64() * 1e6;
        let slots = weights
            .iter()
            .zip(states)
            .map(|(&weight, state)| Slot { state, weight })
            .collect();
        Router {
            slots,
            settings,
            inv_half_life_us: 1.0 / half_life_us, // +inf for 0: any elapsed time forgets all
            clock,
            completions: Arc::new(AtomicU64::new(0)),
            health_checked: false,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn settings(&self) -> RouterSettings {
        self.settings
    }

    /// Configured weight of `node` (0 when out of range).
    pub fn weight(&self, node: usize) -> u32 {
        self.slots.get(node).map_or(0, |s| s.weight)
    }

    /// Node for the next attempt of one request, never one in `tried` (the nodes this request
    /// already tried, in order; empty for the first attempt). `rand` is uniform in [0,1).
    /// `None` when every node is tried.
    pub fn select(&self, tried: &[usize], rand: f64) -> Option<usize> {
        if self.health_checked && self.slots.iter().any(|s| s.state.is_down()) {
            // Nodes failing their health check count as tried, unless no other is left.
            let mut passed: smallvec::SmallVec<[usize; 8]> = tried.into();
            for (i, s) in self.slots.iter().enumerate() {
                if s.state.is_down() && !tried.contains(&i) {
                    passed.push(i);
                }
            }
            if passed.len() < self.slots.len() {
                return self.select_among(&passed, rand);
            }
        }
        self.select_among(tried, rand)
    }

    fn select_among(&self, tried: &[usize], rand: f64) -> Option<usize> {
        let rand = if rand.is_finite() {
            rand.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let tried = Tried::new(tried, self.slots.len());
        match self.settings.algorithm {
            Algorithm::Feedback => self.select_feedback(&tried, rand),
            Algorithm::Serviceq => match tried.first_in_order() {
                None => self.select_serviceq_first(rand),
                Some(first) => self.select_round_robin(&tried, first),
            },
        }
    }

    /// Turns the health-check rule on (see [`Router::select`]).
    pub fn set_health_checked(&mut self, on: bool) {
        self.health_checked = on;
    }

    /// Marks `node` as failing (`true`) or passing its health check; whether it changed.
    pub fn set_down(&self, node: usize, down: bool) -> bool {
        self.slots.get(node).is_some_and(|s| s.state.set_down(down))
    }

    pub fn is_down(&self, node: usize) -> bool {
        self.slots.get(node).is_some_and(|s| s.state.is_down())
    }

    /// An attempt was sent to `node` (in-flight +1). Out-of-range nodes are ignored.
    pub fn start(&self, node: usize) {
        if let Some(slot) = self.slots.get(node) {
            slot.state
                .start(|| self.clock.now_us(), self.completions.load(Relaxed));
        }
    }

    /// The attempt on `node` ended (in-flight -1) with this outcome after `elapsed` (time to
    /// response header, or to the failure). Out-of-range nodes are ignored.
    pub fn finish(&self, node: usize, outcome: Outcome, elapsed: Duration) {
        if let Some(slot) = self.slots.get(node) {
            let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
            let now = self.clock.now_us();
            let completions = self.completions.fetch_add(1, Relaxed) + 1;
            slot.state
                .finish(outcome, elapsed_us, now, self.inv_half_life_us, completions);
        }
    }

    /// weir abandoned the attempt on `node` after `elapsed` because the node stalled: a
    /// failure for its score and a latency sample of at least `elapsed`, but not progress, so
    /// that the node stays stalled (and its other stuck attempts abortable) until it really
    /// answers something.
    pub fn finish_stalled(&self, node: usize, elapsed: Duration) {
        if let Some(slot) = self.slots.get(node) {
            let now = self.clock.now_us();
            let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
            slot.state.abandon(elapsed_us, now, self.inv_half_life_us);
        }
    }

    /// How long `node` has gone without progress, when it counts as stalled now (attempts in
    /// flight and none finished for longer than its expected answer interval, or while its
    /// peers finished many); `None` otherwise. The same judgement that keeps new attempts off
    /// it, whatever the algorithm.
    pub fn stalled_for(&self, node: usize) -> Option<Duration> {
        let slot = self.slots.get(node)?;
        let mut pass = FeedbackPass::new(self);
        let latency = pass.latency_of(&slot.state);
        pass.stall_age(&slot.state, latency)
            .map(|us| Duration::from_micros(us as u64))
    }

    /// Whether weir should abort the attempts stuck on `node` that are at least `min_gap` old:
    /// a stricter judgement than the one that steers new attempts away (there a false alarm
    /// costs nothing; here it costs a duplicate attempt and a failure on a healthy node).
    /// All of:
    /// - the router judges the node stalled, and it has made no progress for `min_gap`;
    /// - its peers finished many attempts meanwhile (max(8, 3 per node)), or it has made no
    ///   progress for 4 × `min_gap` (a quiet gateway has no peers' answers to compare with);
    /// - another node of positive weight is neither stalled nor down (error rate < 0.5), so
    ///   the attempt that follows has somewhere to go.
    pub fn should_abort(&self, node: usize, min_gap: Duration) -> bool {
        let Some(slot) = self.slots.get(node) else {
            return false;
        };
        let Some(gap) = self.stalled_for(node) else {
            return false;
        };
        if gap < min_gap {
            return false;
        }
        let peers_done = self
            .completions
            .load(Relaxed)
            .saturating_sub(slot.state.progress_mark());
        if peers_done < self.stall_peers() && gap < min_gap * 4 {
            return false;
        }
        (0..self.slots.len()).any(|j| {
            j != node
                && self.slots[j].weight > 0
                && self.error_rate(j) < 0.5
                && self.stalled_for(j).is_none()
        })
    }

    /// Completions of the other nodes that make a silent node stalled whatever the clock says.
    fn stall_peers(&self) -> u64 {
        STALL_PEER_COMPLETIONS.max(3 * self.slots.len() as u64)
    }

    /// The attempt on `node` ended for a reason that is not the node's (the client went away, a
    /// stale pooled connection): in-flight -1, the score and latency are left alone.
    pub fn cancel(&self, node: usize) {
        if let Some(slot) = self.slots.get(node) {
            slot.state.cancel();
        }
    }

    /// Current error score: the decayed feedback score, or ServiceQ's failure counter.
    pub fn error_score(&self, node: usize) -> f64 {
        let Some(slot) = self.slots.get(node) else {
            return 0.0;
        };
        match self.settings.algorithm {
            Algorithm::Feedback => slot
                .state
                .score(|| self.clock.now_us(), self.inv_half_life_us),
            Algorithm::Serviceq => slot.state.sq_errors() as f64,
        }
    }

    /// 0..1 for metrics: 1 − the node's health factor. For serviceq the factor is
    /// `1 / (1 + e)`, the node's weight relative to a healthy one before rounding.
    pub fn error_rate(&self, node: usize) -> f64 {
        let score = self.error_score(node);
        match self.settings.algorithm {
            Algorithm::Feedback => 1.0 - health_factor(score),
            Algorithm::Serviceq => 1.0 - 1.0 / (1.0 + score),
        }
    }

    pub fn inflight(&self, node: usize) -> u32 {
        self.slots.get(node).map_or(0, |s| s.state.inflight())
    }

    /// Latency estimate of `node` (peak EWMA over successes), `None` before its first success.
    pub fn latency(&self, node: usize) -> Option<Duration> {
        let us = self.slots.get(node)?.state.latency_us()?;
        Some(Duration::from_secs_f64(us / 1e6))
    }

    /// The node's latency estimate as of its last answer: abandoned attempts (which raise the
    /// routing estimate) leave it alone, so an abort age derived from it cannot run away.
    pub fn answered_latency(&self, node: usize) -> Option<Duration> {
        let us = self.slots.get(node)?.state.answered_latency_us()?;
        Some(Duration::from_secs_f64(us / 1e6))
    }

    /// P(first attempt = node) now; sums to 1 (empty for an empty router).
    pub fn selection_probabilities(&self) -> Vec<f64> {
        let n = self.slots.len();
        let mut weights: Vec<f64> = match self.settings.algorithm {
            Algorithm::Feedback => {
                let mut ctx = FeedbackPass::new(self);
                (0..n).map(|i| ctx.weight(i)).collect()
            }
            Algorithm::Serviceq => {
                let em = self.serviceq_em();
                (0..n).map(|i| self.serviceq_weight(i, em)).collect()
            }
        };
        // Nodes failing their health check get no first attempt while another passes.
        let down = |i: usize| self.health_checked && self.slots[i].state.is_down();
        if (0..n).any(down) && !(0..n).all(down) {
            for (i, w) in weights.iter_mut().enumerate() {
                if down(i) {
                    *w = 0.0;
                }
            }
        }
        let sum: f64 = weights.iter().sum();
        if sum > 0.0 && sum.is_finite() {
            weights.iter().map(|w| w / sum).collect()
        } else {
            vec![1.0 / n as f64; n]
        }
    }

    // --- feedback ---

    fn select_feedback(&self, tried: &Tried, rand: f64) -> Option<usize> {
        let mut ctx = FeedbackPass::new(self);
        weighted_draw(self.slots.len(), tried, rand, |i| ctx.weight(i))
    }

    // --- serviceq ---

    /// `max_i floor((1 + e_i)^1.5)`, computed exactly in integers.
    fn serviceq_em(&self) -> u64 {
        let e_max = self
            .slots
            .iter()
            .map(|s| s.state.sq_errors())
            .max()
            .unwrap_or(0);
        floor_pow_1_5(e_max)
    }

    /// `ceil(Em / (1 + e_i)) × weight_i`: exact integers while the product stays under 2^53
    /// (Em < 2^21, i.e. e < 16,000 failures at weight ≤ 2^32), rounded beyond.
    fn serviceq_weight(&self, node: usize, em: u64) -> f64 {
        let Some(slot) = self.slots.get(node) else {
            return 0.0;
        };
        let base = 1 + slot.state.sq_errors().min(SQ_ERRORS_MAX);
        em.div_ceil(base) as f64 * f64::from(slot.weight)
    }

    fn select_serviceq_first(&self, rand: f64) -> Option<usize> {
        let em = self.serviceq_em();
        weighted_draw(self.slots.len(), &Tried::none(), rand, |i| {
            self.serviceq_weight(i, em)
        })
    }

    /// ServiceQ's retry order: attempt k goes to `(first + k) % n`, skipping tried nodes.
    fn select_round_robin(&self, tried: &Tried, first: usize) -> Option<usize> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let start = first % n + tried.len() % n;
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| !tried.contains(i))
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for i in 0..self.slots.len() {
            list.entry(&format_args!(
                "node {i}: weight {} score {:.4} inflight {} latency {:?}",
                self.weight(i),
                self.error_score(i),
                self.inflight(i),
                self.latency(i)
            ));
        }
        list.finish()?;
        write!(f, " {:?}", self.settings)
    }
}

/// ServiceQ counters beyond this are treated as this (keeps `(1+e)^1.5` inside u64).
const SQ_ERRORS_MAX: u64 = 1 << 40;

/// `floor((1 + e)^1.5)` = `isqrt((1 + e)^3)`, exact where floating point might round across an
/// integer.
fn floor_pow_1_5(e: u64) -> u64 {
    let base = 1 + u128::from(e.min(SQ_ERRORS_MAX));
    // ≤ 2^60.
    u64::try_from((base * base * base).isqrt()).unwrap_or(u64::MAX)
}

// === weighted draw ===

/// Picks an untried node with probability proportional to `weight`, the draw point being
/// `rand × Σ weight`. Nodes of weight 0 are taken only when every untried weight is 0 (then
/// uniformly). Up to 1024 nodes the weights are computed once into a stack buffer and the point
/// found by binary search; beyond that, two passes recompute them.
fn weighted_draw(
    n: usize,
    tried: &Tried,
    rand: f64,
    weight: impl FnMut(usize) -> f64,
) -> Option<usize> {
    if n <= 8 {
        draw_buffered::<8>(n, tried, rand, weight)
    } else if n <= 64 {
        draw_buffered::<64>(n, tried, rand, weight)
    } else if n <= 1024 {
        draw_buffered::<1024>(n, tried, rand, weight)
    } else {
        draw_two_pass(n, tried, rand, weight)
    }
}

fn draw_buffered<const N: usize>(
    n: usize,
    tried: &Tried,
    rand: f64,
    mut weight: impl FnMut(usize) -> f64,
) -> Option<usize> {
    let mut cumulative = [0.0f64; N];
    let cumulative = &mut cumulative[..n.min(N)];
    let mut sum = 0.0;
    let mut eligible = 0usize;
    for (i, c) in cumulative.iter_mut().enumerate() {
        if !tried.contains(i) {
            eligible += 1;
            sum += weight(i);
        }
        *c = sum;
    }
    if eligible == 0 {
        return None;
    }
    if !(sum > 0.0 && sum.is_finite()) {
        return nth_untried(n, tried, (rand * eligible as f64) as usize);
    }
    // Tried and zero-weight nodes add nothing, so the first sum above the point is an untried
    // node of positive weight; at the very top (rand = 1) take the last such node.
    let point = rand * sum;
    let above = cumulative.partition_point(|&c| c <= point);
    if above < cumulative.len() {
        Some(above)
    } else {
        Some(cumulative.partition_point(|&c| c < sum))
    }
}

fn draw_two_pass(
    n: usize,
    tried: &Tried,
    rand: f64,
    mut weight: impl FnMut(usize) -> f64,
) -> Option<usize> {
    let mut sum = 0.0;
    let mut eligible = 0usize;
    for i in (0..n).filter(|&i| !tried.contains(i)) {
        eligible += 1;
        sum += weight(i);
    }
    if eligible == 0 {
        return None;
    }
    if !(sum > 0.0 && sum.is_finite()) {
        return nth_untried(n, tried, (rand * eligible as f64) as usize);
    }
    let point = rand * sum;
    let mut acc = 0.0;
    let mut last = None;
    for i in (0..n).filter(|&i| !tried.contains(i)) {
        let w = weight(i);
        if w > 0.0 {
            acc += w;
            last = Some(i);
            if acc > point {
                return Some(i);
            }
        }
    }
    // Weights shrank between the passes (or every weight is now 0).
    last.or_else(|| nth_untried(n, tried, 0))
}

/// The `k`-th untried node, or the last one when fewer are left.
fn nth_untried(n: usize, tried: &Tried, k: usize) -> Option<usize> {
    let untried = (0..n).filter(|&i| !tried.contains(i));
    let mut last = None;
    for (seen, i) in untried.enumerate() {
        if seen == k {
            return Some(i);
        }
        last = Some(i);
    }
    last
}

/// State shared by the passes of one feedback selection, so that both see the same clock
/// reading and mean latency; each is computed only if some node needs it.
struct FeedbackPass<'a> {
    router: &'a Router,
    now: Option<u64>,
    mean_latency: Option<f64>,
    min_latency: Option<f64>,
}

impl<'a> FeedbackPass<'a> {
    fn new(router: &'a Router) -> Self {
        FeedbackPass {
            router,
            now: None,
            mean_latency: None,
            min_latency: None,
        }
    }

    fn now(&mut self) -> u64 {
        *self.now.get_or_insert_with(|| self.router.clock.now_us())
    }

    fn min_latency(&mut self) -> f64 {
        let slots = &self.router.slots;
        *self.min_latency.get_or_insert_with(|| {
            slots
                .iter()
                .filter_map(|s| s.state.latency_us())
                .fold(f64::INFINITY, f64::min)
        })
    }

    fn mean_latency(&mut self) -> f64 {
        let slots = &self.router.slots;
        *self.mean_latency.get_or_insert_with(|| {
            let (sum, count) = slots
                .iter()
                .filter_map(|s| s.state.latency_us())
                .fold((0.0, 0u32), |(sum, count), l| (sum + l, count + 1));
            if count == 0 {
                DEFAULT_LATENCY_US
            } else {
                sum / f64::from(count)
            }
        })
    }

    /// The node's latency estimate (µs), its excess over the fastest node faded while no
    /// sample refreshes it; the mean of the others without a sample of its own.
    fn latency_of(&mut self, state: &NodeState) -> f64 {
        match state.latency_us() {
            Some(l) => {
                let best = self.min_latency();
                if l > best {
                    // The excess over the fastest node fades while no sample refreshes it.
                    let idle = self.now().saturating_sub(state.last_sample_us()) as f64;
                    best + (l - best) * (-idle / node::LATENCY_DECAY_US).exp()
                } else {
                    l
                }
            }
            None => self.mean_latency(),
        }
    }

    /// The time without progress (µs) of a busy node that counts as stalled; `None` when it
    /// is idle or not stalled.
    fn stall_age(&mut self, state: &NodeState, latency: f64) -> Option<f64> {
        let inflight = state.inflight();
        if inflight == 0 {
            return None;
        }
        // A healthy node with `inflight` attempts answers one about every
        // latency / inflight; measured against the fastest node's latency (its own peak
        // estimate includes queueing), so piling-up requests are noticed sooner.
        let router = self.router;
        let reference = latency.min(self.min_latency());
        let threshold = STALL_FLOOR_US.max(STALL_FACTOR * reference / f64::from(inflight));
        let age = self.now().saturating_sub(state.last_progress_us()) as f64;
        // Or: its peers finished many attempts meanwhile and it finished none, whatever
        // the clock says (this holds when weir itself is the bottleneck, too).
        let peers_done = router
            .completions
            .load(Relaxed)
            .saturating_sub(state.progress_mark());
        let stall_peers = router.stall_peers();
        (age > threshold || (age > STALL_FLOOR_US && peers_done >= stall_peers)).then_some(age)
    }

    /// `weight × h(e) / (latency × (inflight + 1))`; the spec's `min_cost / cost` form differs
    /// only by a factor common to all nodes, which the draw normalises away.
    fn weight(&mut self, node: usize) -> f64 {
        let router = self.router;
        let Some(slot) = router.slots.get(node) else {
            return 0.0;
        };
        if slot.weight == 0 {
            return 0.0;
        }
        let state = &*slot.state;
        let score = state.score(|| self.now(), router.inv_half_life_us);
        let inflight = state.inflight();
        let mut latency = self.latency_of(state);
        let mut penalty = 1.0;
        if let Some(age) = self.stall_age(state, latency) {
            latency = latency.max(age);
            penalty = STALLED_PENALTY;
        }
        penalty * f64::from(slot.weight) * health_factor(score)
            / (latency * (f64::from(inflight) + 1.0))
    }
}

/// The nodes one request has tried: the slice itself while short, a bitmap on the stack when
/// long (so long retry chains over many nodes stay linear).
struct Tried<'a> {
    list: &'a [usize],
    bitmap: Option<[u64; TRIED_BITMAP_WORDS]>,
}

impl<'a> Tried<'a> {
    fn new(list: &'a [usize], nodes: usize) -> Self {
        let bitmap = (list.len() > TRIED_SCAN_MAX && nodes <= TRIED_BITMAP_WORDS * 64).then(|| {
            let mut bits = [0u64; TRIED_BITMAP_WORDS];
            for &i in list.iter().filter(|&&i| i < nodes) {
                bits[i / 64] |= 1 << (i % 64);
            }
            bits
        });
        Tried { list, bitmap }
    }

    fn none() -> Tried<'static> {
        Tried {
            list: &[],
            bitmap: None,
        }
    }

    fn contains(&self, node: usize) -> bool {
        match &self.bitmap {
            Some(bits) => bits[node / 64] & (1 << (node % 64)) != 0,
            None => self.list.contains(&node),
        }
    }

    fn len(&self) -> usize {
        self.list.len()
    }

    fn first_in_order(&self) -> Option<usize> {
        self.list.first().copied()
    }
}
