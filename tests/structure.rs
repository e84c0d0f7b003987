//! Regression tests for behaviours the restructuring of src/ must get right: a stale pooled
//! upstream connection (deterministically, with `Behaviour::CloseOnReuse`), a request queued
//! from a TLS listener, the attempt limit after a reload, `timeouts.keepalive: 0`, and no files
//! written where none are configured.
//!
//! ## What a stale pooled connection proves
//!
//! Pingora tests a pooled connection before it reuses it (`test_reusable_stream`,
//! pingora-core `connectors/mod.rs`: a connection whose peer already closed, or that has
//! unexpected data, is dropped, not reused). A reused-connection error (`ConnectionClosed`
//! with 0 bytes read, or an OS read error; `RetryType::ReusedOnly`, `client_reused = true`,
//! `v1/client.rs` read_response) therefore means the node closed the connection after weir took
//! it: either the close crossed weir's write, or the node read the request and then closed.
//! Nothing in the error tells the two apart, and `CloseOnReuse` is the second case: the node's
//! socket read the whole request before closing, so the node DID see it. Pingora's own default
//! (`error_while_proxy`) retries a reused-connection error only for idempotent requests.
//! Hence:
//! - a GET (replay-safe) is retried on a fresh connection and answered;
//! - a POST without an Idempotency-Key is not provably unseen: it must not be sent again on a
//!   fresh connection; weir answers from its table for a connection that broke before any
//!   response (`503 Service Unavailable`, as for a reset), with the attempt counted (access
//!   log `attempts: 1`, `upstream`: the node) — never the `502` with `attempts: 0` and
//!   `upstream: null` of a failure nobody recorded;
//! - the CI failure (the last node went down, closing its connections, while weir held one of
//!   them in its pool; deferred queue on): the close came before the POST, so nothing of the
//!   POST was written to it. Pingora's own reuse test misses such a close when tokio has not
//!   yet seen the socket readable (a busy machine); weir peeks the socket itself before
//!   writing (`connected_to_upstream`), so the POST goes out on a fresh connection, is refused
//!   like every attempt, and is buffered (`503 Request Buffered`), then delivered once.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::pki::{tls_yaml, Pki};
use support::{Client, Gateway, Received, Request, Response, Upstream};

const DEFERRED_ON: &str = "deferred_queue: {enabled: true}";
const CLIENT_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// Bound on a replay reaching a node that came back (the backoff is at most 5 s).
const DELIVERY: Duration = Duration::from_secs(30);

fn with_target<'a>(reqs: &'a [Received], target: &str) -> Vec<&'a Received> {
    reqs.iter().filter(|r| r.target == target).collect()
}

