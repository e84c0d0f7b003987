//! Start-up failures are fatal: a listener that cannot bind makes `weir run` exit non-zero with
//! the reason on stderr, quickly and before it writes its pid file; `weir check` refuses
//! addresses that cannot exist and warns about ones it cannot bind here and now.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::gateway::{run_weir, BASE_YAML};
use support::Gateway;

/// `weir run` must give up well within this (Pingora alone retries a port in use for 30 s).
const EXIT_DEADLINE: Duration = Duration::from_secs(10);

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr")
}

/// A complete config for `listen` and `admin` in `dir`.
fn config(dir: &Path, listen: &str, admin: &str) -> PathBuf {
    let text = BASE_YAML
        .replace("{listen}", listen)
        .replace("{admin}", admin)
        .replace("{dir}", &dir.display().to_string())
        .replace("upstreams: []", "upstreams: [http://127.0.0.1:9]");
    let path = dir.join("weir.yaml");
    std::fs::write(&path, text).expect("write the config");
    path
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `weir run -c path`, which must fail within [`EXIT_DEADLINE`]; returns its stderr.
async fn run_must_fail(dir: &Path, path: &Path) -> String {
    let started = Instant::now();
    let out = run_weir(
        &["run", "-c", path.to_str().expect("utf-8")],
        dir,
        EXIT_DEADLINE,
    )
    .await;
    let err = stderr(&out);
    assert!(!out.status.success(), "weir run succeeded:\n{err}");
    assert!(!err.contains("panicked"), "weir run panicked:\n{err}");
    assert!(
        started.elapsed() < EXIT_DEADLINE,
        "took {:?}",
        started.elapsed()
    );
    assert!(
        !dir.join("weir.pid").exists(),
        "a pid file was written by a weir that did not start:\n{err}"
    );
    err
}

#[tokio::test]
async fn a_listen_port_in_use_is_fatal_before_the_pid_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let path = config(dir.path(), &addr.to_string(), &free_port().to_string());
    let err = run_must_fail(dir.path(), &path).await;
    let wanted = format!("listen {addr}: address in use");
    assert!(err.contains(&wanted), "stderr lacks {wanted:?}:\n{err}");
}

#[tokio::test]
async fn an_admin_port_in_use_is_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let path = config(dir.path(), &free_port().to_string(), &addr.to_string());
    let err = run_must_fail(dir.path(), &path).await;
    let wanted = format!("admin.listen {addr}: address in use");
    assert!(err.contains(&wanted), "stderr lacks {wanted:?}:\n{err}");
}

#[tokio::test]
async fn an_address_this_machine_does_not_have_is_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    // TEST-NET-1 (RFC 5737): assigned to no interface.
    let path = config(dir.path(), "192.0.2.1:5252", &free_port().to_string());
    let err = run_must_fail(dir.path(), &path).await;
    assert!(
        err.contains("listen 192.0.2.1:5252: address not available"),
        "{err}"
    );
}

#[tokio::test]
async fn an_address_that_cannot_exist_is_refused_by_check_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "upstreams: [http://127.0.0.1:9]\nlisten: 999.1.1.1:80\n",
    )
    .expect("write");
    for command in ["check", "run"] {
        let out = run_weir(
            &[command, "-c", path.to_str().expect("utf-8")],
            dir.path(),
            EXIT_DEADLINE,
        )
        .await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "weir {command}:\n{err}");
        assert!(
            err.contains("bad.yaml:2"),
            "weir {command}: no FILE:LINE:\n{err}"
        );
        assert!(err.contains("999.1.1.1"), "{err}");
    }
}

