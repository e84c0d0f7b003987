//! `weir demo`: three in-process upstreams on loopback, the gateway in front of them on the
//! embedded default config, a light load of its own, and a live line every few seconds showing
//! what clients saw, where traffic went and what the router thinks of each node.
//!
//! Node 3 cycles through the faults weir exists for, one phase each (`--phase`, default
//! 10 s), with a healthy phase between them: **crash** (stops listening, drops its
//! connections), **hang** (accepts and reads requests, never answers), **pause** (answers
//! nothing during 300 ms of every second, like a GC or CPU throttling stall). Requests move
//! away from it, stuck GETs are aborted and answered by another node, its error score rises and
//! falls; the client column should stay at zero errors and low latency throughout.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{AccessLog, Config, ErrorLog, Listener};
use crate::server::{self, RunOptions};

const PORTS: [u16; 3] = [9001, 9002, 9003];
const REPORT_EVERY: Duration = Duration::from_secs(3);
/// In the pause phase: the node answers nothing during this part of every second.
const PAUSE_SLICE: Duration = Duration::from_millis(300);
/// The demo's own load: this many clients, each sending a GET every `LOAD_PERIOD`.
const LOAD_CLIENTS: usize = 4;
const LOAD_PERIOD: Duration = Duration::from_millis(50);
/// A demo client gives up on a request after this long (and counts it as an error).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a demo node does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Fault {
    None = 0,
    Crash = 1,
    Hang = 2,
    Pause = 3,
}

impl Fault {
    fn from_u8(v: u8) -> Fault {
        match v {
            1 => Fault::Crash,
            2 => Fault::Hang,
            3 => Fault::Pause,
            _ => Fault::None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Fault::None => "up",
            Fault::Crash => "CRASHED",
            Fault::Hang => "HUNG",
            Fault::Pause => "PAUSING",
        }
    }
}

/// Node 3's cycle: each fault, with a healthy phase before it.
const CYCLE: [Fault; 6] = [
    Fault::None,
    Fault::Crash,
    Fault::None,
    Fault::Hang,
    Fault::None,
    Fault::Pause,
];

struct DemoNode {
    name: String,
    port: u16,
    fault: AtomicU8,
    served: AtomicU64,
}

impl DemoNode {
    fn fault(&self) -> Fault {
        Fault::from_u8(self.fault.load(Ordering::Relaxed))
    }
}

/// What the demo's clients saw since the last report.
#[derive(Default)]
struct ClientStats {
    ok: u64,
    errors: u64,
    latencies_us: Vec<u64>,
}

/// `weir demo` options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub listen: String,
    /// Drive the demo's own light load.
    pub load: bool,
    /// Length of each phase of node 3's cycle.
    pub phase: Duration,
}

