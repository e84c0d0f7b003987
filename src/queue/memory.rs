//! The in-memory store: a crossbeam `SegQueue` (lock-free, FIFO, grown in small blocks as
//! entries arrive and freed as they leave, so an empty or disabled queue costs nothing however
//! large its capacity) plus a count of occupied slots that also covers entries the replay has
//! taken and not finished, so the capacity bounds everything the queue is responsible for.
//!
//! A push first reserves a slot (entries and bytes) and only then pushes; a durable store
//! writes its record in between.

use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_queue::SegQueue;

use super::{QueuedRequest, RequestQueue};

pub struct MemoryQueue {
    entries: SegQueue<QueuedRequest>,
    occupied: AtomicUsize,
    bytes: AtomicUsize,
    capacity: usize,
    max_bytes: usize,
}

impl MemoryQueue {
    /// A queue of `capacity` entries (at least one) and `max_bytes`.
    pub fn new(capacity: usize, max_bytes: usize) -> MemoryQueue {
        MemoryQueue {
            entries: SegQueue::new(),
            occupied: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            capacity: capacity.max(1),
            max_bytes,
        }
    }
}

impl RequestQueue for MemoryQueue {
    fn reserve(&self, size: usize) -> bool {
        let ok = self
            .occupied
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok();
        if !ok {
            return false;
        }
        let fits = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b + size <= self.max_bytes).then_some(b + size)
            })
            .is_ok();
        if !fits {
            self.occupied.fetch_sub(1, Ordering::AcqRel);
        }
        fits
    }

    fn release(&self, size: usize) {
        self.finish(size);
    }

    fn admit(&self, size: usize) {
        self.occupied.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(size, Ordering::AcqRel);
    }

    fn insert(&self, req: QueuedRequest) {
        self.entries.push(req);
    }

    fn take(&self) -> Option<QueuedRequest> {
        self.entries.pop()
    }

    fn finish(&self, size: usize) {
        let _ = self
            .occupied
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_sub(size))
            });
    }

    fn len(&self) -> usize {
        self.occupied.load(Ordering::Acquire)
    }

    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn max_bytes(&self) -> usize {
        self.max_bytes
    }
}
