//! Request queues: which requests may be queued, and (later) the queues themselves.

pub mod formats;
