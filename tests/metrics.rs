//! The admin listener: `/healthz` and the Prometheus metrics weir exports.

mod support;

use std::time::Duration;

use support::{Gateway, Upstream};

const CORE: [&str; 3] = [
    "weir_requests_total",
    "weir_upstream_attempts_total",
    "weir_upstream_error_rate",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_200() {
    let up = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&up).start().await;
    assert_eq!(gw.admin_get("/healthz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_metric_families_are_exported_after_traffic() {
    let up = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&up).start().await;
    assert_eq!(gw.get("/").await.status, 200);

    let m = gw.metrics().await;
    for name in CORE {
        assert!(m.has_family(name), "{name} missing from\n{}", m.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_metric_families_are_exported_from_startup() {
    let up = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&up).start().await;

    let m = gw.metrics().await;
    for name in CORE {
        assert!(
            m.has_family(name),
            "{name} missing before the first request\n{}",
            m.text
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_requests_and_ok_attempts_are_counted_per_upstream() {
    let up = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&up).start().await;
    for _ in 0..3 {
        assert_eq!(gw.get("/").await.status, 200);
    }

    gw.wait_for_metric(
        "weir_requests_total",
        &[("code", "2xx"), ("outcome", "proxied")],
        |v| v == 3.0,
        Duration::from_secs(5),
    )
    .await;
    let m = gw.metrics().await;
    let url = up.url();
    assert_eq!(
        m.sum(
            "weir_upstream_attempts_total",
            &[("upstream", &url), ("result", "ok")]
        ),
        Some(3.0),
        "\n{}",
        m.text
    );
    let rate = m
        .sum("weir_upstream_error_rate", &[("upstream", &url)])
        .unwrap_or_else(|| panic!("no weir_upstream_error_rate for {url}\n{}", m.text));
    assert!(
        (0.0..=0.01).contains(&rate),
        "error rate of a node that only succeeded: {rate}"
    );
}
