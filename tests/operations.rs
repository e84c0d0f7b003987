//! Zero-downtime operations against the real binary: config reload (SIGHUP and `weir reload`)
//! and binary upgrade (`weir run -u` + SIGQUIT) under a bounded load.

mod support;

use std::process::{Command, Stdio};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{Gateway, Upstream};

/// `clients` tasks sending GETs on fresh connections until `stop`, at most `per_client` each.
/// Each task returns what went wrong (non-2xx, errors). A connection closed before any response
/// byte (a process shutting down drops connections whose request it has not read yet) is
/// retried once on a fresh connection, as HTTP clients do, and counted in `closes`.
fn load(
    gw: &Arc<Gateway>,
    clients: usize,
    per_client: usize,
    stop: &Arc<AtomicBool>,
    done: &Arc<AtomicUsize>,
    closes: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    (0..clients)
        .map(|c| {
            let gw = gw.clone();
            let stop = stop.clone();
            let done = done.clone();
            let closes = closes.clone();
            tokio::spawn(async move {
                let mut bad = Vec::new();
                for i in 0..per_client {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let req = support::Request::get(&format!("/c{c}/{i}"));
                    let mut result = gw.try_send(&req).await;
                    // Closed or reset before any response byte: the request was never read.
                    let unread = |e: &std::io::Error| {
                        e.kind() == std::io::ErrorKind::ConnectionReset
                            || e.to_string().contains("(got \"\")")
                    };
                    if matches!(&result, Err(e) if unread(e)) {
                        closes.fetch_add(1, Ordering::Relaxed);
                        result = gw.try_send(&req).await;
                    }
                    match result {
                        Ok(r) if (200..300).contains(&r.status) => {}
                        Ok(r) => bad.push(format!("client {c} req {i}: {} {}", r.status, r.text())),
                        Err(e) => bad.push(format!("client {c} req {i}: {e}")),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                bad
            })
        })
        .collect()
}

async fn wait_until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + deadline;
    while !f() {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        // Progress of another process cannot be awaited; poll it.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a successor with `weir run -u` on the same config (stderr to `successor.log` in the
/// gateway's directory) and sends the running gateway SIGQUIT once the successor waits for
/// the sockets.
async fn upgrade(gw: &Gateway) -> std::process::Child {
    let log = std::fs::File::create(gw.dir().join("successor.log")).expect("log file");
    let successor = Command::new(support::WEIR)
        .args(["run", "-u", "-c"])
        .arg(gw.config_path())
        .current_dir(gw.dir())
        .env("STATE_DIRECTORY", gw.dir().join("state"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the successor");
    // The successor binds the upgrade socket and waits; the old process hands over on SIGQUIT.
    let sock = gw.dir().join("weir_upgrade.sock");
    wait_until(
        "the successor's upgrade socket",
        Duration::from_secs(10),
        || sock.exists(),
    )
    .await;
    gw.signal("QUIT");
    successor
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_is_rejected_and_the_old_config_keeps_serving() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&a).start().await;
    std::fs::write(
        gw.config_path(),
        "upstreams: [http://\nlimits: {bogus: 1}\n",
    )
    .expect("write");
    gw.reload("rejected").await;
    let resp = gw.get("/still").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.node(), Some("a"));
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_config_reloads_total", &[("result", "rejected")]),
        1.0
    );
    assert_eq!(
        m.sum_or_zero("weir_config_reloads_total", &[("result", "ok")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_reload_command_signals_the_running_process() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let gw = Gateway::builder().upstream(&a).start().await;
    let new = support::gateway::with_upstreams(gw.config_text(), &[b.url()]);
    std::fs::write(gw.config_path(), new).expect("rewrite config");
    let out = support::run_weir(
        &["reload", "-c", &gw.config_path().to_string_lossy()],
        gw.dir(),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    gw.wait_for_reloads("ok", 1.0).await;
    assert_eq!(gw.get("/moved").await.node(), Some("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_then_upgrade_under_load_lose_no_request() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let d = Upstream::start("d").await;
    let gw = Gateway::builder()
        .upstreams([&a, &b, &c])
        .yaml("server: {grace_period: 1s, graceful_shutdown_timeout: 1s}\nlog: {access: off}")
        .start()
        .await;
    let old_pid = gw.pid();
    let pid_file = gw.dir().join("weir.pid");
    let gw = Arc::new(gw);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let closes = Arc::new(AtomicUsize::new(0));
    let clients = load(&gw, 4, 100_000, &stop, &done, &closes);
    wait_until("traffic", Duration::from_secs(10), || {
        done.load(Ordering::Relaxed) >= 100
    })
    .await;

    // (a) Reload: a fourth node joins, the first leaves.
    let new = support::gateway::with_upstreams(gw.config_text(), &[b.url(), c.url(), d.url()]);
    std::fs::write(gw.config_path(), new).expect("rewrite config");
    gw.reload("ok").await;
    wait_until("the added node's traffic", Duration::from_secs(10), || {
        d.count() >= 20
    })
    .await;
    // Requests that started before the swap may still reach `a`: at most one per client.
    let a_after_reload = a.count();
    let m = gw.metrics().await;
    assert!(
        !m.text.contains(&format!("upstream=\"{}\"", a.url())),
        "the removed node's series are dropped"
    );
    assert_eq!(
        closes.load(Ordering::Relaxed),
        0,
        "a reload closes no connection"
    );

    // (b) Upgrade to a second process (which reads the reloaded file).
    let started = std::time::Instant::now();
    let mut successor = upgrade(&gw).await;
    wait_until("the successor's pid file", Duration::from_secs(10), || {
        std::fs::read_to_string(&pid_file)
            .map(|t| t.trim() == successor.id().to_string())
            .unwrap_or(false)
    })
    .await;

    let old_exit = {
        let mut exited = false;
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < until {
            if !std::path::Path::new(&format!("/proc/{old_pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{old_pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true)
            {
                exited = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        exited
    };
    let upgrade_took = started.elapsed();
    // Keep the load on the successor alone for a moment, then stop.
    let served_before = done.load(Ordering::Relaxed);
    wait_until("traffic on the successor", Duration::from_secs(10), || {
        done.load(Ordering::Relaxed) >= served_before + 200
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut bad = Vec::new();
    for t in clients {
        bad.extend(t.await.expect("client task"));
    }
    let _ = successor.kill();
    let _ = successor.wait();
    assert!(old_exit, "the old process did not exit after SIGQUIT");
    eprintln!(
        "upgrade: {} requests, {} failed, {} unread connections closed and retried, old process gone {:?} after the successor started",
        done.load(Ordering::Relaxed),
        bad.len(),
        closes.load(Ordering::Relaxed),
        upgrade_took
    );
    assert!(
        bad.is_empty(),
        "requests lost during the reload or upgrade: {bad:?}"
    );
    assert!(
        a.count() <= a_after_reload + 4,
        "the removed node got traffic after the reload: {a_after_reload} then {}",
        a.count()
    );
}

fn process_gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_queue_survives_an_upgrade_and_is_delivered_once_in_order() {
    queued_requests_survive_an_upgrade("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_log_survives_an_upgrade_and_is_delivered_once_in_order() {
    queued_requests_survive_an_upgrade("log").await;
}

async fn queued_requests_survive_an_upgrade(storage: &str) {
    let a = Upstream::start_down("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(&format!(
            "deferred_queue: {{enabled: true, storage: {storage}}}\n\
             server: {{grace_period: 1s, graceful_shutdown_timeout: 1s}}"
        ))
        .start()
        .await;
    let mut ids = Vec::new();
    for req in [
        support::Request::post("/one", "1"),
        support::Request::put("/two", "2"),
        support::Request::new("DELETE", "/three"),
    ] {
        let resp = gw.send(&req).await;
        resp.assert_sq_msg(503, "Request Buffered");
        ids.push(
            resp.header("x-weir-queue-id")
                .expect("queue id")
                .to_string(),
        );
    }

    let successor_log = gw.dir().join("successor.log");
    let mut successor = upgrade(&gw).await;
    let old = gw.pid();
    wait_until("the old process to exit", Duration::from_secs(20), || {
        process_gone(old)
    })
    .await;
    assert_eq!(
        a.count(),
        0,
        "nothing was delivered while the node was down"
    );

    // The node comes back: the successor, not the old process, delivers.
    a.up().await;
    let deadline = Duration::from_secs(15);
    let result = tokio::time::timeout(deadline, a.wait_for_count(3, deadline)).await;
    let old_log = gw.logs();
    let new_log = std::fs::read_to_string(&successor_log).unwrap_or_default();
    let _ = successor.kill();
    let _ = successor.wait();
    assert!(
        result.is_ok(),
        "not delivered\nold:\n{old_log}\nnew:\n{new_log}"
    );
    let got: Vec<(String, String)> = a
        .requests()
        .iter()
        .map(|r| (r.method.clone(), r.target.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("POST".to_string(), "/one".to_string()),
            ("PUT".to_string(), "/two".to_string()),
            ("DELETE".to_string(), "/three".to_string())
        ],
        "delivered exactly once, in order"
    );
    let handed = if storage == "memory" {
        "handed 3 queued requests over to the successor"
    } else {
        "3 queued requests stay in the queue's log for it"
    };
    assert!(old_log.contains(handed), "old process log:\n{old_log}");
    assert!(
        new_log.contains("took over 3 queued requests"),
        "successor log:\n{new_log}"
    );
    // The head's delivery is logged under the id its client got before the upgrade.
    assert!(
        new_log.contains(&format!("id={} POST /one delivered", ids[0])),
        "queue id {} kept across the upgrade:\n{new_log}",
        ids[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_during_a_replay_delivers_every_entry_once() {
    let a = Upstream::start_down("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(
            "deferred_queue: {enabled: true, replay_rate: 20/s}\n\
             server: {grace_period: 1s, graceful_shutdown_timeout: 1s}",
        )
        .start()
        .await;
    const N: usize = 60;
    for i in 0..N {
        let resp = gw
            .send(&support::Request::post(&format!("/r/{i}"), "b"))
            .await;
        resp.assert_sq_msg(503, "Request Buffered");
    }
    // The replay starts draining at 20/s (3 s for all), and the upgrade comes in the middle.
    a.up().await;
    a.wait_for_count(5, Duration::from_secs(30)).await;
    let successor_log = gw.dir().join("successor.log");
    let mut successor = upgrade(&gw).await;
    let old = gw.pid();
    wait_until("the old process to exit", Duration::from_secs(20), || {
        process_gone(old)
    })
    .await;
    let deadline = Duration::from_secs(30);
    let result = tokio::time::timeout(deadline, a.wait_for_count(N, deadline)).await;
    // Anything delivered twice would arrive by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new_log = std::fs::read_to_string(&successor_log).unwrap_or_default();
    let _ = successor.kill();
    let _ = successor.wait();
    assert!(
        result.is_ok(),
        "not all delivered\nold:\n{}\nnew:\n{new_log}",
        gw.logs()
    );
    let got: Vec<String> = a.requests().iter().map(|r| r.target.clone()).collect();
    let want: Vec<String> = (0..N).map(|i| format!("/r/{i}")).collect();
    assert_eq!(got, want, "each once, in order");
}
