//! Self-tests of the test harness (no gateway involved): the test upstreams behave as the
//! gateway tests assume.

mod support;

use std::time::Duration;

use support::client::{exchange_raw, send, send_raw};
use support::{md5_hex, random_body, Request, Upstream};

#[tokio::test]
async fn answer_echoes_target_method_and_body() {
    let up = Upstream::start("a").await;
    let body = random_body(100_000, 1);
    let req = Request::put("/a%2Fb?x=%2F", body.clone()).header("X-Test", "1");
    let resp = send(up.addr(), &req).await.expect("exchange");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.node(), Some("a"));
    assert_eq!(resp.header("x-seen-target"), Some("/a%2Fb?x=%2F"));
    assert_eq!(resp.header("x-seen-method"), Some("PUT"));
    assert_eq!(resp.header("x-body-md5"), Some(md5_hex(&body).as_str()));
    assert_eq!(resp.json()["body_len"], 100_000);
    let got = up.requests().pop().expect("recorded");
    assert_eq!(got.header("x-test"), Some("1"));
    assert_eq!(got.body, body);
}

#[tokio::test]
async fn chunked_bodies_and_keep_alive_are_understood() {
    let up = Upstream::start("a").await;
    let mut c = support::Client::connect(up.addr()).await.expect("connect");
    let raw = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\n";
    let resp = c.exchange("POST", raw).await.expect("chunked");
    assert_eq!(resp.header("x-body-md5"), Some(md5_hex(b"abcde").as_str()));
    let resp = c.send(&Request::get("/second")).await.expect("keep-alive");
    assert_eq!(resp.header("x-seen-target"), Some("/second"));
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn failure_behaviours_do_what_they_say() {
    let up = Upstream::start("a").await;
    let get = Request::get("/");

    up.status(503);
    assert_eq!(send(up.addr(), &get).await.expect("503").status, 503);

    up.reset();
    let err = send(up.addr(), &get).await.expect_err("reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

    up.close();
    let err = send(up.addr(), &get).await.expect_err("close");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");

    up.garbage();
    let raw = exchange_raw(up.addr(), &get.to_bytes(up.addr()), Duration::from_secs(5))
        .await
        .expect("garbage");
    assert_eq!(raw, support::upstream::GARBAGE);
    assert!(send_raw(up.addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .is_err());

    up.hang();
    let c = support::Client::connect(up.addr()).await.expect("connect");
    let mut c = c.with_timeout(Duration::from_millis(200));
    let err = c.send(&get).await.expect_err("hang");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);

    up.delay(Duration::from_millis(100));
    let started = std::time::Instant::now();
    assert_eq!(send(up.addr(), &get).await.expect("delay").status, 200);
    assert!(started.elapsed() >= Duration::from_millis(100));

    assert_eq!(up.count(), 7);
}

#[tokio::test]
async fn hold_answers_after_release() {
    let up = Upstream::start("a").await;
    up.hold();
    let addr = up.addr();
    let held = tokio::spawn(async move { send(addr, &Request::get("/h")).await });
    up.wait_for_count(1, Duration::from_secs(5)).await;
    assert!(!held.is_finished());
    up.release();
    assert_eq!(held.await.expect("join").expect("held").status, 200);
}

#[tokio::test]
async fn down_refuses_connections_and_up_listens_again() {
    let up = Upstream::start("a").await;
    let mut kept = support::Client::connect(up.addr()).await.expect("connect");
    assert_eq!(kept.send(&Request::get("/")).await.expect("ok").status, 200);

    up.down().await;
    let err = tokio::net::TcpStream::connect(up.addr())
        .await
        .expect_err("down");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(
        kept.send(&Request::get("/")).await.is_err(),
        "open connections are dropped too"
    );

    up.up().await;
    assert_eq!(
        send(up.addr(), &Request::get("/"))
            .await
            .expect("up")
            .status,
        200
    );
}

#[tokio::test]
async fn close_on_reuse_answers_a_connections_first_request_and_drops_the_next() {
    let up = Upstream::start("a").await;
    up.close_on_reuse();
    let mut c = support::Client::connect(up.addr()).await.expect("connect");
    let first = c.send(&Request::get("/first")).await.expect("first");
    assert_eq!(first.status, 200);
    assert_eq!(first.header("connection"), None, "kept alive");
    let err = c
        .send(&Request::post("/second", "x"))
        .await
        .expect_err("closed unanswered");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    // New connections are served as usual.
    let fresh = send(up.addr(), &Request::get("/fresh"))
        .await
        .expect("fresh");
    assert_eq!(fresh.status, 200);

    // stop_listening refuses new connections but leaves open ones to the behaviour.
    let mut kept = support::Client::connect(up.addr()).await.expect("connect");
    assert_eq!(
        kept.send(&Request::get("/k1")).await.expect("k1").status,
        200
    );
    up.stop_listening().await;
    let refused = tokio::net::TcpStream::connect(up.addr())
        .await
        .expect_err("not listening");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(kept.send(&Request::get("/k2")).await.is_err());

    let seen = |reqs: Vec<support::Received>| -> Vec<(String, usize)> {
        reqs.into_iter().map(|r| (r.target, r.connection)).collect()
    };
    let s = |t: &str, c: usize| (t.to_string(), c);
    assert_eq!(
        seen(up.requests()),
        [s("/first", 0), s("/fresh", 1), s("/k1", 2)]
    );
    assert_eq!(seen(up.dropped()), [s("/second", 0), s("/k2", 2)]);
    assert_eq!(up.dropped()[0].body, b"x", "read whole before the close");
    assert_eq!(up.count(), 3, "dropped requests are not counted");
}
