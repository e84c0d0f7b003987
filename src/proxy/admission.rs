//! Admission: the concurrency peak. A request takes a slot for as long as it is in flight;
//! beyond `limits.concurrency_peak` it is refused at once with 429 (never queued, never hung).
//! Queued requests hold no slot: the slot is released when the client's request finishes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The count of in-flight client requests, shared by all worker threads.
#[derive(Default, Clone)]
pub struct Admission {
    inflight: Arc<AtomicUsize>,
}

/// A held slot; dropping it releases the slot.
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// Takes a slot if fewer than `peak` are held.
    pub fn try_admit(&self, peak: usize) -> Option<Slot> {
        let before = self.inflight.fetch_add(1, Ordering::AcqRel);
        if before >= peak {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(self.inflight.clone()))
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_two_admits_two_and_refuses_the_third() {
        let a = Admission::default();
        let s1 = a.try_admit(2);
        let s2 = a.try_admit(2);
        assert!(s1.is_some() && s2.is_some());
        assert!(a.try_admit(2).is_none());
        assert_eq!(a.inflight(), 2);
        drop(s1);
        assert!(a.try_admit(2).is_some());
        drop(s2);
        assert_eq!(a.inflight(), 0);
    }
}
