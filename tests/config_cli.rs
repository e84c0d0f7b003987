//! `weir check` and `weir run` on good and bad config files: a bad file is reported on stderr
//! with the file, the line where there is one and the reason, with a non-zero exit and no panic.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use support::gateway::run_weir;
use support::{Gateway, Upstream};

const EXIT_DEADLINE: Duration = Duration::from_secs(20);

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the config");
    path
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Both `weir check -c` and `weir run -c` must refuse `path` with a non-zero exit and a stderr
/// message containing every one of `wanted`.
async fn assert_rejected(dir: &Path, path: &Path, wanted: &[&str]) {
    let path_text = path.to_str().expect("utf-8 path");
    for command in ["check", "run"] {
        let out = run_weir(&[command, "-c", path_text], dir, EXIT_DEADLINE).await;
        let err = stderr(&out);
        assert!(
            !out.status.success(),
            "weir {command} accepted {path_text}; stdout:\n{}\nstderr:\n{err}",
            stdout(&out)
        );
        assert!(!err.contains("panicked"), "weir {command} panicked:\n{err}");
        for w in wanted {
            assert!(
                err.contains(w),
                "weir {command} -c {path_text}: stderr lacks {w:?}:\n{err}"
            );
        }
    }
}

#[tokio::test]
async fn missing_config_file_is_reported_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope.yaml");
    assert_rejected(dir.path(), &path, &["nope.yaml"]).await;
}

#[tokio::test]
async fn properties_key_without_equals_is_reported_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "sq.properties",
        "LISTENER_PORT=5252\nENDPOINTS=http://127.0.0.1:9001,http://127.0.0.1:9002\nCONCURRENCY_PEAK\n",
    );
    assert_rejected(dir.path(), &path, &["sq.properties:3"]).await;
}

#[tokio::test]
async fn upstream_url_with_a_bad_port_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "bad_port.yaml",
        "listen: 127.0.0.1:5252\nupstreams:\n  - http://127.0.0.1:9001\n  - http://127.0.0.1:99999\n",
    );
    assert_rejected(dir.path(), &path, &["bad_port.yaml", "99999"]).await;
}

#[tokio::test]
async fn upstream_url_with_an_unsupported_scheme_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "bad_scheme.yaml",
        "listen: 127.0.0.1:5252\nupstreams:\n  - ftp://127.0.0.1:9001\n",
    );
    assert_rejected(dir.path(), &path, &["bad_scheme.yaml", "ftp"]).await;
}

#[tokio::test]
async fn unknown_nested_yaml_key_is_reported_with_its_name_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "unknown.yaml",
        "listen: 127.0.0.1:5252\nupstreams:\n  - http://127.0.0.1:9001\nlimits:\n  concurency_peak: 10\n",
    );
    assert_rejected(dir.path(), &path, &["unknown.yaml:5", "concurency_peak"]).await;
}

#[tokio::test]
async fn unknown_top_level_yaml_key_is_reported_with_its_name_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "typo.yaml",
        "listen: 127.0.0.1:5252\nupstreams:\n  - http://127.0.0.1:9001\nretires:\n  gap: 1s\n",
    );
    assert_rejected(dir.path(), &path, &["typo.yaml:4", "retires"]).await;
}

#[tokio::test]
async fn check_accepts_a_good_yaml_and_prints_the_effective_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "good.yaml",
        "listen: 127.0.0.1:5252\nupstreams:\n  - http://127.0.0.1:9001\n  - url: http://127.0.0.1:9002\n    weight: 2\n\
         timeouts:\n  request: 250ms\nlimits:\n  concurrency_peak: 77\n",
    );
    let out = run_weir(
        &["check", "-c", path.to_str().expect("utf-8")],
        dir.path(),
        EXIT_DEADLINE,
    )
    .await;
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "stdout:\n{o}\nstderr:\n{e}");
    for wanted in ["http://127.0.0.1:9001", "http://127.0.0.1:9002", "77"] {
        assert!(
            o.contains(wanted),
            "effective config lacks {wanted:?}:\n{o}"
        );
    }
}

#[tokio::test]
async fn check_accepts_a_good_sq_properties() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "sq.properties",
        "# ServiceQ config\nLISTENER_PORT=5252\nPROTO=http\n\
         ENDPOINTS=http://127.0.0.1:9001,http://127.0.0.1:9002\nCONCURRENCY_PEAK=128\n\
         OUTGOING_REQUEST_TIMEOUT=5\nRETRY_GAP=0\nENABLE_DEFERRED_Q=false\n",
    );
    let out = run_weir(
        &["check", "-c", path.to_str().expect("utf-8")],
        dir.path(),
        EXIT_DEADLINE,
    )
    .await;
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "stdout:\n{o}\nstderr:\n{e}");
    for wanted in ["http://127.0.0.1:9001", "http://127.0.0.1:9002", "128"] {
        assert!(
            o.contains(wanted),
            "effective config lacks {wanted:?}:\n{o}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_traffic_from_an_sq_properties_file() {
    let up = Upstream::start("a").await;
    let url = up.url();
    let gw = Gateway::raw_config("sq.properties", move |p| {
        format!(
            "LISTENER_ADDR=127.0.0.1\nLISTENER_PORT={}\nMETRICS_LISTENER={}\nENDPOINTS={url}\n\
             CONCURRENCY_PEAK=16\nOUTGOING_REQUEST_TIMEOUT=5\nENABLE_DEFERRED_Q=false\n",
            p.listen.port(),
            p.admin
        )
    })
    .start()
    .await;

    let resp = gw.get("/from-properties").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.node(), Some("a"));
}

