//! Admission: what a request may take of the cluster and of weir.
//!
//! - The concurrency peak protects the cluster: a request takes a slot once it goes to a node
//!   (its head and any body up to `limits.max_buffered_body` already in), never while weir still
//!   waits for the client; beyond `limits.concurrency_peak` it is refused at once with 429.
//!   Queued requests hold no slot.
//! - Requests whose body streams to the node (over `max_buffered_body`, or chunked) may hold at
//!   most half the peak while that body arrives: slow uploads cannot take the slots the
//!   requests that are all there need.
//! - `limits.max_requests_per_client` bounds what one client address has in progress, from its
//!   head on (429), so that one client cannot hold every slot by itself.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::conn::PerClient;

/// The count of in-flight client requests, shared by all worker threads.
#[derive(Default, Clone)]
pub struct Admission {
    inflight: Arc<AtomicUsize>,
    /// Of those, the ones whose body is still streaming in.
    uploading: Arc<AtomicUsize>,
    per_client: Arc<PerClient>,
}

/// A held slot; dropping it releases the slot.
pub struct Slot {
    inflight: Arc<AtomicUsize>,
    /// Held while the request's body streams in.
    uploading: Option<Arc<AtomicUsize>>,
}

impl Slot {
    /// The request's body is all in: it no longer counts as an upload.
    pub fn body_done(&mut self) {
        if let Some(u) = self.uploading.take() {
            u.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.body_done();
        self.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request in progress from one client address; dropping it gives it back.
pub struct ClientSlot {
    per_client: Arc<PerClient>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.per_client.give_back(self.ip);
    }
}

impl Admission {
    /// Takes a slot if fewer than `peak` are held; a request whose body is still to stream in
    /// (`uploading`) only while uploads hold less than half the peak.
    pub fn try_admit(&self, peak: usize, uploading: bool) -> Option<Slot> {
        let mut upload = None;
        if uploading {
            let before = self.uploading.fetch_add(1, Ordering::AcqRel);
            if before >= (peak / 2).max(1) {
                self.uploading.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
            upload = Some(self.uploading.clone());
        }
        let before = self.inflight.fetch_add(1, Ordering::AcqRel);
        let slot = Slot {
            inflight: self.inflight.clone(),
            uploading: upload,
        };
        if before >= peak {
            // Dropping the slot gives back both counts.
            drop(slot);
            return None;
        }
        Some(slot)
    }

    /// Counts a request of client `ip` if it has fewer than `limit` in progress.
    pub fn try_admit_client(&self, ip: IpAddr, limit: usize) -> Option<ClientSlot> {
        self.per_client.try_take(ip, limit).then(|| ClientSlot {
            per_client: self.per_client.clone(),
            ip,
        })
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
        let s1 = a.try_admit(2, false);
        let s2 = a.try_admit(2, false);
        assert!(s1.is_some() && s2.is_some());
        assert!(a.try_admit(2, false).is_none());
        assert_eq!(a.inflight(), 2);
        drop(s1);
        assert!(a.try_admit(2, false).is_some());
        drop(s2);
        assert_eq!(a.inflight(), 0);
    }

    #[test]
    fn uploads_hold_at_most_half_the_peak() {
        let a = Admission::default();
        let mut u1 = a.try_admit(4, true).expect("first upload");
        let u2 = a.try_admit(4, true).expect("second upload");
        assert!(a.try_admit(4, true).is_none(), "half of 4 is uploading");
        let whole = a.try_admit(4, false).expect("a request that is all there");
        u1.body_done();
        let u3 = a.try_admit(4, true).expect("an upload ended");
        assert!(a.try_admit(4, false).is_none(), "the peak itself");
        drop((u1, u2, u3, whole));
        assert_eq!(a.inflight(), 0);
        assert_eq!(a.uploading.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn one_client_is_held_to_its_limit_while_others_pass() {
        let a = Admission::default();
        let one = IpAddr::from([10, 0, 0, 1]);
        let other = IpAddr::from([10, 0, 0, 2]);
        let held = a.try_admit_client(one, 1);
        assert!(held.is_some());
        assert!(a.try_admit_client(one, 1).is_none());
        assert!(a.try_admit_client(other, 1).is_some());
        drop(held);
        assert!(a.try_admit_client(one, 1).is_some());
    }
}
