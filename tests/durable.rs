//! The durable queue log (`storage: log`, the default) end to end: the real binary killed
//! with SIGKILL, its log cut, its disk bound reached; real loopback upstreams.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::{Gateway, Request, Upstream};

const DEFERRED_LOG: &str = "deferred_queue: {enabled: true, storage: log}";
/// Bound on a replay reaching a node that came back (its backoff is up to 5 s).
const DELIVERY: Duration = Duration::from_secs(30);

/// A node that is down behind a gateway with a logged deferred queue.
async fn all_down_with_a_log() -> (Upstream, Gateway) {
    let a = Upstream::start_down("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(DEFERRED_LOG)
        .start()
        .await;
    (a, gw)
}

fn segments(gw: &Gateway) -> Vec<std::path::PathBuf> {
    let dir = gw.dir().join("data/deferred");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_requests_survive_kill_9_and_are_delivered_once_in_order() {
    let (a, mut gw) = all_down_with_a_log().await;
    const N: usize = 20;
    let mut ids = Vec::new();
    for i in 0..N {
        let body = format!("body-{i}-{}", "x".repeat(i * 100));
        let req = Request::post(&format!("/orders/{i}?n={i}"), body.clone())
            .header("X-Seq", &i.to_string())
            .header("Idempotency-Key", &format!("k{i}"));
        ids.push(gw.buffered(&req).await);
    }
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), N);
    // No shutdown of any kind: what the answers promised must be on disk already.
    gw.kill9();
    gw.restart().await;
    assert!(
        gw.logs()
            .contains(&format!("recovered {N} queued requests")),
        "{}",
        gw.logs()
    );
    a.up().await;
    a.wait_for_count(N, DELIVERY).await;
    // Nothing more arrives: each exactly once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = a.requests();
    assert_eq!(got.len(), N, "each delivered once");
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.method, "POST");
        assert_eq!(r.target, format!("/orders/{i}?n={i}"), "in order");
        assert_eq!(r.header("x-seq"), Some(i.to_string().as_str()));
        assert_eq!(r.header("idempotency-key"), Some(format!("k{i}").as_str()));
        let body = format!("body-{i}-{}", "x".repeat(i * 100));
        assert_eq!(r.body, body.as_bytes(), "body of {i} intact");
        assert!(r.header("x-forwarded-for").is_some());
    }
    // Delivered entries leave the log: another kill and restart delivers nothing again.
    gw.wait_for_delivered(N, DELIVERY).await;
    let m = gw.metrics().await;
    assert_eq!(
        m.sum("weir_deferred_queue_depth", &[("queue", "deferred")]),
        Some(0.0)
    );
    // Give the writer its removal records (written right after each delivery).
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.kill9();
    gw.restart().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        a.requests().len(),
        N,
        "nothing delivered twice after a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_cut_mid_record_is_truncated_and_the_rest_delivered() {
    let (a, mut gw) = all_down_with_a_log().await;
    for i in 0..5 {
        gw.buffered(&Request::post(&format!("/cut/{i}"), "y".repeat(300)))
            .await;
    }
    gw.kill9();
    // A torn write: the last record loses its end.
    let seg = segments(&gw).pop().expect("a segment");
    let len = std::fs::metadata(&seg).expect("metadata").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .expect("open");
    f.set_len(len - 100).expect("truncate");
    drop(f);
    gw.restart().await;
    let logs = gw.logs();
    assert!(logs.contains("truncated there"), "{logs}");
    assert!(logs.contains("recovered 4 queued requests"), "{logs}");
    a.up().await;
    a.wait_for_count(4, DELIVERY).await;
    let targets: Vec<String> = a.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(targets, ["/cut/0", "/cut/1", "/cut/2", "/cut/3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_says_queue_full_and_loses_nothing_it_accepted() {
    let a = Upstream::start_down("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("deferred_queue: {enabled: true, storage: log, max_bytes: 64KiB}")
        .start()
        .await;
    let body = "z".repeat(10 << 10);
    let mut accepted = Vec::new();
    let mut full = 0;
    for i in 0..12 {
        let resp = gw
            .send(&Request::post(&format!("/full/{i}"), body.clone()))
            .await;
        match resp.status {
            503 if resp.header("x-weir-queue-id").is_some() => accepted.push(i),
            503 => {
                resp.assert_sq_msg(503, "Queue Full");
                full += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!((4..=6).contains(&accepted.len()), "{accepted:?}");
    assert_eq!(accepted.len() + full, 12);
    let m = gw.metrics().await;
    assert_eq!(
        m.sum("weir_rejected_total", &[("reason", "queue_full")]),
        Some(full as f64)
    );
    a.up().await;
    a.wait_for_count(accepted.len(), DELIVERY).await;
    let targets: Vec<String> = a.requests().iter().map(|r| r.target.clone()).collect();
    let want: Vec<String> = accepted.iter().map(|i| format!("/full/{i}")).collect();
    assert_eq!(targets, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_weir_on_the_same_data_dir_is_refused() {
    let (_a, gw) = all_down_with_a_log().await;
    let text = gw
        .config_text()
        .replace(&format!("listen: {}", gw.addr()), "listen: 127.0.0.1:0");
    let text = text.replace(&gw.admin_addr().to_string(), "127.0.0.1:0");
    let path = gw.dir().join("second.yaml");
    std::fs::write(&path, text).expect("write");
    let out = support::run_weir(
        &["run", "-c", path.to_str().expect("utf-8")],
        gw.dir(),
        Duration::from_secs(20),
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another running weir"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_reports_what_is_left_and_the_next_start_delivers_it() {
    let (a, mut gw) = all_down_with_a_log().await;
    let first = gw.buffered(&Request::post("/int/1", "1")).await;
    gw.buffered(&Request::post("/int/2", "2")).await;
    gw.signal("INT");
    assert!(gw.wait_exit(Duration::from_secs(20)).await, "exited");
    let logs = gw.logs();
    assert!(
        logs.contains("2 queued requests remain at shutdown; they stay in the queue log"),
        "{logs}"
    );
    assert!(
        logs.contains(&format!("id={first} POST /int/1 remains undelivered")),
        "{logs}"
    );
    gw.restart().await;
    a.up().await;
    a.wait_for_count(2, DELIVERY).await;
    let targets: Vec<String> = a.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(targets, ["/int/1", "/int/2"]);
}
