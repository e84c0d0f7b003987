//! Slow and greedy clients on raw sockets: a request head or body that arrives too slowly is
//! answered 408 and frees what it held; bodies being received hold no concurrency slot;
//! connection and per-client limits refuse the excess while other clients pass; Pingora's own
//! refusals (a head it cannot parse, CONNECT) come in weir's format, logged and counted.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::wire::{header, Wire};
use support::{Gateway, Request, Upstream};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// A connection to weir from the loopback address `from` (127.0.0.1, 127.0.0.2, …).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> Wire {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::from(from), 0))
        .expect("bind a loopback source address");
    Wire::new(socket.connect(to).await.expect("connect"))
}

async fn wire_to(addr: SocketAddr, bytes: &[u8]) -> Wire {
    let mut wire = Wire::new(TcpStream::connect(addr).await.expect("connect"));
    wire.write_all(bytes).await.expect("write");
    wire
}

/// True when the peer closes the connection (within a bound) with nothing more to read.
async fn closes(wire: &mut Wire) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(20), wire.stream.read(&mut byte)).await,
        Ok(Ok(0))
    )
}

/// Reads one whole response: status and body.
async fn answer(wire: &mut Wire, method: &str) -> (u16, Vec<u8>, Option<String>) {
    let head = wire.read_response_head().await.expect("a response");
    let body = wire.read_response_body(method, &head).await.expect("body");
    let id = header(&head.headers, "x-request-id").map(str::to_string);
    (head.status, body, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_takes_too_long_gets_408_and_is_logged() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("timeouts: {client_head: 1s}")
        .start()
        .await;
    // Slowloris: a head that never ends.
    let mut slow = wire_to(
        gw.addr(),
        b"GET /slow-head HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n",
    )
    .await;
    // A connection that never sends anything is closed without an answer.
    let mut idle = Wire::new(TcpStream::connect(gw.addr()).await.expect("connect"));

    let (status, body, id) = answer(&mut slow, "GET").await;
    assert_eq!(status, 408);
    assert_eq!(body, br#"{"sq_msg":"Request Timeout"}"#);
    assert!(closes(&mut slow).await, "closed after the 408");
    assert!(closes(&mut idle).await, "an idle connection is closed");
    assert_eq!(a.count(), 0);

    let id = id.expect("x-request-id on weir's 408");
    let line = gw.access_line(&id).await;
    assert_eq!(line["status"], 408, "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["target"], "/slow-head", "{line}");
    assert_eq!(line["outcome"], "rejected", "{line}");
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_rejected_total", &[("reason", "client_timeout")]),
        1.0,
        "only the request with a partial head counts\n{}",
        m.text
    );
    // A prompt request still passes.
    assert_eq!(gw.get("/after").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_bodies_hold_no_slot_and_are_cut_with_408() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .upstream(&b)
        .yaml("limits: {concurrency_peak: 1}\ntimeouts: {client_body: 1s}")
        .start()
        .await;
    // Three clients announce 10 bytes and send 3 (R-U-Dead-Yet).
    let mut slow = Vec::new();
    for i in 0..3 {
        let head = format!(
            "POST /trickle{i} HTTP/1.1\r\nHost: t\r\nX-Request-Id: trickle{i}\r\n\
             Content-Length: 10\r\n\r\nabc"
        );
        slow.push(wire_to(gw.addr(), head.as_bytes()).await);
    }
    // While they wait, the one slot of the peak is free for a request that is all there.
    for _ in 0..3 {
        let resp = gw.send(&Request::post("/whole", "whole body")).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    for wire in &mut slow {
        let (status, body, _) = answer(wire, "POST").await;
        assert_eq!(status, 408);
        assert_eq!(body, br#"{"sq_msg":"Request Timeout"}"#);
    }
    let reached: Vec<String> = a
        .requests()
        .into_iter()
        .chain(b.requests())
        .map(|r| r.target)
        .collect();
    assert_eq!(reached, ["/whole"; 3], "no cut-short body reached a node");
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_rejected_total", &[("reason", "client_timeout")]),
        3.0,
        "\n{}",
        m.text
    );
    assert_eq!(
        m.sum_or_zero("weir_rejected_total", &[("reason", "concurrency")]),
        0.0
    );
    for result in ["timeout", "reset"] {
        assert_eq!(
            m.sum_or_zero("weir_upstream_attempts_total", &[("result", result)]),
            0.0,
            "a slow client is not the nodes' failure ({result})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_upload_above_the_minimum_rate_is_delivered_whole() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("limits: {min_body_rate: 1KiB/s}\ntimeouts: {client_body: 1s}")
        .start()
        .await;
    // 6 KiB in 12 pieces, one every 100 ms: ~5 KiB/s, well above the minimum, and longer
    // in all than the 1 s allowance.
    let body = support::random_body(6 * 1024, 7);
    let head = format!(
        "POST /steady HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut wire = wire_to(gw.addr(), head.as_bytes()).await;
    for piece in body.chunks(512) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        wire.write_all(piece).await.expect("piece");
    }
    let (status, _, _) = answer(&mut wire, "POST").await;
    assert_eq!(status, 200);
    let got = a.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_get_503_and_close() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("limits: {max_connections: 2}")
        .start()
        .await;
    let mut first = Wire::new(TcpStream::connect(gw.addr()).await.expect("connect"));
    let _second = Wire::new(TcpStream::connect(gw.addr()).await.expect("connect"));
    gw.wait_for_metric(
        "weir_client_connections",
        &[],
        |v| v == 2.0,
        Duration::from_secs(10),
    )
    .await;
    let mut third = Wire::new(TcpStream::connect(gw.addr()).await.expect("connect"));
    let (status, body, _) = answer(&mut third, "GET").await;
    assert_eq!(status, 503);
    assert_eq!(body, br#"{"sq_msg":"Too Many Connections"}"#);
    assert!(closes(&mut third).await);
    // The connections weir holds still work.
    first
        .write_all(b"GET /held HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(answer(&mut first, "GET").await.0, 200);
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero(
            "weir_connections_refused_total",
            &[("reason", "max_connections")]
        ),
        1.0
    );
    assert_eq!(m.sum("weir_max_connections", &[]), Some(2.0));
    // A closed connection gives its place back.
    drop(first);
    gw.wait_for_metric(
        "weir_client_connections",
        &[],
        |v| v <= 1.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(gw.get("/again").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_address_is_held_to_its_limits_while_others_pass() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("limits: {max_connections_per_client: 2, max_requests_per_client: 1}")
        .start()
        .await;
    a.hold();
    let mut busy = connect_from([127, 0, 0, 1], gw.addr()).await;
    busy.write_all(b"GET /held HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    a.wait_for_count(1, Duration::from_secs(10)).await;

    // The same address: a second request while its first is in progress is refused.
    let mut same = connect_from([127, 0, 0, 1], gw.addr()).await;
    same.write_all(b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let (status, body, _) = answer(&mut same, "GET").await;
    assert_eq!(status, 429);
    assert_eq!(body, br#"{"sq_msg":"Request Discarded"}"#);
    // ... and a third connection from it is refused at accept.
    let mut third = connect_from([127, 0, 0, 1], gw.addr()).await;
    assert_eq!(answer(&mut third, "GET").await.0, 503);

    // Another address is not affected.
    let mut other = connect_from([127, 0, 0, 2], gw.addr()).await;
    other
        .write_all(b"GET /other HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    a.wait_for_count(2, Duration::from_secs(10)).await;
    a.release();
    assert_eq!(answer(&mut busy, "GET").await.0, 200);
    assert_eq!(answer(&mut other, "GET").await.0, 200);
    // Its first request done, the address may send again.
    same.write_all(b"GET /later HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(answer(&mut same, "GET").await.0, 200);

    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_rejected_total", &[("reason", "client_limit")]),
        1.0
    );
    assert_eq!(
        m.sum_or_zero(
            "weir_connections_refused_total",
            &[("reason", "per_client")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pingoras_own_refusals_come_in_weirs_format_logged_and_counted() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("response_headers: {X-Served-By: edge-1}")
        .start()
        .await;
    let cases: [(&[u8], u16, &str, &str, &str); 3] = [
        (
            b"GET /bad-line HTTP/1.1\r\nHost: t\r\nNot A Header\r\n\r\n",
            400,
            "Bad Request",
            "GET",
            "/bad-line",
        ),
        (
            b"GET /two-hosts HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
            "Bad Request",
            "GET",
            "/two-hosts",
        ),
        (
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            405,
            "Method Not Allowed",
            "CONNECT",
            "example.com:443",
        ),
    ];
    for (bytes, status, message, method, target) in cases {
        let mut wire = wire_to(gw.addr(), bytes).await;
        let head = wire.read_response_head().await.expect("a response");
        assert_eq!(head.status, status);
        assert_eq!(
            header(&head.headers, "server"),
            None,
            "no `Server: Pingora`"
        );
        assert_eq!(header(&head.headers, "x-served-by"), Some("edge-1"));
        assert_eq!(
            header(&head.headers, "content-type"),
            Some("application/json")
        );
        let body = wire.read_response_body("GET", &head).await.expect("body");
        assert_eq!(body, format!(r#"{{"sq_msg":"{message}"}}"#).as_bytes());
        assert!(closes(&mut wire).await);
        let id = header(&head.headers, "x-request-id").expect("a request id");
        let line = gw.access_line(id).await;
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["method"], method, "{line}");
        assert_eq!(line["target"], target, "{line}");
    }
    assert_eq!(a.count(), 0);
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_rejected_total", &[("reason", "bad_request")]),
        3.0
    );
    assert_eq!(
        m.sum_or_zero(
            "weir_requests_total",
            &[("code", "4xx"), ("outcome", "rejected")]
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_streaming_to_a_node_hold_at_most_half_the_peak() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("limits: {concurrency_peak: 2, max_buffered_body: 1KiB}")
        .start()
        .await;
    // A body over max_buffered_body streams to the node: the first takes one of the two slots.
    let head = |i: usize| {
        format!(
            "POST /upload{i} HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n{}",
            "x".repeat(2048)
        )
    };
    let mut first = wire_to(gw.addr(), head(1).as_bytes()).await;
    gw.wait_for_metric(
        "weir_inflight_requests",
        &[],
        |v| v == 1.0,
        Duration::from_secs(10),
    )
    .await;
    // A second upload would make half the peak uploads: refused.
    let mut second = wire_to(gw.addr(), head(2).as_bytes()).await;
    let (status, body, _) = answer(&mut second, "POST").await;
    assert_eq!(status, 429);
    assert_eq!(body, br#"{"sq_msg":"Request Discarded"}"#);
    // A request that is all there still gets the other slot.
    assert_eq!(gw.get("/whole").await.status, 200);
    // The first upload finishes and is delivered whole.
    first
        .write_all(&vec![b'x'; 100_000 - 2048])
        .await
        .expect("rest of the body");
    assert_eq!(answer(&mut first, "POST").await.0, 200);
    let got: Vec<(String, usize)> = a
        .requests()
        .into_iter()
        .map(|r| (r.target, r.body.len()))
        .collect();
    assert!(got.contains(&("/upload1".to_string(), 100_000)), "{got:?}");
    assert!(!got.iter().any(|(t, _)| t == "/upload2"), "{got:?}");
}
