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

fn hang_yaml(extra: &str) -> String {
    format!("timeouts: {{request: 30s}}\ndeferred_queue: {{enabled: false}}\n{extra}")
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
             timeouts: {{request: 1s}}\ndeferred_queue: {{enabled: false}}",
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
