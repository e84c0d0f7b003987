use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::config::formats::RequestFormats;
use crate::config::{
    AccessLog, AcmeConfig, Algorithm, ErrorLog, Listener, Scheme, TlsConfig, UpstreamHost,
    DEFAULT_LISTEN, DEFAULT_RENEW_BEFORE, DEFAULT_YAML,
};

fn load(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new("weir.yaml"), text).map(|l| l.config)
}

fn ok(text: &str) -> Config {
    load(text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"))
}

/// Asserts a load error on `line` whose message contains every needle.
fn err_at(text: &str, line: Option<usize>, needles: &[&str]) {
    match load(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => {
            assert_eq!(e.line, line, "{e}");
            assert_eq!(e.file, PathBuf::from("weir.yaml"));
            for n in needles {
                assert!(e.message.contains(n), "`{n}` not in: {e}");
            }
        }
    }
}

const MINIMAL: &str = "upstreams: [http://127.0.0.1:9001]\n";

#[test]
fn embedded_default_yaml_parses_to_the_documented_values() {
    let c = ok(DEFAULT_YAML);
    assert_eq!(
        c.listen,
        vec![Listener {
            addr: "127.0.0.1:5252".into(),
            tls: false,
        }]
    );
    let urls: Vec<_> = c.upstreams.iter().map(|u| u.url.as_str()).collect();
    assert_eq!(
        urls,
        [
            "http://127.0.0.1:9001",
            "http://127.0.0.1:9002",
            "http://127.0.0.1:9003"
        ]
    );
    assert_eq!(c.admin.listen.as_deref(), Some("127.0.0.1:9100"));
    assert_eq!(c.log.error_log, ErrorLog::Stderr);
    // The Server header there is a commented example: no header is added by default.
    assert!(c.response_headers.is_empty());
    // Apart from listen and upstreams, the file is the code's defaults.
    let d = Config {
        listen: c.listen.clone(),
        upstreams: c.upstreams.clone(),
        ..Config::default()
    };
    assert_eq!(c, d);
}

#[test]
fn shipped_sq_properties_parses() {
    let text = include_str!("../../../conf/sq.properties");
    let loaded = crate::config::properties::parse(Path::new("conf/sq.properties"), text)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.config.upstreams.len(), 3);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn a_minimal_file_takes_every_default() {
    let c = ok(MINIMAL);
    assert_eq!(c.listen[0].addr, DEFAULT_LISTEN);
    assert_eq!(c.timeouts.connect, Duration::from_secs(1));
    assert_eq!(c.timeouts.request, Some(Duration::from_secs(5)));
    assert_eq!(c.timeouts.keepalive, Some(Duration::from_secs(120)));
    assert_eq!(c.routing.failure_statuses, vec![502, 503, 504]);
    assert_eq!(c.routing.decay_half_life, Duration::from_secs(10));
    assert_eq!(c.limits.concurrency_peak, 2048);
    assert_eq!(c.limits.max_buffered_body, 1 << 20);
    assert!(c.deferred_queue.enabled);
    assert_eq!(
        c.deferred_queue.formats.entries(),
        ["POST", "PUT", "PATCH", "DELETE"]
    );
    assert_eq!(c.deferred_queue.ttl, Duration::from_secs(86_400));
    assert_eq!(c.deferred_queue.replay_rate, 200);
    assert!(!c.upfront_queue.enabled);
    assert_eq!(c.upfront_queue.formats, RequestFormats::none());
    assert_eq!(c.upfront_queue.capacity, 2048);
    assert_eq!(c.admin.listen.as_deref(), Some("127.0.0.1:9100"));
    assert_eq!(c.log.access, AccessLog::Stdout);
    assert_eq!(c.log.level, "info");
    assert_eq!(c.server.threads, None);
    assert!(c.server.worker_threads() >= 1);
    assert_eq!(
        c.server.upstream_pool_size,
        crate::config::DEFAULT_UPSTREAM_POOL_SIZE
    );
    assert_eq!(c.server.pid_file, PathBuf::from("/tmp/weir.pid"));
    assert!(c.tls.is_none());
    assert!(c.response_headers.is_empty());
}

#[test]
fn missing_upstreams_is_an_error() {
    err_at("", None, &["no upstreams configured"]);
    err_at("{}", None, &["no upstreams configured"]);
    err_at("# only a comment\n", None, &["no upstreams configured"]);
    err_at(
        "listen: 127.0.0.1:1\nupstreams: []\n",
        Some(2),
        &["no upstreams"],
    );
}

#[test]
fn an_unknown_key_is_an_error_naming_it_and_its_line() {
    err_at(
        "upstreams: [http://127.0.0.1:9001]\ntimeouts:\n  conect: 1s\n",
        Some(3),
        &["conect"],
    );
    // The position moved out of the message into the error's line.
    let e = load("upstream: []\n")
        .err()
        .map(|e| e.message)
        .unwrap_or_default();
    assert!(!e.contains(" at line "), "{e}");
    err_at(
        "upstream: [http://127.0.0.1:9001]\n",
        Some(1),
        &["upstream`"],
    );
    err_at(
        "upstreams:\n  - url: http://127.0.0.1:9001\n    wieght: 2\n",
        Some(3),
        &["wieght"],
    );
}

#[test]
fn listen_takes_one_address_or_a_list() {
    let c = ok(
        "listen: [\"127.0.0.1:1\", \"[::1]:2\", \"localhost:3\"]\nupstreams: [http://127.0.0.1:9]",
    );
    let addrs: Vec<_> = c.listen.iter().map(|l| l.addr.as_str()).collect();
    assert_eq!(addrs, ["127.0.0.1:1", "[::1]:2", "localhost:3"]);
    err_at("listen: []\n", Some(1), &["at least one"]);
    err_at("listen: 5252\n", Some(1), &["expected host:port"]);
    err_at(
        "listen:\n  - 1.2.3.4:5\n  - ::1:5\n",
        Some(3),
        &["brackets"],
    );
    err_at("listen: 1.2.3.4:99999\n", Some(1), &["not a port"]);
    err_at("listen: \":80\"\n", Some(1), &["host is missing"]);
    err_at("listen: [a:1, a:1]\n", Some(1), &["twice"]);
}

#[test]
fn listen_addresses_that_cannot_exist_are_refused_at_their_line() {
    let text = format!("{MINIMAL}listen: 999.1.1.1:80\n");
    err_at(&text, Some(2), &["999.1.1.1", "not an IPv4 address"]);
    err_at("listen: [127.0.0.1:1, 10.1:2]\n", Some(1), &["`10.1`"]);
    err_at(
        "admin:\n  listen: 256.0.0.1:9100\n",
        Some(2),
        &["not an IPv4"],
    );
    // Names stay names, IPv4 literals stay addresses.
    let c = ok(&format!(
        "{MINIMAL}listen: [a1.example:1, host-2:2, 10.0.0.1:3]\n"
    ));
    assert_eq!(c.listen.len(), 3);
}

#[test]
fn upstream_urls_are_normalised_and_resolved() {
    let c = ok("upstreams:\n  - http://127.0.0.1\n  - HTTPS://[::1]/\n  - url: http://LOCALHOST:8080\n    weight: 3\n    tls_verify: false\n    sni: api.local\n    ca: /ca.pem\n");
    let u = &c.upstreams;
    assert_eq!(u[0].url, "http://127.0.0.1:80");
    assert_eq!(u[0].port, 80);
    assert_eq!(
        u[0].addr,
        "127.0.0.1:80".parse().unwrap_or_else(|e| panic!("{e}"))
    );
    assert_eq!((u[0].weight, u[0].tls_verify), (1, true));
    assert_eq!(u[1].url, "https://[::1]:443");
    assert_eq!((u[1].scheme, u[1].host.as_str()), (Scheme::Https, "::1"));
    assert_eq!(u[2].url, "http://localhost:8080");
    assert_eq!((u[2].weight, u[2].tls_verify), (3, false));
    assert_eq!(u[2].sni.as_deref(), Some("api.local"));
    assert_eq!(u[2].ca, Some(PathBuf::from("/ca.pem")));
}

#[test]
fn bad_upstreams_are_errors_at_their_line() {
    let cases: &[(&str, usize, &str)] = &[
        (
            "upstreams:\n  - ftp://127.0.0.1\n",
            2,
            "http:// or https://",
        ),
        ("upstreams:\n  - 127.0.0.1:80\n", 2, "http:// or https://"),
        (
            "upstreams:\n  - http://127.0.0.1/api\n",
            2,
            "the path `/api`",
        ),
        ("upstreams:\n  - http://127.0.0.1:0\n", 2, "port"),
        ("upstreams:\n  - http://:80\n", 2, "host is missing"),
        (
            "upstreams:\n  - http://no_such_host.invalid\n",
            2,
            "cannot resolve",
        ),
        (
            "upstreams:\n  - url: http://127.0.0.1\n    weight: 0\n",
            3,
            "at least 1",
        ),
        ("upstreams:\n  - weight: 2\n", 2, "missing field `url`"),
        // At the second listing.
        (
            "upstreams:\n  - http://127.0.0.1:80\n  - http://127.0.0.1\n",
            3,
            "listed twice",
        ),
    ];
    for (text, line, needle) in cases {
        err_at(text, Some(*line), &[needle]);
    }
}

#[test]
fn request_timeout_can_be_turned_off() {
    for off in ["off", "none", "0", "0ms", "~"] {
        let c = ok(&format!("{MINIMAL}timeouts:\n  request: {off}\n"));
        assert_eq!(c.timeouts.request, None, "{off}");
    }
    let c = ok(&format!("{MINIMAL}timeouts:\n  request: 250ms\n"));
    assert_eq!(c.timeouts.request, Some(Duration::from_millis(250)));
}

#[test]
fn bad_values_are_errors_at_their_line_naming_the_key() {
    let cases: &[(&str, usize, &[&str])] = &[
        (
            "timeouts:\n  connect: 0s\n",
            3,
            &["timeouts.connect", "longer than 0"],
        ),
        ("timeouts:\n  connect: 5\n", 3, &["unit is required"]),
        ("routing:\n  decay_half_life: 0\n", 3, &["longer than 0"]),
        (
            "routing:\n  algorithm: roundrobin\n",
            3,
            &["feedback, serviceq"],
        ),
        ("routing:\n  failure_statuses: [500, 600]\n", 3, &["`600`"]),
        ("limits:\n  concurrency_peak: 0\n", 3, &["at least 1"]),
        ("limits:\n  max_buffered_body: 1.5MiB\n", 3, &["KiB"]),
        ("deferred_queue:\n  replay_rate: 0/s\n", 3, &["at least 1"]),
        (
            "deferred_queue:\n  replay_concurrency: 0\n",
            3,
            &["at least 1"],
        ),
        ("deferred_queue:\n  capacity: -1\n", 3, &["at least 1"]),
        ("deferred_queue:\n  enabled: yes\n", 3, &["boolean"]),
        (
            "upfront_queue:\n  formats:\n    - POST\n    - FOO BAR BAZ\n",
            5,
            &["FOO BAR BAZ"],
        ),
        ("retries:\n  max_attempts: many\n", 3, &["whole number"]),
        ("upstream_host: sometimes\n", 2, &["keep, rewrite"]),
        ("response_headers:\n  Bad Name: x\n", 3, &["Bad Name"]),
        ("log:\n  level: loud\n", 3, &["trace"]),
        ("admin:\n  listen: 9100\n", 3, &["host:port"]),
        ("server:\n  threads: 0\n", 3, &["at least 1", "auto"]),
        ("server:\n  threads: many\n", 3, &["or auto"]),
        ("server:\n  upstream_pool_size: 0\n", 3, &["at least 1"]),
    ];
    for (tail, line, needles) in cases {
        err_at(&format!("{MINIMAL}{tail}"), Some(*line), needles);
    }
}

#[test]
fn queues_read_every_field() {
    let c = ok(&format!(
        "{MINIMAL}upfront_queue:\n  enabled: true\n  formats: [POST /events, POST /events/debug !]\n  capacity: 10\n  max_attempts: 3\n  ttl: 1h\n  replay_unsafe: true\n  replay_rate: 120/m\n  replay_concurrency: 4\n"
    ));
    let q = &c.upfront_queue;
    assert!(q.enabled && q.replay_unsafe);
    assert!(q.formats.matches("post", "/events?x=1"));
    assert!(!q.formats.matches("POST", "/events/debug"));
    assert_eq!(
        (
            q.capacity,
            q.max_attempts,
            q.replay_rate,
            q.replay_concurrency
        ),
        (10, 3, 2, 4)
    );
    assert_eq!(q.ttl, Duration::from_secs(3600));
    // The other queue keeps its defaults.
    assert_eq!(c.deferred_queue, QueueConfig::default());
}

#[test]
fn formats_accept_a_comma_separated_string_and_empty_means_none() {
    let c = ok(&format!(
        "{MINIMAL}deferred_queue:\n  formats: \"POST /orders !, POST\"\n"
    ));
    assert!(!c.deferred_queue.formats.matches("POST", "/orders"));
    assert!(c.deferred_queue.formats.matches("POST", "/pay"));
    for empty in ["[]", "\"\"", "~"] {
        let c = ok(&format!("{MINIMAL}deferred_queue:\n  formats: {empty}\n"));
        assert_eq!(c.deferred_queue.formats, RequestFormats::none(), "{empty}");
    }
}

#[test]
fn response_headers_keep_file_order_and_reject_duplicates() {
    let c = ok(&format!(
        "{MINIMAL}response_headers:\n  X-B: two\n  Server: weir\n  X-A: 1\n"
    ));
    let names: Vec<_> = c.response_headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["X-B", "Server", "X-A"]);
    assert_eq!(c.response_headers[2].1, "1");
    err_at(
        &format!("{MINIMAL}response_headers:\n  X-A: 1\n  x-a: 2\n"),
        Some(4),
        &["set twice"],
    );
}

