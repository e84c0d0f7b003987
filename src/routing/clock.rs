//! Time as the router sees it: monotonic microseconds from an injected source, so tests drive
//! decay and stall detection without sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A monotonic clock in microseconds. The origin is arbitrary but fixed for one clock.
pub trait Clock: Send + Sync + 'static {
    fn now_us(&self) -> u64;
}

/// Wall-clock-free monotonic time: microseconds since the clock was created.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    base: Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        SystemClock {
            base: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now_us(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to: for deterministic tests and simulations.
#[derive(Debug, Default)]
pub struct ManualClock {
    us: AtomicU64,
}

impl ManualClock {
    /// Starts at 0 µs.
    pub fn new() -> Self {
        ManualClock {
            us: AtomicU64::new(0),
        }
    }

    pub fn advance(&self, d: Duration) {
        let step = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        // Saturate instead of wrapping: a clock must never run backwards.
        let _ = self
            .us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_add(step))
            });
    }

    pub fn set_us(&self, us: u64) {
        self.us.store(us, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_us(&self) -> u64 {
        self.us.load(Ordering::Relaxed)
    }
}
