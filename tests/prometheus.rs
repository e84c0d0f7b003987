//! A real Prometheus server (Debian's `prometheus`) scrapes weir's admin listener every second;
//! its HTTP API must show what an operator looks for during an outage, and every expression of
//! the Grafana dashboard must evaluate against what it scraped.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::tools::Prometheus;
use support::{Gateway, Upstream};
use tokio::time::Instant;

const DASHBOARD: &str = include_str!("../grafana/weir.json");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_dead_node_error_rate_rise_and_the_queue_depth_change() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    // A registered node that refuses connections fails the `api` cluster's health check, so
    // the registry and health-check panels have series too.
    let z = Upstream::start_down("z").await;
    let gw = Gateway::builder()
        .upstreams([&a, &b])
        .yaml(
            "deferred_queue: {enabled: true}\nclusters:\n  api: {registry: {liveness: 5m}, \
             health_check: {kind: tcp, interval: 200ms, timeout: 100ms}}\n  \
             names: {dns: {name: nodes.test, port: 80, refresh: 1s, server: \"127.0.0.1:9\"}}",
        )
        .start()
        .await;
    assert_eq!(gw.register("api", "z", z.port(), "").await.status, 200);
    let prom = Prometheus::start(gw.admin_addr()).await;
    let b_url = b.url();
    let rate_of_b = format!(r#"weir_upstream_error_rate{{cluster="default",upstream="{b_url}"}}"#);

    // Healthy: Prometheus has scraped weir and sees b at zero.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        gw.get("/").await;
        let v = prom.values_by(&rate_of_b, "upstream").await;
        if v.len() == 1 {
            assert_eq!(v[0].1, 0.0, "healthy node b has an error rate");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no scrape in 30 s\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // b dies; traffic goes on and Prometheus sees b's error rate rise, its share fall.
    b.down().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (rate, probability) = loop {
        for _ in 0..20 {
            assert_eq!(gw.get("/").await.status, 200, "a is up: no client error");
        }
        let rate = prom.values_by(&rate_of_b, "upstream").await;
        let p = prom
            .values_by(
                &format!(
                    r#"weir_upstream_selection_probability{{cluster="default",upstream="{b_url}"}}"#
                ),
                "upstream",
            )
            .await;
        if let (Some(r), Some(p)) = (rate.first(), p.first()) {
            if r.1 > 0.9 && p.1 < 0.05 {
                break (r.1, p.1);
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw b fail: rate {rate:?}, probability {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("Prometheus: dead node error rate {rate}, selection probability {probability}");
    let attempts = prom
        .values_by(
            &format!(
                r#"weir_upstream_attempts_total{{cluster="default",upstream="{b_url}",result="connect_refused"}}"#
            ),
            "result",
        )
        .await;
    assert!(
        attempts.first().is_some_and(|(_, n)| *n >= 1.0),
        "{attempts:?}"
    );
    let retries = prom
        .values_by(r#"weir_retries_total{reason="connect_refused"}"#, "reason")
        .await;
    assert!(
        retries.first().is_some_and(|(_, n)| *n >= 1.0),
        "{retries:?}"
    );

    // Both nodes down: a POST is buffered, and Prometheus sees the queue depth rise; once a
    // node is back the replay delivers it and the depth falls back to zero.
    a.down().await;
    let resp = gw.send(&support::Request::post("/order", "x")).await;
    resp.assert_sq_msg(503, "Request Buffered");
    let depth_is = |want: f64| {
        let prom = &prom;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let depth = prom.values_by("weir_deferred_queue_depth", "queue").await;
                if depth.iter().any(|(q, v)| q == "deferred" && *v == want) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "Prometheus never saw a deferred depth of {want}: {depth:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    depth_is(1.0).await;
    let served = a.count();
    a.up().await;
    a.wait_for_count(served + 1, Duration::from_secs(15)).await;
    depth_is(0.0).await;

    // Every dashboard expression parses and returns series from what was scraped.
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("dashboard JSON");
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let concrete = expr
                .replace("$__rate_interval", "10s")
                .replace("$job", ".*")
                .replace("$instance", ".*")
                .replace("$cluster", ".*");
            let body = prom.query(&concrete).await;
            let series = body["data"]["result"].as_array().map_or(0, Vec::len);
            assert!(
                series > 0,
                "panel {:?}: `{concrete}` returned no series",
                panel["title"]
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "{checked} expressions");
}