#[test]
fn admin_and_logs_can_be_turned_off() {
    let c = ok(&format!(
        "{MINIMAL}admin:\n  listen: off\nlog:\n  access: off\n  error_file: off\n  level: debug\n"
    ));
    assert_eq!(c.admin.listen, None);
    assert_eq!(c.log.access, AccessLog::Off);
    assert_eq!(c.log.error_log, ErrorLog::Off);
    assert_eq!(c.log.level, "debug");
    let c = ok(&format!(
        "{MINIMAL}admin:\n  listen: ~\nlog:\n  access: /var/log/weir.jsonl\n"
    ));
    assert_eq!(c.admin.listen, None);
    assert_eq!(c.log.access, AccessLog::File("/var/log/weir.jsonl".into()));
}

#[test]
fn tls_needs_a_cert_and_key_pair_or_acme() {
    let c = ok(&format!("{MINIMAL}tls:\n  cert: /c.pem\n  key: /k.pem\n"));
    let tls = c.tls.unwrap_or_else(|| panic!("no tls"));
    assert_eq!(
        (tls.cert, tls.key),
        (Some("/c.pem".into()), Some("/k.pem".into()))
    );
    let c = ok(&format!(
        "{MINIMAL}tls:\n  acme: {{ email: a@b.c, domains: [a.example], cache_dir: /acme }}\n"
    ));
    let acme = c
        .tls
        .and_then(|t| t.acme)
        .unwrap_or_else(|| panic!("no acme"));
    assert_eq!(acme.domains, ["a.example"]);
    assert_eq!(acme.renew_before, DEFAULT_RENEW_BEFORE);
    err_at(
        &format!("{MINIMAL}tls:\n  cert: /c.pem\n"),
        Some(3),
        &["tls.key is missing"],
    );
    err_at(
        &format!("{MINIMAL}tls:\n  key: /k.pem\n"),
        Some(3),
        &["tls.cert is missing"],
    );
    err_at(&format!("{MINIMAL}tls: {{}}\n"), Some(2), &["cert", "acme"]);
    err_at(
        &format!("{MINIMAL}tls:\n  acme:\n    email: a@b.c\n"),
        Some(3),
        &["domains"],
    );
    err_at(
        &format!("{MINIMAL}tls:\n  crt: /c.pem\n"),
        Some(3),
        &["crt"],
    );
}

