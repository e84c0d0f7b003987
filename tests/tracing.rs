//! Request tracing: `X-Request-Id` and W3C `traceparent` from the client to every upstream
//! attempt and into the access log; and the log files reopened on SIGUSR1 (rotation).

mod support;

use std::path::Path;
use std::time::Duration;

use support::{Gateway, Request, Upstream};
use tokio::time::Instant;

const CLIENT_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A `traceparent` of version 00 as weir generates it: flags 01, non-zero ids.
fn assert_generated(tp: &str) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00", "{tp}");
    assert_eq!(parts[1].len(), 32, "{tp}");
    assert_eq!(parts[2].len(), 16, "{tp}");
    assert_eq!(parts[3], "01", "{tp}");
    for id in &parts[1..3] {
        assert!(
            id.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
            "{tp}"
        );
        assert!(id.bytes().any(|c| c != b'0'), "{tp}");
    }
}

/// Lines of a file so far (empty when it does not exist yet).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Waits (bounded) until a line of `path` contains `needle`; returns that line.
async fn wait_for_line(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = lines(path).into_iter().find(|l| l.contains(needle)) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no line with {needle:?} in {path:?} within 10 s:\n{:?}",
            lines(path)
        );
        // The log writer is another thread of another process: poll its file.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_traceparent_reaches_every_attempt_unchanged() {
    let failing = Upstream::start("failing").await;
    failing.status(503);
    let a = Upstream::start("a").await;
    let gw = Gateway::builder().upstreams([&failing, &a]).start().await;
    // Until one request went to the failing node first and was retried on a.
    for i in 0..100 {
        let resp = gw
            .send(
                &Request::get(&format!("/t/{i}"))
                    .header("traceparent", CLIENT_TRACE)
                    .header("tracestate", "vendor=opaque"),
            )
            .await;
        assert_eq!(resp.status, 200);
        if failing.count() > 0 {
            break;
        }
    }
    assert!(failing.count() > 0, "the failing node was never tried");
    for r in failing.requests().iter().chain(a.requests().iter()) {
        assert_eq!(r.header_all("traceparent"), [CLIENT_TRACE], "{}", r.target);
        assert_eq!(r.header("tracestate"), Some("vendor=opaque"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_traceparent_is_generated_once_per_request_and_kept_across_retries() {
    let failing = Upstream::start("failing").await;
    failing.status(503);
    let a = Upstream::start("a").await;
    let gw = Gateway::builder().upstreams([&failing, &a]).start().await;
    for _ in 0..100 {
        assert_eq!(gw.get("/").await.status, 200);
        if failing.count() > 0 {
            break;
        }
    }
    let retried = failing.requests().remove(0);
    let id = retried
        .header("x-request-id")
        .expect("request id")
        .to_string();
    let tp = retried
        .header("traceparent")
        .expect("traceparent")
        .to_string();
    assert_generated(&tp);
    let on_a = a
        .requests()
        .into_iter()
        .find(|r| r.header("x-request-id") == Some(id.as_str()))
        .expect("the retry reached a");
    assert_eq!(
        on_a.header("traceparent"),
        Some(tp.as_str()),
        "same trace on retry"
    );
    // Different requests, different traces.
    let traces: std::collections::HashSet<String> = a
        .requests()
        .iter()
        .map(|r| r.header("traceparent").unwrap_or("").to_string())
        .collect();
    assert_eq!(traces.len(), a.count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_traceparent_is_replaced_and_its_tracestate_dropped() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&a).start().await;
    let invalid = [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "garbage",
    ];
    for bad in invalid {
        gw.send(
            &Request::get("/")
                .header("traceparent", bad)
                .header("tracestate", "vendor=stale"),
        )
        .await;
    }
    for r in a.requests() {
        let tp = r.header("traceparent").expect("traceparent");
        assert_generated(tp);
        assert!(!invalid.contains(&tp));
        assert_eq!(
            r.header("tracestate"),
            None,
            "tracestate of a replaced trace"
        );
    }
    assert_eq!(a.count(), invalid.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_and_traceparent_go_end_to_end_and_into_the_access_log() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&a).start().await;
    let stdout = gw.dir().join("stdout.log");

    // The client's id and trace are kept.
    let resp = gw
        .send(
            &Request::get("/given")
                .header("x-request-id", "client-id-42")
                .header("traceparent", CLIENT_TRACE),
        )
        .await;
    assert_eq!(resp.header("x-request-id"), Some("client-id-42"));
    let seen = a.requests().pop().expect("a got it");
    assert_eq!(seen.header("x-request-id"), Some("client-id-42"));
    let line = wait_for_line(&stdout, "client-id-42").await;
    let json: serde_json::Value = serde_json::from_str(&line).expect("access line is JSON");
    assert_eq!(json["id"], "client-id-42");
    assert_eq!(json["traceparent"], CLIENT_TRACE);

    // None given: weir's id is the same at the upstream, in the response and in the log.
    let resp = gw.get("/fresh").await;
    let id = resp
        .header("x-request-id")
        .expect("generated id")
        .to_string();
    let seen = a.requests().pop().expect("a got it");
    assert_eq!(seen.header("x-request-id"), Some(id.as_str()));
    let tp = seen.header("traceparent").expect("generated traceparent");
    assert_generated(tp);
    let line = wait_for_line(&stdout, &id).await;
    let json: serde_json::Value = serde_json::from_str(&line).expect("access line is JSON");
    assert_eq!(json["traceparent"], tp);
    assert_eq!(json["target"], "/fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_and_error_logs_after_rotation() {
    let dead = Upstream::start_down("dead").await;
    let gw = Gateway::builder()
        .upstream(&dead)
        .yaml("log: {access: '{dir}/access.log', error_file: '{dir}/weir_error.log'}")
        .start()
        .await;
    let access = gw.dir().join("access.log");
    let error = gw.dir().join("weir_error.log");

    let before = Request::get("/").header("x-request-id", "before-rotation");
    assert_eq!(gw.send(&before).await.status, 503);
    wait_for_line(&access, "before-rotation").await;
    wait_for_line(&error, "UPSTREAM_DOWN").await;

    // logrotate's default: rename, then signal.
    let (access_old, error_old) = (
        gw.dir().join("access.log.1"),
        gw.dir().join("weir_error.log.1"),
    );
    std::fs::rename(&access, &access_old).expect("rotate access.log");
    std::fs::rename(&error, &error_old).expect("rotate weir_error.log");
    gw.signal("USR1");

    // Requests after the signal land in new files (the reopen is asynchronous: poll).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("after-rotation-{n}");
        gw.send(&Request::get("/").header("x-request-id", &id))
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if lines(&access).iter().any(|l| l.contains(&id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new access.log 10 s after SIGUSR1\n{}",
            gw.logs()
        );
    }
    wait_for_line(&error, "UPSTREAM_DOWN").await;
    assert!(lines(&access_old)
        .iter()
        .any(|l| l.contains("before-rotation")));
    assert!(!lines(&access).iter().any(|l| l.contains("before-rotation")));
    assert!(!lines(&error_old).is_empty());
    // The gateway is still serving.
    assert_eq!(gw.admin_get("/healthz").await.status, 200);
}
