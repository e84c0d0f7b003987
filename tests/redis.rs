//! `storage: redis`: one deferred queue shared by several real weir processes through a real
//! `redis-server` (Debian package `redis-server`; `scripts/deps test` installs it) on a free
//! loopback port.

mod support;

use std::time::Duration;

use support::tools::Redis;
use support::{Gateway, Request, Upstream};

/// Bound on a delivery once a node is back (lease expiry, replay backoff up to 5 s).
const DELIVERY: Duration = Duration::from_secs(40);

fn shared_queue(redis: &Redis) -> String {
    format!(
        "deferred_queue: {{enabled: true, storage: redis}}\n\
         store: {{redis: {{url: \"{}\", key: fleet, lease: 2s, timeout: 500ms}}}}",
        redis.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_queue_is_delivered_once_in_order_by_another() {
    let redis = Redis::start().await;
    let node = Upstream::start_down("a").await;
    let mut a = Gateway::builder()
        .upstream(&node)
        .yaml(&shared_queue(&redis))
        .start()
        .await;
    // A takes the delivery lease first; B waits for it.
    a.wait_for_stderr("holds the delivery lease").await;
    let b = Gateway::builder()
        .upstream(&node)
        .yaml(&shared_queue(&redis))
        .start()
        .await;
    const N: usize = 12;
    for i in 0..N {
        // Both instances take pushes into the one queue, alternately.
        let gw = if i % 2 == 0 { &a } else { &b };
        let body = format!("body-{i}-{}", "y".repeat(i * 50));
        let req = Request::post(&format!("/jobs/{i}"), body)
            .header("X-Seq", &i.to_string())
            .header("Idempotency-Key", &format!("k{i}"));
        gw.buffered(&req).await;
    }
    assert_eq!(redis.command("XLEN fleet:deferred").await.trim(), ":12");
    // A has read the entries and is failing to deliver them; it dies with them read.
    a.wait_for_stderr("delivery attempt 1 failed").await;
    a.kill9();
    node.up().await;
    node.wait_for_count(N, DELIVERY).await;
    b.wait_for_delivered(N, DELIVERY).await;
    let got = node.requests();
    assert_eq!(got.len(), N, "each delivered once: {got:?}");
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.target, format!("/jobs/{i}"), "in order");
        assert_eq!(r.header("x-seq"), Some(i.to_string().as_str()));
        let body = format!("body-{i}-{}", "y".repeat(i * 50));
        assert_eq!(r.body, body.as_bytes(), "body of {i} intact");
    }
    assert!(
        b.logs().contains("holds the delivery lease"),
        "B took the lease over:\n{}",
        b.logs()
    );
    // Delivered entries left the stream (the removal follows each answer).
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while redis.command("XLEN fleet:deferred").await.trim() != ":0" {
        assert!(tokio::time::Instant::now() < end, "the stream kept entries");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_queue_answers_unavailable_proxying_goes_on_and_it_reconnects() {
    let mut redis = Redis::start().await;
    let port = redis.port;
    let node = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&node)
        .yaml(&shared_queue(&redis))
        .start()
        .await;
    redis.stop().await;
    node.down().await;
    let resp = gw.send(&Request::post("/lost?", "x")).await;
    resp.assert_sq_msg(503, "Queue Unavailable");
    node.up().await;
    // Proxying does not depend on Redis.
    assert_eq!(gw.get("/live").await.status, 200);
    gw.wait_for_metric(
        "weir_rejected_total",
        &[("reason", "queue_unavailable")],
        |v| v >= 1.0,
        Duration::from_secs(10),
    )
    .await;
    assert!(gw.logs().contains("unreachable"), "{}", gw.logs());
    let m = gw.metrics().await;
    assert_eq!(
        m.sum("weir_queue_store_up", &[("queue", "deferred")]),
        Some(0.0)
    );
    // Back: the next push is taken without a restart.
    let redis = Redis::start_on(port).await;
    node.down().await;
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let resp = gw.send(&Request::post("/kept", "y")).await;
        if resp.status == 503 && resp.text().contains("Request Buffered") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "no reconnect: {} {}",
            resp.status,
            resp.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.wait_for_metric(
        "weir_queue_store_up",
        &[("queue", "deferred")],
        |v| v == 1.0,
        Duration::from_secs(10),
    )
    .await;
    node.up().await;
    // `/live` and then the queued one.
    node.wait_for_count(2, DELIVERY).await;
    let got: Vec<String> = node
        .requests()
        .iter()
        .map(|r| r.target.clone())
        .filter(|t| t != "/live")
        .collect();
    assert_eq!(got, ["/kept"]);
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_instance_gives_the_lease_up_and_leaves_its_entries_to_the_fleet() {
    let redis = Redis::start().await;
    let node = Upstream::start_down("a").await;
    // A long lease: only a released lease lets B deliver within the deadline below.
    let yaml = shared_queue(&redis).replace("lease: 2s", "lease: 60s");
    let mut a = Gateway::builder().upstream(&node).yaml(&yaml).start().await;
    a.wait_for_stderr("holds the delivery lease").await;
    let b = Gateway::builder().upstream(&node).yaml(&yaml).start().await;
    for i in 0..3 {
        a.buffered(&Request::post(&format!("/s/{i}"), "z")).await;
    }
    a.signal("TERM");
    assert!(a.wait_exit(Duration::from_secs(30)).await, "A did not stop");
    assert!(
        a.logs()
            .contains("3 queued requests remain at shutdown; they stay in the Redis stream"),
        "{}",
        a.logs()
    );
    node.up().await;
    node.wait_for_count(3, Duration::from_secs(25)).await;
    let got: Vec<String> = node.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(got, ["/s/0", "/s/1", "/s/2"]);
    assert!(
        b.logs().contains("holds the delivery lease"),
        "{}",
        b.logs()
    );
}

fn shared_registry(redis: &Redis) -> String {
    format!(
        "clusters:\n  api: {{registry: {{liveness: 2s, storage: redis}}}}\n\
         routes:\n  - {{path_prefix: /api/, cluster: api}}\n\
         store: {{redis: {{url: \"{}\", key: fleet, timeout: 500ms}}}}",
        redis.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_route_to_the_nodes_registered_in_one_redis_registry() {
    let redis = Redis::start().await;
    let d = Upstream::start("d").await;
    let n1 = Upstream::start("n1").await;
    let n2 = Upstream::start("n2").await;
    let a = Gateway::builder()
        .upstream(&d)
        .yaml(&shared_registry(&redis))
        .start()
        .await;
    let b = Gateway::builder()
        .upstream(&d)
        .yaml(&shared_registry(&redis))
        .start()
        .await;
    // Registered through A: A routes to it at once, B on its next read.
    assert_eq!(a.register("api", "n1", n1.port(), "").await.status, 200);
    assert_eq!(a.get("/api/x").await.node(), Some("n1"));
    // B reads the registry every 500 ms; the bound leaves room for a busy machine.
    let took = b.until_routed(None, "/api/x", Some("n1")).await;
    assert!(
        took < Duration::from_secs(3),
        "B routed to n1 after {took:?}"
    );
    assert_eq!(
        b.admin_get("/registry").await.json(),
        serde_json::json!({"api": 1})
    );

    // Deleted through B: A stops routing to it.
    let resp = b
        .admin_send(&Request::new("DELETE", "/registry/api/n1"))
        .await;
    assert_eq!(resp.status, 204);
    a.until_routed(None, "/api/x", None).await;

    // n2 registers through B and then stops renewing: it expires in Redis for both.
    assert_eq!(b.register("api", "n2", n2.port(), "").await.status, 200);
    a.until_routed(None, "/api/y", Some("n2")).await;
    a.until_routed(None, "/api/y", None).await;
    b.until_routed(None, "/api/y", None).await;
    assert_eq!(redis.command("HLEN fleet:registry:api").await.trim(), ":0");
    let expired =
        |m: support::Metrics| m.sum_or_zero("weir_registry_events_total", &[("event", "expired")]);
    let expired_a = expired(a.metrics().await);
    let expired_b = expired(b.metrics().await);
    assert_eq!(
        expired_a + expired_b,
        1.0,
        "the expiry is counted once, by one instance"
    );

    // Redis down: routing keeps the last nodes read, registrations get 503.
    assert_eq!(a.register("api", "n1", n1.port(), "").await.status, 200);
    b.until_routed(None, "/api/z", Some("n1")).await;
    let mut redis = redis;
    redis.stop().await;
    let resp = a.register("api", "n1", n1.port(), "").await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(
        b.get("/api/z").await.node(),
        Some("n1"),
        "the last good set stays"
    );
}
