//! Runs the real `weir` binary as a child process against a config written to a tempdir.
//!
//! ```ignore
//! let gw = Gateway::builder()
//!     .upstreams([&a, &b])
//!     .yaml("timeouts: {request: 300ms}\nlimits: {concurrency_peak: 2}")
//!     .start()
//!     .await;
//! let resp = gw.get("/").await;
//! ```
//!
//! The YAML fragments are deep-merged over [`BASE_YAML`] (maps merge key by key, anything else
//! replaces), so a test states only what it is about. The child is killed (by its PID) when the
//! `Gateway` is dropped; if the test is panicking its stdout and stderr are printed first.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_yaml::Value;
use tempfile::TempDir;
use tokio::time::Instant;

use super::client::{self, Request, Response};
use super::metrics::Metrics;
use super::ports::two_free_ports;
use super::upstream::Upstream;

/// The weir binary under test.
pub const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// How long a gateway may take to answer `/healthz` (debug build, loaded 2-core machine).
pub const READY_DEADLINE: Duration = Duration::from_secs(30);

/// What every test gateway starts from. `{dir}`, `{listen}` and `{admin}` are filled in.
/// The deferred queue is off so that failures surface as the plain 502/503/504 answers.
pub const BASE_YAML: &str = "\
listen: {listen}
upstreams: []
admin:
  listen: {admin}
timeouts:
  connect: 1s
  request: 5s
deferred_queue:
  enabled: false
log:
  level: info
  access: stdout
  error_file: {dir}/weir_error.log
server:
  threads: 1
  pid_file: {dir}/weir.pid
  upgrade_sock: {dir}/weir_upgrade.sock
  data_dir: {dir}/data
";

/// Addresses and directory a config is written for.
#[derive(Debug, Clone)]
pub struct Ports {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
}

enum Source {
    /// BASE_YAML + upstreams + fragments.
    Yaml {
        upstreams: Vec<String>,
        fragments: Vec<String>,
    },
    /// A whole file, written by the closure for the chosen ports.
    Raw {
        file_name: String,
        text: Box<dyn Fn(&Ports) -> String + Send>,
    },
}

pub struct GatewayBuilder {
    source: Source,
    /// Extra environment of the weir process (e.g. SSL_CERT_FILE for a test CA).
    env: Vec<(String, String)>,
    /// The weir process's working directory (default: the gateway's tempdir).
    cwd: Option<PathBuf>,
}

