//! The real external tools the observability tests drive: `promtool`, a Prometheus server and
//! headless Chromium (Debian packages `prometheus` and `chromium`; `scripts/deps` installs
//! them). A missing tool fails the test with the package to install; it never passes silently.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::client::{self, Request};

pub const PROMTOOL: &str = "/usr/bin/promtool";
pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// `path`, or a panic naming the Debian package that provides it.
#[track_caller]
pub fn require(path: &str, package: &str) -> PathBuf {
    assert!(
        Path::new(path).exists(),
        "{path} not found: this test needs the Debian package `{package}` \
         (scripts/deps installs it; CI runs scripts/deps)"
    );
    PathBuf::from(path)
}

pub use super::ports::free_port;

/// Percent-encodes a query parameter value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs `promtool check metrics` on an exposition; returns (success, everything it printed).
pub async fn promtool_check_metrics(exposition: &str) -> (bool, String) {
    let promtool = require(PROMTOOL, "prometheus");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn promtool");
    let mut stdin = child.stdin.take().expect("promtool stdin");
    stdin
        .write_all(exposition.as_bytes())
        .await
        .expect("write to promtool");
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("promtool finishes within 30 s")
        .expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A real Prometheus server on loopback scraping one target every second, with its own storage
/// in a tempdir. Killed (by its PID, through `kill_on_drop`) when dropped.
pub struct Prometheus {
    child: Child,
    dir: TempDir,
    pub addr: SocketAddr,
}

impl Prometheus {
    pub async fn start(target: SocketAddr) -> Prometheus {
        let binary = require(PROMETHEUS, "prometheus");
        let dir = tempfile::Builder::new()
            .prefix("weir-prometheus-")
            .tempdir()
            .expect("tempdir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: weir\n    static_configs:\n      - targets: ['{target}']\n"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let addr = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn prometheus");
        let mut p = Prometheus { child, dir, addr };
        p.wait_ready().await;
        p
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            if let Ok(r) = client::send(self.addr, &Request::get("/-/ready")).await {
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in 60 s:\n{}",
                self.log()
            );
            // Another process's readiness cannot be awaited; poll it.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/query?query=expr`; panics unless Prometheus answers `status: success`.
    pub async fn query(&self, expr: &str) -> serde_json::Value {
        let target = format!("/api/v1/query?query={}", url_encode(expr));
        let resp = client::send(self.addr, &Request::get(&target))
            .await
            .unwrap_or_else(|e| panic!("query {expr}: {e}"));
        let body = resp.json();
        assert_eq!(
            body["status"], "success",
            "query {expr} answered {}: {body}",
            resp.status
        );
        body
    }

    /// The value of each series of an instant query, by the value of `label`.
    pub async fn values_by(&self, expr: &str, label: &str) -> Vec<(String, f64)> {
        let body = self.query(expr).await;
        body["data"]["result"]
            .as_array()
            .map(|series| {
                series
                    .iter()
                    .map(|s| {
                        let key = s["metric"][label].as_str().unwrap_or("").to_string();
                        let value = s["value"][1]
                            .as_str()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(f64::NAN);
                        (key, value)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Loads `url` in headless Chromium (fresh profile), lets the page run for `budget` of virtual
/// time, and returns the serialised DOM.
pub async fn chromium_dump_dom(url: &str, budget: Duration) -> String {
    let out = chromium(url, budget, &["--dump-dom"]).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Like [`chromium_dump_dom`], but writes a PNG screenshot to `path`.
pub async fn chromium_screenshot(url: &str, budget: Duration, path: &Path) {
    chromium(
        url,
        budget,
        &[
            &format!("--screenshot={}", path.display()),
            "--window-size=1400,800",
        ],
    )
    .await;
    assert!(path.exists(), "chromium wrote no screenshot to {path:?}");
}

async fn chromium(url: &str, budget: Duration, extra: &[&str]) -> Vec<u8> {
    let binary = require(CHROMIUM, "chromium");
    let profile = tempfile::Builder::new()
        .prefix("weir-chromium-")
        .tempdir()
        .expect("tempdir");
    let child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn chromium");
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("chromium finishes within 90 s")
        .expect("chromium output");
    assert!(
        out.status.success(),
        "chromium failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// A real `redis-server` on a free loopback port, in memory only; killed when dropped.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    _dir: TempDir,
}

impl Redis {
    /// Starts one on a free port and waits until it answers.
    pub async fn start() -> Redis {
        Redis::start_on(super::ports::free_port().port()).await
    }

    /// Starts one on `port` (e.g. again after [`Redis::stop`]).
    pub async fn start_on(port: u16) -> Redis {
        let bin = require(REDIS_SERVER, "redis-server");
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn redis-server");
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let _ = s.write_all(b"PING\r\n").await;
                let mut buf = [0u8; 16];
                use tokio::io::AsyncReadExt;
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await
                {
                    if buf[..n].starts_with(b"+PONG") {
                        break;
                    }
                }
            }
            assert!(
                Instant::now() < end,
                "redis-server on {port} did not answer"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Redis {
            child: Some(child),
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Runs one command (RESP, inline form) and returns the raw reply.
    pub async fn command(&self, line: &str) -> String {
        use tokio::io::AsyncReadExt;
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect to redis");
        s.write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("write");
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("redis answers")
            .expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}
