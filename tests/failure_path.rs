//! The failure path (issue 10): attempts stuck on a stalled node are aborted and sent to
//! another node when that is safe; one retry budget caps the extra attempts.
//!
//! Every gateway here has `timeouts.request: 30s`, so a request that is not rescued by an
//! abort waits far longer than any bound these tests set: a pass cannot come from the
//! per-attempt timeout, and the bounds are loose enough for a busy 2-core machine.

mod support;

use std::time::{Duration, Instant};

use support::{md5_hex, random_body, Gateway, Request, Upstream};

/// Far above anything an abort needs, far below the 30 s attempt timeout.
const RESCUED: Duration = Duration::from_secs(10);

/// Nodes a, b and c, answering until told otherwise.
async fn three_nodes() -> [Upstream; 3] {
    [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ]
}

/// The abort-on-stall tests turn hedging off: a hedge would otherwise rescue some stuck
/// attempts first, and these tests count aborts exactly.
fn hang_yaml(extra: &str) -> String {
    format!(
        "timeouts: {{request: 30s}}\nhedging: {{enabled: false}}\n\
         deferred_queue: {{enabled: false}}\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_safe_requests_stuck_on_a_hung_node_are_aborted_and_answered_elsewhere() {
    let a = Upstream::start("a").await;
    let hung = Upstream::start("hung").await;
    hung.hang();
    let b = Upstream::start("b").await;
    let gw = Gateway::builder()
        .upstreams([&a, &hung, &b])
        .yaml(&hang_yaml(""))
        .start()
        .await;

    // Requests one after the other (no other traffic to compare with): the single attempt
    // on the hung node is judged stalled by its age alone.
    for i in 0..30 {
        let put_body = random_body(20_000, i);
        let req = if i % 2 == 0 {
            Request::get(&format!("/get/{i}"))
        } else {
            Request::put(&format!("/put/{i}"), put_body.clone())
        };
        let t0 = Instant::now();
        let resp = gw.send(&req).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        assert!(
            t0.elapsed() < RESCUED,
            "request {i} took {:?}: not aborted",
            t0.elapsed()
        );
        assert_ne!(resp.node(), Some("hung"));
        if i % 2 == 1 {
            let target = format!("/put/{i}");
            let got = [&a, &b]
                .iter()
                .flat_map(|u| u.requests())
                .find(|r| r.target == target)
                .expect("the PUT reached a live node");
            assert_eq!(got.body_md5(), md5_hex(&put_body), "PUT {i} body intact");
        }
    }
    let stuck = hung.count();
    assert!(stuck >= 1, "the hung node never got an attempt");
    let m = gw.metrics().await;
    let aborted = m.sum_or_zero("weir_attempts_aborted_total", &[]);
    let retried = m.sum_or_zero("weir_retries_total", &[("reason", "stall")]);
    assert_eq!(
        aborted, stuck as f64,
        "every stuck attempt aborted\n{}",
        m.text
    );
    assert_eq!(retried, stuck as f64, "and sent again\n{}", m.text);
    // The aborts count against the hung node as timeouts.
    let timeouts = m.sum_or_zero(
        "weir_upstream_attempts_total",
        &[("upstream", &hung.url()), ("result", "timeout")],
    );
    assert_eq!(timeouts, stuck as f64, "{}", m.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_without_idempotency_key_is_never_aborted_nor_sent_twice() {
    let hung = Upstream::start("hung").await;
    hung.hang();
    let b = Upstream::start("b").await;
    // The weights send (almost) every first attempt to the hung node.
    let gw = Gateway::builder()
        .yaml(&format!(
            "upstreams: [{{url: '{}', weight: 1000}}, {{url: '{}'}}]\n\
             timeouts: {{request: 1s}}\nhedging: {{enabled: false}}\n\
             deferred_queue: {{enabled: false}}",
            hung.url(),
            b.url()
        ))
        .start()
        .await;
    let mut answers = Vec::new();
    for i in 0..3 {
        let target = format!("/post/{i}");
        let resp = gw.send(&Request::post(&target, "once")).await;
        let seen = [&hung, &b]
            .iter()
            .flat_map(|u| u.requests())
            .filter(|r| r.target == target)
            .count();
        assert_eq!(seen, 1, "POST {i} reached {seen} nodes");
        answers.push((resp.status, resp.node().map(str::to_owned)));
    }
    // Those on the hung node waited for their own deadline: 504, no abort.
    let on_hung = answers.iter().filter(|(s, _)| *s == 504).count();
    assert_eq!(on_hung, hung.count(), "{answers:?}");
    assert!(on_hung >= 2, "{answers:?}");
    let m = gw.metrics().await;
    assert_eq!(m.sum_or_zero("weir_attempts_aborted_total", &[]), 0.0);
    // With an Idempotency-Key the same POST is aborted on the hung node and sent to b.
    for i in 0..3 {
        let target = format!("/keyed/{i}");
        let req = Request::post(&target, "keyed").header("Idempotency-Key", &format!("k{i}"));
        let resp = gw.send(&req).await;
        assert_eq!(resp.status, 200, "keyed POST {i}: {}", resp.text());
        assert_eq!(resp.node(), Some("b"));
    }
    let keyed_on_hung = hung
        .requests()
        .iter()
        .filter(|r| r.target.starts_with("/keyed/"))
        .count();
    assert!(keyed_on_hung >= 1, "{keyed_on_hung}");
    let m = gw.metrics().await;
    let aborted = m.sum_or_zero("weir_attempts_aborted_total", &[]);
    assert_eq!(aborted, keyed_on_hung as f64, "{}", m.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_extra_attempts_when_every_node_fails() {
    let nodes = three_nodes().await;
    for n in &nodes {
        n.status(503);
    }
    let gw = Gateway::builder()
        .upstreams(&nodes)
        .yaml("retries: {budget: 20%, budget_floor: 0}\ndeferred_queue: {enabled: false}")
        .start()
        .await;
    const N: usize = 200;
    for i in 0..N {
        let resp = gw.get(&format!("/storm/{i}")).await;
        assert_eq!(resp.status, 503, "request {i}");
    }
    let attempts: usize = nodes.iter().map(Upstream::count).sum();
    let ratio = attempts as f64 / N as f64;
    // Without the budget each request would try all three nodes (ratio 3).
    assert!(
        (1.0..=1.2).contains(&ratio),
        "{attempts} attempts for {N} requests"
    );
    let m = gw.metrics().await;
    let refused = m.sum_or_zero("weir_retry_budget_exhausted_total", &[]);
    let retries = m.sum_or_zero("weir_retries_total", &[]);
    assert_eq!(retries as usize, attempts - N, "{}", m.text);
    assert!(refused > 0.0, "{}", m.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_node_hung_attempts_per_request_stay_within_the_budget() {
    let nodes = three_nodes().await;
    for n in &nodes {
        n.hang();
    }
    let gw = Gateway::builder()
        .upstreams(&nodes)
        .yaml("timeouts: {request: 2s}\nretries: {budget: 20%, budget_floor: 0}\ndeferred_queue: {enabled: false}")
        .start()
        .await;
    const N: usize = 40;
    let gw = std::sync::Arc::new(gw);
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let gw = gw.clone();
            tokio::spawn(async move { gw.get(&format!("/slow/{i}")).await.status })
        })
        .collect();
    for t in tasks {
        let status = t.await.expect("request task");
        assert_eq!(status, 504);
    }
    let attempts: usize = nodes.iter().map(Upstream::count).sum();
    assert!(
        attempts as f64 <= 1.2 * N as f64,
        "{attempts} attempts for {N} requests"
    );
}

// === Deadlines (issue 10, item 4) ===

/// A node that sends `len` body bytes one every `every_ms`, falling silent after
/// `stop_after` of them if set.
fn trickling(len: usize, every_ms: u64, stop_after: Option<usize>) -> support::Behaviour {
    support::Behaviour::Trickle {
        len,
        every: Duration::from_millis(every_ms),
        stop_after,
    }
}

/// What a raw client saw of one response: when the header came, the body bytes and when the
/// connection ended.
struct Streamed {
    header_after: Duration,
    status: u16,
    body: usize,
    ended_after: Duration,
}

/// Sends `GET target` on a fresh connection and reads until the gateway closes it or `cap`
/// passes, timing the header and the end.
async fn stream_get(gw: &Gateway, target: &str, cap: Duration) -> Streamed {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.addr())
        .await
        .expect("connect");
    let req = format!("GET {target} HTTP/1.1\r\nHost: weir\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let mut header_after = None;
    let mut chunk = [0u8; 4096];
    let until = tokio::time::Instant::now() + cap;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        if header_after.is_none() && buf.windows(4).any(|w| w == b"\r\n\r\n") {
            header_after = Some(t0.elapsed());
        }
    }
    let ended_after = t0.elapsed();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Streamed {
        header_after: header_after.unwrap_or(ended_after),
        status,
        body: body.len(),
        ended_after,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_node_hits_the_whole_attempt_deadline_and_the_client_gets_what_came() {
    let trickle = Upstream::start("trickle").await;
    // 100,000 bytes, one every 100 ms: 10,000 s at that pace.
    trickle.set(trickling(100_000, 100, None));
    let gw = Gateway::builder()
        .upstream(&trickle)
        .yaml("timeouts: {request: 1500ms}\ndeferred_queue: {enabled: false}")
        .start()
        .await;
    let seen = stream_get(&gw, "/trickle", Duration::from_secs(20)).await;
    assert_eq!(seen.status, 200);
    // The header and the bytes that came went out as they came, not at the end.
    assert!(
        seen.header_after < Duration::from_millis(1500),
        "header after {:?}",
        seen.header_after
    );
    assert!(
        (3..100_000).contains(&seen.body),
        "{} body bytes forwarded",
        seen.body
    );
    // Cut at the deadline (1.5 s), far before the 10,000 s the node would take.
    assert!(
        seen.ended_after >= Duration::from_millis(1400)
            && seen.ended_after < Duration::from_secs(10),
        "ended after {:?}",
        seen.ended_after
    );
    assert!(
        trickle.wait_for_closed(1, RESCUED).await,
        "the node saw the close"
    );
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_attempt_timeouts_total", &[("kind", "attempt")]),
        1.0,
        "{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_body_within_its_idle_budget_is_never_cut_and_a_silent_one_is() {
    let steady = Upstream::start("steady").await;
    // 25 bytes, one every 60 ms (1.5 s in all), within a 400 ms idle budget.
    steady.set(trickling(25, 60, None));
    let gw = Gateway::builder()
        .upstream(&steady)
        .yaml("timeouts: {request: off, body_idle: 400ms}\ndeferred_queue: {enabled: false}")
        .start()
        .await;
    let seen = stream_get(&gw, "/steady", Duration::from_secs(20)).await;
    assert_eq!((seen.status, seen.body), (200, 25), "the whole body");
    // Then 5 bytes and silence: cut 400 ms after the last byte.
    steady.set(trickling(25, 60, Some(5)));
    let seen = stream_get(&gw, "/silent", Duration::from_secs(20)).await;
    assert_eq!((seen.status, seen.body), (200, 5));
    assert!(
        seen.ended_after < Duration::from_secs(10),
        "ended after {:?}",
        seen.ended_after
    );
    assert!(steady.wait_for_closed(1, RESCUED).await);
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_attempt_timeouts_total", &[("kind", "body_idle")]),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum_or_zero("weir_attempt_timeouts_total", &[("kind", "attempt")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_byte_deadline_ends_a_silent_attempt_and_a_safe_request_goes_elsewhere() {
    let hung = Upstream::start("hung").await;
    hung.hang();
    let b = Upstream::start("b").await;
    // Abort on stall off: only the first-byte deadline (300 ms) can end the hung attempts,
    // long before the 30 s whole-attempt deadline.
    let gw = Gateway::builder()
        .yaml(&format!(
            "upstreams: [{{url: '{}', weight: 1000}}, {{url: '{}'}}]\n\
             timeouts: {{request: 30s, first_byte: 300ms}}\n\
             retries: {{abort_on_stall: false}}\ndeferred_queue: {{enabled: false}}",
            hung.url(),
            b.url()
        ))
        .start()
        .await;
    let t0 = Instant::now();
    let resp = gw.get("/first").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.node(), Some("b"));
    assert!(t0.elapsed() < RESCUED, "took {:?}", t0.elapsed());
    // A POST without a key is not sent again: its answer is the timeout, in time.
    let t0 = Instant::now();
    let resp = gw.send(&Request::post("/once", "x")).await;
    if hung.requests().iter().any(|r| r.target == "/once") {
        assert_eq!(resp.status, 504, "{}", resp.text());
        assert!(t0.elapsed() < RESCUED, "took {:?}", t0.elapsed());
    }
    let m = gw.metrics().await;
    let first_byte = m.sum_or_zero("weir_attempt_timeouts_total", &[("kind", "first_byte")]);
    assert_eq!(first_byte, hung.count() as f64, "{}", m.text);
    assert_eq!(m.sum_or_zero("weir_attempts_aborted_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_tunnel_outlives_the_attempt_deadline_and_blames_no_node() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ws = Upstream::start("ws").await;
    ws.set(support::Behaviour::Tunnel);
    let gw = Gateway::builder()
        .upstream(&ws)
        .yaml("timeouts: {request: 200ms, tunnel_idle: 30s}\ndeferred_queue: {enabled: false}")
        .start()
        .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr())
        .await
        .expect("connect");
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: weir\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(RESCUED, s.read(&mut byte))
            .await
            .expect("101 in time")
            .expect("read");
        assert_eq!(
            n,
            1,
            "closed before the 101: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // Idle for well over the 200 ms attempt deadline (idleness is what is tested: time must
    // pass, there is nothing to wait for), then the tunnel still carries bytes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.write_all(b"ping")
        .await
        .expect("write through the tunnel");
    let mut echo = [0u8; 4];
    tokio::time::timeout(RESCUED, s.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echo, b"ping");
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_attempt_timeouts_total", &[]),
        0.0,
        "{}",
        m.text
    );
    let timeouts = m.sum_or_zero(
        "weir_upstream_attempts_total",
        &[("upstream", &ws.url()), ("result", "timeout")],
    );
    assert_eq!(timeouts, 0.0, "{}", m.text);
}

// === Hedged requests (issue 10, item 2) ===

/// A gateway over `slow` (weight 1000: nearly every first attempt) and `fast`, with abort on
/// stall off so that only a hedge can rescue a request, and a hedge delay of 20–50 ms.
async fn hedging_gateway(slow: &Upstream, fast: &Upstream, extra: &str) -> Gateway {
    Gateway::builder()
        .yaml(&format!(
            "upstreams: [{{url: '{}', weight: 1000}}, {{url: '{}'}}]\n\
             timeouts: {{request: 30s}}\n\
             retries: {{abort_on_stall: false, budget: 100%}}\n\
             hedging: {{min_delay: 20ms, max_delay: 50ms}}\n\
             deferred_queue: {{enabled: false}}\n{extra}",
            slow.url(),
            fast.url()
        ))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_answers_for_a_hung_or_paused_node_and_the_loser_is_cancelled() {
    let slow = Upstream::start("slow").await;
    let fast = Upstream::start("fast").await;
    let gw = hedging_gateway(&slow, &fast, "").await;
    let mut on_slow = 0;
    let mut hung_on_slow = 0;
    // Hung (never answers) until one hung first attempt landed on the slow node, then paused
    // (holds every request until released) until one paused did: the router lowers the slow
    // node's share after each lost attempt, so which request lands there is chance.
    for i in 0..16 {
        if hung_on_slow >= 1 && on_slow > hung_on_slow {
            break;
        }
        let pause = hung_on_slow >= 1;
        if pause {
            slow.hold();
        } else {
            slow.hang();
        }
        let target = format!("/hedged/{i}");
        let t0 = Instant::now();
        let resp = gw
            .send(&Request::get(&target).header("X-Request-Id", &format!("h{i}")))
            .await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        assert!(
            t0.elapsed() < RESCUED,
            "request {i} took {:?}",
            t0.elapsed()
        );
        // The answer went through the usual response path (the request id).
        assert_eq!(resp.header("x-request-id"), Some(format!("h{i}").as_str()));
        if slow.requests().iter().any(|r| r.target == target) {
            on_slow += 1;
            assert_eq!(resp.node(), Some("fast"));
            // The first attempt lost: its connection was closed (the node sees it).
            if !pause {
                hung_on_slow += 1;
                assert!(
                    slow.wait_for_closed(hung_on_slow, RESCUED).await,
                    "request {i}: the losing attempt was not cancelled"
                );
            }
        }
        if pause {
            slow.release();
        }
    }
    // Each lost first attempt counts against the slow node, so the router soon sends it less;
    // both faults must still have been rescued by a hedge.
    let paused_on_slow = on_slow - hung_on_slow;
    assert!(
        hung_on_slow >= 1 && paused_on_slow >= 1,
        "first attempts on the slow node: {hung_on_slow} hung, {paused_on_slow} paused"
    );
    let m = gw.metrics().await;
    let sent = m.sum_or_zero("weir_hedges_sent_total", &[]);
    let won = m.sum_or_zero("weir_hedges_won_total", &[]);
    assert_eq!(sent, on_slow as f64, "{}", m.text);
    assert_eq!(won, on_slow as f64, "{}", m.text);
    // A cancelled attempt is no fault of its node.
    let timeouts = m.sum_or_zero(
        "weir_upstream_attempts_total",
        &[("upstream", &slow.url()), ("result", "timeout")],
    );
    assert_eq!(timeouts, 0.0, "{}", m.text);
    // The access line names the node that answered.
    let line = gw.access_line("h0").await;
    assert_eq!(line["status"], 200);
    if slow.requests().iter().any(|r| r.target == "/hedged/0") {
        assert_eq!(line["upstream"], fast.url().as_str(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_first_attempt_answers_first_the_hedge_is_cancelled() {
    let first = Upstream::start("first").await;
    // Answers after 300 ms: late enough to be hedged (50 ms), early enough to win against
    // a hedge that hangs.
    first.delay(Duration::from_millis(300));
    let hedge = Upstream::start("hedge").await;
    hedge.hang();
    let gw = hedging_gateway(&first, &hedge, "").await;
    let mut hedged = 0;
    for i in 0..3 {
        let target = format!("/first/{i}");
        let resp = gw.get(&target).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        if hedge.requests().iter().any(|r| r.target == target) {
            hedged += 1;
            assert_eq!(resp.node(), Some("first"));
            assert!(
                hedge.wait_for_closed(hedged, RESCUED).await,
                "request {i}: the hedge was not cancelled"
            );
        }
    }
    assert!(hedged >= 2, "{hedged} hedges");
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_hedges_won_total", &[]),
        0.0,
        "{}",
        m.text
    );
    assert!(m.sum_or_zero("weir_hedges_sent_total", &[]) >= hedged as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_without_idempotency_key_is_never_hedged_and_hedges_keep_to_the_budget() {
    let slow = Upstream::start("slow").await;
    slow.delay(Duration::from_millis(150));
    let fast = Upstream::start("fast").await;
    let gw = hedging_gateway(&slow, &fast, "").await;
    for i in 0..3 {
        let target = format!("/post/{i}");
        let resp = gw.send(&Request::post(&target, "once")).await;
        assert_eq!(resp.status, 200);
        let seen = [&slow, &fast]
            .iter()
            .flat_map(|u| u.requests())
            .filter(|r| r.target == target)
            .count();
        assert_eq!(seen, 1, "POST {i} reached {seen} nodes");
    }
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero("weir_hedges_sent_total", &[]),
        0.0,
        "{}",
        m.text
    );
    drop(gw);

    // Every node slow: a 20 % budget (no floor) holds hedges to a fifth of the requests.
    fast.delay(Duration::from_millis(150));
    let gw = Gateway::builder()
        .upstreams([&slow, &fast])
        .yaml(
            "timeouts: {request: 30s}\nretries: {abort_on_stall: false, budget: 20%, budget_floor: 0}\n\
             hedging: {min_delay: 5ms, max_delay: 10ms}\ndeferred_queue: {enabled: false}",
        )
        .start()
        .await;
    let before = slow.count() + fast.count();
    const N: usize = 30;
    for i in 0..N {
        assert_eq!(gw.get(&format!("/slow/{i}")).await.status, 200);
    }
    let attempts = slow.count() + fast.count() - before;
    assert!(
        attempts as f64 <= 1.2 * N as f64,
        "{attempts} attempts for {N} requests"
    );
    let m = gw.metrics().await;
    assert!(
        m.sum_or_zero("weir_retry_budget_exhausted_total", &[]) > 0.0,
        "{}",
        m.text
    );
}