#[tokio::test]
async fn check_warns_about_a_port_in_use_but_accepts_the_file() {
    // A warning, not an error: the port is typically the running weir's, checked before a
    // reload or an upgrade.
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let path = config(dir.path(), &addr.to_string(), &free_port().to_string());
    let out = run_weir(
        &["check", "-c", path.to_str().expect("utf-8")],
        dir.path(),
        EXIT_DEADLINE,
    )
    .await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let wanted = format!("warning: listen {addr}: address in use");
    assert!(err.contains(&wanted), "stderr lacks {wanted:?}:\n{err}");
    // The check released the address at once.
    TcpListener::bind(free_port()).expect("bind");
}

#[tokio::test]
async fn a_privileged_port_without_the_right_is_warned_by_check_and_fatal_for_run() {
    // Run weir as `nobody` (setpriv), which may not bind below 1024 unless the machine says so.
    let unprivileged = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(1024);
    let setpriv = Command::new("setpriv").arg("--version").output();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || unprivileged <= 80 || setpriv.is_err() {
        eprintln!("skipped: needs root, setpriv, and port 80 privileged on this machine");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let path = config(dir.path(), "127.0.0.1:80", &free_port().to_string());
    let as_nobody = |command: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(support::WEIR)
            .args([command, "-c"])
            .arg(&path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run setpriv")
    };
    let check = as_nobody("check");
    let err = stderr(&check);
    assert!(check.status.success(), "{err}");
    assert!(
        err.contains("warning: listen 127.0.0.1:80: permission denied"),
        "{err}"
    );
    let started = Instant::now();
    let run = as_nobody("run");
    let err = stderr(&run);
    assert!(!run.status.success(), "{err}");
    assert!(
        err.contains("listen 127.0.0.1:80: permission denied (a port below 1024"),
        "{err}"
    );
    assert!(started.elapsed() < EXIT_DEADLINE);
    assert!(!dir.path().join("weir.pid").exists());
}

/// The case the start-up check cannot see: a successor (`weir run -u`) tolerates `address in
/// use` (the old process holds its addresses until the hand-over), so a new listener taken by
/// another program fails in Pingora's service thread, after Pingora's own 30 one-second
/// retries. That must end the process, not leave it running without the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_fails_in_pingora_ends_the_process() {
    let gw = Gateway::builder()
        .upstream_url("http://127.0.0.1:9")
        .start()
        .await;
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let extra = taken.local_addr().expect("addr");
    let text = gw.config_text().replace(
        &format!("listen: {}", gw.addr()),
        &format!("listen: ['{}', '{extra}']", gw.addr()),
    );
    assert_ne!(text, gw.config_text(), "the listen line was not found");
    let path = gw.dir().join("successor.yaml");
    std::fs::write(&path, text).expect("write");
    let log = gw.dir().join("successor.log");
    let mut successor = Command::new(support::WEIR)
        .args(["run", "-u", "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start the successor");
    let sock = gw.dir().join("weir_upgrade.sock");
    let until = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < until, "no upgrade socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.signal("QUIT");
    let until = Instant::now() + Duration::from_secs(50);
    let status = loop {
        if let Some(status) = successor.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= until {
            let _ = successor.kill();
            panic!(
                "the successor kept running without its listener:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("a listener could not start"), "{err}");
    assert!(err.contains(&extra.to_string()), "{err}");
    drop(taken);
}

#[tokio::test]
async fn a_data_dir_that_cannot_be_written_is_warned_by_check_and_fatal_for_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config(
        dir.path(),
        &free_port().to_string(),
        &free_port().to_string(),
    );
    // A file where the queue log's directory should be: no user can create it.
    std::fs::write(dir.path().join("plain-file"), "x").expect("write");
    let bad = dir.path().join("plain-file/data");
    let text = std::fs::read_to_string(&path)
        .expect("read")
        .replace(
            &format!("data_dir: {}/data", dir.path().display()),
            &format!("data_dir: {}", bad.display()),
        )
        .replace(
            "deferred_queue:\n  enabled: false",
            "deferred_queue:\n  enabled: true",
        );
    assert!(text.contains("plain-file/data"), "{text}");
    std::fs::write(&path, text).expect("write");
    let check = run_weir(
        &["check", "-c", path.to_str().expect("utf-8")],
        dir.path(),
        EXIT_DEADLINE,
    )
    .await;
    let err = stderr(&check);
    assert!(check.status.success(), "{err}");
    assert!(
        err.contains("server.data_dir") && err.contains("is not a directory"),
        "{err}"
    );
    let run = run_weir(
        &["run", "-c", path.to_str().expect("utf-8")],
        dir.path(),
        EXIT_DEADLINE,
    )
    .await;
    let err = stderr(&run);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("deferred_queue: cannot create"), "{err}");
}

/// A daemon (`weir run -d`) stopped by SIGTERM when dropped, if it still runs.
struct Daemon(Option<i32>);

impl Daemon {
    fn alive(&self) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        self.0.is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.0.filter(|_| self.alive()) {
            // SAFETY: the pid is the daemon this test started (read from its pid file).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Waits (bounded, polling) until `f` holds.
async fn eventually(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_daemon_writes_its_queue_log_and_access_log_after_the_fork() {
    // Pingora's `-d` forks after weir is built: the queue log's and the logs' writer threads
    // must run in the daemon, or a buffered request is never answered and no line is written.
    let dir = tempfile::tempdir().expect("tempdir");
    let (listen, admin) = (free_port(), free_port());
    let path = config(dir.path(), &listen.to_string(), &admin.to_string());
    let text = std::fs::read_to_string(&path)
        .expect("read")
        .replace(
            "deferred_queue:\n  enabled: false",
            "deferred_queue:\n  enabled: true",
        )
        .replace(
            "access: stdout",
            &format!("access: {}/access.log", dir.path().display()),
        );
    std::fs::write(&path, text).expect("write");
    // The daemon keeps the inherited stdout and stderr: files, not pipes to wait on.
    let parent_err = dir.path().join("parent-stderr.log");
    let status = Command::new(support::WEIR)
        .args(["run", "-d", "-c", path.to_str().expect("utf-8")])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&parent_err).expect("create"))
        .status()
        .expect("spawn weir");
    let parent_text = std::fs::read_to_string(&parent_err).unwrap_or_default();
    assert!(status.success(), "{parent_text}");
    let pid_file = dir.path().join("weir.pid");
    eventually("the pid file", support::gateway::READY_DEADLINE, || {
        std::fs::read_to_string(&pid_file).is_ok_and(|t| t.trim().parse::<i32>().is_ok())
    })
    .await;
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    let daemon = Daemon(Some(pid));
    let end = Instant::now() + support::gateway::READY_DEADLINE;
    loop {
        let ok = support::client::send(admin, &support::Request::get("/healthz"))
            .await
            .is_ok_and(|r| r.status == 200)
            && tokio::net::TcpStream::connect(listen).await.is_ok();
        if ok {
            break;
        }
        assert!(Instant::now() < end, "the daemon never answered /healthz");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resp = support::client::send(listen, &support::Request::post("/daemon", "kept"))
        .await
        .expect("the daemon answers a request every node fails for");
    resp.assert_sq_msg(503, "Request Buffered");
    let access = dir.path().join("access.log");
    eventually("the access line", Duration::from_secs(10), || {
        std::fs::read_to_string(&access)
            .is_ok_and(|t| t.contains("\"/daemon\"") && t.contains("buffered"))
    })
    .await;
    // SAFETY: the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    eventually("the daemon to exit", Duration::from_secs(30), || {
        !daemon.alive()
    })
    .await;
    // The daemon keeps the stderr it was started with.
    let errors = std::fs::read_to_string(&parent_err).expect("stderr");
    assert!(
        errors.contains("queue=deferred 1 queued requests remain at shutdown; they stay"),
        "{errors}"
    );
    // Only the daemon reports: not the parent that exited when it forked.
    assert!(
        !errors.contains("queue=deferred empty at shutdown"),
        "{errors}"
    );
}
