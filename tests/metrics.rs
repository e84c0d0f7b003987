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

/// metrics.md: every family, its type and its label names.
const DESIGN: [(&str, &str, &[&str]); 18] = [
    ("weir_requests_total", "counter", &["code", "outcome"]),
    ("weir_request_duration_seconds", "histogram", &["outcome"]),
    ("weir_inflight_requests", "gauge", &[]),
    ("weir_concurrency_peak", "gauge", &[]),
    ("weir_rejected_total", "counter", &["reason"]),
    (
        "weir_upstream_attempts_total",
        "counter",
        &["cluster", "result", "upstream"],
    ),
    (
        "weir_upstream_error_rate",
        "gauge",
        &["cluster", "upstream"],
    ),
    (
        "weir_upstream_selection_probability",
        "gauge",
        &["cluster", "upstream"],
    ),
    (
        "weir_upstream_response_duration_seconds",
        "histogram",
        &["cluster", "upstream"],
    ),
    ("weir_retries_total", "counter", &["reason"]),
    ("weir_deferred_queue_depth", "gauge", &["queue"]),
    ("weir_deferred_queue_capacity", "gauge", &["queue"]),
    (
        "weir_deferred_queue_oldest_age_seconds",
        "gauge",
        &["queue"],
    ),
    ("weir_deferred_enqueued_total", "counter", &["queue"]),
    (
        "weir_deferred_replayed_total",
        "counter",
        &["queue", "result"],
    ),
    ("weir_deferred_dead_letters", "gauge", &["queue"]),
    ("weir_config_reloads_total", "counter", &["result"]),
    ("weir_build_info", "gauge", &["version"]),
];

