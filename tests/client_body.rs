//! A request is forwarded or queued only as the client sent it: a body that ends before its
//! declared length (the client closed) is never delivered, live or from the queue.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{Gateway, Request, Upstream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const DEFERRED_ON: &str = "deferred_queue: {enabled: true}";

/// Sends a POST announcing `declared` body bytes, sends `sent` of them, and closes.
async fn abort_upload(addr: SocketAddr, id: &str, declared: usize, sent: usize) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /{id} HTTP/1.1\r\nHost: test\r\nX-Request-Id: {id}\r\n\
         Content-Length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(&vec![b'a'; sent]).await.expect("body");
    s.shutdown().await.expect("shutdown");
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_short_in_an_outage_is_never_queued_or_delivered() {
    let a = Upstream::start_down("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(DEFERRED_ON)
        .start()
        .await;
    for (id, declared, sent) in [
        ("abort1", 10, 3),
        ("abort2", 10, 0),
        ("abort3", 100_000, 50_000),
    ] {
        abort_upload(gw.addr(), id, declared, sent).await;
        let line = gw.access_line(id).await;
        assert_ne!(line["outcome"], "buffered", "{line}");
    }
    // A complete request behind them: FIFO delivery means anything queued before it would
    // reach the node first.
    let resp = gw.send(&Request::post("/complete", "whole")).await;
    resp.assert_sq_msg(503, "Request Buffered");
    a.up().await;
    gw.wait_for_metric(
        "weir_deferred_replayed_total",
        &[("queue", "deferred"), ("result", "delivered")],
        |v| v >= 1.0,
        Duration::from_secs(30),
    )
    .await;
    let targets: Vec<String> = a.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/complete"]);
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_deferred_enqueued_total", &[("queue", "deferred")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_short_is_never_forwarded_and_leaves_the_node_blameless() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(DEFERRED_ON)
        .start()
        .await;
    abort_upload(gw.addr(), "cut", 10, 3).await;
    let line = gw.access_line("cut").await;
    assert_eq!(line["attempts"], 0, "{line}");
    let resp = gw.send(&Request::post("/after", "x")).await;
    assert_eq!(resp.status, 200);
    let targets: Vec<String> = a.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/after"]);
    assert!(a.dropped().is_empty());
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_upstream_attempts_total", &[("result", "ok")]),
        1.0,
        "one attempt, the complete request's"
    );
}
