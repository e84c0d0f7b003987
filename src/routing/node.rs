//! One upstream node's live routing state: a handful of atomics on its own cache line.
//!
//! Every field is updated with single atomic operations or short CAS loops, so the request
//! path never takes a lock and never allocates. Ordering is `Relaxed` throughout: these are
//! statistics, nothing else is published through them.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Highest error score the feedback algorithm keeps (see the module essay for why 3.6).
pub const SCORE_CAP: f64 = 3.6;
/// Fraction of the score a success keeps.
pub const SUCCESS_KEEP: f64 = 0.8;
/// Time constant with which the latency estimate follows samples below it (µs).
pub const LATENCY_DECAY_US: f64 = 300_000.0;

// The feedback score is packed with the time it was last written, so that decay and update
// happen in one CAS: low 16 bits = score in units of 1/2^14 (max 3.99994 ≥ SCORE_CAP), high
// 48 bits = microseconds (8.9 years; saturates, after which the score stops decaying).
const SCORE_BITS: u32 = 16;
const SCORE_MASK: u64 = (1 << SCORE_BITS) - 1;
const SCORE_UNIT: f64 = (1u64 << 14) as f64;
const STAMP_MAX: u64 = (1 << (64 - SCORE_BITS)) - 1;

fn unpack(packed: u64) -> (u64, u64) {
    (packed >> SCORE_BITS, packed & SCORE_MASK)
}

fn pack(stamp: u64, fixed: u64) -> u64 {
    (stamp.min(STAMP_MAX) << SCORE_BITS) | (fixed & SCORE_MASK)
}

/// Rounds down, so that repeated decay always reaches exactly 0.
fn to_fixed(score: f64) -> u64 {
    let clamped = score.clamp(0.0, SCORE_CAP);
    (clamped * SCORE_UNIT) as u64
}

/// Multiplier for a score after `dt_us` with the given `1 / half-life`.
pub fn decay_factor(dt_us: u64, inv_half_life_us: f64) -> f64 {
    if dt_us == 0 {
        1.0
    } else {
        (-(dt_us as f64) * inv_half_life_us).exp2()
    }
}

/// How one attempt on a node ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response header arrived with a status not counted as a failure.
    Success,
    /// Connect error, timeout, reset, or a status counted as a failure.
    Failure,
}

/// Live state of one node. Aligned to a cache line so that workers updating different nodes
/// do not contend.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct NodeState {
    /// Feedback error score, packed with its write time (see `pack`).
    score: AtomicU64,
    /// ServiceQ's counter: failures since the last success.
    sq_errors: AtomicU64,
    /// Peak-EWMA latency estimate in µs as `f64` bits; 0 = no sample yet.
    latency: AtomicU64,
    /// When the latency estimate last took a sample (µs).
    last_sample: AtomicU64,
    /// The latency estimate as of the last answer (`f64` bits; 0 = none): what the node takes
    /// when it works, without the lower bounds abandoned attempts add.
    answered_latency: AtomicU64,
    /// Last finish, or the moment in-flight went from 0 to 1 (µs).
    last_progress: AtomicU64,
    /// The router's completion count at this node's last progress.
    progress_mark: AtomicU64,
    inflight: AtomicU32,
    /// Failing its active health check: no attempts while another node is not.
    down: std::sync::atomic::AtomicBool,
}

impl NodeState {
    pub fn is_down(&self) -> bool {
        self.down.load(Relaxed)
    }

    /// Whether it changed.
    pub fn set_down(&self, down: bool) -> bool {
        self.down.swap(down, Relaxed) != down
    }

