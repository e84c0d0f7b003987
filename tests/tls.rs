//! TLS end to end: the real weir binary terminating TLS for real clients (system curl, a rustls
//! client), an HTTPS upstream built on tokio-rustls, certificates generated per test (rcgen).

mod support;

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

use support::pki::{tls_yaml, Issued, Pki};
use support::{run_weir, Gateway, Upstream};

/// Runs curl against the gateway's listener as `localhost` (the certificate's name).
async fn curl(gw: &Gateway, ca: &Path, args: &[&str], path: &str) -> Output {
    let port = gw.addr().port();
    let resolve = format!("localhost:{port}:127.0.0.1");
    let url = format!("https://localhost:{port}{path}");
    tokio::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--max-time", "10"])
        .args(["-w", "%{http_code} %{http_version}"])
        .arg("--resolve")
        .arg(&resolve)
        .arg("--cacert")
        .arg(ca)
        .args(args)
        .arg(&url)
        .output()
        .await
        .expect("run curl (the Debian package curl)")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn tls13_clients_get_proxied_responses_over_h2_and_http11() {
    let pki = Pki::new();
    let leaf = pki.issue("server");
    let up = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&up)
        .yaml(&tls_yaml(&leaf.cert, &leaf.key))
        .start()
        .await;

    let h2 = curl(&gw, &pki.ca_path(), &["--tlsv1.3", "--http2"], "/h2").await;
    assert_eq!(text(&h2.stdout), "200 2", "curl: {}", text(&h2.stderr));
    let h1 = curl(&gw, &pki.ca_path(), &["--tlsv1.3", "--http1.1"], "/h1").await;
    assert_eq!(text(&h1.stdout), "200 1.1", "curl: {}", text(&h1.stderr));
    let tls12 = curl(
        &gw,
        &pki.ca_path(),
        &["--tlsv1.2", "--tls-max", "1.2", "--http1.1"],
        "/tls12",
    )
    .await;
    assert_eq!(
        text(&tls12.stdout),
        "200 1.1",
        "curl: {}",
        text(&tls12.stderr)
    );

    let post = curl(
        &gw,
        &pki.ca_path(),
        &["--http2", "--data-binary", "hello over h2"],
        "/h2-post",
    )
    .await;
    assert_eq!(text(&post.stdout), "200 2", "curl: {}", text(&post.stderr));

    let seen = up.requests();
    let targets: Vec<_> = seen.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, ["/h2", "/h1", "/tls12", "/h2-post"]);
    assert_eq!(seen[3].method, "POST");
    assert_eq!(seen[3].body, b"hello over h2");
    for r in &seen {
        assert_eq!(r.header("x-forwarded-proto"), Some("https"), "{r:?}");
    }
}

#[tokio::test]
async fn a_tls11_client_is_refused() {
    let pki = Pki::new();
    let leaf = pki.issue("server");
    let up = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&up)
        .yaml(&tls_yaml(&leaf.cert, &leaf.key))
        .start()
        .await;
    // SECLEVEL=0 lets curl's OpenSSL offer TLS 1.1 at all, so the refusal is weir's.
    let old = curl(
        &gw,
        &pki.ca_path(),
        &[
            "--tlsv1.1",
            "--tls-max",
            "1.1",
            "--ciphers",
            "DEFAULT@SECLEVEL=0",
        ],
        "/old",
    )
    .await;
    assert!(!old.status.success(), "TLS 1.1 was accepted");
    let err = text(&old.stderr);
    // An alert is the server's refusal (curl's own refusal would send nothing).
    assert!(err.contains("alert"), "curl: {err}");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn plain_and_tls_listeners_run_side_by_side() {
    let pki = Pki::new();
    let leaf = pki.issue("server");
    let up = Upstream::start("a").await;
    let plain = support::tools::free_port();
    let gw = Gateway::builder()
        .upstream(&up)
        .yaml(&tls_yaml(&leaf.cert, &leaf.key))
        .yaml(&format!(
            "listen: ['{{listen}}', {{addr: '{plain}', tls: false}}]\n"
        ))
        .start()
        .await;
    let tls = curl(&gw, &pki.ca_path(), &["--http1.1"], "/tls").await;
    assert_eq!(text(&tls.stdout), "200 1.1", "curl: {}", text(&tls.stderr));
    let resp = support::client::send(plain, &support::Request::get("/plain"))
        .await
        .expect("plain request");
    assert_eq!(resp.status, 200);
    let protos: Vec<_> = up
        .requests()
        .iter()
        .map(|r| {
            (
                r.target.clone(),
                r.header("x-forwarded-proto").map(String::from),
            )
        })
        .collect();
    assert_eq!(
        protos,
        [
            ("/tls".to_string(), Some("https".to_string())),
            ("/plain".to_string(), Some("http".to_string()))
        ]
    );
}

