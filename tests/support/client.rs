//! A small HTTP/1.1 client over a raw `TcpStream`: requests go out exactly as built (method,
//! raw target, headers, body), responses are parsed with Content-Length, chunked or
//! close-delimited bodies. Every exchange is bounded by a timeout.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::wire::{self, Headers, Wire};

/// Bound on one request/response exchange (generous: the machine may be loaded).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// A request to send as is.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Sent byte for byte.
    pub target: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    /// Add `Host` (when absent) and `Content-Length` (when absent, no Transfer-Encoding, and
    /// there is a body or the method usually has one). On by default.
    pub auto_headers: bool,
}

impl Request {
    pub fn new(method: &str, target: &str) -> Self {
        Request {
            method: method.to_string(),
            target: target.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
            auto_headers: true,
        }
    }

    pub fn get(target: &str) -> Self {
        Request::new("GET", target)
    }

    pub fn post(target: &str, body: impl Into<Vec<u8>>) -> Self {
        Request::new("POST", target).body(body)
    }

    pub fn put(target: &str, body: impl Into<Vec<u8>>) -> Self {
        Request::new("PUT", target).body(body)
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sends only the headers given (no Host, no Content-Length added).
    pub fn exact_headers(mut self) -> Self {
        self.auto_headers = false;
        self
    }

    /// The bytes this request puts on the wire to `addr`.
    pub fn to_bytes(&self, addr: SocketAddr) -> Vec<u8> {
        let mut head = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        let has = |n: &str| wire::header(&self.headers, n).is_some();
        if self.auto_headers && !has("host") {
            head.push_str(&format!("Host: {addr}\r\n"));
        }
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let body_method = matches!(self.method.as_str(), "POST" | "PUT" | "PATCH");
        if self.auto_headers
            && !has("content-length")
            && !has("transfer-encoding")
            && (!self.body.is_empty() || body_method)
        {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        wire::header(&self.headers, name)
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        wire::header_all(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body text when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {} body {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// The test upstream that answered (`X-Node`), if any.
    pub fn node(&self) -> Option<&str> {
        self.header("x-node")
    }

    /// Asserts this is one of weir's own JSON answers: `status`, body `{"sq_msg": msg}`,
    /// `Content-Type: application/json` and a non-empty `X-Request-Id`.
    #[track_caller]
    pub fn assert_sq_msg(&self, status: u16, msg: &str) {
        assert_eq!(
            self.status,
            status,
            "status; headers {:?} body {:?}",
            self.headers,
            self.text()
        );
        let body: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("body of the {status} is not JSON ({e}): {:?}", self.text())
        });
        assert_eq!(body, serde_json::json!({ "sq_msg": msg }), "body");
        let ct = self.header("content-type").unwrap_or("");
        assert!(
            ct.starts_with("application/json"),
            "Content-Type of the {status} is {ct:?}, headers {:?}",
            self.headers
        );
        let id = self.header("x-request-id").unwrap_or("");
        assert!(
            !id.trim().is_empty(),
            "the {status} has no X-Request-Id, headers {:?}",
            self.headers
        );
    }
}

/// One client connection, reusable for several requests (keep-alive).
pub struct Client {
    addr: SocketAddr,
    wire: Wire,
    timeout: Duration,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> io::Result<Client> {
        let stream = tokio::time::timeout(EXCHANGE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = stream.set_nodelay(true);
        Ok(Client {
            addr,
            wire: Wire::new(stream),
            timeout: EXCHANGE_TIMEOUT,
        })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `req` on this connection and reads its response.
    pub async fn send(&mut self, req: &Request) -> io::Result<Response> {
        let bytes = req.to_bytes(self.addr);
        self.exchange(&req.method, &bytes).await
    }

    /// Writes `bytes` as they are and reads one response (as to a request with `method`).
    pub async fn exchange(&mut self, method: &str, bytes: &[u8]) -> io::Result<Response> {
        let wire = &mut self.wire;
        let work = async {
            wire.write_all(bytes).await?;
            let head = wire.read_response_head().await?;
            let body = wire.read_response_body(method, &head).await?;
            Ok(Response {
                status: head.status,
                reason: head.reason,
                headers: head.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no complete response in time"))?
    }
}

/// Sends `req` on a new connection and reads the response.
pub async fn send(addr: SocketAddr, req: &Request) -> io::Result<Response> {
    Client::connect(addr).await?.send(req).await
}

/// Writes raw `bytes` on a new connection and parses one response (for malformed requests).
pub async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> io::Result<Response> {
    Client::connect(addr).await?.exchange("GET", bytes).await
}

/// Writes raw `bytes` on a new connection and returns everything read until the server closes
/// or `timeout` passes.
pub async fn exchange_raw(
    addr: SocketAddr,
    bytes: &[u8],
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(bytes).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    Ok(out)
}