    /// A copy of everything but in-flight attempts (which belong to whoever started them).
    pub fn snapshot(&self) -> NodeState {
        NodeState {
            score: AtomicU64::new(self.score.load(Relaxed)),
            sq_errors: AtomicU64::new(self.sq_errors.load(Relaxed)),
            latency: AtomicU64::new(self.latency.load(Relaxed)),
            last_sample: AtomicU64::new(self.last_sample.load(Relaxed)),
            answered_latency: AtomicU64::new(self.answered_latency.load(Relaxed)),
            last_progress: AtomicU64::new(self.last_progress.load(Relaxed)),
            progress_mark: AtomicU64::new(self.progress_mark.load(Relaxed)),
            inflight: AtomicU32::new(0),
            down: std::sync::atomic::AtomicBool::new(self.is_down()),
        }
    }

    pub fn start(&self, now: impl FnOnce() -> u64, completions: u64) {
        if self.inflight.fetch_add(1, Relaxed) == 0 {
            self.last_progress.store(now(), Relaxed);
            self.progress_mark.store(completions, Relaxed);
        }
    }

    /// An attempt ended for reasons that are not the node's: in-flight -1, nothing learned.
    pub fn cancel(&self) {
        let _ = self
            .inflight
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }

    pub fn finish(
        &self,
        outcome: Outcome,
        elapsed_us: u64,
        now_us: u64,
        inv_half_life_us: f64,
        completions: u64,
    ) {
        // Saturating: a finish without a start must not wrap the count.
        let _ = self
            .inflight
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        self.last_progress.store(now_us, Relaxed);
        self.progress_mark.store(completions, Relaxed);
        match outcome {
            Outcome::Failure => {
                self.sq_errors.fetch_add(1, Relaxed);
            }
            Outcome::Success => {
                if self.sq_errors.load(Relaxed) != 0 {
                    self.sq_errors.store(0, Relaxed);
                }
                self.observe_latency(elapsed_us, now_us);
                let estimate = self.latency.load(Relaxed);
                if self.answered_latency.load(Relaxed) != estimate {
                    self.answered_latency.store(estimate, Relaxed);
                }
            }
        }
        self.update_score(outcome, now_us, inv_half_life_us);
    }

    /// An attempt weir abandoned on a stalled node after `elapsed_us`: in-flight -1 and a
    /// failure for the score and ServiceQ's counter, without counting as progress (the node
    /// answered nothing). Its age is a lower bound of the node's latency now and is sampled as
    /// one, so the node stays expensive once its stuck attempts are gone.
    pub fn abandon(&self, elapsed_us: u64, now_us: u64, inv_half_life_us: f64) {
        let _ = self
            .inflight
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        self.sq_errors.fetch_add(1, Relaxed);
        self.observe_latency(elapsed_us, now_us);
        self.update_score(Outcome::Failure, now_us, inv_half_life_us);
    }

