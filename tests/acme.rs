//! ACME against a real ACME server: Debian's `pebble` (Let's Encrypt's test server) on
//! loopback, with `pebble-challtestsrv` as its DNS (every name → 127.0.0.1). Pebble really
//! validates the HTTP-01 challenge by connecting to weir's plain listener (no
//! PEBBLE_VA_ALWAYS_VALID); a client trusting only pebble's root then talks HTTP/2 to weir.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use support::tools::{free_port, require};
use support::{Gateway, Upstream};

/// pebble and its DNS server, killed (by PID, `kill_on_drop`) when dropped.
struct Pebble {
    _dns: Child,
    _pebble: Child,
    dir: TempDir,
    /// The directory URL.
    directory: String,
    /// The CA of pebble's own HTTPS endpoints (not of the certificates it issues).
    https_ca: PathBuf,
    management: SocketAddr,
}

impl Pebble {
    /// Starts pebble with its HTTP-01 validation port pointed at `http_port`.
    async fn start(http_port: u16) -> Pebble {
        let pebble = require("/usr/bin/pebble", "pebble");
        let challtestsrv = require("/usr/bin/pebble-challtestsrv", "pebble");
        let dir = tempfile::Builder::new()
            .prefix("weir-pebble-")
            .tempdir()
            .expect("tempdir");

        // Pebble's HTTPS endpoint needs a certificate; the ACME client must trust its CA.
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pebble https test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let key = KeyPair::generate().expect("key");
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("params")
            .signed_by(&key, &ca, &ca_key)
            .expect("leaf");
        let https_ca = dir.path().join("https-ca.pem");
        std::fs::write(&https_ca, ca.pem()).expect("write");
        std::fs::write(dir.path().join("https.pem"), leaf.pem()).expect("write");
        std::fs::write(dir.path().join("https.key"), key.serialize_pem()).expect("write");

        let listen = free_port();
        let management = free_port();
        let dns = free_port();
        let dns_management = free_port();
        let tls_port = free_port().port();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": listen.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": dir.path().join("https.pem"),
                "privateKey": dir.path().join("https.key"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string()).expect("write");

        let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("log file");
        let dns_child = Command::new(challtestsrv)
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &dns.to_string()])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &dns_management.to_string()])
            .stdin(Stdio::null())
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn pebble-challtestsrv");
        let pebble_child = Command::new(pebble)
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &dns.to_string()])
            // No random sleeps before validation, no random nonce rejections: a fast,
            // deterministic run. The validation itself is real.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn pebble");
        let p = Pebble {
            _dns: dns_child,
            _pebble: pebble_child,
            directory: format!("https://127.0.0.1:{}/dir", listen.port()),
            https_ca,
            management,
            dir,
        };
        for addr in [listen, management, dns_management] {
            wait_listening(addr, &p).await;
        }
        p
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for name in [
            "pebble.log",
            "pebble.err",
            "challtestsrv.log",
            "challtestsrv.err",
        ] {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            out.push_str(&format!("--- {name} ---\n{text}\n"));
        }
        out
    }

    /// The root pebble signs certificates with (generated at its start).
    async fn issuing_root(&self) -> PathBuf {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(&self.https_ca)
            .arg(format!("https://{}/roots/0", self.management))
            .output()
            .await
            .expect("run curl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = self.dir.path().join("root.pem");
        std::fs::write(&path, &out.stdout).expect("write root");
        path
    }
}

