//! Shared harness for weir's integration tests: test upstreams whose behaviour switches at
//! runtime ([`upstream`]), a spawner for the real `weir` binary ([`gateway`]), a raw HTTP/1.1
//! client ([`client`]), a Prometheus text parser ([`metrics`]), a test CA ([`pki`]), loopback
//! ports to name before binding ([`ports`]) and the external tools some tests drive: promtool,
//! a Prometheus server, headless Chromium ([`tools`]).
//!
//! Every test file uses it with `mod support;`; not every file uses every item.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod dns;
pub mod gateway;
pub mod metrics;
pub mod pki;
pub mod ports;
pub mod tools;
pub mod upstream;
pub mod wire;

pub use client::{Client, Request, Response};
pub use gateway::{run_weir, Gateway, Ports, WEIR};
pub use metrics::Metrics;
pub use upstream::{Behaviour, Received, Upstream};
pub use wire::md5_hex;

/// Deterministic pseudo-random bytes (a fixed seed, so a failing body can be reproduced).
pub fn random_body(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}
