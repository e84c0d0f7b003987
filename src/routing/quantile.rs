//! A sliding quantile of the cluster's time to first response byte, for the hedge delay.
//!
//! Samples go into log-spaced buckets (four per doubling, 100 µs to about 6.5 s: a bucket is
//! at most 19 % wide), counted in two windows of `WINDOW` each: the quantile is read over the
//! current and the previous window, so it follows the last 10–20 s and forgets older traffic.
//! Recording is one relaxed atomic add; the quantile is computed off the request path
//! ([`TtfbQuantile::refresh`], from the background watch) and read as one atomic load.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use super::Clock;

const BUCKETS: usize = 64;
/// The lower edge of bucket 1 (bucket 0 holds everything faster).
const BASE_US: f64 = 100.0;
/// A window's length.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Fewer samples than this over both windows: no quantile yet (the delay is the upper bound).
const MIN_SAMPLES: u64 = 20;

pub struct TtfbQuantile {
    windows: [[AtomicU32; BUCKETS]; 2],
    /// Which window takes samples (0 or 1).
    current: AtomicUsize,
    /// When the current window began (the clock's microseconds).
    began_us: AtomicU64,
    /// The last computed quantile in microseconds (`u64::MAX`: none yet).
    value_us: AtomicU64,
    clock: Arc<dyn Clock>,
}

fn bucket_of(d: Duration) -> usize {
    let us = d.as_secs_f64() * 1e6;
    if us < BASE_US {
        return 0;
    }
    // Four buckets per doubling above BASE_US.
    let i = 1 + ((us / BASE_US).log2() * 4.0) as usize;
    i.min(BUCKETS - 1)
}

/// The upper edge of bucket `i` (what a quantile falling in it reports: never too early).
fn upper_edge(i: usize) -> Duration {
    Duration::from_secs_f64(BASE_US * 2f64.powf(i as f64 / 4.0) / 1e6)
}

impl TtfbQuantile {
    pub fn new(clock: Arc<dyn Clock>) -> TtfbQuantile {
        TtfbQuantile {
            windows: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU32::new(0))),
            current: AtomicUsize::new(0),
            began_us: AtomicU64::new(clock.now_us()),
            value_us: AtomicU64::new(u64::MAX),
            clock,
        }
    }

    /// One attempt's time to its response header.
    pub fn record(&self, ttfb: Duration) {
        let w = self.current.load(Relaxed) & 1;
        self.windows[w][bucket_of(ttfb)].fetch_add(1, Relaxed);
    }

    /// Rotates the windows when the current one is `WINDOW` old and recomputes quantile `q`
    /// (0 < q < 1). Called from one task at a time.
    pub fn refresh(&self, q: f64) {
        let now = self.clock.now_us();
        let window_us = WINDOW.as_micros() as u64;
        if now.saturating_sub(self.began_us.load(Relaxed)) >= window_us {
            let next = (self.current.load(Relaxed) + 1) & 1;
            for b in &self.windows[next] {
                b.store(0, Relaxed);
            }
            self.current.store(next, Relaxed);
            self.began_us.store(now, Relaxed);
        }
        let counts: [u64; BUCKETS] = std::array::from_fn(|i| {
            u64::from(self.windows[0][i].load(Relaxed))
                + u64::from(self.windows[1][i].load(Relaxed))
        });
        let total: u64 = counts.iter().sum();
        if total < MIN_SAMPLES {
            self.value_us.store(u64::MAX, Relaxed);
            return;
        }
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let us = upper_edge(i).as_micros() as u64;
                self.value_us.store(us, Relaxed);
                return;
            }
        }
    }

    /// The last computed quantile; `None` before there are enough samples.
    pub fn get(&self) -> Option<Duration> {
        match self.value_us.load(Relaxed) {
            u64::MAX => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The hedge delay: the quantile clamped to `[min, max]` (`max` while there is none).
    pub fn delay(&self, min: Duration, max: Duration) -> Duration {
        self.get().map_or(max, |q| q.clamp(min, max.max(min)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::ManualClock;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn buckets_are_ordered_and_at_most_a_fifth_wide() {
        for i in 1..BUCKETS - 1 {
            let lo = upper_edge(i - 1);
            let hi = upper_edge(i);
            assert!(hi > lo);
            assert!(hi.as_secs_f64() / lo.as_secs_f64() < 1.2);
        }
        assert_eq!(bucket_of(Duration::from_micros(50)), 0);
        assert!(upper_edge(bucket_of(ms(3))) >= ms(3));
        assert!(upper_edge(bucket_of(ms(3))) < ms(4));
        assert_eq!(bucket_of(Duration::from_secs(3600)), BUCKETS - 1);
    }

    #[test]
    fn the_quantile_follows_the_samples_and_forgets_old_windows() {
        let clock = Arc::new(ManualClock::new());
        let q = TtfbQuantile::new(clock.clone());
        q.refresh(0.95);
        assert_eq!(q.get(), None);
        assert_eq!(
            q.delay(ms(5), ms(500)),
            ms(500),
            "no quantile yet: the upper bound"
        );
        // 95 fast answers (1 ms) and 5 slow ones (80 ms): p95 is about 1 ms, p99 about 80 ms.
        for _ in 0..95 {
            q.record(ms(1));
        }
        for _ in 0..5 {
            q.record(ms(80));
        }
        q.refresh(0.95);
        let p95 = q.get().expect("enough samples");
        assert!(p95 >= ms(1) && p95 < Duration::from_micros(1200), "{p95:?}");
        q.refresh(0.99);
        let p99 = q.get().expect("enough samples");
        assert!(p99 >= ms(80) && p99 < ms(96), "{p99:?}");
        // Clamped to the bounds.
        q.refresh(0.95);
        assert_eq!(q.delay(ms(5), ms(500)), ms(5));
        // The cluster slows down: two windows later only the new samples count.
        clock.advance(WINDOW);
        q.refresh(0.95);
        for _ in 0..100 {
            q.record(ms(40));
        }
        clock.advance(WINDOW);
        q.refresh(0.95);
        let p95 = q.get().expect("enough samples");
        assert!(p95 >= ms(40) && p95 < ms(48), "{p95:?}");
    }
}