impl GatewayBuilder {
    /// Runs weir in `dir` instead of the gateway's own tempdir (which still holds the config
    /// and the captured stdout/stderr).
    pub fn current_dir(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_path_buf());
        self
    }

    /// Sets an environment variable of the weir process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    fn yaml_parts(&mut self) -> (&mut Vec<String>, &mut Vec<String>) {
        match &mut self.source {
            Source::Yaml {
                upstreams,
                fragments,
            } => (upstreams, fragments),
            Source::Raw { .. } => panic!("a raw config takes no upstreams or YAML fragments"),
        }
    }

    pub fn upstream(mut self, u: &Upstream) -> Self {
        self.yaml_parts().0.push(u.url());
        self
    }

    pub fn upstreams<'a>(mut self, us: impl IntoIterator<Item = &'a Upstream>) -> Self {
        for u in us {
            self.yaml_parts().0.push(u.url());
        }
        self
    }

    pub fn upstream_url(mut self, url: &str) -> Self {
        self.yaml_parts().0.push(url.to_string());
        self
    }

    /// A YAML fragment deep-merged over the base config (later fragments win).
    pub fn yaml(mut self, fragment: &str) -> Self {
        self.yaml_parts().1.push(fragment.to_string());
        self
    }

    /// Runs `weir run -c FILE` and waits until its admin `/healthz` answers 200 and its listener
    /// accepts. Retries with fresh ports if the chosen ones were taken meanwhile.
    pub async fn start(self) -> Gateway {
        let mut last_failure = String::new();
        for _ in 0..3 {
            match self.try_start().await {
                Ok(gw) => return gw,
                Err(StartError::PortTaken(logs)) => last_failure = logs,
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
        panic!("weir could not bind its ports three times:\n{last_failure}");
    }

    async fn try_start(&self) -> Result<Gateway, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("weir-test-")
            .tempdir()
            .expect("create a tempdir");
        let (listen, admin) = two_free_ports();
        let ports = Ports {
            listen,
            admin,
            dir: dir.path().to_path_buf(),
        };
        let (file_name, text) = match &self.source {
            Source::Yaml {
                upstreams,
                fragments,
            } => (
                "weir.yaml".to_string(),
                compose_yaml(&ports, upstreams, fragments),
            ),
            Source::Raw { file_name, text } => (file_name.clone(), text(&ports)),
        };
        let config_path = dir.path().join(file_name);
        std::fs::write(&config_path, &text).expect("write the config");

        let stdout_path = dir.path().join("stdout.log");
        let stderr_path = dir.path().join("stderr.log");
        let child = Command::new(WEIR)
            .arg("run")
            .arg("-c")
            .arg(&config_path)
            .current_dir(self.cwd.as_deref().unwrap_or(dir.path()))
            // sq.properties configs have no data_dir: the default follows systemd's variable.
            .env("STATE_DIRECTORY", dir.path().join("state"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("create stdout.log"))
            .stderr(File::create(&stderr_path).expect("create stderr.log"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {WEIR}: {e}"));
        let mut gw = Gateway {
            child,
            dir,
            listen,
            admin,
            config_path,
            config_text: text,
        };
        gw.wait_ready().await?;
        Ok(gw)
    }
}

enum StartError {
    PortTaken(String),
    Failed(String),
}

fn fill(template: &str, ports: &Ports) -> String {
    template
        .replace("{listen}", &ports.listen.to_string())
        .replace("{admin}", &ports.admin.to_string())
        .replace("{dir}", &ports.dir.display().to_string())
}

fn compose_yaml(ports: &Ports, upstreams: &[String], fragments: &[String]) -> String {
    let mut config: Value = serde_yaml::from_str(&fill(BASE_YAML, ports)).expect("base YAML");
    let list = Value::Sequence(upstreams.iter().cloned().map(Value::String).collect());
    merge(
        &mut config,
        serde_yaml::Mapping::from_iter([("upstreams".into(), list)]).into(),
    );
    for fragment in fragments {
        let overlay: Value = serde_yaml::from_str(&fill(fragment, ports))
            .unwrap_or_else(|e| panic!("test YAML fragment does not parse ({e}):\n{fragment}"));
        merge(&mut config, overlay);
    }
    serde_yaml::to_string(&config).expect("serialise the test config")
}

/// `text` (a YAML config) with its `upstreams` replaced by `urls`.
pub fn with_upstreams(text: &str, urls: &[String]) -> String {
    let mut doc: Value = serde_yaml::from_str(text).expect("config is YAML");
    doc["upstreams"] = Value::Sequence(urls.iter().cloned().map(Value::String).collect());
    serde_yaml::to_string(&doc).expect("serialise")
}

/// Deep merge: mappings merge key by key, everything else is replaced by the overlay.
pub fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// A running weir child process.
pub struct Gateway {
    child: Child,
    dir: TempDir,
    listen: SocketAddr,
    admin: SocketAddr,
    config_path: PathBuf,
    config_text: String,
}

impl Gateway {
    /// A gateway from [`BASE_YAML`]; add upstreams and fragments, then `start()`.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder {
            source: Source::Yaml {
                upstreams: Vec::new(),
                fragments: Vec::new(),
            },
            env: Vec::new(),
            cwd: None,
        }
    }

    /// A gateway from a whole config file (e.g. an `sq.properties`), written by `text` for the
    /// chosen ports.
    pub fn raw_config(
        file_name: &str,
        text: impl Fn(&Ports) -> String + Send + 'static,
    ) -> GatewayBuilder {
        GatewayBuilder {
            source: Source::Raw {
                file_name: file_name.to_string(),
                text: Box::new(text),
            },
            env: Vec::new(),
            cwd: None,
        }
    }

    async fn wait_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + READY_DEADLINE;
        let mut last = String::from("not polled yet");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let logs = self.logs();
                if logs.contains("in use") || logs.to_lowercase().contains("addrinuse") {
                    return Err(StartError::PortTaken(logs));
                }
                return Err(StartError::Failed(format!(
                    "weir exited ({status}) before it was ready\n{}",
                    self.describe()
                )));
            }
            if Instant::now() >= deadline {
                return Err(StartError::Failed(format!(
                    "weir not ready within {READY_DEADLINE:?} (last /healthz: {last})\n{}",
                    self.describe()
                )));
            }
            match self.healthz().await {
                Ok(200) => {
                    if tokio::net::TcpStream::connect(self.listen).await.is_ok() {
                        return Ok(());
                    }
                    last = "200, but the proxy listener refuses".into();
                }
                Ok(code) => last = format!("status {code}"),
                Err(e) => last = e.to_string(),
            }
            // Readiness of another process cannot be awaited; poll it.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn healthz(&self) -> io::Result<u16> {
        let mut c = client::Client::connect(self.admin)
            .await?
            .with_timeout(Duration::from_secs(2));
        Ok(c.send(&Request::get("/healthz")).await?.status)
    }

    /// Kills the process with SIGKILL (no shutdown of any kind) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts weir again on the same config and directory (after [`Gateway::kill9`] or an
    /// exit); its logs are appended to the same files.
    pub async fn restart(&mut self) {
        self.kill9();
        let append = |name: &str| {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(self.dir.path().join(name))
                .expect("open a log file")
        };
        self.child = Command::new(WEIR)
            .arg("run")
            .arg("-c")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .env("STATE_DIRECTORY", self.dir.path().join("state"))
            .stdin(Stdio::null())
            .stdout(append("stdout.log"))
            .stderr(append("stderr.log"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {WEIR}: {e}"));
        match self.wait_ready().await {
            Ok(()) => {}
            Err(StartError::PortTaken(logs) | StartError::Failed(logs)) => {
                panic!("restart failed:\n{logs}")
            }
        }
    }

    /// Waits (bounded, polling) for the child to exit; returns whether it did.
    pub async fn wait_exit(&mut self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// The proxy listener.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The weir child's process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (a `kill -s` name such as `USR1`) to the weir child.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("run kill -s {signal}: {e}"));
        assert!(status.success(), "kill -s {signal} {} failed", self.pid());
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn config_text(&self) -> &str {
        &self.config_text
    }

    /// stdout and stderr of the child so far.
    pub fn logs(&self) -> String {
        let read = |name: &str| {
            std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_else(|e| e.to_string())
        };
        format!(
            "--- weir stdout ---\n{}\n--- weir stderr ---\n{}",
            tail(&read("stdout.log")),
            tail(&read("stderr.log"))
        )
    }

    /// What the child wrote to stdout so far (the access log, with `log.access: stdout`).
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    /// What the child wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// The JSON access-log lines on stdout so far.
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        self.stdout_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.is_object())
            .collect()
    }

    /// Waits (bounded) for the access-log line of the request whose `id` (X-Request-Id) is
    /// `id`; the line is written by the logging hook, just after the response went out.
    pub async fn access_line(&self, id: &str) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.access_lines().into_iter().find(|l| l["id"] == id) {
                return line;
            }
            assert!(
                Instant::now() < end,
                "no access-log line with id {id:?} within 10 s\n{}",
                self.logs()
            );
            // The log is written by another process: poll its file.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) until stderr contains `needle`; returns all of stderr.
    pub async fn wait_for_stderr(&self, needle: &str) -> String {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.stderr_text();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < end,
                "no {needle:?} on weir's stderr within 10 s\n{}",
                self.logs()
            );
            // The log is written by another process: poll its file.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn describe(&self) -> String {
        format!(
            "--- config {} ---\n{}\n{}",
            self.config_path.display(),
            self.config_text,
            self.logs()
        )
    }

    /// Sends `req` on a new connection to the proxy listener.
    pub async fn try_send(&self, req: &Request) -> io::Result<Response> {
        client::send(self.listen, req).await
    }

    /// Sends `req` on a new connection; panics (printing the gateway's logs) on an I/O error.
    pub async fn send(&self, req: &Request) -> Response {
        match self.try_send(req).await {
            Ok(r) => r,
            Err(e) => panic!(
                "{} {} through weir: {e}\n{}",
                req.method,
                req.target,
                self.describe()
            ),
        }
    }

    pub async fn get(&self, target: &str) -> Response {
        self.send(&Request::get(target)).await
    }

    /// `GET path` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Response {
        client::send(self.admin, &Request::get(path))
            .await
            .unwrap_or_else(|e| panic!("GET {path} on the admin listener: {e}\n{}", self.logs()))
    }

    /// `req` on the admin listener (the registry API).
    pub async fn admin_send(&self, req: &Request) -> Response {
        client::send(self.admin, req).await.unwrap_or_else(|e| {
            panic!(
                "{} {} on the admin listener: {e}\n{}",
                req.method,
                req.target,
                self.logs()
            )
        })
    }

    /// `PUT /registry/{cluster}/{id}` for a node on 127.0.0.1:`port`; `extra` are more JSON
    /// fields (`"zone":"eu-1"`, or empty). Returns the admin listener's answer.
    pub async fn register(&self, cluster: &str, id: &str, port: u16, extra: &str) -> Response {
        let sep = if extra.is_empty() { "" } else { "," };
        let body = format!(r#"{{"host":"127.0.0.1","port":{port}{sep}{extra}}}"#);
        self.admin_send(
            &Request::put(&format!("/registry/{cluster}/{id}"), body)
                .header("Content-Type", "application/json"),
        )
        .await
    }

    /// GETs `target` (with `Host: host` when given) until the node that answers is `node`
    /// (`None`: no node answered, a 503); how long that took. Bounded by 10 s.
    pub async fn until_routed(
        &self,
        host: Option<&str>,
        target: &str,
        node: Option<&str>,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let mut req = Request::get(target);
            if let Some(h) = host {
                req = req.header("Host", h);
            }
            let resp = self.send(&req).await;
            let got = match resp.status {
                200 => resp.node().map(str::to_string),
                _ => None,
            };
            if got.as_deref() == node {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{host:?}{target} still goes to {got:?} ({}), not {node:?}\n{}",
                resp.status,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `req`, which must be answered `503 Request Buffered`; returns its queue id.
    pub async fn buffered(&self, req: &Request) -> String {
        let resp = self.send(req).await;
        resp.assert_sq_msg(503, "Request Buffered");
        resp.header("x-weir-queue-id")
            .unwrap_or_else(|| panic!("no X-Weir-Queue-Id: {:?}", resp.headers))
            .to_string()
    }

    /// Waits until the deferred queue's replay counted `n` deliveries.
    pub async fn wait_for_delivered(&self, n: usize, deadline: Duration) {
        self.wait_for_metric(
            "weir_deferred_replayed_total",
            &[("queue", "deferred"), ("result", "delivered")],
            |v| v >= n as f64,
            deadline,
        )
        .await;
    }

    pub async fn metrics(&self) -> Metrics {
        let resp = self.admin_get("/metrics").await;
        assert_eq!(resp.status, 200, "GET /metrics: {}", resp.text());
        Metrics::parse(&resp.text())
    }

    /// Sends SIGHUP and waits (bounded) until the reload is counted with `result` (`ok` or
    /// `rejected`) in `weir_config_reloads_total`.
    pub async fn reload(&self, result: &str) {
        let labels = [("result", result)];
        let before = self
            .metrics()
            .await
            .sum_or_zero("weir_config_reloads_total", &labels);
        self.signal("HUP");
        self.wait_for_reloads(result, before + 1.0).await;
    }

    /// Waits (bounded) until `weir_config_reloads_total{result}` reaches `at_least`.
    pub async fn wait_for_reloads(&self, result: &str, at_least: f64) {
        self.wait_for_metric(
            "weir_config_reloads_total",
            &[("result", result)],
            |v| v >= at_least,
            Duration::from_secs(10),
        )
        .await;
    }

    /// Scrapes `/metrics` until `ok` holds for the sum of `name{labels}` (missing = 0), bounded by
    /// `deadline`; counters are updated when a request is logged, which may be just after the
    /// client saw the response. Returns the last value.
    pub async fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        ok: impl Fn(f64) -> bool,
        deadline: Duration,
    ) -> f64 {
        let end = Instant::now() + deadline;
        loop {
            let m = self.metrics().await;
            let v = m.sum_or_zero(name, labels);
            if ok(v) {
                return v;
            }
            assert!(
                Instant::now() < end,
                "{name}{labels:?} = {v} still not as expected after {deadline:?}\n{}",
                m.text
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.describe());
        }
    }
}

/// The last 200 lines of a log.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(200);
    lines[start..].join("\n")
}

/// Runs `weir ARGS` to completion (bounded by `deadline`; killed after it).
pub async fn run_weir(args: &[&str], dir: &Path, deadline: Duration) -> Output {
    let child = tokio::process::Command::new(WEIR)
        .args(args)
        .current_dir(dir)
        .env("STATE_DIRECTORY", dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {WEIR}: {e}"));
    match tokio::time::timeout(deadline, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("waiting for weir {args:?}: {e}"),
        Err(_) => panic!("weir {args:?} did not exit within {deadline:?}"),
    }
}
