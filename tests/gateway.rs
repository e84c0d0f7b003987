//! Failover, retries and weir's own answers: the core fault-tolerance contract, end to end
//! against the real binary.

mod support;

use std::time::{Duration, Instant};

use support::{md5_hex, random_body, Gateway, Request, Upstream};

const ATTEMPTS: &str = "weir_upstream_attempts_total";

/// GETs these nodes may have received twice: attempts weir aborted on them because they
/// stalled (each aborted GET was answered by another node too: a busy machine can stall a
/// healthy node long enough for an abort), and hedges (a second attempt on another node when
/// the first had no header after the hedge delay; the loser may have reached its node).
async fn aborted_on(gw: &Gateway, nodes: &[&Upstream]) -> usize {
    let m = gw.metrics().await;
    let aborted = nodes
        .iter()
        .map(|n| m.sum_or_zero(ATTEMPTS, &[("upstream", &n.url()), ("result", "timeout")]))
        .sum::<f64>();
    (aborted + m.sum_or_zero("weir_hedges_sent_total", &[])) as usize
}

/// `got` deliveries for `n` requests: each at least once, at most once more per abort or
/// hedge (`extra`).
fn answered_once(got: usize, n: usize, extra: usize, what: &str) {
    assert!(
        (n..=n + extra).contains(&got),
        "{what}: {got} deliveries for {n} requests ({extra} aborts and hedges)"
    );
}

