//! Test upstreams: real HTTP/1.1 servers on 127.0.0.1 ephemeral ports whose behaviour can be
//! switched while the gateway runs, and which record every request they receive.
//!
//! ```ignore
//! let a = Upstream::start("a").await;
//! a.set(Behaviour::Status(503));
//! a.down();           // connects are refused from now on
//! a.up().await;       // listening again on the same port
//! assert_eq!(a.count(), 0);
//! ```
//!
//! A request is recorded once its head and whole body were read, before the behaviour acts, so
//! a `reset`, `close` or `hang` node still shows what it was sent. The one exception is
//! [`Behaviour::CloseOnReuse`]: a request it drops unanswered on a reused connection is kept
//! apart, in [`Upstream::dropped`], so that `count`/`requests` are what the node answered.
//!
//! Every echo response (answer, status, delay, hold) carries `X-Node`, `X-Seen-Method`,
//! `X-Seen-Target`, `X-Body-Len` and `X-Body-Md5` headers and a JSON body
//! `{"node", "method", "target", "headers": [[name, value], ..], "body_len", "body_md5"}`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

use super::wire::{self, Headers, Wire};

/// What the upstream does with each request it has read (chosen when the request is complete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// 200 with the echo body (see [`Upstream`]).
    Answer,
    /// The echo response with this status.
    Status(u16),
    /// The echo response with this status and these extra headers (e.g. a 302 with Location).
    Respond { status: u16, headers: Headers },
    /// Read the request, never answer; the connection is dropped when the peer closes it
    /// (counted in [`Upstream::closed_while_hung`]).
    Hang,
    /// Answer 200 with `Content-Length: len` at once, then the body one byte (`x`) at a time,
    /// one every `every`; after `stop_after` bytes (if set) fall silent and wait for the close.
    Trickle {
        len: usize,
        every: Duration,
        stop_after: Option<usize>,
    },
    /// Answer `101 Switching Protocols` and then echo every byte back (a WebSocket-like
    /// tunnel), until the peer closes.
    Tunnel,
    /// Read the request, then wait for [`Upstream::release`] and answer 200.
    Hold,
    /// Read the request, then close with a TCP RST (SO_LINGER 0).
    Reset,
    /// Read the request, then close cleanly without a response.
    Close,
    /// Wait this long, then answer 200.
    Delay(Duration),
    /// Answer bytes that are not HTTP, then close.
    Garbage,
    /// A stale keep-alive connection, deterministically: the first request on a connection is
    /// answered like [`Behaviour::Answer`] (keep-alive, no `Connection: close`); a later request
    /// on that same connection is read (head and body, recorded in [`Upstream::dropped`], not
    /// in `requests`) and the socket is then closed cleanly without a response byte. A gateway
    /// that pooled the connection meets what Pingora calls a reused-connection error
    /// (`ConnectionClosed`, `RetryType::ReusedOnly`, `client_reused = true`). New connections
    /// are served as usual; with [`Upstream::stop_listening`] they are refused instead.
    CloseOnReuse,
}

/// One request as an upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// The request target exactly as it was on the wire.
    pub target: String,
    pub version: u8,
    pub headers: Headers,
    pub body: Vec<u8>,
    /// Which connection it came on: numbered from 0 in accept order, per upstream.
    pub connection: usize,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        wire::header(&self.headers, name)
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        wire::header_all(&self.headers, name)
    }

    pub fn body_md5(&self) -> String {
        wire::md5_hex(&self.body)
    }
}

/// What a [`Behaviour::Garbage`] node answers.
pub const GARBAGE: &[u8] = b"SSH-2.0-weir-test\r\nthis is not an HTTP response\r\n\r\n";