#[test]
fn a_yaml_syntax_error_reports_its_line() {
    err_at(
        "upstreams:\n  - http://127.0.0.1:9001\n listen: x\n",
        Some(3),
        &[],
    );
    err_at("upstreams: [http://127.0.0.1:9001\n", Some(2), &[]);
}

#[test]
fn to_yaml_reads_back_to_an_equal_config() {
    let mut c = ok(DEFAULT_YAML);
    assert_eq!(ok(&c.to_yaml()), c);

    // Every non-default shape: lists, maps, offs, odd units.
    c.listen.push(Listener {
        addr: "[::1]:5253".into(),
        tls: false,
    });
    c.upstreams[1].weight = 5;
    c.upstreams[1].sni = Some("b.local".into());
    c.upstreams[2].tls_verify = false;
    c.upstreams[2].ca = Some("/ca.pem".into());
    c.tls = Some(TlsConfig {
        cert: Some("/c.pem".into()),
        key: Some("/k.pem".into()),
        acme: Some(AcmeConfig {
            directory: Some("https://acme.example/dir".into()),
            email: None,
            domains: vec!["a.example".into(), "b.example".into()],
            cache_dir: Some("/acme".into()),
            renew_before: Duration::from_secs(86_400),
        }),
    });
    c.upstream_host = UpstreamHost::Rewrite;
    c.routing.algorithm = Algorithm::Serviceq;
    c.routing.failure_statuses = vec![500];
    c.retries.gap = Duration::from_millis(1500);
    c.timeouts.request = None;
    c.limits.max_buffered_body = 1500;
    c.upfront_queue.enabled = true;
    c.upfront_queue.formats = RequestFormats::parse_csv("POST /events/*, ALL /events/x !")
        .unwrap_or_else(|e| panic!("{e}"));
    c.deferred_queue.formats = RequestFormats::none();
    c.response_headers = vec![
        ("X-Num".into(), "42".into()),
        ("Server".into(), "weir".into()),
    ];
    c.admin.listen = None;
    c.log.access = AccessLog::File("/var/log/a.jsonl".into());
    c.log.error_log = ErrorLog::File("/var/log/weir.err".into());
    let text = c.to_yaml();
    assert_eq!(ok(&text), c, "{text}");
}

