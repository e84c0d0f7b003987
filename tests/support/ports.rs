//! Loopback ports for things a test must name before they listen (a second listener, pebble's
//! ports, a Prometheus server).
//!
//! A port from `bind(127.0.0.1:0)` is in the kernel's ephemeral range: once the probe socket is
//! closed, any `connect()` or `bind(0)` on the machine (the other tests of this binary run in
//! parallel threads and open thousands of connections; other suites may run beside this one)
//! may be handed the same port before the test binds it. So ports are drawn at random from
//! below the ephemeral range (`net.ipv4.ip_local_port_range`), which the kernel never hands out
//! by itself: between the check here and the test's own bind, only another explicit picker
//! could take the port, and with a random draw from thousands of ports that is unlikely.

use std::net::{SocketAddr, TcpListener, UdpSocket};

/// The lowest port drawn from.
const LOWEST: u16 = 10_000;

/// The first port of the kernel's ephemeral range (Linux's default when unreadable).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A 127.0.0.1 port on which nothing listens now (TCP or UDP) and that the kernel does not hand
/// out to other sockets by itself.
pub fn free_port() -> SocketAddr {
    let end = ephemeral_start();
    if end > LOWEST + 1_000 {
        for _ in 0..1_000 {
            let port = fastrand::u16(LOWEST..end);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if TcpListener::bind(addr).is_ok() && UdpSocket::bind(addr).is_ok() {
                return addr;
            }
        }
    }
    // No room below the ephemeral range: an ephemeral port, racy as described above.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
}

/// Two distinct free ports.
pub fn two_free_ports() -> (SocketAddr, SocketAddr) {
    let a = free_port();
    loop {
        let b = free_port();
        if b != a {
            return (a, b);
        }
    }
}