/// The closed set of values each bounded label may take.
const LABEL_VALUES: [(&str, &[&str]); 6] = [
    // weir_attempt_timeouts_total
    ("kind", &["first_byte", "body_idle", "attempt"]),
    ("code", &["1xx", "2xx", "3xx", "4xx", "5xx"]),
    (
        "outcome",
        &["proxied", "buffered", "queued", "rejected", "failed"],
    ),
    ("queue", &["deferred", "upfront"]),
    (
        "result",
        &[
            "ok",
            "connect_refused",
            "connect_timeout",
            "timeout",
            "reset",
            "bad_response",
            "status",
            "delivered",
            "failed_attempt",
            "expired",
            "dead_letter",
            "rejected",
            // weir_acme_orders_total
            "failed",
        ],
    ),
    (
        "reason",
        &[
            "concurrency",
            "queue_full",
            "queue_unavailable",
            "bad_request",
            "client_timeout",
            "client_limit",
            // weir_connections_refused_total
            "max_connections",
            "per_client",
            "connect_refused",
            "connect_timeout",
            "timeout",
            "reset",
            "bad_response",
            "status",
            "stale_connection",
            "stall",
        ],
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_designed_metric_is_exported_at_startup_with_its_labels() {
    let a = Upstream::start("a").await;
    let b = Upstream::start_down("b").await;
    let gw = Gateway::builder().upstreams([&a, &b]).start().await;
    let m = gw.metrics().await;
    for (name, kind, labels) in DESIGN {
        assert!(
            m.text.contains(&format!("# TYPE {name} {kind}\n")),
            "no `# TYPE {name} {kind}` before any traffic\n{}",
            m.text
        );
        let sample_name = if kind == "histogram" {
            format!("{name}_count")
        } else {
            name.to_string()
        };
        let samples: Vec<_> = m.samples.iter().filter(|s| s.name == sample_name).collect();
        assert!(!samples.is_empty(), "{name} has no series at start-up");
        for s in samples {
            let mut got: Vec<&str> = s.labels.iter().map(|(k, _)| k.as_str()).collect();
            got.sort_unstable();
            assert_eq!(got, labels, "labels of {name}: {:?}", s.labels);
        }
    }
    // Per-node series exist for both nodes from the start.
    for url in [a.url(), b.url()] {
        for name in [
            "weir_upstream_error_rate",
            "weir_upstream_selection_probability",
            "weir_upstream_response_duration_seconds_count",
        ] {
            assert!(m.sum(name, &[("upstream", &url)]).is_some(), "{name} {url}");
        }
        assert_eq!(
            m.matching("weir_upstream_attempts_total", &[("upstream", &url)])
                .count(),
            7,
            "one attempts series per result for {url}"
        );
    }
    assert_eq!(
        m.sum("weir_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_values_stay_in_their_closed_sets_after_mixed_traffic() {
    let a = Upstream::start("a").await;
    let b = Upstream::start_down("b").await;
    let c = Upstream::start("c").await;
    c.status(503);
    let gw = Gateway::builder()
        .upstreams([&a, &b, &c])
        .yaml("limits: {concurrency_peak: 64}")
        .start()
        .await;
    for i in 0..30 {
        let target = format!("/client-chosen/{i}?q={i}");
        gw.send(&support::Request::get(&target).header("x-request-id", &format!("id-{i}")))
            .await;
    }
    gw.wait_for_metric(
        "weir_requests_total",
        &[],
        |v| v == 30.0,
        Duration::from_secs(5),
    )
    .await;
    let m = gw.metrics().await;
    let urls = [a.url(), b.url(), c.url()];
    for s in m.samples.iter().filter(|s| s.name.starts_with("weir_")) {
        for (k, v) in &s.labels {
            match k.as_str() {
                "upstream" => assert!(urls.contains(v), "unknown upstream label {v}"),
                // No clusters configured: every node is in `default`.
                "cluster" => assert_eq!(v, "default", "{}", s.name),
                "le" | "version" => {}
                _ => {
                    let allowed = LABEL_VALUES
                        .iter()
                        .find(|(name, _)| name == k)
                        .unwrap_or_else(|| panic!("unexpected label {k} on {}", s.name))
                        .1;
                    assert!(allowed.contains(&v.as_str()), "{}: {k}={v}", s.name);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histogram_buckets_span_sub_millisecond_to_tens_of_seconds() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&a).start().await;
    let m = gw.metrics().await;
    for (name, labels) in [
        (
            "weir_request_duration_seconds_bucket",
            vec![("outcome", "proxied")],
        ),
        (
            "weir_upstream_response_duration_seconds_bucket",
            vec![("upstream", a.url().leak() as &str)],
        ),
    ] {
        let bounds: Vec<f64> = m
            .matching(name, &labels)
            .filter_map(|s| s.labels.iter().find(|(k, _)| k == "le"))
            .map(|(_, v)| {
                if v == "+Inf" {
                    f64::INFINITY
                } else {
                    v.parse().unwrap()
                }
            })
            .filter(|b| b.is_finite())
            .collect();
        let lo = bounds.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = bounds.iter().cloned().fold(0.0, f64::max);
        assert!(
            lo < 0.001,
            "{name}: smallest bucket {lo}s is not sub-millisecond"
        );
        assert!(
            hi >= 10.0,
            "{name}: largest bucket {hi}s is under ten seconds"
        );
        assert!(bounds.len() >= 12, "{name}: only {} buckets", bounds.len());
    }
}

/// Every failed attempt that had a node left is followed by one retry, labelled with how it
/// failed; a connect-refused node and a node answering 503 (a failure status) show both labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_counted_by_the_failure_that_caused_them() {
    let a = Upstream::start("a").await;
    let dead = Upstream::start_down("dead").await;
    let failing = Upstream::start("failing").await;
    failing.status(503);
    // Hedging off: a hedge is an extra attempt without a retry (a slow answer from `a` on a
    // busy machine would hedge to `dead` or `failing` and break the one-retry-per-failure
    // count this test pins; hedges have their own tests and counter).
    let gw = Gateway::builder()
        .upstreams([&a, &dead, &failing])
        .yaml("hedging: {enabled: false}")
        .start()
        .await;
    const N: usize = 60;
    for _ in 0..N {
        assert_eq!(gw.get("/").await.status, 200);
    }
    gw.wait_for_metric(
        "weir_requests_total",
        &[("outcome", "proxied")],
        |v| v == N as f64,
        Duration::from_secs(5),
    )
    .await;
    let m = gw.metrics().await;
    let attempts = |url: &str, result: &str| {
        m.sum_or_zero(
            "weir_upstream_attempts_total",
            &[("upstream", url), ("result", result)],
        )
    };
    let refused = attempts(&dead.url(), "connect_refused");
    let statuses = attempts(&failing.url(), "status");
    assert!(
        refused > 0.0 && statuses > 0.0,
        "{refused} {statuses}\n{}",
        m.text
    );
    assert_eq!(attempts(&a.url(), "ok"), N as f64);
    assert_eq!(
        m.sum("weir_retries_total", &[("reason", "connect_refused")]),
        Some(refused)
    );
    assert_eq!(
        m.sum("weir_retries_total", &[("reason", "status")]),
        Some(statuses)
    );
    assert_eq!(
        m.sum_or_zero("weir_retries_total", &[]),
        refused + statuses,
        "no other retry reason\n{}",
        m.text
    );
    // Time to response header, once per attempt that got one.
    let observed = |url: &str| {
        m.sum_or_zero(
            "weir_upstream_response_duration_seconds_count",
            &[("upstream", url)],
        )
    };
    assert_eq!(observed(&a.url()), N as f64);
    assert_eq!(observed(&failing.url()), statuses);
    assert_eq!(observed(&dead.url()), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_during_an_outage_shows_the_dead_node_near_zero() {
    let a = Upstream::start("a").await;
    let dead = Upstream::start_down("dead").await;
    // The dead node's score must not fade while a loaded machine sends the 100 requests: what
    // the scrape shows is then a matter of request counts, not of wall time.
    let gw = Gateway::builder()
        .upstreams([&a, &dead])
        .yaml("routing: {decay_half_life: 1h}")
        .start()
        .await;
    for _ in 0..100 {
        assert_eq!(gw.get("/").await.status, 200);
    }
    let m = gw.metrics().await;
    let p = |url: &str| {
        m.sum("weir_upstream_selection_probability", &[("upstream", url)])
            .unwrap_or_else(|| panic!("no probability for {url}"))
    };
    let rate = m
        .sum("weir_upstream_error_rate", &[("upstream", &dead.url())])
        .unwrap_or(0.0);
    assert!(
        p(&dead.url()) < 0.05,
        "dead node still has {}",
        p(&dead.url())
    );
    assert!(p(&a.url()) > 0.95, "live node has {}", p(&a.url()));
    assert!(rate > 0.9, "dead node error rate {rate}");
    assert_eq!(
        m.sum("weir_upstream_error_rate", &[("upstream", &a.url())]),
        Some(0.0)
    );
    // The last request's slot is released by the logging hook, just after its response.
    gw.wait_for_metric(
        "weir_inflight_requests",
        &[],
        |v| v == 0.0,
        Duration::from_secs(5),
    )
    .await;
    gw.wait_for_metric(
        "weir_upstream_inflight_requests",
        &[("upstream", &a.url())],
        |v| v == 0.0,
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_check_at_startup_and_after_failures() {
    let a = Upstream::start("a").await;
    let dead = Upstream::start_down("dead").await;
    let gw = Gateway::builder().upstreams([&a, &dead]).start().await;
    let (ok, out) = support::tools::promtool_check_metrics(&gw.metrics().await.text).await;
    assert!(ok && out.trim().is_empty(), "promtool at start-up:\n{out}");

    for _ in 0..20 {
        gw.get("/").await;
    }
    gw.send(&support::Request::new("BREW", "/")).await;
    let m = gw.metrics().await;
    let (ok, out) = support::tools::promtool_check_metrics(&m.text).await;
    assert!(
        ok && out.trim().is_empty(),
        "promtool after traffic:\n{out}\n{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_limits_are_exported() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("limits: {concurrency_peak: 33}\ndeferred_queue: {enabled: true, capacity: 99}")
        .start()
        .await;
    let m = gw.metrics().await;
    assert_eq!(m.sum("weir_concurrency_peak", &[]), Some(33.0));
    assert_eq!(
        m.sum("weir_deferred_queue_capacity", &[("queue", "deferred")]),
        Some(99.0)
    );
    assert_eq!(
        m.sum("weir_deferred_queue_capacity", &[("queue", "upfront")]),
        Some(0.0)
    );
    assert_eq!(
        m.sum("weir_deferred_queue_depth", &[("queue", "deferred")]),
        Some(0.0)
    );
}