#[test]
fn listeners_follow_the_tls_block_unless_they_say_otherwise() {
    let plain = ok("listen: 127.0.0.1:80\nupstreams: [http://127.0.0.1:9001]\n");
    assert!(!plain.listen[0].tls);
    let tls = "tls: {cert: /c.pem, key: /k.pem}\nupstreams: [http://127.0.0.1:9001]\n";
    let all = ok(&format!("listen: 127.0.0.1:443\n{tls}"));
    assert!(
        all.listen[0].tls,
        "listen + tls = a TLS listener (SSL_ENABLE)"
    );
    let mixed = ok(&format!(
        "listen: [{{addr: 127.0.0.1:80, tls: false}}, 127.0.0.1:443]\n{tls}"
    ));
    let flags: Vec<_> = mixed
        .listen
        .iter()
        .map(|l| (l.addr.as_str(), l.tls))
        .collect();
    assert_eq!(flags, [("127.0.0.1:80", false), ("127.0.0.1:443", true)]);
    // The written form reads back as the same listeners.
    let back = ok(&mixed.to_yaml());
    assert_eq!(back.listen, mixed.listen);
    err_at(
        "listen: [{addr: 127.0.0.1:443, tls: true}]\nupstreams: [http://127.0.0.1:9001]\n",
        Some(1),
        &["tls: true", "no `tls` block"],
    );
    err_at(
        "listen: [{addr: 127.0.0.1:443, tsl: true}]\nupstreams: [http://127.0.0.1:9001]\n",
        Some(1),
        &["tsl"],
    );
}

