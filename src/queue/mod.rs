//! Request formats today; the deferred and upfront queues build on them.
pub mod formats;