async fn wait_listening(addr: SocketAddr, p: &Pebble) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{addr} not listening:\n{}",
            p.logs()
        );
        // Another process's readiness cannot be awaited; poll it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn curl_domain(gw: &Gateway, root: &Path, domain: &str) -> (String, String) {
    let port = gw.addr().port();
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--max-time", "10", "--http2"])
        .args(["-w", "%{http_code} %{http_version}"])
        .arg("--resolve")
        .arg(format!("{domain}:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(root)
        .arg(format!("https://{domain}:{port}/acme"))
        .output()
        .await
        .expect("run curl");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_certificate_is_obtained_from_pebble_over_http01_and_served() {
    let up = Upstream::start("a").await;
    let plain = free_port();
    let pebble = Pebble::start(plain.port()).await;
    // Outlives pebble: the cache and pebble's root serve the restarted gateway.
    let keep = tempfile::Builder::new()
        .prefix("weir-acme-")
        .tempdir()
        .expect("tempdir");
    let cache = keep.path().join("acme-cache");
    let acme_yaml = format!(
        "listen: ['{{listen}}', {{addr: '{plain}', tls: false}}]\n\
         tls:\n  acme:\n    directory: '{}'\n    email: ops@weir.test\n    \
         domains: [weir.test, www.weir.test]\n    cache_dir: '{}'\n    renew_before: 30d\n",
        pebble.directory,
        cache.display()
    );
    let gw = Gateway::builder()
        .upstream(&up)
        .yaml(&acme_yaml)
        .env("SSL_CERT_FILE", &pebble.https_ca.to_string_lossy())
        .start()
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = gw.metrics().await;
        if m.sum_or_zero("weir_acme_orders_total", &[("result", "ok")]) >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no certificate within 60 s\n{}\n{}",
            gw.logs(),
            pebble.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cache.join("cert.pem").exists() && cache.join("key.pem").exists());
    // Pebble fetched the challenge answers from weir and accepted them.
    let logs = pebble.logs();
    for domain in ["weir.test", "www.weir.test"] {
        let attempt = format!(
            "Attempting to validate w/ HTTP: http://{domain}:{}/",
            plain.port()
        );
        assert!(logs.contains(&attempt), "{logs}");
    }
    assert_eq!(
        logs.matches("set VALID by completed challenge").count(),
        2,
        "{logs}"
    );

    let root = keep.path().join("root.pem");
    std::fs::copy(pebble.issuing_root().await, &root).expect("copy root");
    for domain in ["weir.test", "www.weir.test"] {
        let (out, err) = curl_domain(&gw, &root, domain).await;
        assert_eq!(out, "200 2", "{domain}: curl: {err}");
    }
    assert_eq!(up.count(), 2);
    let expiry = gw
        .metrics()
        .await
        .sum_or_zero("weir_acme_certificate_expiry_timestamp_seconds", &[]);
    assert!(expiry > 0.0);
    drop(gw);

    // A restart serves the cached certificate without a new order, even with pebble gone.
    drop(pebble);
    let again = Gateway::builder()
        .upstream(&up)
        .yaml(&acme_yaml.replace(&format!("'{plain}'"), &format!("'{}'", free_port())))
        .start()
        .await;
    let (out, err) = curl_domain(&again, &root, "weir.test").await;
    assert_eq!(out, "200 2", "curl: {err}\n{}", again.logs());
    let m = again.metrics().await;
    assert_eq!(m.sum_or_zero("weir_acme_orders_total", &[]), 0.0);
    drop(again);

    // Due for renewal (renew_before longer than pebble's five-year certificates) with the ACME
    // server gone: the renewal fails, is counted and logged, and the old certificate stays.
    let due = Gateway::builder()
        .upstream(&up)
        .yaml(
            &acme_yaml
                .replace(&format!("'{plain}'"), &format!("'{}'", free_port()))
                .replace("renew_before: 30d", "renew_before: 36500d"),
        )
        .start()
        .await;
    due.wait_for_metric(
        "weir_acme_orders_total",
        &[("result", "failed")],
        |v| v >= 1.0,
        Duration::from_secs(30),
    )
    .await;
    let (out, err) = curl_domain(&due, &root, "weir.test").await;
    assert_eq!(out, "200 2", "curl: {err}\n{}", due.logs());
    assert!(
        due.logs().contains("the certificate in service stays"),
        "{}",
        due.logs()
    );
}