#[tokio::test]
async fn a_key_that_does_not_match_the_certificate_is_refused_by_check_and_run() {
    let pki = Pki::new();
    let one = pki.issue("one");
    let two = pki.issue("two");
    let dir = pki.dir.path();
    let config = dir.join("weir.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nupstreams: [http://127.0.0.1:9]\nadmin: {{listen: off}}\n\
             server: {{pid_file: '{0}/weir.pid', upgrade_sock: '{0}/up.sock'}}\n{1}",
            dir.display(),
            tls_yaml(&one.cert, &two.key)
        ),
    )
    .expect("write config");
    let config = config.to_string_lossy().into_owned();
    for cmd in ["check", "run"] {
        let out = run_weir(&[cmd, "-c", &config], dir, Duration::from_secs(20)).await;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "weir {cmd}: {err}");
        assert!(
            err.contains("does not match the certificate") && err.contains("two.key"),
            "weir {cmd}: {err}"
        );
    }

    std::fs::write(dir.join("empty.pem"), "not a certificate\n").expect("write");
    let unreadable = tls_yaml(&dir.join("empty.pem"), &one.key);
    let missing = tls_yaml(&one.cert, &dir.join("missing.key"));
    for (tls, needle) in [
        (unreadable, "no PEM certificate"),
        (missing, "cannot read key file"),
    ] {
        let path = dir.join("bad.yaml");
        std::fs::write(
            &path,
            format!("listen: 127.0.0.1:0\nupstreams: [http://127.0.0.1:9]\n{tls}"),
        )
        .expect("write");
        let out = run_weir(
            &["check", "-c", &path.to_string_lossy()],
            dir,
            Duration::from_secs(20),
        )
        .await;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
}

/// A one-request-per-connection HTTPS upstream answering `200 ok` (or nothing, if the
/// handshake fails).
async fn https_upstream(leaf: &Issued) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let chain = vec![CertificateDer::from(leaf.der.clone())];
    let key = PrivateKeyDer::Pkcs8(leaf.key_der.clone().into());
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn an_https_upstream_is_verified_and_its_ca_can_be_configured() {
    let pki = Pki::new();
    let leaf = pki.issue("upstream");
    let (addr, _task) = https_upstream(&leaf).await;
    let url = format!("https://localhost:{}", addr.port());

    // Not signed by a system root: refused.
    let untrusted = Gateway::builder().upstream_url(&url).start().await;
    let resp = untrusted.get("/untrusted").await;
    assert_eq!(resp.status, 503, "an unverifiable upstream was used");
    let logs = untrusted.logs();
    assert!(logs.contains("TLS handshake with upstream"), "{logs}");

    // Its CA configured: verified and used, SNI `localhost` from the URL.
    let trusted = Gateway::builder()
        .yaml(&format!(
            "upstreams: [{{url: '{url}', ca: '{}'}}]\n",
            pki.ca_path().display()
        ))
        .start()
        .await;
    let resp = trusted.get("/trusted").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"ok");

    // The CA is right but the name is not: refused too.
    let wrong_name = Gateway::builder()
        .yaml(&format!(
            "upstreams: [{{url: '{url}', ca: '{}', sni: other.example}}]\n",
            pki.ca_path().display()
        ))
        .start()
        .await;
    assert_eq!(wrong_name.get("/wrong-name").await.status, 503);

    // tls_verify: false takes anything, and says so at start.
    let unverified = Gateway::builder()
        .yaml(&format!(
            "upstreams: [{{url: '{url}', tls_verify: false}}]\n"
        ))
        .start()
        .await;
    assert_eq!(unverified.get("/unverified").await.status, 200);
    assert!(
        unverified.logs().contains("tls_verify: false"),
        "{}",
        unverified.logs()
    );
}

/// The leaf certificate the gateway serves to a new connection.
async fn served_certificate(addr: std::net::SocketAddr, pki: &Pki) -> Vec<u8> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(pki.ca.der().to_vec()))
        .expect("add CA");
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let (_, conn) = tls.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .expect("a served certificate")
}

#[tokio::test]
async fn a_renewed_certificate_is_served_after_sighup() {
    let pki = Pki::new();
    let first = pki.issue("first");
    let up = Upstream::start("a").await;
    let gw = Gateway::builder()
        .upstream(&up)
        .yaml(&tls_yaml(&first.cert, &first.key))
        .start()
        .await;
    assert_eq!(served_certificate(gw.addr(), &pki).await, first.der);

    // Renewal: new key and certificate written over the same files.
    let renewed = pki.issue("renewed");
    std::fs::copy(&renewed.cert, &first.cert).expect("replace cert");
    std::fs::copy(&renewed.key, &first.key).expect("replace key");
    gw.reload("ok").await;
    assert_eq!(served_certificate(gw.addr(), &pki).await, renewed.der);
    assert!(
        gw.logs().contains("new TLS certificate in service"),
        "{}",
        gw.logs()
    );
    let ok = curl(&gw, &pki.ca_path(), &["--http2"], "/after").await;
    assert_eq!(text(&ok.stdout), "200 2", "curl: {}", text(&ok.stderr));

    // A broken renewal (key of another certificate) is rejected: the renewed one stays.
    let other = pki.issue("other");
    std::fs::copy(&other.key, &first.key).expect("replace key");
    gw.reload("rejected").await;
    assert_eq!(served_certificate(gw.addr(), &pki).await, renewed.der);
    assert!(gw.logs().contains("does not match"), "{}", gw.logs());
}
