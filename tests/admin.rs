//! The admin listener's access rules, against the real binary over raw HTTP (a client library
//! would set `Host` itself): only requests whose `Host` names the listener are answered (DNS
//! rebinding), and with `admin.token` set every method but GET needs the bearer token.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::client::{self, Request, Response};
use support::gateway::{run_weir, BASE_YAML};
use support::Gateway;

const TOKEN: &str = "s3cret-token-0123456789";

async fn gateway(yaml: &str) -> Gateway {
    Gateway::builder()
        .upstream_url("http://127.0.0.1:9")
        .yaml(yaml)
        .start()
        .await
}

async fn send(addr: SocketAddr, req: &Request) -> Response {
    client::send(addr, req)
        .await
        .unwrap_or_else(|e| panic!("{} {}: {e}", req.method, req.target))
}

async fn raw(addr: SocketAddr, bytes: &str) -> Response {
    client::send_raw(addr, bytes.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{bytes:?}: {e}"))
}

fn get_with_host(path: &str, host: &str) -> Request {
    Request::get(path).header("Host", host)
}

fn assert_json_error(resp: &Response, status: u16, needle: &str) {
    assert_eq!(resp.status, status, "{}", resp.text());
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        resp.header("content-type")
    );
    let error = resp.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains(needle), "{error:?} lacks {needle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requests_naming_the_listener_are_answered() {
    let gw = gateway("{}").await;
    let admin = gw.admin_addr();
    let port = admin.port();
    for host in [
        admin.to_string(),
        format!("localhost:{port}"),
        "localhost".to_string(),
        // An ssh tunnel or port-forward changes the port, not the name.
        "localhost:8080".to_string(),
        format!("[::1]:{port}"),
        format!("127.0.0.2:{port}"),
    ] {
        for path in ["/healthz", "/metrics", "/status.json", "/queue", "/"] {
            let resp = send(admin, &get_with_host(path, &host)).await;
            assert_eq!(resp.status, 200, "Host {host} {path}: {}", resp.text());
        }
    }
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_string(),
        format!("localhost.evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("10.1.2.3:{port}"),
    ] {
        for path in ["/healthz", "/metrics", "/status.json", "/queue", "/"] {
            let resp = send(admin, &get_with_host(path, &host)).await;
            assert_json_error(&resp, 421, "misdirected");
        }
    }
    // The absolute form's authority (Pingora refuses one that differs from Host).
    let resp = raw(
        admin,
        &format!(
            "GET http://evil.example:{port}/status.json HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n"
        ),
    )
    .await;
    assert_json_error(&resp, 421, "evil.example");
    // Two Host headers: Pingora drops the connection (and weir would answer 421).
    let two = format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nHost: evil.example\r\n\r\n");
    if let Ok(resp) = client::send_raw(admin, two.as_bytes()).await {
        assert_eq!(resp.status, 421, "two Host headers: {}", resp.text());
    }
    // No browser sends a request without Host: an HTTP/1.0 probe is answered.
    let resp = raw(admin, "GET /healthz HTTP/1.0\r\n\r\n").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    // A purge from a rebinding page is refused before anything is done.
    let resp = send(
        admin,
        &Request::new("DELETE", "/queue/dead").header("Host", "evil.example"),
    )
    .await;
    assert_eq!(resp.status, 421, "{}", resp.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_hosts_adds_names() {
    let gw = gateway("admin: {hosts: [weir-1.internal]}").await;
    let admin = gw.admin_addr();
    let resp = send(admin, &get_with_host("/metrics", "WEIR-1.internal:9100")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = send(admin, &get_with_host("/metrics", "weir-2.internal")).await;
    assert_eq!(resp.status, 421, "{}", resp.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_only_get_is_open() {
    let gw = gateway(&format!("admin: {{token: {TOKEN}}}")).await;
    let admin = gw.admin_addr();
    let purge = || Request::new("DELETE", "/queue/dead");

    let resp = send(admin, &purge()).await;
    assert_json_error(&resp, 401, "Authorization: Bearer");
    assert_eq!(
        resp.header("www-authenticate"),
        Some("Bearer realm=\"weir admin\"")
    );
    for bad in [
        "Bearer wrong-token-0123456789".to_string(),
        format!("Basic {TOKEN}"),
        TOKEN.to_string(),
        format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]),
        format!("Bearer {TOKEN}x"),
    ] {
        let resp = send(admin, &purge().header("Authorization", &bad)).await;
        assert_json_error(&resp, 401, "unauthorized");
    }
    let resp = send(
        admin,
        &purge().header("Authorization", &format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["purged"], 0);
    // Any other method too, even on a path that does not take it.
    let resp = send(admin, &Request::post("/healthz", "x")).await;
    assert_eq!(resp.status, 401, "{}", resp.text());
    let resp = send(
        admin,
        &Request::post("/healthz", "x").header("Authorization", &format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!(resp.status, 405, "{}", resp.text());
    // Reading needs no token.
    for path in ["/healthz", "/metrics", "/status.json", "/queue", "/"] {
        let resp = gw.admin_get(path).await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_purge_needs_none() {
    let gw = gateway("{}").await;
    let resp = send(gw.admin_addr(), &Request::new("DELETE", "/queue/dead")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[tokio::test]
async fn short_or_spaced_tokens_are_refused_at_their_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (token, needle) in [
        ("short", "at least 16"),
        ("'has a space in it ok'", "visible"),
    ] {
        let path = dir.path().join("t.yaml");
        std::fs::write(
            &path,
            format!("upstreams: [http://127.0.0.1:9]\nadmin:\n  token: {token}\n"),
        )
        .expect("write");
        let out = run_weir(
            &["check", "-c", path.to_str().expect("utf-8")],
            dir.path(),
            Duration::from_secs(20),
        )
        .await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("t.yaml:3") && err.contains(needle), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_listener_off_loopback_is_warned_at_start_and_by_check() {
    let gw = Gateway::raw_config("weir.yaml", |p| {
        BASE_YAML
            .replace("{listen}", &p.listen.to_string())
            .replace("{admin}", &format!("0.0.0.0:{}", p.admin.port()))
            .replace("{dir}", &p.dir.display().to_string())
            .replace("upstreams: []", "upstreams: [http://127.0.0.1:9]")
    })
    .start()
    .await;
    let logs = gw.logs();
    assert!(
        logs.contains("admin.listen") && logs.contains("is not a loopback address"),
        "{logs}"
    );
    // Reached over loopback, it answers as before.
    let resp = gw.admin_get("/healthz").await;
    assert_eq!(resp.status, 200);
    let out = run_weir(
        &["check", "-c", gw.config_path().to_str().expect("utf-8")],
        gw.dir(),
        Duration::from_secs(20),
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: admin.listen") && err.contains("set admin.token"),
        "{err}"
    );
}
