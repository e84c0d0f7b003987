//! Raw HTTP/1.1 framing shared by the test upstreams and the test client: a buffered reader over
//! a `TcpStream` that parses request and response heads with `httparse` (so the request target
//! is seen byte for byte) and reads Content-Length, chunked and close-delimited bodies.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

/// Header list as received: names and values in order, duplicates kept.
pub type Headers = Vec<(String, String)>;

/// First value of `name` (case-insensitive).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Every value of `name` (case-insensitive), in order.
pub fn header_all<'a>(headers: &'a Headers, name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Hex md5 of `bytes`, the form the test upstream reports in `X-Body-Md5`.
pub fn md5_hex(bytes: &[u8]) -> String {
    format!("{:x}", md5::compute(bytes))
}

/// A request head as parsed off the wire.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Headers,
}

/// A response head as parsed off the wire.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub version: u8,
    pub headers: Headers,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn owned_headers(headers: &[httparse::Header<'_>]) -> Headers {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// How a message body is delimited.
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

fn request_framing(headers: &Headers) -> io::Result<Framing> {
    if is_chunked(headers) {
        return Ok(Framing::Chunked);
    }
    match header(headers, "content-length") {
        Some(v) => v
            .trim()
            .parse()
            .map(Framing::Length)
            .map_err(|_| invalid(format!("bad Content-Length {v:?}"))),
        None => Ok(Framing::None),
    }
}

fn is_chunked(headers: &Headers) -> bool {
    header_all(headers, "transfer-encoding")
        .iter()
        .flat_map(|v| v.split(','))
        .next_back()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
}

/// A TCP stream plus the bytes read from it but not consumed yet.
pub struct Wire {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    pub fn new(stream: TcpStream) -> Self {
        Wire {
            stream,
            buf: Vec::with_capacity(8192),
        }
    }

    /// Reads more bytes into the buffer; returns how many (0 = EOF).
    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Reads one request head. `Ok(None)` when the peer closed before sending anything.
    pub async fn read_request_head(&mut self) -> io::Result<Option<RequestHead>> {
        loop {
            if !self.buf.is_empty() {
                let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut slots);
                match req.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let head = RequestHead {
                            method: req.method.unwrap_or_default().to_string(),
                            target: req.path.unwrap_or_default().to_string(),
                            version: req.version.unwrap_or(1),
                            headers: owned_headers(req.headers),
                        };
                        self.buf.drain(..n);
                        return Ok(Some(head));
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => return Err(invalid(format!("bad request head: {e}"))),
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(invalid("request head too large"));
                }
            }
            if self.fill().await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    /// Reads the body that follows a request head.
    pub async fn read_request_body(&mut self, head: &RequestHead) -> io::Result<Vec<u8>> {
        let framing = request_framing(&head.headers)?;
        self.read_body(framing).await
    }

    /// Reads one final response head (interim 1xx responses other than 101 are skipped).
    pub async fn read_response_head(&mut self) -> io::Result<ResponseHead> {
        loop {
            let head = self.read_one_response_head().await?;
            if (100..200).contains(&head.status) && head.status != 101 {
                continue;
            }
            return Ok(head);
        }
    }

    async fn read_one_response_head(&mut self) -> io::Result<ResponseHead> {
        loop {
            if !self.buf.is_empty() {
                let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut resp = httparse::Response::new(&mut slots);
                match resp.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let head = ResponseHead {
                            status: resp.code.unwrap_or_default(),
                            reason: resp.reason.unwrap_or_default().to_string(),
                            version: resp.version.unwrap_or(1),
                            headers: owned_headers(resp.headers),
                        };
                        self.buf.drain(..n);
                        return Ok(head);
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => {
                        return Err(invalid(format!(
                            "bad response head ({e}): {:?}",
                            String::from_utf8_lossy(&self.buf)
                        )))
                    }
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(invalid("response head too large"));
                }
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before a complete response head (got {:?})",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        }
    }

    /// Reads the body that follows a response head to a request with `method`.
    pub async fn read_response_body(
        &mut self,
        method: &str,
        head: &ResponseHead,
    ) -> io::Result<Vec<u8>> {
        let no_body = method.eq_ignore_ascii_case("HEAD")
            || head.status == 204
            || head.status == 304
            || (100..200).contains(&head.status);
        let framing = if no_body {
            Framing::None
        } else if is_chunked(&head.headers) {
            Framing::Chunked
        } else if let Some(v) = header(&head.headers, "content-length") {
            Framing::Length(
                v.trim()
                    .parse()
                    .map_err(|_| invalid(format!("bad Content-Length {v:?}")))?,
            )
        } else {
            Framing::UntilClose
        };
        self.read_body(framing).await
    }

    async fn read_body(&mut self, framing: Framing) -> io::Result<Vec<u8>> {
        match framing {
            Framing::None => Ok(Vec::new()),
            Framing::Length(n) => self.take(n).await,
            Framing::Chunked => self.read_chunked().await,
            Framing::UntilClose => {
                while self.fill().await? > 0 {}
                Ok(std::mem::take(&mut self.buf))
            }
        }
    }

    /// Takes exactly `n` bytes.
    async fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("body ended after {} of {n} bytes", self.buf.len()),
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Takes one line without its CRLF.
    async fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).take(pos).collect();
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            if self.buf.len() > MAX_HEAD {
                return Err(invalid("line too long"));
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.line().await?;
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.line().await?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.take(size).await?);
            if !self.line().await?.is_empty() {
                return Err(invalid("chunk not followed by CRLF"));
            }
        }
    }

    /// Writes back every byte read (what was buffered first), until EOF or an error.
    pub async fn echo_until_close(&mut self) {
        let pending = std::mem::take(&mut self.buf);
        if !pending.is_empty() && self.write_all(&pending).await.is_err() {
            return;
        }
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if self.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Reads until EOF (or error), returning everything not consumed yet.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        while let Ok(n) = self.fill().await {
            if n == 0 {
                break;
            }
        }
        std::mem::take(&mut self.buf)
    }
}