    fn update_score(&self, outcome: Outcome, now_us: u64, inv_half_life_us: f64) {
        let now = now_us.min(STAMP_MAX);
        let mut current = self.score.load(Relaxed);
        loop {
            let (stamp, fixed) = unpack(current);
            if fixed == 0 && outcome == Outcome::Success {
                return; // a healthy node's success writes nothing
            }
            let decayed = fixed as f64 / SCORE_UNIT
                * decay_factor(now.saturating_sub(stamp), inv_half_life_us);
            let next = match outcome {
                Outcome::Failure => (decayed + 1.0).min(SCORE_CAP),
                Outcome::Success => decayed * SUCCESS_KEEP,
            };
            let packed = pack(stamp.max(now), to_fixed(next));
            if packed == current {
                return;
            }
            match self
                .score
                .compare_exchange_weak(current, packed, Relaxed, Relaxed)
            {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// Peak EWMA: a sample above the estimate replaces it; below, the estimate moves toward it
    /// by `1 - exp(-dt/τ)`, `dt` being the time since the previous sample.
    fn observe_latency(&self, elapsed_us: u64, now_us: u64) {
        let sample = elapsed_us.max(1) as f64;
        let dt = now_us.saturating_sub(self.last_sample.swap(now_us, Relaxed));
        let mut keep = None;
        let mut current = self.latency.load(Relaxed);
        loop {
            let estimate = f64::from_bits(current);
            let next = if estimate <= 0.0 || sample >= estimate {
                sample
            } else {
                let keep = *keep.get_or_insert_with(|| (-(dt as f64) / LATENCY_DECAY_US).exp());
                estimate * keep + sample * (1.0 - keep)
            };
            let next = next.to_bits();
            if next == current {
                return;
            }
            match self
                .latency
                .compare_exchange_weak(current, next, Relaxed, Relaxed)
            {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// The decayed feedback score; `now` is only consulted when the score is not 0.
    pub fn score(&self, now: impl FnOnce() -> u64, inv_half_life_us: f64) -> f64 {
        let (stamp, fixed) = unpack(self.score.load(Relaxed));
        if fixed == 0 {
            return 0.0;
        }
        fixed as f64 / SCORE_UNIT * decay_factor(now().saturating_sub(stamp), inv_half_life_us)
    }

    pub fn sq_errors(&self) -> u64 {
        self.sq_errors.load(Relaxed)
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Relaxed)
    }

    /// Latency estimate in µs, `None` before the first successful attempt.
    pub fn latency_us(&self) -> Option<f64> {
        let estimate = f64::from_bits(self.latency.load(Relaxed));
        (estimate > 0.0).then_some(estimate)
    }

    /// The latency estimate (µs) as of the node's last answer, `None` before the first.
    pub fn answered_latency_us(&self) -> Option<f64> {
        let estimate = f64::from_bits(self.answered_latency.load(Relaxed));
        (estimate > 0.0).then_some(estimate)
    }

    /// When the latency estimate last took a sample (µs).
    pub fn last_sample_us(&self) -> u64 {
        self.last_sample.load(Relaxed)
    }

    /// The router's completion count when this node last made progress.
    pub fn progress_mark(&self) -> u64 {
        self.progress_mark.load(Relaxed)
    }

    pub fn last_progress_us(&self) -> u64 {
        self.last_progress.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_score_round_trips_at_the_cap() {
        let (stamp, fixed) = unpack(pack(123_456_789, to_fixed(SCORE_CAP)));
        assert_eq!(stamp, 123_456_789);
        assert!((fixed as f64 / SCORE_UNIT - SCORE_CAP).abs() < 1.0 / SCORE_UNIT);
    }

    #[test]
    fn stamp_saturates_instead_of_wrapping() {
        let (stamp, fixed) = unpack(pack(u64::MAX, 5));
        assert_eq!((stamp, fixed), (STAMP_MAX, 5));
    }

    #[test]
    fn finish_without_start_keeps_inflight_at_zero() {
        let node = NodeState::default();
        node.finish(Outcome::Success, 10, 10, 1e-7, 0);
        assert_eq!(node.inflight(), 0);
    }

    #[test]
    fn failures_do_not_feed_latency() {
        let node = NodeState::default();
        node.finish(Outcome::Failure, 5, 10, 1e-7, 0);
        assert_eq!(node.latency_us(), None);
        node.finish(Outcome::Success, 5_000, 20, 1e-7, 0);
        node.finish(Outcome::Failure, 5, 30, 1e-7, 0);
        assert_eq!(node.latency_us(), Some(5_000.0));
    }

    #[test]
    fn latency_estimate_jumps_to_peaks_and_decays_with_time() {
        let node = NodeState::default();
        node.finish(Outcome::Success, 1_000, 1_000, 1e-7, 0);
        node.finish(Outcome::Success, 50_000, 2_000, 1e-7, 0);
        assert_eq!(node.latency_us(), Some(50_000.0));
        // One time constant later a fast sample removes 1 - 1/e of the gap.
        node.finish(
            Outcome::Success,
            1_000,
            2_000 + LATENCY_DECAY_US as u64,
            1e-7,
            0,
        );
        let expected = 1_000.0 + 49_000.0 / std::f64::consts::E;
        let got = node.latency_us().unwrap_or(0.0);
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }
}
