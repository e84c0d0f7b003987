//! `weir demo`: three in-process upstreams on loopback (node 3 crashes for 10 s every 30 s),
//! the gateway in front of them on the embedded default config, and a live line every few
//! seconds showing where traffic went and what the router thinks of each node.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{AccessLog, Config, ErrorLog, Listener};
use crate::server::{self, RunOptions};

const PORTS: [u16; 3] = [9001, 9002, 9003];
const FLAP_UP: Duration = Duration::from_secs(20);
const FLAP_DOWN: Duration = Duration::from_secs(10);
const REPORT_EVERY: Duration = Duration::from_secs(3);

struct DemoNode {
    name: String,
    port: u16,
    up: AtomicBool,
    served: AtomicU64,
}

pub fn run(listen: &str) -> Result<(), String> {
    let mut config = Config::embedded_default();
    config.listen = vec![Listener {
        addr: listen.to_string(),
        tls: false,
    }];
    config.log.access = AccessLog::Off;
    config.log.error_log = ErrorLog::Off;
    let nodes: Vec<Arc<DemoNode>> = PORTS
        .iter()
        .enumerate()
        .map(|(i, &port)| {
            Arc::new(DemoNode {
                name: format!("node{}", i + 1),
                port,
                up: AtomicBool::new(true),
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
        let flapping = node.port == PORTS[2];
        rt.spawn(serve_node(node.clone(), Some(listener), flapping));
    }

    let built = server::build(config, &RunOptions::default())?;
    let gateway = built.gateway.clone();
    let report_nodes = nodes.clone();
    println!("weir demo: gateway on http://{listen}, upstreams on 127.0.0.1:9001-9003");
    println!(
        "  node3 crashes for {FLAP_DOWN:?} every {:?}; clients should not notice.",
        FLAP_UP + FLAP_DOWN
    );
    println!("  try:     curl -i http://{listen}/hello");
    println!("  load:    for i in $(seq 200); do curl -s http://{listen}/ ; done | sort | uniq -c");
    println!("  status:  open http://127.0.0.1:9100/ (live per-node view)");
    println!("  metrics: curl -s http://127.0.0.1:9100/metrics | grep weir_upstream");
    rt.spawn(async move {
        let mut last = vec![0u64; report_nodes.len()];
        loop {
            tokio::time::sleep(REPORT_EVERY).await;
            let state = gateway.runtime();
            let p = state.router.selection_probabilities();
            let mut line = String::from("weir demo:");
            for (i, n) in report_nodes.iter().enumerate() {
                let served = n.served.load(Ordering::Relaxed);
                line.push_str(&format!(
                    "  {} {} {:>4} req, score {:.2}, p {:.2} |",
                    n.name,
                    if n.up.load(Ordering::Relaxed) {
                        "up  "
                    } else {
                        "DOWN"
                    },
                    served - last[i],
                    state.router.error_score(i),
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

async fn serve_node(node: Arc<DemoNode>, mut listener: Option<TcpListener>, flapping: bool) {
    let mut phase_end = tokio::time::Instant::now() + FLAP_UP;
    loop {
        match &listener {
            Some(l) => {
                let accepted = if flapping {
                    tokio::time::timeout_at(phase_end, l.accept()).await.ok()
                } else {
                    Some(l.accept().await)
                };
                match accepted {
                    Some(Ok((stream, _))) => {
                        tokio::spawn(serve_conn(node.clone(), stream));
                    }
                    Some(Err(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
                    None => {
                        // Crash: stop listening (connects are refused) and drop live connections.
                        node.up.store(false, Ordering::Relaxed);
                        drop(listener.take());
                        tokio::time::sleep(FLAP_DOWN).await;
                        phase_end = tokio::time::Instant::now() + FLAP_UP;
                        listener = TcpListener::bind(("127.0.0.1", node.port)).await.ok();
                        node.up.store(listener.is_some(), Ordering::Relaxed);
                    }
                }
            }
            None => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                listener = TcpListener::bind(("127.0.0.1", node.port)).await.ok();
            }
        }
    }
}

/// A minimal HTTP/1.1 keep-alive responder.
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
        if !node.up.load(Ordering::Relaxed) {
            return;
        }
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
