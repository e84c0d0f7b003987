//! The in-memory store: a crossbeam `SegQueue` (lock-free, FIFO, grown in small blocks as
//! entries arrive and freed as they leave, so an empty or disabled queue costs nothing however
//! large its capacity) plus a count of occupied slots that also covers entries the replay has
//! taken and not finished, so the capacity bounds everything the queue is responsible for.
//!
//! A push first reserves a slot with a compare-and-swap on the count and only then pushes.

use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_queue::SegQueue;

use super::{QueuedRequest, RequestQueue};

pub struct MemoryQueue {
    entries: SegQueue<QueuedRequest>,
    occupied: AtomicUsize,
    capacity: usize,
}

impl MemoryQueue {
    /// A queue of `capacity` entries (at least one).
    pub fn new(capacity: usize) -> MemoryQueue {
        let capacity = capacity.max(1);
        MemoryQueue {
            entries: SegQueue::new(),
            occupied: AtomicUsize::new(0),
            capacity,
        }
    }
}

impl RequestQueue for MemoryQueue {
    #[allow(clippy::result_large_err)]
    fn try_push(&self, req: QueuedRequest) -> Result<(), QueuedRequest> {
        let mut current = self.occupied.load(Ordering::Acquire);
        loop {
            if current >= self.capacity {
                return Err(req);
            }
            match self.occupied.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        self.entries.push(req);
        Ok(())
    }

    fn take(&self) -> Option<QueuedRequest> {
        self.entries.pop()
    }

    fn finish(&self) {
        let _ = self
            .occupied
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    fn len(&self) -> usize {
        self.occupied.load(Ordering::Acquire)
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}