pub fn run(opts: &DemoOptions) -> Result<(), String> {
    let listen = opts.listen.as_str();
    let mut config = Config::embedded_default();
    config.listen = vec![Listener {
        addr: listen.to_string(),
        tls: false,
    }];
    config.log.access = AccessLog::Off;
    config.log.error_log = ErrorLog::Off;
    // The demo's queues are its own: a fresh log in a directory of this run (a second demo, or
    // a weir already running as this user, keeps its own).
    config.server.data_dir =
        Some(std::env::temp_dir().join(format!("weir-demo-{}", std::process::id())));
    let nodes: Vec<Arc<DemoNode>> = PORTS
        .iter()
        .enumerate()
        .map(|(i, &port)| {
            Arc::new(DemoNode {
                name: format!("node{}", i + 1),
                port,
                fault: AtomicU8::new(Fault::None as u8),
                served: AtomicU64::new(0),
            })
        })
        .collect();

    // Bind the upstream ports first so a busy port is reported before anything starts.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the demo runtime: {e}"))?;
    for node in &nodes {
        let listener = rt
            .block_on(TcpListener::bind(("127.0.0.1", node.port)))
            .map_err(|e| format!("cannot listen on 127.0.0.1:{}: {e}", node.port))?;
        rt.spawn(serve_node(node.clone(), listener));
    }
    rt.spawn(cycle_faults(nodes[2].clone(), opts.phase));

    let built = server::build(config, &RunOptions::default())?;
    let gateway = built.gateway.clone();
    println!("weir demo: gateway on http://{listen}, upstreams on 127.0.0.1:9001-9003");
    println!(
        "  node3 cycles every {:?}: up, crash, up, hang, up, pause (300 ms of every second);",
        opts.phase
    );
    println!("  clients should not notice.");
    if opts.load {
        println!(
            "  the demo sends its own load ({LOAD_CLIENTS} clients, a GET every {LOAD_PERIOD:?} each; --no-load turns it off)"
        );
    }
    println!("  try:     curl -i http://{listen}/hello");
    println!("  status:  open http://127.0.0.1:9100/ (live per-node view)");
    println!("  metrics: curl -s http://127.0.0.1:9100/metrics | grep weir_upstream");

    let stats = Arc::new(Mutex::new(ClientStats::default()));
    if opts.load {
        let addr = listen.to_string();
        for c in 0..LOAD_CLIENTS {
            rt.spawn(load_client(addr.clone(), c, stats.clone()));
        }
    }
    let report_nodes = nodes.clone();
    let load = opts.load;
    rt.spawn(async move {
        let mut last = vec![0u64; report_nodes.len()];
        let mut last_aborts = 0;
        let mut last_retries = 0;
        let mut last_hedges = (0, 0);
        loop {
            tokio::time::sleep(REPORT_EVERY).await;
            let state = gateway.runtime();
            let router = &state.cluster(0).router;
            let p = router.selection_probabilities();
            let totals = gateway.metrics.totals();
            let retries: u64 = totals.retries.0.iter().map(|(_, n)| n).sum();
            let mut line = String::from("weir demo:");
            if load {
                let s = std::mem::take(&mut *stats.lock().unwrap_or_else(|e| e.into_inner()));
                line.push_str(&format!(
                    " clients {} ok {} err, p99 {} |",
                    s.ok,
                    s.errors,
                    p99_ms(s.latencies_us)
                ));
            }
            line.push_str(&format!(
                " aborted {} retried {} hedges {} won {} |",
                totals.attempts_aborted - last_aborts,
                retries - last_retries,
                totals.hedges_sent - last_hedges.0,
                totals.hedges_won - last_hedges.1,
            ));
            last_hedges = (totals.hedges_sent, totals.hedges_won);
            last_aborts = totals.attempts_aborted;
            last_retries = retries;
            for (i, n) in report_nodes.iter().enumerate() {
                let served = n.served.load(Ordering::Relaxed);
                line.push_str(&format!(
                    " {} {:<7} {:>4} req, err {:.2}, p {:.2} |",
                    n.name,
                    n.fault().label(),
                    served - last[i],
                    router.error_rate(i),
                    p.get(i).copied().unwrap_or(0.0),
                ));
                last[i] = served;
            }
            line.pop();
            println!("{line}");
        }
    });
    // The runtime must outlive the gateway, which never returns.
    std::mem::forget(rt);
    built.server.run_forever()
}

fn p99_ms(mut us: Vec<u64>) -> String {
    if us.is_empty() {
        return "-".to_string();
    }
    us.sort_unstable();
    let i = (us.len() * 99).div_ceil(100).saturating_sub(1);
    format!("{:.1} ms", us[i.min(us.len() - 1)] as f64 / 1000.0)
}

/// Node 3's fault cycle, forever.
async fn cycle_faults(node: Arc<DemoNode>, phase: Duration) {
    for fault in CYCLE.iter().cycle() {
        node.fault.store(*fault as u8, Ordering::Relaxed);
        let what = match fault {
            Fault::None => "back up",
            Fault::Crash => "CRASHED: connections refused",
            Fault::Hang => "HUNG: accepts and reads requests, never answers",
            Fault::Pause => "PAUSING: answers nothing 300 ms of every second",
        };
        println!("weir demo: {} {what}", node.name);
        tokio::time::sleep(phase).await;
    }
}

