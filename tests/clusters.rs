//! Clusters, routes, the registry and active health checks, against real upstreams and the
//! real gateway.

mod support;

use std::time::Duration;

use support::{Gateway, Request, Upstream};

/// Bound on anything that should happen within a second or two.
const SOON: Duration = Duration::from_secs(10);

/// Metadata every registration in these tests carries (and the registry must keep).
const ZONE: &str = r#""zone":"eu-1""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_the_cluster_their_host_or_path_routes_to() {
    let d = Upstream::start("d").await;
    let a = Upstream::start("a").await;
    let w = Upstream::start("w").await;
    let gw = Gateway::builder()
        .upstream(&d)
        .yaml(&format!(
            "clusters:\n  api: {{upstreams: [\"{}\"]}}\n  web: {{upstreams: [\"{}\"]}}\n\
             routes:\n  - {{host: api.example.com, cluster: api}}\n  \
             - {{host: \"*.static.example.com\", path_prefix: /img/, cluster: web}}\n  \
             - {{path_prefix: /web/, cluster: web}}\n\
             deferred_queue: {{enabled: true, storage: memory}}",
            a.url(),
            w.url()
        ))
        .start()
        .await;
    let host = |h: &str, target: &str| Request::get(target).header("Host", h);
    let cases = [
        (host("api.example.com", "/x"), "a"),
        (host("API.example.com:5252", "/web/x"), "a"),
        (host("cdn.static.example.com", "/img/1.png"), "w"),
        (host("cdn.static.example.com", "/css/1.css"), "d"),
        (host("other.example.com", "/web/page"), "w"),
        (host("other.example.com", "/"), "d"),
    ];
    for (req, node) in &cases {
        let resp = gw.send(req).await;
        assert_eq!(resp.status, 200, "{req:?}: {}", resp.text());
        assert_eq!(resp.node(), Some(*node), "{} {:?}", req.target, req.headers);
    }

    // A request buffered while its cluster is down is delivered to that cluster, not to the
    // default one, which is up all along.
    a.down().await;
    let req = Request::post("/orders", "o-1").header("Host", "api.example.com");
    gw.buffered(&req).await;
    let before_d = d.count();
    a.up().await;
    a.wait_for_count(2, SOON * 4).await;
    gw.wait_for_delivered(1, SOON * 4).await;
    let got = a.requests();
    assert_eq!(got.last().map(|r| r.target.as_str()), Some("/orders"));
    assert_eq!(d.count(), before_d, "the default cluster got none of it");

    // The node metrics and the status carry the cluster.
    let m = gw.metrics().await;
    let a_url = a.url();
    let labels = [
        ("cluster", "api"),
        ("upstream", a_url.as_str()),
        ("result", "ok"),
    ];
    assert!(
        m.sum_or_zero("weir_upstream_attempts_total", &labels) >= 2.0,
        "{}",
        m.text
    );
    let status = gw.admin_get("/status.json").await.json();
    let clusters: Vec<&str> = status["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(clusters, ["default", "api", "web"]);
    assert_eq!(status["clusters"][1]["routes"][0], "api.example.com/*");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_node_takes_traffic_at_once_and_leaves_when_its_heartbeat_stops() {
    let d = Upstream::start("d").await;
    let n1 = Upstream::start("n1").await;
    let n2 = Upstream::start("n2").await;
    let gw = Gateway::builder()
        .upstream(&d)
        .yaml(
            "clusters:\n  api: {registry: {liveness: 1s}}\n\
             routes:\n  - {path_prefix: /api/, cluster: api}",
        )
        .start()
        .await;
    // No node registered yet: the cluster has none.
    let resp = gw.get("/api/x").await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(d.count(), 0, "never the default cluster's node");

    let resp = gw.register("api", "n1", n1.port(), ZONE).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let entry = resp.json();
    assert_eq!(entry["zone"], "eu-1", "metadata is kept: {entry}");
    assert_eq!(entry["port"], n1.port());
    // Routed at once (the PUT's answer comes after the swap).
    let resp = gw.get("/api/x").await;
    assert_eq!(resp.node(), Some("n1"), "{}", resp.text());

    let listed = gw.admin_get("/registry/api").await.json();
    assert!(
        listed["n1"]["expires_in_ms"]
            .as_u64()
            .is_some_and(|ms| ms <= 1000),
        "{listed}"
    );
    assert_eq!(
        gw.admin_get("/registry").await.json(),
        serde_json::json!({"api": 1})
    );

    // DELETE: out of routing at once.
    gw.register("api", "n2", n2.port(), ZONE).await;
    let resp = gw
        .admin_send(&Request::new("DELETE", "/registry/api/n1"))
        .await;
    assert_eq!(resp.status, 204);
    for _ in 0..10 {
        assert_eq!(gw.get("/api/y").await.node(), Some("n2"));
    }

    // n2 heartbeats a few times, then stops: it expires after its liveness (1 s).
    for _ in 0..3 {
        assert_eq!(gw.register("api", "n2", n2.port(), ZONE).await.status, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    gw.wait_for_stderr("registry: api/n2").await;
    gw.wait_for_metric(
        "weir_registry_events_total",
        &[("cluster", "api"), ("event", "expired")],
        |v| v >= 1.0,
        SOON,
    )
    .await;
    let served = n2.count();
    let resp = gw.get("/api/z").await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(n2.count(), served, "no traffic after the expiry");
    assert!(gw.stderr_text().contains("expired"), "{}", gw.stderr_text());
    assert_eq!(
        gw.admin_get("/registry").await.json(),
        serde_json::json!({"api": 0})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_get_a_reason_and_entries_survive_a_reload_that_adds_a_route() {
    let d = Upstream::start("d").await;
    let n1 = Upstream::start("n1").await;
    let gw = Gateway::builder()
        .upstream(&d)
        .yaml("clusters:\n  api: {registry: {liveness: 5m}}")
        .start()
        .await;
    for (body, why) in [
        ("not json", "not JSON"),
        ("[1,2]", "JSON object"),
        (r#"{"port": 80}"#, "`host` is missing"),
        (r#"{"host": "127.0.0.1", "port": 70000}"#, "port number"),
    ] {
        let resp = gw.admin_send(&Request::put("/registry/api/n1", body)).await;
        assert_eq!(resp.status, 400, "{body}: {}", resp.text());
        assert!(
            resp.json()["error"]
                .as_str()
                .is_some_and(|e| e.contains(why)),
            "{}",
            resp.text()
        );
    }
    let resp = gw
        .admin_send(&Request::put(
            "/registry/default/n1",
            r#"{"host":"127.0.0.1","port":1}"#,
        ))
        .await;
    assert_eq!(
        resp.status,
        404,
        "the default cluster has no registry: {}",
        resp.text()
    );

    assert_eq!(gw.register("api", "n1", n1.port(), ZONE).await.status, 200);
    // No route to `api` yet: the default cluster serves everything.
    let req = Request::get("/x").header("Host", "api.example.com");
    assert_eq!(gw.send(&req).await.node(), Some("d"));
    // A reload adds the route; the registered node is still there.
    let text = format!(
        "{}\nroutes:\n  - {{host: api.example.com, cluster: api}}\n",
        gw.config_text()
    );
    std::fs::write(gw.config_path(), text).expect("rewrite the config");
    gw.reload("ok").await;
    assert_eq!(gw.send(&req).await.node(), Some("n1"));
    assert_eq!(
        gw.admin_get("/registry").await.json(),
        serde_json::json!({"api": 1})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_failing_its_health_check_loses_traffic_before_a_client_request_fails_on_it() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let gw = Gateway::builder()
        .upstreams([&a, &b])
        .yaml(
            "clusters:\n  default: {health_check: {kind: http, path: /healthz, expect: 200, \
             interval: 500ms, timeout: 500ms}}\n\
             routing: {decay_half_life: 500ms}",
        )
        .start()
        .await;
    let healthy = |u: &Upstream| {
        [
            ("cluster", "default"),
            ("upstream", Box::leak(u.url().into_boxed_str()) as &str),
        ]
    };
    gw.wait_for_metric("weir_upstream_healthy", &healthy(&a), |v| v == 1.0, SOON)
        .await;
    // a starts failing: its probes see 503.
    a.status(503);
    gw.wait_for_stderr(&format!(
        "health check: {} (cluster default) failed",
        a.url()
    ))
    .await;
    let client_requests = |u: &Upstream| {
        u.requests()
            .iter()
            .filter(|r| r.target != "/healthz")
            .count()
    };
    let before = client_requests(&a);
    for i in 0..30 {
        let resp = gw.get(&format!("/c/{i}")).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.node(), Some("b"), "request {i}");
    }
    assert_eq!(client_requests(&a), before, "no client request went to a");
    // a recovers: it passes again, and wins traffic back.
    a.answer();
    gw.wait_for_stderr(&format!(
        "health check: {} (cluster default) passes again",
        a.url()
    ))
    .await;
    let mut back = false;
    for i in 0..400 {
        if gw.get(&format!("/r/{i}")).await.node() == Some("a") {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(back, "a got traffic again");
    let m = gw.metrics().await;
    assert!(m.sum_or_zero("weir_health_checks_total", &[("result", "failed")]) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_follows_a_and_srv_records_and_keeps_the_last_good_answer() {
    use std::net::{IpAddr, Ipv4Addr};
    use support::dns::DnsServer;
    let dns = DnsServer::start().await;
    let d = Upstream::start("d").await;
    let n1 = Upstream::start("n1").await;
    let n2 = Upstream::start("n2").await;
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    dns.set_srv(
        "_http._tcp.web.test",
        &[("n1.web.test", n1.port(), 1), ("n2.web.test", n2.port(), 1)],
        1,
    );
    dns.set_addresses("n1.web.test", &[local], 1);
    dns.set_addresses("n2.web.test", &[local], 1);
    let gw = Gateway::builder()
        .upstream(&d)
        .yaml(&format!(
            "clusters:\n  \
             api: {{dns: {{name: api.test, port: {}, refresh: 1s, server: \"{}\"}}}}\n  \
             web: {{dns: {{srv: _http._tcp.web.test, refresh: 10s, server: \"{}\"}}}}\n\
             routes:\n  - {{host: api.test, cluster: api}}\n  - {{host: web.test, cluster: web}}",
            n1.port(),
            dns.addr,
            dns.addr
        ))
        .start()
        .await;
    // SRV: both targets, on the ports of their records.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..200 {
        if let Some(n) = gw
            .send(&Request::get(&format!("/s/{i}")).header("Host", "web.test"))
            .await
            .node()
        {
            seen.insert(n.to_string());
        }
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["n1", "n2"]);
    // The SRV set shrinks; after its 1 s TTL (well before the 10 s refresh) only n2 is left.
    dns.set_srv("_http._tcp.web.test", &[("n2.web.test", n2.port(), 1)], 1);
    gw.wait_for_stderr(&format!("_http._tcp.web.test -> [\"{}\"]", n2.url()))
        .await;
    for i in 0..20 {
        let resp = gw
            .send(&Request::get(&format!("/t/{i}")).header("Host", "web.test"))
            .await;
        assert_eq!(resp.node(), Some("n2"), "{}", resp.text());
    }

    // A: no record yet, so the cluster has no node; then the record appears.
    assert_eq!(
        gw.send(&Request::get("/a").header("Host", "api.test"))
            .await
            .status,
        503
    );
    dns.set_addresses("api.test", &[local], 1);
    gw.until_routed(Some("api.test"), "/a", Some("n1")).await;
    // The server fails: the last good answer stays.
    dns.set_failing(true);
    gw.wait_for_stderr("lookup of api.test failed").await;
    for _ in 0..10 {
        assert_eq!(
            gw.send(&Request::get("/a").header("Host", "api.test"))
                .await
                .node(),
            Some("n1")
        );
    }
    let m = gw.metrics().await;
    assert!(
        m.sum_or_zero(
            "weir_dns_lookups_total",
            &[("cluster", "api"), ("result", "failed")]
        ) >= 1.0
    );
    // It answers again, with another address: n1 is no longer used.
    dns.set_failing(false);
    dns.set_addresses("api.test", &[IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))], 1);
    gw.wait_for_stderr("api.test resolves again").await;
    gw.until_routed(Some("api.test"), "/a", None).await;
    assert!(dns.queries() > 3);
    assert_eq!(d.count(), 0, "nothing fell through to the default cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_on_a_deleted_node_finishes() {
    let d = Upstream::start("d").await;
    let n1 = Upstream::start("n1").await;
    let gw = Gateway::builder()
        .upstream(&d)
        .yaml(
            "clusters:\n  api: {registry: {liveness: 5m}}\n\
             routes:\n  - {path_prefix: /api/, cluster: api}",
        )
        .start()
        .await;
    assert_eq!(gw.register("api", "n1", n1.port(), ZONE).await.status, 200);
    n1.hold();
    let addr = gw.addr();
    let in_flight =
        tokio::spawn(async move { support::client::send(addr, &Request::get("/api/slow")).await });
    n1.wait_for_count(1, SOON).await;
    let resp = gw
        .admin_send(&Request::new("DELETE", "/registry/api/n1"))
        .await;
    assert_eq!(resp.status, 204);
    assert_eq!(
        gw.get("/api/next").await.status,
        503,
        "out of routing at once"
    );
    n1.release();
    let resp = in_flight.await.expect("join").expect("answered");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.node(), Some("n1"));
}
