//! HTTP semantics through weir: request targets, redirects, forwarded and hop-by-hop headers,
//! configured response headers, malformed requests, bodies and keep-alive.

mod support;

use std::time::Duration;

use support::{md5_hex, random_body, Behaviour, Client, Gateway, Request, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_targets_reach_the_upstream_byte_for_byte() {
    let up = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&up).start().await;

    let targets = [
        "/%25zz",
        "/a%2Fb?x=%2F",
        "/a/./b/../c//d",
        "/%7Euser/caf%C3%A9?q=a+b&empty=&sp=%20",
    ];
    for target in targets {
        let resp = gw.get(target).await;
        assert_eq!(resp.status, 200, "GET {target}: {}", resp.text());
        assert_eq!(resp.header("x-seen-target"), Some(target));
        let last = up.requests().pop().expect("a request");
        assert_eq!(last.target, target);
    }
    assert_eq!(up.count(), targets.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_redirect_reaches_the_client_unfollowed() {
    let up = Upstream::start("a").await;
    up.set(Behaviour::Respond {
        status: 302,
        headers: vec![("Location".into(), "http://example.invalid/next?a=1".into())],
    });
    let gw = Gateway::builder().upstream(&up).start().await;

    let resp = gw.get("/old").await;
    assert_eq!(resp.status, 302, "{}", resp.text());
    assert_eq!(
        resp.header("location"),
        Some("http://example.invalid/next?a=1")
    );
    assert_eq!(up.count(), 1, "the redirect is not followed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_added_and_host_is_kept() {
    let up = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&up).start().await;

    let resp = gw
        .send(&Request::get("/who").header("Host", "example.test"))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let got = up.requests().pop().expect("a request");
    assert_eq!(got.header_all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(got.header_all("x-forwarded-proto"), ["http"]);
    assert_eq!(got.header_all("host"), ["example.test"]);
    let ids = got.header_all("x-request-id");
    assert_eq!(
        ids.len(),
        1,
        "one generated X-Request-Id: {:?}",
        got.headers
    );
    assert!(!ids[0].trim().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_request_ids_differ_between_requests() {
    let up = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&up).start().await;

    for _ in 0..2 {
        assert_eq!(gw.get("/").await.status, 200);
    }
    let ids: Vec<String> = up
        .requests()
        .iter()
        .map(|r| r.header("x-request-id").unwrap_or("").to_string())
        .collect();
    assert!(!ids[0].is_empty());
    assert_ne!(ids[0], ids[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_request_id_is_kept() {
    let up = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&up).start().await;

    let resp = gw
        .send(&Request::get("/").header("X-Request-Id", "client-id-42"))
        .await;
    assert_eq!(resp.status, 200);
    let got = up.requests().pop().expect("a request");
    assert_eq!(got.header_all("x-request-id"), ["client-id-42"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let up = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&up).start().await;

    let req = Request::get("/")
        .header("Connection", "foo")
        .header("Foo", "x")
        .header("Keep-Alive", "timeout=5")
        .header("Proxy-Connection", "keep-alive")
        .header("X-End-To-End", "yes");
    let resp = gw.send(&req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let got = up.requests().pop().expect("a request");
    for name in ["foo", "keep-alive", "proxy-connection"] {
        assert!(
            got.header(name).is_none(),
            "{name} was forwarded: {:?}",
            got.headers
        );
    }
    for value in got.header_all("connection") {
        assert!(
            !value.to_ascii_lowercase().contains("foo"),
            "the client's Connection header was forwarded: {:?}",
            got.headers
        );
    }
    assert_eq!(got.header("x-end-to-end"), Some("yes"));
}

const RESPONSE_HEADERS: &str = "response_headers: {X-Weir-Test: \"yes\", X-Served-By: weir-test}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_response_headers_are_added_to_proxied_responses() {
    let up = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&up)
        .yaml(RESPONSE_HEADERS)
        .start()
        .await;

    let resp = gw.get("/").await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("x-weir-test"),
        Some("yes"),
        "{:?}",
        resp.headers
    );
    assert_eq!(resp.header("x-served-by"), Some("weir-test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_response_headers_are_added_to_weirs_own_responses() {
    let dead = Upstream::start_down("dead").await;
    let gw = Gateway::builder()
        .upstream(&dead)
        .yaml(RESPONSE_HEADERS)
        .start()
        .await;

    let resp = gw.get("/").await;
    resp.assert_sq_msg(503, "Service Unavailable");
    assert_eq!(
        resp.header("x-weir-test"),
        Some("yes"),
        "{:?}",
        resp.headers
    );
}

async fn malformed_request_gets_400_and_weir_keeps_serving(raw: &[u8]) {
    let up = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&up).start().await;

    let resp = support::client::send_raw(gw.addr(), raw)
        .await
        .unwrap_or_else(|e| panic!("no response to {:?}: {e}", String::from_utf8_lossy(raw)));
    assert_eq!(resp.status, 400, "{:?} {}", resp.headers, resp.text());
    assert_eq!(up.count(), 0, "a malformed request reached the upstream");

    let next = gw.get("/after").await;
    assert_eq!(next.status, 200, "{}", next.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_line_without_colon_gets_400_and_weir_keeps_serving() {
    malformed_request_gets_400_and_weir_keeps_serving(
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_request_line_gets_400_and_weir_keeps_serving() {
    malformed_request_gets_400_and_weir_keeps_serving(b"THIS IS NOT HTTP\x01\x02\r\n\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_reaches_the_upstream_intact() {
    let up = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&up).start().await;
    let body = random_body(50_000, 3);
    let mut chunked = Vec::new();
    for part in body.chunks(7_000) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");

    let req = Request::post("/chunked", chunked).header("Transfer-Encoding", "chunked");
    let resp = gw.send(&req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-body-md5"), Some(md5_hex(&body).as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connection_is_kept_alive_across_requests() {
    let up = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&up).start().await;

    let mut client = Client::connect(gw.addr())
        .await
        .expect("connect")
        .with_timeout(Duration::from_secs(15));
    for i in 0..3 {
        let resp = client
            .send(&Request::get(&format!("/ka/{i}")))
            .await
            .unwrap_or_else(|e| panic!("request {i} on the kept-alive connection: {e}"));
        assert_eq!(resp.status, 200);
    }
    assert_eq!(up.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_off_closes_the_connection_after_the_response() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("timeouts: {keepalive: off}")
        .start()
        .await;
    let started = std::time::Instant::now();
    let raw = support::client::exchange_raw(
        gw.addr(),
        b"GET /once HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(6),
    )
    .await
    .expect("exchange");
    let closed = started.elapsed();
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // Not after an idle second (the old `0` meant 1 s), but right after the response.
    assert!(
        closed < Duration::from_millis(900),
        "connection closed after {closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connection_is_closed_after_the_keepalive_timeout() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("timeouts: {keepalive: 1s}")
        .start()
        .await;
    // Measured from before the request, so the lower bound holds however slow the exchange;
    // the upper one leaves a loaded machine room and is still far below the 120 s default.
    let started = std::time::Instant::now();
    // Reads until the server closes the idle connection (or 15 s pass).
    let raw = support::client::exchange_raw(
        gw.addr(),
        b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(15),
    )
    .await
    .expect("exchange");
    let idle = started.elapsed();
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(10),
        "connection closed after {idle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_written_as_serviceq_error_lines() {
    let a = Upstream::start("a").await;
    let dead = Upstream::start_down("dead").await;
    let gw = Gateway::builder().upstreams([&dead, &a]).start().await;
    for i in 0..10 {
        assert_eq!(gw.get(&format!("/e{i}")).await.status, 200);
    }
    let file = gw.dir().join("weir_error.log");
    let want = format!(
        "Error detected on {} [Code: 701, UPSTREAM_DOWN]",
        dead.url()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if text.contains(&want) {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no `{want}` in the error log:\n{text}"
        );
        // The log is written by its own thread; poll the file.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let line = text.lines().find(|l| l.contains(&want)).unwrap_or_default();
    // `weir: 2026/11/24 06:25:46 Error detected on ...`
    let stamp = line
        .strip_prefix("weir: ")
        .and_then(|rest| rest.get(..19))
        .unwrap_or_default();
    assert!(
        stamp.len() == 19 && stamp.as_bytes()[4] == b'/' && stamp.as_bytes()[13] == b':',
        "line shape: {line}"
    );
}
