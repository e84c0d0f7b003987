//! Bad and unusual input from clients, on raw sockets: a body that ends before its declared
//! length (the client closed) is never delivered, live or from the queue; pipelined requests
//! are all answered in order; an HTTP/1.1 request without Host is refused; the client's own
//! keep-alive choice and RFC 9112's close after an ambiguous framing hold.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::wire::{header, Wire};
use support::{Gateway, Request, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `bytes` on a fresh connection to weir.
async fn wire_to(addr: SocketAddr, bytes: &[u8]) -> Wire {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let mut wire = Wire::new(stream);
    wire.write_all(bytes).await.expect("write");
    wire
}

/// True when the peer closes the connection (within a bound) with nothing more to read.
async fn closes(wire: &mut Wire) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), wire.stream.read(&mut byte)).await,
        Ok(Ok(0))
    )
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered_in_order() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&a).start().await;
    let mut wire = wire_to(
        gw.addr(),
        b"GET /p1 HTTP/1.1\r\nHost: t\r\n\r\nGET /p2 HTTP/1.1\r\nHost: t\r\n\r\n\
          GET /p3 HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await;
    for target in ["/p1", "/p2", "/p3"] {
        let head = wire
            .read_response_head()
            .await
            .expect("a response per request");
        assert_eq!(head.status, 200);
        assert_eq!(header(&head.headers, "x-seen-target"), Some(target));
        wire.read_response_body("GET", &head).await.expect("body");
    }
    let seen: Vec<String> = a.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(seen, ["/p1", "/p2", "/p3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http11_request_without_host_is_refused_with_400_and_counted() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&a).start().await;
    // (Two Host headers are refused by Pingora itself, before weir sees the request.)
    {
        let bytes = b"GET /nohost HTTP/1.1\r\nX-Request-Id: nohost\r\n\r\n";
        let mut wire = wire_to(gw.addr(), bytes).await;
        let head = wire.read_response_head().await.expect("response");
        assert_eq!(head.status, 400);
        let body = wire.read_response_body("GET", &head).await.expect("body");
        assert_eq!(body, br#"{"sq_msg":"Bad Request"}"#);
        assert!(
            closes(&mut wire).await,
            "the connection is closed after a 400"
        );
    }
    let line = gw.access_line("nohost").await;
    assert_eq!(line["status"], 400, "{line}");
    assert_eq!(line["outcome"], "rejected", "{line}");
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_rejected_total", &[("reason", "bad_request")]),
        1.0
    );
    // HTTP/1.0 needs no Host.
    let mut wire = wire_to(gw.addr(), b"GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(
        wire.read_response_head().await.expect("response").status,
        200
    );
    assert_eq!(a.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_asks_for_no_keepalive_gets_its_connection_closed() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&a).start().await;
    for bytes in [
        &b"GET /h10 HTTP/1.0\r\n\r\n"[..],
        &b"GET /close HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"[..],
    ] {
        let mut wire = wire_to(gw.addr(), bytes).await;
        let head = wire.read_response_head().await.expect("response");
        assert_eq!(head.status, 200);
        assert_ne!(
            header(&head.headers, "connection").map(str::to_ascii_lowercase),
            Some("keep-alive".to_string())
        );
        wire.read_response_body("GET", &head).await.expect("body");
        assert!(closes(&mut wire).await, "{bytes:?}: connection left open");
    }
    // HTTP/1.0 that asks for keep-alive keeps it.
    let mut wire = wire_to(
        gw.addr(),
        b"GET /h10ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    let head = wire.read_response_head().await.expect("response");
    wire.read_response_body("GET", &head).await.expect("body");
    wire.write_all(b"GET /again HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .expect("second request");
    assert_eq!(wire.read_response_head().await.expect("second").status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_both_content_length_and_chunked_is_answered_then_closed() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&a).start().await;
    let mut wire = wire_to(
        gw.addr(),
        b"POST /both HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let head = wire.read_response_head().await.expect("response");
    assert_eq!(head.status, 200);
    wire.read_response_body("POST", &head).await.expect("body");
    assert!(closes(&mut wire).await, "RFC 9112 §6.1: close after CL+TE");
    let got = a.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"hello", "the chunked framing wins");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_its_body_gets_408_and_leaves_the_nodes_blameless() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .upstream(&b)
        .yaml("timeouts: {request: 1s}")
        .start()
        .await;
    // Announce 2 MB (over max_buffered_body, so the body streams to the node) and send none.
    let mut clients = Vec::new();
    for i in 0..4 {
        let head = format!(
            "POST /slow{i} HTTP/1.1\r\nHost: t\r\nX-Request-Id: slow{i}\r\n\
             Content-Length: 2000000\r\n\r\n"
        );
        clients.push(wire_to(gw.addr(), head.as_bytes()).await);
    }
    for wire in &mut clients {
        let head = wire.read_response_head().await.expect("an answer");
        assert_eq!(head.status, 408);
        let body = wire.read_response_body("POST", &head).await.expect("body");
        assert_eq!(body, br#"{"sq_msg":"Request Timeout"}"#);
    }
    let m = gw.metrics().await;
    for result in ["timeout", "reset", "connect_refused"] {
        assert_eq!(
            m.sum_or_zero("weir_upstream_attempts_total", &[("result", result)]),
            0.0,
            "a slow client is not the nodes' failure ({result})"
        );
    }
    for node in [&a, &b] {
        assert_eq!(
            m.sum_or_zero(
                "weir_upstream_error_rate",
                &[("upstream", node.url().as_str())]
            ),
            0.0
        );
    }
    let resp = gw.send(&Request::get("/after")).await;
    assert_eq!(resp.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_coding_under_chunked_is_refused_with_501_not_stripped() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&a).start().await;
    // gzip under chunked: Pingora would decode the chunks and pass the gzip bytes as if plain.
    let mut wire = wire_to(
        gw.addr(),
        b"POST /gz HTTP/1.1\r\nHost: t\r\nX-Request-Id: gz1\r\n\
          Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let head = wire.read_response_head().await.expect("response");
    assert_eq!(head.status, 501);
    let body = wire.read_response_body("POST", &head).await.expect("body");
    assert_eq!(body, br#"{"sq_msg":"Not Implemented"}"#);
    assert!(
        closes(&mut wire).await,
        "the unread body ends the connection"
    );
    assert_eq!(a.count(), 0, "nothing reached the node");
    let line = gw.access_line("gz1").await;
    assert_eq!(line["status"], 501, "{line}");
}
