//! weir: a fault-tolerant HTTP edge gateway on Pingora.

pub mod config;
pub mod queue;