/// What `weir check` and `weir convert` print is a config that prints the same again.
#[tokio::test]
async fn printed_configs_read_back_to_the_same_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = write(
        dir.path(),
        "in.yaml",
        "listen: [{addr: 127.0.0.1:80, tls: false}, 127.0.0.1:443]\n\
         tls: {acme: {domains: [a.example], cache_dir: /acme}}\n\
         upstreams: [http://127.0.0.1:9001, {url: http://127.0.0.1:9002, weight: 3}]\n\
         timeouts: {request: off, keepalive: off}\n\
         upfront_queue: {enabled: true, formats: [POST /events]}\n\
         response_headers: {Server: weir, X-Num: 42}\nlog: {error_file: off}\n\
         clusters:\n  api: {upstreams: [http://127.0.0.1:9003], registry: {liveness: 10s}, \
         health_check: {kind: http, path: /up, interval: 1s}, timeouts: {request: 2s}, \
         retries: {max_attempts: 2}}\n  \
         names: {dns: {srv: _http._tcp.api.test, refresh: 5s, server: \"127.0.0.1:5353\"}}\n\
         routes:\n  - {host: \"*.example.com\", path_prefix: /v2/, cluster: api}\n  \
         - {path_prefix: /n/, cluster: names}\n",
    );
    let props = write(
        dir.path(),
        "in.properties",
        "ENDPOINTS=http://127.0.0.1:9001\nCONCURRENCY_PEAK=64\nKEEP_ALIVE_TIMEOUT=0\n\
         CUSTOM_RESPONSE_HEADERS=Server|X-A: b\nQ_REQUEST_FORMATS=POST /orders !,POST\n",
    );
    for input in [yaml, props] {
        let path = input.to_str().expect("utf-8");
        let mut printed = Vec::new();
        for args in [vec!["check", "-c", path], vec!["convert", path]] {
            let out = run_weir(&args, dir.path(), EXIT_DEADLINE).await;
            assert!(out.status.success(), "weir {args:?}: {}", stderr(&out));
            printed.push(stdout(&out));
        }
        assert_eq!(printed[0], printed[1], "check and convert print the same");
        let again = write(dir.path(), "printed.yaml", &printed[0]);
        let out = run_weir(
            &["check", "-c", again.to_str().expect("utf-8")],
            dir.path(),
            EXIT_DEADLINE,
        )
        .await;
        assert!(out.status.success(), "{}\n{}", stderr(&out), printed[0]);
        assert_eq!(stdout(&out), printed[0], "{path} printed twice");
    }
}

#[tokio::test]
async fn cluster_and_route_mistakes_are_reported_at_their_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = "listen: 127.0.0.1:5252\nupstreams:\n  - http://127.0.0.1:9001\n";
    for (name, tail, wanted) in [
        (
            "route.yaml",
            "clusters:\n  api: {upstreams: [http://127.0.0.1:9002]}\nroutes:\n  - {host: a.example, cluster: api}\n  - {path_prefix: /x/, cluster: apx}\n",
            vec!["route.yaml:8", "no cluster named `apx`"],
        ),
        (
            "empty.yaml",
            "clusters:\n  api: {}\n",
            vec!["empty.yaml:5", "has no nodes"],
        ),
        (
            "liveness.yaml",
            "clusters:\n  api:\n    registry:\n      liveness: 10ms\n",
            vec!["liveness.yaml:7", "liveness"],
        ),
        (
            "prefix.yaml",
            "clusters:\n  api: {registry: {}}\nroutes:\n  - {path_prefix: api, cluster: api}\n",
            vec!["prefix.yaml:7", "must start with `/`"],
        ),
        (
            "default.yaml",
            "clusters:\n  default:\n    upstreams: [http://127.0.0.1:9002]\n",
            vec!["default.yaml:6", "top-level `upstreams`"],
        ),
    ] {
        let path = write(dir.path(), name, &format!("{base}{tail}"));
        assert_rejected(dir.path(), &path, &wanted).await;
    }
}

#[tokio::test]
async fn check_prints_the_route_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "routes.yaml",
        "listen: 127.0.0.1:5252\nupstreams: [http://127.0.0.1:9001]\n\
         clusters:\n  api: {upstreams: [http://127.0.0.1:9002], registry: {liveness: 30s}}\n\
         routes:\n  - {host: api.example.com, path_prefix: /v2/, cluster: api}\n",
    );
    let out = run_weir(
        &["check", "-c", path.to_str().expect("utf-8")],
        dir.path(),
        EXIT_DEADLINE,
    )
    .await;
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    assert!(
        e.contains("api.example.com/v2/*")
            && e.contains("-> api (1 static node, registry with liveness 30s)"),
        "{e}"
    );
    assert!(
        e.contains("anything else") && e.contains("-> default (1 static node)"),
        "{e}"
    );
}