/// Sends `req` (answered 200 by `node` on a new upstream connection) and waits until weir has
/// logged it: Pingora puts the upstream connection back into its pool before the logging hook
/// runs (pingora-proxy `proxy_to_upstream`, then `finish`), so from then on the next request
/// to `node` is sent on that pooled connection. Returns the node's connection number.
async fn pool_a_connection(gw: &Gateway, node: &Upstream, req: Request) -> usize {
    let resp = gw.send(&req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.node(), Some(node.name()));
    gw.wait_for_metric(
        "weir_requests_total",
        &[],
        |v| v >= 1.0,
        Duration::from_secs(10),
    )
    .await;
    let answered = node.requests();
    let first = with_target(&answered, &req.target);
    assert_eq!(first.len(), 1, "{answered:?}");
    first[0].connection
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_that_meets_a_stale_pooled_connection_is_retried_on_a_fresh_one() {
    let a = Upstream::start("a").await;
    a.close_on_reuse();
    let gw = Gateway::builder().upstream(&a).start().await;
    let pooled = pool_a_connection(&gw, &a, Request::get("/warm")).await;

    let resp = gw.get("/stale-get").await;
    assert_eq!(resp.status, 200, "{}\n{}", resp.text(), gw.logs());
    assert_eq!(resp.node(), Some("a"));
    let dropped = a.dropped();
    assert_eq!(
        dropped
            .iter()
            .map(|r| (r.target.as_str(), r.connection))
            .collect::<Vec<_>>(),
        [("/stale-get", pooled)],
        "the GET met the pooled connection first"
    );
    let answered = a.requests();
    let served = with_target(&answered, "/stale-get");
    assert_eq!(served.len(), 1, "answered once: {answered:?}");
    assert_ne!(served[0].connection, pooled, "on a fresh connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_meets_a_stale_pooled_connection_is_not_resent_and_gets_weirs_503() {
    let a = Upstream::start("a").await;
    a.close_on_reuse();
    let gw = Gateway::builder().upstream(&a).start().await;
    let pooled = pool_a_connection(&gw, &a, Request::get("/warm")).await;

    let resp = gw.send(&Request::post("/stale-post", "once")).await;
    resp.assert_sq_msg(503, "Service Unavailable");
    let line = gw
        .access_line(resp.header("x-request-id").unwrap_or(""))
        .await;
    let dropped = a.dropped();
    assert_eq!(
        dropped
            .iter()
            .map(|r| (r.target.as_str(), r.connection, r.body.as_slice()))
            .collect::<Vec<_>>(),
        [("/stale-post", pooled, &b"once"[..])],
        "the node read the POST on the pooled connection"
    );
    assert!(
        with_target(&a.requests(), "/stale-post").is_empty(),
        "a POST the node may have seen was sent again: {:?}",
        a.requests()
    );
    assert_eq!(line["status"], 503, "{line}");
    assert_eq!(line["attempts"], 1, "the attempt is counted: {line}");
    assert_eq!(line["upstream"], a.url().as_str(), "{line}");
    assert_eq!(line["outcome"], "failed", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_after_the_last_node_went_down_with_a_pooled_connection_is_buffered_and_delivered_once(
) {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(DEFERRED_ON)
        .start()
        .await;
    pool_a_connection(&gw, &a, Request::post("/orders/1", "one")).await;
    // The node goes away: it stops listening and closes every connection, the one weir holds
    // in its pool included, before this returns.
    a.down().await;

    let resp = gw.send(&Request::post("/orders/2", "two")).await;
    resp.assert_sq_msg(503, "Request Buffered");
    assert!(
        resp.header("x-weir-queue-id").is_some(),
        "no X-Weir-Queue-Id: {:?}",
        resp.headers
    );
    let id = resp
        .header("x-request-id")
        .expect("X-Request-Id")
        .to_string();
    let line = gw.access_line(&id).await;
    assert_eq!(line["outcome"], "buffered", "{line}");

    a.up().await;
    gw.wait_for_metric(
        "weir_deferred_replayed_total",
        &[("queue", "deferred"), ("result", "delivered")],
        |v| v >= 1.0,
        DELIVERY,
    )
    .await;
    gw.wait_for_metric(
        "weir_deferred_queue_depth",
        &[("queue", "deferred")],
        |v| v == 0.0,
        Duration::from_secs(10),
    )
    .await;
    let answered = a.requests();
    let delivered = with_target(&answered, "/orders/2");
    assert_eq!(delivered.len(), 1, "delivered exactly once: {answered:?}");
    assert_eq!(delivered[0].method, "POST");
    assert_eq!(delivered[0].body, b"two");
    assert!(a.dropped().is_empty(), "nothing was dropped unanswered");
    let m = gw.metrics().await;
    assert_eq!(
        m.sum_or_zero(
            "weir_deferred_replayed_total",
            &[("queue", "deferred"), ("result", "delivered")]
        ),
        1.0
    );
}

/// A response read by curl `-i`: status, headers, body.
struct CurlResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl CurlResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A POST over TLS (HTTP/1.1) to the gateway's listener as `localhost`, with `headers`.
async fn tls_post(
    gw: &Gateway,
    ca: &Path,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> CurlResponse {
    let port = gw.addr().port();
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "-i", "--http1.1", "--max-time", "15"])
        .arg("--resolve")
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(ca)
        .args(["--data-binary", body]);
    for (name, value) in headers {
        cmd.arg("-H").arg(format!("{name}: {value}"));
    }
    let out = cmd
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .await
        .expect("run curl (the Debian package curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl POST {path}: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line from curl:\n{text}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    CurlResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The same client request, once live and once queued.
struct Pair {
    /// What the node received for the live request.
    live: Received,
    /// What the node received when the queued request was delivered.
    delivered: Received,
    /// weir's answer to the queued request (503 Request Buffered).
    buffered: CurlResponse,
    /// The access-log line of the queued request.
    access: Value,
}

/// Over a TLS listener, with the deferred queue on: each client request is sent once while the
/// node is up (live) and once while every node is down (buffered), and the queued copy is
/// delivered when the node comes back. `with_client_headers`: the client sends
/// `X-Forwarded-For: 203.0.113.7` and a valid `traceparent`; otherwise neither.
async fn live_and_queued_over_tls() -> (Pair, Pair) {
    let pki = Pki::new();
    let leaf = pki.issue("server");
    let a = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(&tls_yaml(&leaf.cert, &leaf.key))
        .yaml(DEFERRED_ON)
        .start()
        .await;
    let ca = pki.ca_path();
    let client: &[(&str, &str)] = &[
        ("X-Forwarded-For", "203.0.113.7"),
        ("traceparent", CLIENT_TRACE),
    ];
    let cases = [("given", client), ("none", &[][..])];

    for (name, headers) in cases {
        let resp = tls_post(&gw, &ca, &format!("/live/{name}"), "live", headers).await;
        assert_eq!(resp.status, 200, "live POST over TLS: {}", resp.body);
    }
    a.down().await;
    let mut buffered = Vec::new();
    for (name, headers) in cases {
        let resp = tls_post(&gw, &ca, &format!("/queued/{name}"), "queued", headers).await;
        assert_eq!(resp.status, 503, "{} {:?}", resp.body, resp.headers);
        assert_eq!(
            serde_json::from_str::<Value>(&resp.body).ok(),
            Some(serde_json::json!({"sq_msg": "Request Buffered"})),
            "{}",
            resp.body
        );
        assert!(
            resp.header("x-weir-queue-id").is_some(),
            "{:?}",
            resp.headers
        );
        buffered.push(resp);
    }
    a.up().await;
    a.wait_for_count(4, DELIVERY).await;

    let answered = a.requests();
    let one = |target: &str| {
        let got = with_target(&answered, target);
        assert_eq!(got.len(), 1, "{target}: {answered:?}");
        got[0].clone()
    };
    let mut pairs = Vec::new();
    for ((name, _), resp) in cases.iter().zip(buffered) {
        let id = resp
            .header("x-request-id")
            .unwrap_or_else(|| panic!("no X-Request-Id on the 503: {:?}", resp.headers))
            .to_string();
        pairs.push(Pair {
            live: one(&format!("/live/{name}")),
            delivered: one(&format!("/queued/{name}")),
            access: gw.access_line(&id).await,
            buffered: resp,
        });
    }
    let none = pairs.pop().expect("two cases");
    let given = pairs.pop().expect("two cases");
    (given, none)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_from_a_tls_listener_is_delivered_with_x_forwarded_proto_https() {
    let (given, none) = live_and_queued_over_tls().await;
    for p in [&given, &none] {
        assert_eq!(p.live.header_all("x-forwarded-proto"), ["https"], "live");
        assert_eq!(
            p.delivered.header_all("x-forwarded-proto"),
            ["https"],
            "delivered {}: {:?}",
            p.delivered.target,
            p.delivered.headers
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_from_a_tls_listener_is_delivered_with_the_forwarded_for_of_a_live_attempt(
) {
    let (given, none) = live_and_queued_over_tls().await;
    for (p, want) in [(&given, "203.0.113.7, 127.0.0.1"), (&none, "127.0.0.1")] {
        assert_eq!(p.live.header_all("x-forwarded-for"), [want], "live");
        assert_eq!(
            p.delivered.header_all("x-forwarded-for"),
            p.live.header_all("x-forwarded-for"),
            "delivered {}: {:?}",
            p.delivered.target,
            p.delivered.headers
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_from_a_tls_listener_is_delivered_with_the_request_id_its_client_got() {
    let (given, none) = live_and_queued_over_tls().await;
    for p in [&given, &none] {
        let id = p.buffered.header("x-request-id").expect("X-Request-Id");
        assert_eq!(
            p.delivered.header_all("x-request-id"),
            [id],
            "delivered {}: {:?}",
            p.delivered.target,
            p.delivered.headers
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_from_a_tls_listener_is_delivered_with_the_traceparent_of_its_live_attempts(
) {
    let (given, none) = live_and_queued_over_tls().await;
    // The client's own trace, live and queued.
    assert_eq!(given.live.header_all("traceparent"), [CLIENT_TRACE]);
    assert_eq!(
        given.access["traceparent"], CLIENT_TRACE,
        "{}",
        given.access
    );
    assert_eq!(
        given.delivered.header_all("traceparent"),
        [CLIENT_TRACE],
        "{:?}",
        given.delivered.headers
    );
    // None given: the trace weir started for the request (its failed live attempts carried it;
    // no node saw them, so the access log says which it was) is the one delivered.
    let generated = none.access["traceparent"]
        .as_str()
        .filter(|t| t.len() == 55)
        .unwrap_or_else(|| panic!("no generated traceparent in {}", none.access))
        .to_string();
    assert_ne!(generated, CLIENT_TRACE);
    assert_eq!(none.live.header_all("traceparent").len(), 1, "live got one");
    assert_eq!(
        none.delivered.header_all("traceparent"),
        [generated.as_str()],
        "{:?}",
        none.delivered.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_ten_nodes_allows_ten_attempts_with_max_attempts_zero() {
    let mut nodes = Vec::new();
    for i in 0..10 {
        let n = Upstream::start(&format!("n{i}")).await;
        n.status(503);
        nodes.push(n);
    }
    let gw = Gateway::builder()
        .upstreams(&nodes[..2])
        .yaml("retries: {max_attempts: 0}")
        .start()
        .await;
    let seen = |target: &str| -> Vec<usize> {
        nodes
            .iter()
            .map(|n| with_target(&n.requests(), target).len())
            .collect()
    };
    let resp = gw.get("/before").await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(
        seen("/before"),
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        "one per node"
    );

    let urls: Vec<String> = nodes.iter().map(Upstream::url).collect();
    std::fs::write(
        gw.config_path(),
        support::gateway::with_upstreams(gw.config_text(), &urls),
    )
    .expect("rewrite the config");
    gw.reload("ok").await;

    let resp = gw.get("/after").await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(
        seen("/after"),
        [1; 10],
        "one attempt per node of the reloaded config"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_zero_closes_the_client_connection_after_the_response() {
    let a = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml("timeouts: {keepalive: 0}")
        .start()
        .await;
    let mut client = Client::connect(gw.addr()).await.expect("connect");
    // HTTP/1.1 without `Connection: close`: the client asks for keep-alive.
    let first: Response = client.send(&Request::get("/first")).await.expect("first");
    assert_eq!(first.status, 200, "{}", first.text());
    if let Some(c) = first.header("connection") {
        assert!(
            c.eq_ignore_ascii_case("close"),
            "keep-alive is off, the response says Connection: {c}"
        );
    }
    // The connection is closed after the response: a second request on it gets no answer.
    let second = client.send(&Request::get("/second")).await;
    assert!(
        second.is_err(),
        "the connection was kept alive: the second request got {:?}",
        second.map(|r| (r.status, r.headers))
    );
    assert!(
        with_target(&a.requests(), "/second").is_empty(),
        "a request on the kept-alive connection reached the node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_writes_no_file_where_none_is_configured_and_logs_errors_to_stderr() {
    let dead = Upstream::start_down("dead").await;
    let cwd = tempfile::Builder::new()
        .prefix("weir-cwd-")
        .tempdir()
        .expect("tempdir");
    let url = dead.url();
    // Minimal: no `log` section at all. The pid file and upgrade socket are placed in the
    // gateway's own directory only so that parallel tests do not share /tmp/weir.pid.
    let gw = Gateway::raw_config("weir.yaml", move |p| {
        format!(
            "listen: {}\nupstreams: ['{url}']\nadmin: {{listen: {}}}\n\
             server: {{pid_file: '{dir}/weir.pid', upgrade_sock: '{dir}/weir_upgrade.sock'}}\n",
            p.listen,
            p.admin,
            dir = p.dir.display()
        )
    })
    .current_dir(cwd.path())
    .start()
    .await;
    let resp = gw.get("/fails").await;
    resp.assert_sq_msg(503, "Service Unavailable");
    gw.wait_for_metric(
        "weir_requests_total",
        &[],
        |v| v >= 1.0,
        Duration::from_secs(10),
    )
    .await;
    // The error line is written by weir's log thread: poll stderr (bounded).
    let want = format!(
        "Error detected on {} [Code: 701, UPSTREAM_DOWN]",
        dead.url()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !gw.stderr_text().contains(&want) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stderr = gw.stderr_text();
    let written: Vec<String> = std::fs::read_dir(cwd.path())
        .expect("read the working directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path().display().to_string())
        .collect();
    assert!(
        written.is_empty() && stderr.contains(&want),
        "files written into the working directory: {written:?}; `{want}` on stderr: {}\n\
         --- stderr ---\n{stderr}",
        stderr.contains(&want)
    );
}
