//! The deferred and upfront queues end to end: the real binary, real loopback upstreams.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::{client, Gateway, Request, Upstream};

const DEFERRED_ON: &str = "deferred_queue: {enabled: true}";
/// Bound on a replay reaching a node that came back: the replay backs off up to 5 s between
/// tries while the cluster is down (where in that backoff the node returns depends on how fast
/// the test got there), then delivers; a loaded machine adds its own delays.
const DELIVERY: Duration = Duration::from_secs(30);

async fn buffered(gw: &Gateway, req: Request) -> String {
    let resp = gw.send(&req).await;
    resp.assert_sq_msg(503, "Request Buffered");
    assert!(
        resp.header("retry-after").is_some(),
        "no Retry-After: {:?}",
        resp.headers
    );
    resp.header("x-weir-queue-id")
        .unwrap_or_else(|| panic!("no X-Weir-Queue-Id: {:?}", resp.headers))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_requests_reach_a_returning_node_in_order_with_bodies_and_headers() {
    let a = Upstream::start_down("a").await;
    let b = Upstream::start_down("b").await;
    let gw = Gateway::builder()
        .upstreams([&a, &b])
        .yaml(DEFERRED_ON)
        .start()
        .await;

    let ids = [
        buffered(
            &gw,
            Request::post("/orders?x=1", "one").header("X-Trace", "t1"),
        )
        .await,
        buffered(
            &gw,
            Request::put("/orders/2", "two").header("X-Trace", "t2"),
        )
        .await,
        buffered(
            &gw,
            Request::new("DELETE", "/orders/3").header("X-Trace", "t3"),
        )
        .await,
    ];
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3, "{ids:?}");

    a.up().await;
    a.wait_for_count(3, DELIVERY).await;
    let got = a.requests();
    let seen: Vec<(&str, &str, &[u8], Option<&str>)> = got
        .iter()
        .map(|r| {
            (
                r.method.as_str(),
                r.target.as_str(),
                r.body.as_slice(),
                r.header("x-trace"),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("POST", "/orders?x=1", &b"one"[..], Some("t1")),
            ("PUT", "/orders/2", &b"two"[..], Some("t2")),
            ("DELETE", "/orders/3", &b""[..], Some("t3")),
        ]
    );
    assert!(got[0].header("x-forwarded-for").is_some());
    assert!(got[0].header("x-request-id").is_some());
    gw.wait_for_metric(
        "weir_deferred_replayed_total",
        &[("queue", "deferred"), ("result", "delivered")],
        |v| v == 3.0,
        DELIVERY,
    )
    .await;
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_deferred_enqueued_total", &[("queue", "deferred")]),
        3.0
    );
    assert_eq!(
        m.sum_or_zero("weir_requests_total", &[("outcome", "buffered")]),
        3.0
    );
    assert_eq!(
        m.sum_or_zero("weir_deferred_queue_depth", &[("queue", "deferred")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_hold_no_concurrency_slot() {
    let a = Upstream::start_down("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(DEFERRED_ON)
        .yaml("limits: {concurrency_peak: 2}")
        .start()
        .await;
    for i in 0..5 {
        buffered(&gw, Request::post(&format!("/p/{i}"), format!("body {i}"))).await;
    }
    a.up().await;
    a.wait_for_count(5, DELIVERY).await;
    let targets: Vec<String> = a.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/p/0", "/p/1", "/p/2", "/p/3", "/p/4"]);
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_rejected_total", &[("reason", "concurrency")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_queue_full_at_once() {
    let a = Upstream::start_down("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("deferred_queue: {enabled: true, capacity: 3}")
        .start()
        .await;
    for i in 0..3 {
        buffered(&gw, Request::post(&format!("/p/{i}"), "x")).await;
    }
    for i in 3..5 {
        let resp = gw.send(&Request::post(&format!("/p/{i}"), "x")).await;
        resp.assert_sq_msg(503, "Queue Full");
        assert!(resp.header("x-weir-queue-id").is_none());
    }
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_rejected_total", &[("reason", "queue_full")]),
        2.0
    );
    assert_eq!(
        m.sum_or_zero("weir_deferred_queue_depth", &[("queue", "deferred")]),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_outside_the_formats_is_not_buffered() {
    let a = Upstream::start_down("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("deferred_queue: {enabled: true, formats: [POST, PUT]}")
        .start()
        .await;
    let resp = gw.get("/items").await;
    resp.assert_sq_msg(503, "Service Unavailable");
    assert!(resp.header("x-weir-queue-id").is_none());
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_deferred_enqueued_total", &[("queue", "deferred")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upfront_queue_answers_202_before_the_upstream_sees_the_request() {
    let a = Upstream::start("a").await;
    a.hold();
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("upfront_queue: {enabled: true, formats: [POST /events]}")
        .start()
        .await;
    // The node is down while the client is answered, so the answer cannot depend on it.
    a.down().await;
    let resp = gw.send(&Request::post("/events", "e1")).await;
    resp.assert_sq_msg(202, "Request Queued");
    let id = resp.header("x-weir-queue-id").map(str::to_string);
    assert!(id.is_some(), "{:?}", resp.headers);
    assert_eq!(a.count(), 0);
    // Not in the formats: proxied as usual (and, with the node down, not queued upfront).
    let other = gw.send(&Request::post("/other", "o")).await;
    assert_ne!(other.status, 202);

    a.up().await;
    a.release();
    a.wait_for_count(1, DELIVERY).await;
    let got = a.requests();
    assert_eq!(
        (got[0].target.as_str(), &got[0].body[..]),
        ("/events", &b"e1"[..])
    );
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_requests_total", &[("outcome", "queued")]),
        1.0
    );
}

async fn post_to_a_hanging_node(replay_unsafe: bool) -> (support::Response, Gateway, Upstream) {
    let a = Upstream::start("a").await;
    a.hang();
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(&format!(
            "deferred_queue: {{enabled: true, replay_unsafe: {replay_unsafe}}}\ntimeouts: {{request: 300ms}}"
        ))
        .start()
        .await;
    let resp = gw.send(&Request::post("/pay", "once")).await;
    assert!(a.count() >= 1, "the node received the POST");
    (resp, gw, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_reached_a_node_that_timed_out_is_not_queued() {
    let (resp, _gw, a) = post_to_a_hanging_node(false).await;
    resp.assert_sq_msg(504, "Gateway Timeout");
    assert!(resp.header("x-weir-queue-id").is_none());
    assert_eq!(a.count(), 1, "the POST was sent exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_unsafe_queues_a_post_that_reached_a_node_that_timed_out() {
    // The replay may already be re-sending it (the operator allowed that): count not pinned.
    let (resp, _gw, _a) = post_to_a_hanging_node(true).await;
    resp.assert_sq_msg(503, "Request Buffered");
    assert!(resp.header("x-weir-queue-id").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_makes_a_timed_out_post_deferrable() {
    let a = Upstream::start("a").await;
    a.hang();
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(DEFERRED_ON)
        .yaml("timeouts: {request: 300ms}")
        .start()
        .await;
    let resp = gw
        .send(&Request::post("/pay", "once").header("Idempotency-Key", "k1"))
        .await;
    resp.assert_sq_msg(503, "Request Buffered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_down_for_ten_seconds_gets_a_bounded_number_of_replay_attempts() {
    let a = Upstream::start_down("a").await;
    let b = Upstream::start_down("b").await;
    let gw = Gateway::builder()
        .upstreams([&a, &b])
        .yaml(DEFERRED_ON)
        .start()
        .await;
    buffered(&gw, Request::post("/p", "x")).await;
    // Nothing to await: the point is that nothing happens much for ten seconds.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let m = gw.metrics().await;
    let failed = m.sum_or_zero(
        "weir_deferred_replayed_total",
        &[("queue", "deferred"), ("result", "failed_attempt")],
    );
    // Backoff 100 ms doubling to 5 s: about 7-10 deliveries in 10 s (each tries both nodes).
    assert!(
        (3.0..=20.0).contains(&failed),
        "{failed} failed replay deliveries in 10 s\n{}",
        m.text
    );
    let refused = m.sum_or_zero(
        "weir_upstream_attempts_total",
        &[("result", "connect_refused")],
    );
    assert!(refused <= 50.0, "{refused} connect attempts in 10 s");
    assert_eq!(
        m.sum_or_zero("weir_deferred_queue_depth", &[("queue", "deferred")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_moves_a_request_to_the_dead_letters_and_delete_purges_them() {
    let a = Upstream::start_down("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("deferred_queue: {enabled: true, ttl: 1s}")
        .start()
        .await;
    let id = buffered(&gw, Request::post("/late", "x")).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let dead = loop {
        let q = gw.admin_get("/queue").await.json();
        let dead = q["deferred"]["dead_letters"].clone();
        if dead.as_array().is_some_and(|d| !d.is_empty()) {
            break q;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter: {q}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let letter = &dead["deferred"]["dead_letters"][0];
    assert_eq!(letter["id"], id.as_str());
    assert_eq!(letter["method"], "POST");
    assert_eq!(letter["target"], "/late");
    assert_eq!(letter["reason"], "ttl");
    assert!(
        letter["attempts"].as_u64().is_some_and(|n| n >= 1),
        "{letter}"
    );
    assert!(letter["last_error"].is_string(), "{letter}");
    assert_eq!(dead["deferred"]["depth"], 0);
    assert_eq!(dead["deferred"]["capacity"], 2048);

    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero(
            "weir_deferred_replayed_total",
            &[("queue", "deferred"), ("result", "expired")]
        ),
        1.0
    );
    assert_eq!(
        m.sum_or_zero("weir_deferred_dead_letters", &[("queue", "deferred")]),
        1.0
    );

    let purge = client::send(gw.admin_addr(), &Request::new("DELETE", "/queue/dead"))
        .await
        .expect("DELETE /queue/dead");
    assert_eq!(purge.status, 200, "{}", purge.text());
    assert_eq!(purge.json()["purged"], 1);
    let q = gw.admin_get("/queue").await.json();
    assert_eq!(q["deferred"]["dead_letters"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_is_buffered_when_no_node_could_be_reached() {
    let a = Upstream::start_down("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(DEFERRED_ON)
        .start()
        .await;
    let req = Request::post("/chunked", "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .header("Transfer-Encoding", "chunked");
    buffered(&gw, req).await;
    a.up().await;
    a.wait_for_count(1, DELIVERY).await;
    assert_eq!(a.requests()[0].body, b"hello world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_is_buffered_and_replayed_intact() {
    let a = Upstream::start_down("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(DEFERRED_ON)
        .start()
        .await;
    let body = support::random_body(300 * 1024, 11);
    buffered(&gw, Request::post("/big", body.clone())).await;
    a.up().await;
    a.wait_for_count(1, DELIVERY).await;
    assert_eq!(a.requests()[0].body_md5(), support::md5_hex(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_replaying_through_the_grace_period() {
    let a = Upstream::start_down("a").await;
    let mut gw = Gateway::builder()
        .upstream(&a)
        .yaml(DEFERRED_ON)
        .yaml("server: {grace_period: 10s, graceful_shutdown_timeout: 1s}")
        .start()
        .await;
    buffered(&gw, Request::post("/during-shutdown", "x")).await;
    gw.signal("TERM");
    a.up().await;
    // Within the grace period (the replay may be in a backoff of up to 5 s when the node
    // returns; the period leaves a loaded machine room beyond that).
    a.wait_for_count(1, Duration::from_secs(10)).await;
    assert_eq!(a.requests()[0].target, "/during-shutdown");
    assert!(
        gw.wait_exit(Duration::from_secs(30)).await,
        "weir did not exit"
    );
    let logs = gw.logs();
    assert!(logs.contains("empty at shutdown"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_still_queued_at_shutdown_are_logged_one_by_one() {
    let a = Upstream::start_down("a").await;
    let mut gw = Gateway::builder()
        .upstream(&a)
        .yaml(DEFERRED_ON)
        .yaml("server: {grace_period: 1s, graceful_shutdown_timeout: 1s}")
        .start()
        .await;
    let first = buffered(&gw, Request::post("/left/1", "x")).await;
    let second = buffered(&gw, Request::post("/left/2", "y")).await;
    gw.signal("TERM");
    assert!(
        gw.wait_exit(Duration::from_secs(15)).await,
        "weir did not exit"
    );
    let logs = gw.logs();
    assert!(
        logs.contains("2 queued requests remain at shutdown"),
        "{logs}"
    );
    for (id, target) in [(first, "/left/1"), (second, "/left/2")] {
        assert!(
            logs.lines()
                .any(|l| l.contains(&id) && l.contains(target) && l.contains("undelivered")),
            "no shutdown line for {id} {target}:\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_every_node_answered_503_for_is_buffered_and_delivered_later() {
    let a = Upstream::start("a").await;
    a.status(503);
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(DEFERRED_ON)
        .start()
        .await;
    buffered(&gw, Request::put("/doc/1", "v1")).await;
    a.answer();
    a.wait_for_count(2, DELIVERY).await;
    let last = a.requests().pop().expect("a replayed request");
    assert_eq!((last.method.as_str(), &last.body[..]), ("PUT", &b"v1"[..]));
    gw.wait_for_metric(
        "weir_deferred_replayed_total",
        &[("queue", "deferred"), ("result", "delivered")],
        |v| v == 1.0,
        DELIVERY,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_a_node_answered_503_for_is_passed_through_not_buffered() {
    let a = Upstream::start("a").await;
    a.status(503);
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(DEFERRED_ON)
        .start()
        .await;
    let resp = gw.send(&Request::post("/pay", "once")).await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.node(), Some("a"), "the node's own answer");
    assert!(resp.header("x-weir-queue-id").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sq_properties_request_formats_feed_the_deferred_queue() {
    let a = Upstream::start_down("a").await;
    let url = a.url();
    let gw = Gateway::raw_config("sq.properties", move |p| {
        format!(
            "LISTENER_ADDR=127.0.0.1\nLISTENER_PORT={}\nMETRICS_LISTENER={}\nENDPOINTS={url}\n\
             CONCURRENCY_PEAK=16\nENABLE_DEFERRED_Q=true\n\
             DEFERRED_Q_REQUEST_FORMATS=POST /orders/*,POST /orders/private !\n",
            p.listen.port(),
            p.admin
        )
    })
    .start()
    .await;
    buffered(&gw, Request::post("/orders", "o")).await;
    let excluded = gw.send(&Request::post("/orders/private", "x")).await;
    excluded.assert_sq_msg(503, "Service Unavailable");
    let other = gw.send(&Request::put("/items/1", "x")).await;
    other.assert_sq_msg(503, "Service Unavailable");
    a.up().await;
    a.wait_for_count(1, DELIVERY).await;
    assert_eq!(a.requests()[0].target, "/orders");
}

/// Found by the chaos soak: after `503 Request Buffered` and `503 Queue Full`, Pingora never
/// reuses the client connection (every attempt failed), so the answer must say
/// `Connection: close`; a client that took the connection for open raced its next request
/// against the close (2,000 requests in a 60 s soak met a closed connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_and_queue_full_answers_keep_their_connection_or_say_close() {
    let a = Upstream::start_down("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("deferred_queue: {enabled: true, capacity: 1}")
        .start()
        .await;
    for (i, msg) in [(0, "Request Buffered"), (1, "Queue Full")] {
        let mut c = client::Client::connect(gw.addr()).await.expect("connect");
        let resp = c
            .send(&Request::post(&format!("/p/{i}"), "x"))
            .await
            .expect("an answer");
        resp.assert_sq_msg(503, msg);
        let close = resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if !close {
            // Announced as open: the next request on it gets its own answer.
            let next = c.send(&Request::get("/next")).await;
            assert!(
                next.is_ok(),
                "after {msg} without Connection: close the connection was closed: {next:?}"
            );
        }
    }
}