struct Shared {
    name: String,
    addr: SocketAddr,
    behaviour: Mutex<Behaviour>,
    received: Mutex<Vec<Received>>,
    /// Requests read and dropped unanswered by [`Behaviour::CloseOnReuse`].
    dropped: Mutex<Vec<Received>>,
    count: watch::Sender<usize>,
    /// Connections accepted so far (the next connection's number).
    accepted: std::sync::atomic::AtomicUsize,
    released: watch::Sender<bool>,
    connections: Mutex<Vec<JoinHandle<()>>>,
    /// Hung or trickling exchanges whose peer (the gateway) closed the connection.
    closed: watch::Sender<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running test upstream. Dropping it stops the listener and every connection.
pub struct Upstream {
    shared: Arc<Shared>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Upstream {
    /// Starts an upstream answering 200 on a fresh 127.0.0.1 port. `name` appears in `X-Node`.
    pub async fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a test upstream");
        let addr = listener.local_addr().expect("upstream local addr");
        let shared = Arc::new(Shared {
            name: name.to_string(),
            addr,
            behaviour: Mutex::new(Behaviour::Answer),
            received: Mutex::new(Vec::new()),
            dropped: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
            accepted: std::sync::atomic::AtomicUsize::new(0),
            released: watch::Sender::new(false),
            connections: Mutex::new(Vec::new()),
            closed: watch::Sender::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Upstream {
            shared,
            accept: Mutex::new(Some(accept)),
        }
    }

    /// Starts an upstream and takes it down at once: its port refuses connections.
    pub async fn start_down(name: &str) -> Upstream {
        let u = Upstream::start(name).await;
        u.down().await;
        u
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn port(&self) -> u16 {
        self.shared.addr.port()
    }

    /// `http://127.0.0.1:PORT`, the form weir uses as the metrics `upstream` label.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    pub fn set(&self, behaviour: Behaviour) {
        self.switch(behaviour);
    }

    /// Sets the behaviour and returns how many requests were counted before the switch: every
    /// one of them met the old behaviour, every later one meets the new (while traffic flows,
    /// `set` followed by `count` could count requests that already met the new behaviour).
    pub fn switch(&self, behaviour: Behaviour) -> usize {
        if behaviour == Behaviour::Hold {
            self.shared.released.send_replace(false);
        }
        let mut current = lock(&self.shared.behaviour);
        *current = behaviour;
        self.count()
    }

    pub fn answer(&self) {
        self.set(Behaviour::Answer)
    }

    pub fn status(&self, code: u16) {
        self.set(Behaviour::Status(code))
    }

    pub fn hang(&self) {
        self.set(Behaviour::Hang)
    }

    pub fn hold(&self) {
        self.set(Behaviour::Hold)
    }

    pub fn reset(&self) {
        self.set(Behaviour::Reset)
    }

    pub fn close(&self) {
        self.set(Behaviour::Close)
    }

    pub fn delay(&self, d: Duration) {
        self.set(Behaviour::Delay(d))
    }

    pub fn garbage(&self) {
        self.set(Behaviour::Garbage)
    }

    pub fn close_on_reuse(&self) {
        self.set(Behaviour::CloseOnReuse)
    }

    /// Lets every request held by [`Behaviour::Hold`] (now or later, until the next `hold`) answer.
    pub fn release(&self) {
        self.shared.released.send_replace(true);
    }

    /// Stops listening and drops every open connection: once this returns, connects are refused.
    pub async fn down(&self) {
        let accept = lock(&self.accept).take();
        if let Some(task) = accept {
            task.abort();
            // Resolves once the task (and with it the listener) was dropped.
            let _ = task.await;
        }
        // Each connection is closed when this returns (its FIN is on its way), so a gateway
        // that pooled one finds it closed rather than racing the close.
        let connections: Vec<_> = lock(&self.shared.connections).drain(..).collect();
        for conn in connections {
            conn.abort();
            let _ = conn.await;
        }
    }

    /// Stops listening, like [`Upstream::down`], but leaves the connections already open as
    /// they are: a node that went away while a gateway still holds one of its keep-alive
    /// connections in its pool (with [`Behaviour::CloseOnReuse`], that connection closes when
    /// the gateway next uses it). Once this returns, connects are refused.
    pub async fn stop_listening(&self) {
        let accept = lock(&self.accept).take();
        if let Some(task) = accept {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn up(&self) {
        if lock(&self.accept).is_some() {
            return;
        }
        let listener = rebind(self.shared.addr)
            .await
            .unwrap_or_else(|e| panic!("re-listen on {}: {e}", self.shared.addr));
        let task = tokio::spawn(accept_loop(listener, self.shared.clone()));
        *lock(&self.accept) = Some(task);
    }

    /// Hung (or silent trickling) exchanges the gateway closed: a cancelled attempt is seen.
    pub fn closed_while_hung(&self) -> usize {
        *self.shared.closed.borrow()
    }

    /// Waits until `n` hung exchanges were closed by the gateway, at most `deadline`.
    pub async fn wait_for_closed(&self, n: usize, deadline: Duration) -> bool {
        let mut rx = self.shared.closed.subscribe();
        tokio::time::timeout(deadline, rx.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Requests received so far (complete head and body).
    pub fn count(&self) -> usize {
        *self.shared.count.borrow()
    }

    pub fn requests(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    /// Removes and returns the requests recorded so far (`count` is unchanged): a long run
    /// folds them into its own tally instead of keeping every body.
    pub fn take_requests(&self) -> Vec<Received> {
        std::mem::take(&mut *lock(&self.shared.received))
    }

    /// Requests [`Behaviour::CloseOnReuse`] read on a reused connection and dropped unanswered.
    pub fn dropped(&self) -> Vec<Received> {
        lock(&self.shared.dropped).clone()
    }

    /// Waits (bounded by `deadline`) until at least `n` requests were received.
    pub async fn wait_for_count(&self, n: usize, deadline: Duration) {
        let mut rx = self.shared.count.subscribe();
        let waited = tokio::time::timeout(deadline, rx.wait_for(|c| *c >= n)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "upstream {} received {} requests within {deadline:?}, wanted {n}",
            self.shared.name,
            self.count()
        );
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.accept).take() {
            task.abort();
        }
        for conn in lock(&self.shared.connections).drain(..) {
            conn.abort();
        }
    }
}

async fn rebind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // e.g. EMFILE on a loaded machine: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let task = tokio::spawn(serve(stream, shared.clone()));
        let mut conns = lock(&shared.connections);
        conns.retain(|c| !c.is_finished());
        conns.push(task);
    }
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let connection = shared
        .accepted
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut wire = Wire::new(stream);
    let mut answered_here = 0usize;
    loop {
        let head = match wire.read_request_head().await {
            Ok(Some(head)) => head,
            Ok(None) | Err(_) => return,
        };
        let Ok(body) = wire.read_request_body(&head).await else {
            return;
        };
        let received = Received {
            method: head.method,
            target: head.target,
            version: head.version,
            headers: head.headers,
            body,
            connection,
        };
        // Recorded under the behaviour lock, so that [`Upstream::switch`] splits the requests
        // exactly into those counted before it (old behaviour) and after it (new behaviour).
        let behaviour = {
            let behaviour = lock(&shared.behaviour);
            if *behaviour == Behaviour::CloseOnReuse && answered_here > 0 {
                lock(&shared.dropped).push(received.clone());
            } else {
                lock(&shared.received).push(received.clone());
                shared.count.send_modify(|c| *c += 1);
            }
            behaviour.clone()
        };
        if behaviour == Behaviour::CloseOnReuse && answered_here > 0 {
            // Everything the gateway sent was read, so the close is a clean FIN, not a reset.
            use tokio::io::AsyncWriteExt;
            let _ = wire.stream.shutdown().await;
            return;
        }
        let keep_alive = received.version >= 1
            && !received
                .header("connection")
                .is_some_and(|v| v.to_ascii_lowercase().contains("close"));

        let response = match behaviour {
            Behaviour::Answer | Behaviour::CloseOnReuse => echo(&shared.name, &received, 200, &[]),
            Behaviour::Status(code) => echo(&shared.name, &received, code, &[]),
            Behaviour::Respond { status, headers } => {
                echo(&shared.name, &received, status, &headers)
            }
            Behaviour::Delay(d) => {
                tokio::time::sleep(d).await;
                echo(&shared.name, &received, 200, &[])
            }
            Behaviour::Hold => {
                let mut rx = shared.released.subscribe();
                if rx.wait_for(|r| *r).await.is_err() {
                    return;
                }
                echo(&shared.name, &received, 200, &[])
            }
            Behaviour::Hang => {
                wire.read_to_close().await;
                shared.closed.send_modify(|c| *c += 1);
                return;
            }
            Behaviour::Trickle {
                len,
                every,
                stop_after,
            } => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nX-Node: {}\r\nContent-Length: {len}\r\n\r\n",
                    shared.name
                );
                if wire.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let upto = stop_after.unwrap_or(len).min(len);
                for _ in 0..upto {
                    tokio::time::sleep(every).await;
                    if wire.write_all(b"x").await.is_err() {
                        // The gateway closed the connection mid-body.
                        shared.closed.send_modify(|c| *c += 1);
                        return;
                    }
                }
                if upto < len {
                    wire.read_to_close().await;
                    shared.closed.send_modify(|c| *c += 1);
                    return;
                }
                answered_here += 1;
                continue;
            }
            Behaviour::Tunnel => {
                let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                            Connection: Upgrade\r\n\r\n";
                if wire.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                wire.echo_until_close().await;
                return;
            }
            Behaviour::Reset => {
                let _ = wire.stream.set_zero_linger();
                return;
            }
            Behaviour::Close => {
                use tokio::io::AsyncWriteExt;
                let _ = wire.stream.shutdown().await;
                return;
            }
            Behaviour::Garbage => {
                let _ = wire.write_all(GARBAGE).await;
                use tokio::io::AsyncWriteExt;
                let _ = wire.stream.shutdown().await;
                return;
            }
        };
        if wire.write_all(&response).await.is_err() || !keep_alive {
            return;
        }
        answered_here += 1;
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// The echo response: headers and a JSON body describing what was received.
fn echo(node: &str, req: &Received, status: u16, extra: &[(String, String)]) -> Vec<u8> {
    let md5 = req.body_md5();
    let body = serde_json::json!({
        "node": node,
        "method": req.method,
        "target": req.target,
        "headers": req.headers,
        "body_len": req.body.len(),
        "body_md5": md5,
    })
    .to_string();
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nX-Node: {node}\r\n\
         X-Seen-Method: {}\r\nX-Seen-Target: {}\r\nX-Body-Len: {}\r\nX-Body-Md5: {md5}\r\n",
        reason(status),
        req.method,
        req.target,
        req.body.len(),
    );
    for (name, value) in extra {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    let no_body = req.method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304;
    if status != 204 && status != 304 {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !no_body {
        bytes.extend_from_slice(body.as_bytes());
    }
    bytes
}
