//! The retry budget: extra attempts (retries, hedges, aborted attempts sent again) allowed as a
//! share of the requests of a sliding window, plus a small floor per second (Finagle's and
//! Linkerd's retry budget). While every node fails, a request costs its nodes at most
//! `1 + share` attempts on average instead of one per node, so a struggling cluster is not
//! buried under its own retries.
//!
//! The window is [`WINDOW_SECS`] one-second buckets of two counters (requests, extra attempts).
//! `deposit` and `try_withdraw` cost a few relaxed atomics and take no lock; a bucket is
//! recycled by the first caller of its new second, and a race around a recycle can lose a few
//! counts of that second, which only blurs the share slightly.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::Clock;

/// Seconds the budget looks back.
pub const WINDOW_SECS: u64 = 10;

#[derive(Debug, Default)]
struct Bucket {
    /// The second (since the clock's origin) whose counts this bucket holds, plus one (0: none).
    second: AtomicU64,
    requests: AtomicU64,
    extra: AtomicU64,
}

/// One budget for the whole gateway, shared by every worker thread.
pub struct RetryBudget {
    clock: Arc<dyn Clock>,
    buckets: [Bucket; WINDOW_SECS as usize],
}

/// The budget's terms, from `retries.budget` and `retries.budget_floor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetTerms {
    /// Extra attempts per request over the window (0.2 = 20%); `None`: no budget.
    pub share: Option<f64>,
    /// Extra attempts per second allowed whatever the share says.
    pub floor_per_sec: u32,
}

impl RetryBudget {
    pub fn new(clock: Arc<dyn Clock>) -> RetryBudget {
        RetryBudget {
            clock,
            buckets: Default::default(),
        }
    }

    /// The bucket of the current second, recycled if it still holds an older second.
    fn current(&self) -> (&Bucket, u64) {
        let second = self.clock.now_us() / 1_000_000;
        let bucket = &self.buckets[(second % WINDOW_SECS) as usize];
        let stamp = second + 1;
        let held = bucket.second.load(Relaxed);
        if held != stamp
            && bucket
                .second
                .compare_exchange(held, stamp, Relaxed, Relaxed)
                .is_ok()
        {
            bucket.requests.store(0, Relaxed);
            bucket.extra.store(0, Relaxed);
        }
        (bucket, second)
    }

    /// Counts one client request (its first attempt).
    pub fn deposit(&self) {
        self.current().0.requests.fetch_add(1, Relaxed);
    }

    /// Requests and extra attempts in the window ending now.
    pub fn window(&self) -> (u64, u64) {
        let (_, second) = self.current();
        let oldest = (second + 1).saturating_sub(WINDOW_SECS - 1);
        self.buckets
            .iter()
            .filter(|b| b.second.load(Relaxed) >= oldest)
            .fold((0, 0), |(r, e), b| {
                (r + b.requests.load(Relaxed), e + b.extra.load(Relaxed))
            })
    }

    /// Takes one extra attempt from the budget: `false` when it is spent.
    pub fn try_withdraw(&self, terms: BudgetTerms) -> bool {
        let Some(share) = terms.share else {
            self.current().0.extra.fetch_add(1, Relaxed);
            return true;
        };
        let (requests, extra) = self.window();
        let allowed = share * requests as f64 + f64::from(terms.floor_per_sec) * WINDOW_SECS as f64;
        if (extra + 1) as f64 > allowed {
            return false;
        }
        self.current().0.extra.fetch_add(1, Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::ManualClock;
    use std::time::Duration;

    fn budget() -> (RetryBudget, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        (RetryBudget::new(clock.clone()), clock)
    }

    const TWENTY: BudgetTerms = BudgetTerms {
        share: Some(0.2),
        floor_per_sec: 0,
    };

    #[test]
    fn extra_attempts_stay_within_the_share_of_requests() {
        let (b, _) = budget();
        let mut granted = 0;
        for _ in 0..1000 {
            b.deposit();
            // Every request wants three retries (every node fails).
            for _ in 0..3 {
                granted += u32::from(b.try_withdraw(TWENTY));
            }
        }
        assert!((195..=200).contains(&granted), "{granted}");
    }

    #[test]
    fn the_floor_allows_retries_without_traffic_and_no_budget_allows_all() {
        let (b, _) = budget();
        let terms = BudgetTerms {
            share: Some(0.2),
            floor_per_sec: 1,
        };
        let granted = (0..50).filter(|_| b.try_withdraw(terms)).count();
        assert_eq!(granted, WINDOW_SECS as usize);
        let off = BudgetTerms {
            share: None,
            floor_per_sec: 0,
        };
        assert!((0..50).all(|_| b.try_withdraw(off)));
    }

    #[test]
    fn the_window_slides_and_old_seconds_are_forgotten() {
        let (b, clock) = budget();
        for _ in 0..100 {
            b.deposit();
        }
        assert_eq!(b.window(), (100, 0));
        assert_eq!((0..40).filter(|_| b.try_withdraw(TWENTY)).count(), 20);
        clock.advance(Duration::from_secs(WINDOW_SECS - 1));
        assert_eq!(b.window(), (100, 20), "still inside the window");
        clock.advance(Duration::from_secs(1));
        assert_eq!(b.window(), (0, 0), "the first second left the window");
        assert!(!b.try_withdraw(TWENTY));
        // A bucket is reused for its new second with fresh counts.
        b.deposit();
        assert_eq!(b.window(), (1, 0));
        clock.advance(Duration::from_secs(3 * WINDOW_SECS));
        assert_eq!(b.window(), (0, 0));
    }
}