/// Accepts connections; while crashed, stops listening (connects are refused) and drops the
/// connections it had.
async fn serve_node(node: Arc<DemoNode>, listener: TcpListener) {
    let mut listener = Some(listener);
    let mut conns: Vec<tokio::task::AbortHandle> = Vec::new();
    loop {
        if node.fault() == Fault::Crash {
            drop(listener.take());
            for c in conns.drain(..) {
                c.abort();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let Some(l) = &listener else {
            listener = TcpListener::bind(("127.0.0.1", node.port)).await.ok();
            if listener.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            continue;
        };
        // Wake now and then to notice a crash even without connections.
        match tokio::time::timeout(Duration::from_millis(100), l.accept()).await {
            Ok(Ok((stream, _))) => {
                conns.retain(|c| !c.is_finished());
                conns.push(tokio::spawn(serve_conn(node.clone(), stream)).abort_handle());
            }
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => {}
        }
    }
}

/// A minimal HTTP/1.1 keep-alive responder that plays its node's fault.
async fn serve_conn(node: Arc<DemoNode>, mut stream: TcpStream) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 64 * 1024 {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let body_len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < head_end + body_len {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + body_len);
        match node.fault() {
            Fault::Crash => return,
            Fault::Hang => {
                // Never answer; hold the connection until the gateway closes it.
                while matches!(stream.read(&mut chunk).await, Ok(n) if n > 0) {}
                return;
            }
            Fault::Pause => {
                // The paused slice of each second: no answer until it is over.
                let into_second =
                    Duration::from_micros((epoch_us() % 1_000_000).try_into().unwrap_or(u64::MAX));
                if into_second < PAUSE_SLICE {
                    tokio::time::sleep(PAUSE_SLICE - into_second).await;
                }
            }
            Fault::None => {}
        }
        node.served.fetch_add(1, Ordering::Relaxed);
        let body = format!("hello from {}\n", node.name);
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            body
        );
        if stream.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn epoch_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

/// One demo client: a GET every `LOAD_PERIOD` on a keep-alive connection (reconnecting when
/// the gateway closes it), recording status and latency.
async fn load_client(addr: String, id: usize, stats: Arc<Mutex<ClientStats>>) {
    // Let the gateway bind first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn: Option<TcpStream> = None;
    let mut tick = tokio::time::interval(LOAD_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tick.tick().await;
        let t0 = Instant::now();
        let ok = match tokio::time::timeout(CLIENT_TIMEOUT, get(&addr, &mut conn, id, n)).await {
            Ok(Ok(status)) => status == 200,
            _ => {
                conn = None;
                false
            }
        };
        let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            s.ok += 1;
        } else {
            s.errors += 1;
        }
        s.latencies_us
            .push(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
    }
}

/// One GET; returns the status. The demo nodes' answers are small and carry a Content-Length.
async fn get(addr: &str, conn: &mut Option<TcpStream>, id: usize, n: u64) -> std::io::Result<u16> {
    if conn.is_none() {
        *conn = Some(TcpStream::connect(addr).await?);
    }
    let Some(stream) = conn.as_mut() else {
        return Err(std::io::ErrorKind::NotConnected.into());
    };
    let req = format!("GET /demo/{id}/{n} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    if let Err(e) = stream.write_all(req.as_bytes()).await {
        *conn = None;
        return Err(e);
    }
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(0);
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                match stream.read(&mut chunk).await? {
                    0 => break,
                    k => buf.extend_from_slice(&chunk[..k]),
                }
            }
            if head.contains("connection: close") {
                *conn = None;
            }
            return Ok(status);
        }
        match stream.read(&mut chunk).await? {
            0 => {
                *conn = None;
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            k => buf.extend_from_slice(&chunk[..k]),
        }
    }
}
