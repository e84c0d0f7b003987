//! weir in this process, for counting what one proxied request costs: a counting allocator
//! over mimalloc (weir's own allocator), an upstream and a keep-alive client that do not
//! allocate per request, and the real server (`weir::server::build`, every service) on
//! loopback ports. Shared by `tests/allocations.rs` and `benches/request.rs`.
//!
//! The process counts every allocation of every thread; the upstream and the client reuse
//! fixed buffers, so what a request adds is weir's and Pingora's.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// mimalloc with a count of allocations (`alloc`, `alloc_zeroed`, `realloc`).
pub struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
}

/// Allocations so far, all threads.
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";

/// An HTTP/1.1 node on a loopback port: keep-alive, `200 ok` to every request (which must have
/// no body), a thread per connection, no allocation per request.
pub fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an upstream");
    let addr = listener.local_addr().expect("upstream address");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = conn.set_nodelay(true);
                let mut buf = [0u8; 16 * 1024];
                let mut filled = 0;
                loop {
                    match conn.read(&mut buf[filled..]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => filled += n,
                    }
                    // Every complete head gets its answer; a partial one waits for more.
                    while let Some(end) = head_end(&buf[..filled]) {
                        if conn.write_all(RESPONSE).is_err() {
                            return;
                        }
                        buf.copy_within(end..filled, 0);
                        filled -= end;
                    }
                    if filled == buf.len() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The value of header `name` in a response head, trimmed.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Bounded wait for a listener the server binds on its own thread.
fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} never listened on {addr}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running weir: the proxy's address; its files live in `dir` until the process exits.
pub struct Weir {
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Never asks the server to stop: it runs until the process exits.
struct Forever;

#[async_trait::async_trait]
impl pingora::server::ShutdownSignalWatch for Forever {
    async fn recv(&self) -> pingora::server::ShutdownSignal {
        std::future::pending().await
    }
}

/// Starts weir with `extra` YAML (top-level keys) over `nodes`: the shipped defaults for
/// everything else (access log on, into a file here; request ids, traceparent, forwarding
/// headers, metrics, feedback routing, hedging, the durable deferred queue), one worker thread.
pub fn start(nodes: &[SocketAddr], extra: &str) -> Weir {
    let dir = std::env::temp_dir().join(format!(
        "weir-inproc-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let port = free_port();
    let upstreams: String = nodes.iter().map(|n| format!("  - http://{n}\n")).collect();
    let yaml = format!(
        "listen: 127.0.0.1:{port}\nupstreams:\n{upstreams}\
         admin:\n  listen: 127.0.0.1:{admin}\n\
         log:\n  level: warn\n  access: {dir}/access.log\n  error_file: {dir}/error.log\n\
         server:\n  threads: 1\n  pid_file: {dir}/weir.pid\n  upgrade_sock: {dir}/upgrade.sock\n  data_dir: {dir}/data\n\
         {extra}\n",
        admin = free_port(),
        dir = dir.display(),
    );
    let path = dir.join("weir.yaml");
    std::fs::write(&path, yaml).expect("write the config");
    let config = weir::config::Config::load(&path)
        .unwrap_or_else(|e| panic!("{e}"))
        .config;
    let built = weir::server::build(config, &weir::server::RunOptions::default())
        .unwrap_or_else(|e| panic!("build: {e}"));
    std::thread::spawn(move || {
        built.server.run(pingora::server::RunArgs {
            shutdown_signal: Box::new(Forever),
        })
    });
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_listening(addr, "weir");
    Weir { addr, dir }
}

/// A keep-alive client on one connection; requests and responses in fixed buffers.
pub struct Client {
    addr: SocketAddr,
    conn: TcpStream,
    buf: Box<[u8; 16 * 1024]>,
    request: Vec<u8>,
}

impl Client {
    fn open(addr: SocketAddr) -> TcpStream {
        let conn = TcpStream::connect(addr).expect("connect to weir");
        let _ = conn.set_nodelay(true);
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        conn
    }

    pub fn connect(addr: SocketAddr, path: &str) -> Client {
        let conn = Self::open(addr);
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: bench.local\r\nUser-Agent: inproc\r\n\r\n");
        Client {
            addr,
            conn,
            buf: Box::new([0; 16 * 1024]),
            request: request.into_bytes(),
        }
    }

    /// One GET; the response's status. Panics on a broken connection or response.
    pub fn get(&mut self) -> u16 {
        self.conn
            .write_all(&self.request)
            .expect("send the request");
        let mut filled = 0;
        let (end, status, length, close) = loop {
            filled += self.read_more(filled, "the response");
            if let Some(end) = head_end(&self.buf[..filled]) {
                let head = std::str::from_utf8(&self.buf[..end]).expect("a text head");
                let status = head
                    .get(9..12)
                    .and_then(|s| s.parse().ok())
                    .expect("a status");
                let length = header(head, "content-length")
                    .and_then(|v| v.parse::<usize>().ok())
                    .expect("a content-length");
                let close =
                    header(head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
                break (end, status, length, close);
            }
        };
        while filled < end + length {
            filled += self.read_more(filled, "the body");
        }
        if close {
            // weir ends the connection after some answers (a hedge's, an error's): a new one.
            self.conn = Self::open(self.addr);
        }
        status
    }

    /// Reads into the buffer after `filled`; the byte count (never 0: a close panics).
    fn read_more(&mut self, filled: usize, what: &str) -> usize {
        let n = self
            .conn
            .read(&mut self.buf[filled..])
            .unwrap_or_else(|e| panic!("read {what}: {e}"));
        assert!(n > 0, "weir closed the connection while sending {what}");
        n
    }
}

/// A bare Pingora proxy (round robin, nothing else, one thread) over `nodes`: the baseline
/// of what Pingora itself allocates per request.
pub fn start_bare(nodes: &[SocketAddr]) -> SocketAddr {
    use pingora::prelude::*;
    use std::sync::atomic::AtomicUsize;

    struct Bare {
        nodes: Vec<SocketAddr>,
        next: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl ProxyHttp for Bare {
        type CTX = ();
        fn new_ctx(&self) {}
        async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.nodes.len();
            Ok(Box::new(HttpPeer::new(self.nodes[i], false, String::new())))
        }
    }

    let port = free_port();
    let conf = pingora::server::configuration::ServerConf {
        threads: 1,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora::proxy::http_proxy_service(
        &server.configuration,
        Bare {
            nodes: nodes.to_vec(),
            next: AtomicUsize::new(0),
        },
    );
    svc.add_tcp(&format!("127.0.0.1:{port}"));
    server.add_service(svc);
    std::thread::spawn(move || {
        server.run(pingora::server::RunArgs {
            shutdown_signal: Box::new(Forever),
        })
    });
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_listening(addr, "the bare proxy");
    addr
}