/// Error scores that do not fade during the test: how many attempts a failing node gets is
/// then a matter of request counts alone, not of how long a loaded machine takes to send them
/// (with the default 10 s half-life a slow run gives the node its share back more often).
const NO_DECAY: &str = "routing: {decay_half_life: 1h}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_node_of_three_takes_only_a_few_first_attempts() {
    let a = Upstream::start("a").await;
    let dead = Upstream::start_down("dead").await;
    let b = Upstream::start("b").await;
    let gw = Gateway::builder()
        .upstreams([&a, &dead, &b])
        .yaml(NO_DECAY)
        .start()
        .await;

    for i in 0..300 {
        let resp = gw.get(&format!("/item/{i}")).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
    }
    let aborted = aborted_on(&gw, &[&a, &b]).await;
    answered_once(
        a.count() + b.count(),
        300,
        aborted,
        "each GET answered once",
    );

    let m = gw.metrics().await;
    assert!(m.has_family(ATTEMPTS), "no {ATTEMPTS} in\n{}", m.text);
    let refused = m.sum_or_zero(
        ATTEMPTS,
        &[("upstream", &dead.url()), ("result", "connect_refused")],
    );
    assert!(
        refused <= 15.0,
        "the dead node took {refused} attempts out of 300 requests\n{}",
        m.text
    );
    let ok = m.sum_or_zero(ATTEMPTS, &[("upstream", &a.url()), ("result", "ok")])
        + m.sum_or_zero(ATTEMPTS, &[("upstream", &b.url()), ("result", "ok")]);
    // A hedge that answered too late still counts as the node's answer.
    let hedges = m.sum_or_zero("weir_hedges_sent_total", &[]);
    assert!(
        (300.0..=300.0 + hedges).contains(&ok),
        "{ok} ok attempts on the live nodes, {hedges} hedges\n{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_answering_503_is_retried_and_loses_its_share() {
    let a = Upstream::start("a").await;
    let sick = Upstream::start("sick").await;
    sick.status(503);
    let b = Upstream::start("b").await;
    let gw = Gateway::builder()
        .upstreams([&a, &sick, &b])
        .yaml(NO_DECAY)
        .start()
        .await;

    for i in 0..300 {
        let resp = gw.get(&format!("/item/{i}")).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        assert_ne!(resp.node(), Some("sick"));
    }
    let aborted = aborted_on(&gw, &[&a, &b]).await;
    answered_once(
        a.count() + b.count(),
        300,
        aborted,
        "each GET answered once",
    );
    assert!(
        sick.count() <= 30,
        "the 503 node still took {} of 300 first attempts",
        sick.count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nodes_down_answers_503_service_unavailable() {
    let a = Upstream::start_down("a").await;
    let b = Upstream::start_down("b").await;
    let gw = Gateway::builder().upstreams([&a, &b]).start().await;

    let resp = gw.get("/").await;
    resp.assert_sq_msg(503, "Service Unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_nodes_time_out_with_504_long_before_they_would_answer() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    a.delay(Duration::from_secs(30));
    b.delay(Duration::from_secs(30));
    let gw = Gateway::builder()
        .upstreams([&a, &b])
        .yaml("timeouts: {request: 300ms}")
        .start()
        .await;

    let started = Instant::now();
    let resp = gw.get("/slow").await;
    let took = started.elapsed();
    resp.assert_sq_msg(504, "Gateway Timeout");
    // Two attempts of 300 ms each; the nodes would answer after 30 s. The bound leaves a busy
    // machine room and still tells the timeouts from the nodes' answers.
    assert!(took < Duration::from_secs(10), "the 504 took {took:?}");
    assert_eq!(
        (a.count(), b.count()),
        (1, 1),
        "a timed-out GET is retried once on the other node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_http_answer_from_the_sole_node_is_502_bad_gateway() {
    let a = Upstream::start("a").await;
    a.garbage();
    let gw = Gateway::builder().upstream(&a).start().await;

    let resp = gw.get("/").await;
    resp.assert_sq_msg(502, "Bad Gateway");
    assert_eq!(a.count(), 1);
}

/// Sends a 200 KiB body until the resetting node has been tried first at least once; every
/// response must come from the good node with the body intact.
async fn body_survives_a_reset_after_it_was_sent(method: &str, idempotency_key: bool) {
    let flaky = Upstream::start("flaky").await;
    flaky.reset();
    let good = Upstream::start("good").await;
    let gw = Gateway::builder().upstreams([&flaky, &good]).start().await;
    let body = random_body(200 * 1024, 7);
    let md5 = md5_hex(&body);

    for i in 0..40 {
        let mut req = Request::new(method, &format!("/upload/{i}")).body(body.clone());
        if idempotency_key {
            req = req.header("Idempotency-Key", &format!("key-{i}"));
        }
        let resp = gw.send(&req).await;
        assert_eq!(resp.status, 200, "{method} {i}: {}", resp.text());
        assert_eq!(resp.node(), Some("good"));
        assert_eq!(
            resp.header("x-body-md5"),
            Some(md5.as_str()),
            "{method} {i}"
        );
        if flaky.count() > 0 {
            break;
        }
    }
    assert!(
        flaky.count() >= 1,
        "the resetting node was never tried first in 40 requests"
    );
    for got in flaky.requests() {
        assert_eq!(
            got.body.len(),
            body.len(),
            "the flaky node got a short body"
        );
        assert_eq!(got.body_md5(), md5);
    }
    for got in good.requests() {
        assert_eq!(got.method, method);
        assert_eq!(got.body_md5(), md5, "body replayed to {}", got.target);
        if idempotency_key {
            assert!(got.header("idempotency-key").is_some());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_body_is_replayed_byte_identical_after_a_reset() {
    body_survives_a_reset_after_it_was_sent("PUT", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_with_idempotency_key_is_replayed_byte_identical_after_a_reset() {
    body_survives_a_reset_after_it_was_sent("POST", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_without_idempotency_key_is_not_sent_twice_after_a_timeout() {
    let hung = Upstream::start("hung").await;
    hung.hang();
    let good = Upstream::start("good").await;
    let gw = Gateway::builder()
        .upstreams([&hung, &good])
        .yaml("timeouts: {request: 300ms}")
        .start()
        .await;

    let mut timed_out = false;
    for i in 0..40 {
        let target = format!("/orders/{i}");
        let resp = gw.send(&Request::post(&target, format!("order {i}"))).await;
        let seen = |u: &Upstream| u.requests().iter().filter(|r| r.target == target).count();
        if resp.status == 200 {
            assert_eq!(
                (seen(&hung), seen(&good)),
                (0, 1),
                "a POST answered by the good node was sent to the hung one"
            );
            continue;
        }
        resp.assert_sq_msg(504, "Gateway Timeout");
        assert_eq!(seen(&hung), 1, "the hung node received the POST once");
        assert_eq!(seen(&good), 0, "the timed-out POST was resent");
        timed_out = true;
        break;
    }
    assert!(timed_out, "the hung node was never tried first in 40 POSTs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_to_a_refused_node_is_retried_on_the_other() {
    let dead = Upstream::start_down("dead").await;
    let good = Upstream::start("good").await;
    let gw = Gateway::builder().upstreams([&dead, &good]).start().await;

    for i in 0..20 {
        let body = format!("payment {i}");
        let resp = gw.send(&Request::post("/payments", body.clone())).await;
        assert_eq!(resp.status, 200, "POST {i}: {}", resp.text());
        assert_eq!(
            resp.header("x-body-md5"),
            Some(md5_hex(body.as_bytes()).as_str())
        );
    }
    assert_eq!(good.count(), 20, "every POST reached the good node once");
    gw.wait_for_metric(
        ATTEMPTS,
        &[("upstream", &dead.url()), ("result", "connect_refused")],
        |v| v >= 1.0,
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_peak_of_two_answers_429_to_the_third_and_fourth_request() {
    let slow = Upstream::start("slow").await;
    slow.hold();
    let gw = Gateway::builder()
        .upstream(&slow)
        .yaml("limits: {concurrency_peak: 2}")
        .start()
        .await;
    let addr = gw.addr();

    let in_flight: Vec<_> = (0..2)
        .map(|i| {
            let req = Request::get(&format!("/held/{i}"));
            tokio::spawn(async move { support::client::send(addr, &req).await })
        })
        .collect();
    slow.wait_for_count(2, Duration::from_secs(10)).await;

    let (third, fourth) = tokio::join!(gw.get("/third"), gw.get("/fourth"));
    for resp in [&third, &fourth] {
        resp.assert_sq_msg(429, "Request Discarded");
        let retry_after = resp.header("retry-after").unwrap_or("");
        assert!(
            !retry_after.trim().is_empty(),
            "429 without Retry-After: {:?}",
            resp.headers
        );
    }

    slow.release();
    for task in in_flight {
        let resp = task.await.expect("join").expect("held request");
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(
        slow.count(),
        2,
        "rejected requests never reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_node_loses_traffic_before_its_timeout_fires() {
    let a = Upstream::start("a").await;
    let hung = Upstream::start("hung").await;
    let b = Upstream::start("b").await;
    let gw = std::sync::Arc::new(
        Gateway::builder()
            .upstreams([&a, &hung, &b])
            .yaml("timeouts: {request: 2s}")
            .start()
            .await,
    );
    // Warm up: every node has answered, so the router knows their latency.
    for i in 0..30 {
        assert_eq!(gw.get(&format!("/warm/{i}")).await.status, 200);
    }
    // 32 clients in parallel: a router that learned only from timeouts (or from in-flight counts
    // alone) would park most of them on the hung node for 2 s each; one that notices the stall
    // stops sending it anything within a few requests. The node hangs once traffic flows.
    let mut clients = Vec::new();
    let warm = a.count() + b.count();
    for c in 0..32 {
        let gw = gw.clone();
        clients.push(tokio::spawn(async move {
            for i in 0..15 {
                let resp = gw.get(&format!("/c{c}/{i}")).await;
                assert_eq!(resp.status, 200, "client {c} request {i}: {}", resp.text());
            }
        }));
    }
    a.wait_for_count(a.count().max(warm / 2) + 40, Duration::from_secs(10))
        .await;
    // Requests counted before the switch were answered; every later one hangs.
    let before = hung.switch(support::Behaviour::Hang);
    for c in clients {
        c.await.expect("client task");
    }
    let stuck = hung.count() - before;
    eprintln!("hung node received {stuck} requests");
    // Its stuck GETs are aborted within tens of milliseconds (and answered elsewhere), after
    // which it is idle again, so it wins a request now and then: each costs its client an
    // abort, not the 2 s timeout.
    assert!(
        stuck <= 30,
        "the hung node received {stuck} of 480 requests before its first timeout fired"
    );
    // Stuck GETs were aborted and answered elsewhere (counted once there); an abort of a
    // healthy node's attempt (a busy machine) is answered twice.
    let aborted = aborted_on(&gw, &[&a, &b]).await;
    answered_once(
        a.count() + b.count() + before,
        30 + 480,
        aborted,
        "every request answered once",
    );
}