#[test]
fn acme_and_unverified_upstreams_are_warned() {
    let loaded = parse(
        Path::new("weir.yaml"),
        "tls: {cert: /c.pem, key: /k.pem, acme: {domains: [a.example], cache_dir: /acme}}\n\
         upstreams: [{url: 'https://127.0.0.1:9443', tls_verify: false}]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let messages: Vec<_> = loaded.warnings.iter().map(|w| w.message.as_str()).collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(messages[0].contains("HTTP-01"), "{messages:?}");
    assert!(messages[1].contains("tls_verify: false"), "{messages:?}");
}

#[test]
fn a_partial_upfront_queue_keeps_the_upfront_defaults() {
    let c = ok(&format!(
        "{MINIMAL}upfront_queue:\n  capacity: 10\ndeferred_queue:\n  capacity: 20\n"
    ));
    assert!(!c.upfront_queue.enabled);
    assert_eq!(c.upfront_queue.formats, RequestFormats::none());
    assert_eq!(c.upfront_queue.capacity, 10);
    assert!(c.deferred_queue.enabled);
    assert_eq!(
        c.deferred_queue.formats.entries(),
        ["POST", "PUT", "PATCH", "DELETE"]
    );
    assert_eq!(c.deferred_queue.capacity, 20);
    let on = ok(&format!("{MINIMAL}upfront_queue: {{enabled: true}}\n"));
    assert!(on.upfront_queue.enabled);
    assert_eq!(on.upfront_queue.formats, RequestFormats::none());
}

#[test]
fn rules_the_runtime_relies_on_are_checked_at_load() {
    err_at(
        &format!("{MINIMAL}tls:\n  acme:\n    domains: [a.example]\n"),
        Some(3),
        &["tls.acme.cache_dir", "required"],
    );
    err_at(
        &format!("{MINIMAL}listen:\n  - 127.0.0.1:80\n  - {{addr: 127.0.0.1:443, tls: true}}\n"),
        Some(4),
        &["listen[1]", "no `tls` block"],
    );
    err_at(
        &format!("{MINIMAL}response_headers:\n  X-Ok: fine\n  X-Bad: \"a\\u0007b\"\n"),
        Some(4),
        &["response_headers.X-Bad", "not a valid header value"],
    );
    err_at(
        &format!("{MINIMAL}tls:\n  acme:\n    cache_dir: /acme\n    domains:\n      - a.example\n      - '*.example'\n"),
        Some(7),
        &["tls.acme.domains[1]", "DNS-01"],
    );
    err_at(
        &format!(
            "{MINIMAL}tls:\n  acme:\n    cache_dir: /acme\n    domains: [a.example, 10.0.0.1]\n"
        ),
        Some(5),
        &["`10.0.0.1` is not a DNS name"],
    );
    err_at(
        &format!("{MINIMAL}tls:\n  acme:\n    cache_dir: /acme\n    domains: [a.example]\n    directory: acme.example/dir\n"),
        Some(6),
        &["tls.acme.directory", "not an http(s):// URL"],
    );
    // A host the URL parser would refuse, built by hand: the Host header rule still holds.
    let mut c = ok(MINIMAL);
    c.upstreams[0].host = "bad\nhost".into();
    let f = c.validate().unwrap_err();
    assert_eq!(f.path(), "upstreams[0]");
    assert!(f.message.contains("not a valid Host header"), "{f}");
}

#[test]
fn locate_finds_block_keys_list_items_and_falls_back_to_the_enclosing_key() {
    let text = "\
# comment
listen: 127.0.0.1:1
upstreams:
- http://a:1
-   url: http://b:1
    weight: 2
tls:
  acme:
    domains: [a]
    \"cache_dir\": /x
response_headers: {X-A: 1}
";
    let name = |n: &str| Key::Name(n.to_string());
    assert_eq!(locate(text, &[name("listen"), Key::Index(0)]), Some(2));
    assert_eq!(locate(text, &[name("upstreams"), Key::Index(1)]), Some(5));
    assert_eq!(
        locate(text, &[name("upstreams"), Key::Index(1), name("weight")]),
        Some(6)
    );
    assert_eq!(locate(text, &[name("tls"), name("acme")]), Some(8));
    assert_eq!(
        locate(text, &[name("tls"), name("acme"), name("cache_dir")]),
        Some(10)
    );
    assert_eq!(
        locate(text, &[name("tls"), name("acme"), name("email")]),
        Some(8)
    );
    assert_eq!(
        locate(text, &[name("response_headers"), name("X-A")]),
        Some(11)
    );
    assert_eq!(locate(text, &[name("admin")]), None);
}

#[test]
fn pingora_second_settings_take_whole_seconds_only() {
    let c = ok(&format!(
        "{MINIMAL}server:\n  grace_period: 0s\n  graceful_shutdown_timeout: 2m\n"
    ));
    assert_eq!(c.server.grace_period, Duration::ZERO);
    assert_eq!(c.server.graceful_shutdown_timeout, Duration::from_secs(120));
    for key in ["grace_period", "graceful_shutdown_timeout"] {
        err_at(
            &format!("{MINIMAL}server:\n  threads: 1\n  {key}: 1500ms\n"),
            Some(4),
            &[
                &format!("server.{key}"),
                "`1500ms`: whole seconds only (Pingora counts it in seconds)",
            ],
        );
    }
}

#[test]
fn keepalive_zero_or_off_turns_keep_alive_off_and_takes_whole_seconds() {
    for off in ["0", "0s", "off", "~"] {
        let c = ok(&format!("{MINIMAL}timeouts:\n  keepalive: {off}\n"));
        assert_eq!(c.timeouts.keepalive, None, "{off}");
    }
    let c = ok(&format!("{MINIMAL}timeouts:\n  keepalive: 1m\n"));
    assert_eq!(c.timeouts.keepalive, Some(Duration::from_secs(60)));
    err_at(
        &format!("{MINIMAL}timeouts:\n  keepalive: 500ms\n"),
        Some(3),
        &["timeouts.keepalive", "whole seconds only"],
    );
    // Printed as `off`, which reads back as off.
    let mut c = ok(MINIMAL);
    c.timeouts.keepalive = None;
    assert!(c.to_yaml().contains("keepalive: off"), "{}", c.to_yaml());
    assert_eq!(ok(&c.to_yaml()), c);
}

#[test]
fn sizes_that_would_exhaust_memory_are_refused_at_their_line() {
    for q in ["deferred_queue", "upfront_queue"] {
        err_at(
            &format!("{MINIMAL}{q}:\n  enabled: false\n  capacity: 100000000\n"),
            Some(4),
            &[
                &format!("{q}.capacity"),
                "100000000 is more than the maximum of 10000000 entries",
            ],
        );
        err_at(
            &format!("{MINIMAL}{q}:\n  storage: memory\n  max_bytes: 100GiB\n"),
            Some(4),
            &[
                &format!("{q}.max_bytes"),
                "100GiB is more than the maximum of 64GiB for storage memory",
            ],
        );
    }
    err_at(
        &format!("{MINIMAL}store:\n  fsync: 2m\n"),
        Some(3),
        &["store.fsync", "at most 60s"],
    );
    err_at(
        &format!("{MINIMAL}deferred_queue:\n  storage: disk\n"),
        Some(3),
        &["deferred_queue.storage", "not one of: log, memory"],
    );
    let c = ok(&format!(
        "{MINIMAL}deferred_queue: {{capacity: 10000000}}\n"
    ));
    assert_eq!(c.deferred_queue.capacity, QueueConfig::MAX_CAPACITY);
    err_at(
        &format!("{MINIMAL}limits:\n  max_buffered_body: 10GiB\n"),
        Some(3),
        &[
            "limits.max_buffered_body",
            "10GiB is more than the maximum of 1GiB",
        ],
    );
    let c = ok(&format!("{MINIMAL}limits: {{max_buffered_body: 1GiB}}\n"));
    assert_eq!(c.limits.max_buffered_body, 1 << 30);
}

#[test]
fn the_error_log_goes_to_stderr_unless_told_otherwise() {
    assert_eq!(ok(MINIMAL).log.error_log, ErrorLog::Stderr);
    for (value, want) in [
        ("stderr", ErrorLog::Stderr),
        ("off", ErrorLog::Off),
        ("~", ErrorLog::Off),
        (
            "/var/log/weir.err",
            ErrorLog::File("/var/log/weir.err".into()),
        ),
        (
            "logs/weir_error.log",
            ErrorLog::File("logs/weir_error.log".into()),
        ),
    ] {
        let c = ok(&format!("{MINIMAL}log:\n  error_file: {value}\n"));
        assert_eq!(c.log.error_log, want, "{value}");
        assert_eq!(ok(&c.to_yaml()), c, "{value} reads back");
    }
    err_at(
        &format!("{MINIMAL}log:\n  error_file: \"\"\n"),
        Some(3),
        &["log.error_file", "stderr, off or a file path"],
    );
}

#[test]
fn conf_weir_yaml_writes_out_every_key() {
    // Adding a key is a field with its default plus its line in conf/weir.yaml: this holds
    // the second half (the embedded-default test holds the values).
    let name = |n: &str| Key::Name(n.to_string());
    let printed = serde_yaml::to_value(Config::default()).unwrap_or_default();
    let sections = printed.as_mapping().cloned().unwrap_or_default();
    assert!(sections.len() > 10, "{sections:?}");
    for (section, value) in &sections {
        let section = section.as_str().unwrap_or_default();
        let line = locate(DEFAULT_YAML, &[name(section)]);
        assert!(line.is_some(), "conf/weir.yaml lacks `{section}`");
        for key in value.as_mapping().into_iter().flat_map(|m| m.keys()) {
            let key = key.as_str().unwrap_or_default();
            let at = locate(DEFAULT_YAML, &[name(section), name(key)]);
            assert!(
                at.is_some() && at != line,
                "conf/weir.yaml lacks `{section}.{key}`"
            );
        }
    }
}

#[test]
fn threads_are_auto_or_a_count_and_the_pool_size_a_count() {
    let c = ok(&format!(
        "{MINIMAL}server:\n  threads: auto\n  upstream_pool_size: 16\n"
    ));
    assert_eq!(c.server.threads, None);
    assert_eq!(
        c.server.worker_threads(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    assert_eq!(c.server.upstream_pool_size, 16);
    let c = ok(&format!("{MINIMAL}server:\n  threads: 3\n"));
    assert_eq!((c.server.threads, c.server.worker_threads()), (Some(3), 3));
    // `weir check` prints what reads back the same.
    let again = ok(&c.to_yaml());
    assert_eq!(again.server, c.server);
}
