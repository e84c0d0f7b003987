//! The live status page of the admin listener (`GET /`) and its JSON (`GET /status.json`),
//! the page checked in a real headless Chromium.

mod support;

use std::time::Duration;

use support::tools::{chromium_dump_dom, chromium_screenshot};
use support::{Gateway, Upstream};

/// The node's error rate in `status.json`.
async fn json_error_rate(gw: &Gateway, url: &str) -> f64 {
    let s = gw.admin_get("/status.json").await.json();
    s["upstreams"]
        .as_array()
        .and_then(|us| us.iter().find(|u| u["url"] == url))
        .and_then(|u| u["error_rate"].as_f64())
        .unwrap_or_else(|| panic!("no {url} in {s}"))
}

/// Sends requests one by one until `ok(error rate of url)` holds (at most `max` requests).
async fn drive_until(gw: &Gateway, url: &str, max: usize, ok: impl Fn(f64) -> bool) -> f64 {
    for _ in 0..max {
        assert_eq!(gw.get("/").await.status, 200);
        let r = json_error_rate(gw, url).await;
        if ok(r) {
            return r;
        }
    }
    let status = gw.admin_get("/status.json").await.text();
    panic!("error rate of {url} not as wanted after {max} requests: {status}");
}

/// The `data-value` of the `class` cell in the row of `url` in a DOM dump.
fn cell_value(dom: &str, url: &str, class: &str) -> f64 {
    let row_start = dom
        .find(&format!(r#"data-upstream="{url}""#))
        .unwrap_or_else(|| panic!("no row for {url} in the rendered page:\n{dom}"));
    let row = &dom[row_start..];
    let row = &row[..row.find("</tr>").unwrap_or(row.len())];
    let cell = row
        .find(&format!(r#"class="{class}"#))
        .map(|i| &row[i..])
        .unwrap_or_else(|| panic!("no {class} cell in {row}"));
    let v = cell
        .split_once(r#"data-value=""#)
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(v, _)| v)
        .unwrap_or_else(|| panic!("no data-value in {cell}"));
    v.parse()
        .unwrap_or_else(|e| panic!("{class} of {url} is {v:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_nodes_queues_and_totals() {
    let a = Upstream::start("a").await;
    let dead = Upstream::start_down("dead").await;
    // No decay: the dead node's share depends on how often it failed, not on wall time.
    let gw = Gateway::builder()
        .upstreams([&a, &dead])
        // Hedging off: a hedge to the dead node is a refused attempt without a retry, and the
        // page's retry count is compared with the refused attempts below.
        .yaml("limits: {concurrency_peak: 77}\nrouting: {decay_half_life: 1h}\nhedging: {enabled: false}")
        .start()
        .await;
    // At least 20 requests, and until the dead node failed twice: after a single failure its
    // share is still 0.28 (h(1) = 0.396), and which request first picks it is random.
    let mut sent = 0u64;
    loop {
        assert_eq!(gw.get("/").await.status, 200);
        sent += 1;
        let s = gw.admin_get("/status.json").await.json();
        let refused = s["upstreams"]
            .as_array()
            .and_then(|us| us.iter().find(|u| u["url"] == dead.url().as_str()))
            .and_then(|u| u["attempts"]["connect_refused"].as_u64())
            .unwrap_or(0);
        if sent >= 20 && refused >= 2 {
            break;
        }
        assert!(
            sent < 500,
            "the dead node failed {refused} times in {sent} requests"
        );
    }
    gw.wait_for_metric(
        "weir_requests_total",
        &[],
        |v| v == sent as f64,
        Duration::from_secs(5),
    )
    .await;
    let resp = gw.admin_get("/status.json").await;
    assert_eq!(resp.status, 200);
    assert!(resp
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    assert_eq!(resp.header("cache-control"), Some("no-store"));
    let s = resp.json();
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_seconds"].as_f64().is_some_and(|u| u >= 0.0));
    assert!(s["started_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(s["algorithm"], "feedback");
    assert_eq!(s["concurrency_peak"], 77);
    assert!(s["inflight"].as_u64().is_some());
    assert_eq!(s["requests"]["requests"], sent);
    assert_eq!(s["requests"]["by_outcome"]["proxied"], sent);
    assert_eq!(s["requests"]["by_code"]["2xx"], sent);

    let ups = s["upstreams"].as_array().expect("upstreams");
    assert_eq!(ups.len(), 2);
    let node = |url: &str| ups.iter().find(|u| u["url"] == url).expect("node");
    let (live, down) = (node(&a.url()), node(&dead.url()));
    assert_eq!(live["attempts"]["ok"], sent);
    assert_eq!(live["error_rate"], 0.0);
    assert!(live["latency_ms"].as_f64().is_some_and(|l| l > 0.0));
    assert!(down["latency_ms"].is_null());
    let refused = down["attempts"]["connect_refused"].as_u64().expect("count");
    assert!(refused >= 1);
    assert_eq!(down["attempts_total"], refused);
    assert_eq!(s["requests"]["retries"]["connect_refused"], refused);
    assert!(down["error_rate"].as_f64().is_some_and(|r| r > 0.5));
    let p_sum = live["selection_probability"].as_f64().unwrap()
        + down["selection_probability"].as_f64().unwrap();
    assert!((p_sum - 1.0).abs() < 1e-9, "probabilities sum to {p_sum}");
    assert!(down["selection_probability"].as_f64().unwrap() < 0.2);
    for u in [live, down] {
        assert_eq!(u["inflight"], 0);
        assert_eq!(u["weight"], 1);
    }

    for q in ["deferred", "upfront"] {
        let queue = &s["queues"][q];
        assert_eq!(queue["enabled"], false, "{q}");
        assert_eq!(queue["capacity"], 0, "a queue that is off holds nothing");
        assert_eq!(queue["depth"], 0);
        assert_eq!(queue["oldest_age_seconds"], 0.0);
        assert_eq!(queue["dead_letters"], 0);
        assert_eq!(queue["replayed"]["delivered"], 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_is_one_self_contained_html_document() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder().upstream(&a).start().await;
    let resp = gw.admin_get("/").await;
    assert_eq!(resp.status, 200);
    assert!(resp
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/html")));
    let page = resp.text();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("status.json"), "the page reads status.json");
    for external in ["http://", "https://", "<link", " src=", "@import", "url("] {
        assert!(!page.contains(external), "the page refers to {external}");
    }
    assert_eq!(gw.admin_get("/nope").await.status, 404);
}

/// Chromium renders the page while one node is down: the node's row shows its error rate, and
/// a second load after more failures shows it higher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_the_dead_node_error_rate_rising() {
    let a = Upstream::start("a").await;
    let dead = Upstream::start_down("dead").await;
    // A long half-life: the score must not fade between the two page loads.
    let gw = Gateway::builder()
        .upstreams([&a, &dead])
        .yaml("routing: {decay_half_life: 1h}")
        .start()
        .await;
    let url = dead.url();
    let page = format!("http://{}/", gw.admin_addr());

    // Stops at the first failure (score 1, rate 0.60), leaving room to rise.
    let first = drive_until(&gw, &url, 200, |r| r > 0.0).await;
    let dom = chromium_dump_dom(&page, Duration::from_millis(2500)).await;
    let shown_first = cell_value(&dom, &url, "error-rate");
    // The score decays (slowly, with this half-life) between the two reads.
    assert!(
        (shown_first - first).abs() < 0.01,
        "page shows {shown_first}, status.json had {first}"
    );
    assert!(
        dom.contains(r#"class="node down""#),
        "dead node not marked down"
    );
    assert!(cell_value(&dom, &a.url(), "error-rate") == 0.0);
    assert!(cell_value(&dom, &url, "attempts-connect_refused") >= 1.0);
    assert!(cell_value(&dom, &url, "selection-probability") < 0.5);

    let second = drive_until(&gw, &url, 3000, |r| r > shown_first + 0.05).await;
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("weir-status-page.png");
    chromium_screenshot(&page, Duration::from_millis(2500), &path).await;
    let dom = chromium_dump_dom(&page, Duration::from_millis(2500)).await;
    let shown_second = cell_value(&dom, &url, "error-rate");
    assert!(
        shown_second > shown_first,
        "error rate on the page did not rise: {shown_first} then {shown_second}"
    );
    assert!(
        (shown_second - second).abs() < 0.01,
        "{shown_second} vs {second}"
    );
    eprintln!(
        "status page: dead node error rate {shown_first:.3} then {shown_second:.3}; screenshot {}",
        path.display()
    );
}
