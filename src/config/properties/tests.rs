use super::*;
use crate::config::AccessLog;

fn load(text: &str) -> Result<Loaded, ConfigError> {
    parse(Path::new("sq.properties"), text)
}

fn ok(text: &str) -> Loaded {
    load(text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"))
}

fn config(text: &str) -> Config {
    ok(text).config
}

/// Asserts a load error on `line` whose message contains every needle.
fn err_at(text: &str, line: Option<usize>, needles: &[&str]) {
    match load(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => {
            assert_eq!(e.line, line, "{e}");
            assert_eq!(e.file, PathBuf::from("sq.properties"));
            for n in needles {
                assert!(e.message.contains(n), "`{n}` not in: {e}");
            }
        }
    }
}

const ENDPOINTS: &str = "ENDPOINTS=http://127.0.0.1:9001\n";

/// A file as ServiceQ users write them, every key set.
const REALISTIC: &str = "\
# ServiceQ config
LISTENER_PORT=8080
PROTO=https
ENDPOINTS=http://127.0.0.1:8001,http://localhost,https://127.0.0.1:8443

CONCURRENCY_PEAK=512
OUTGOING_REQUEST_TIMEOUT=3
RETRY_GAP=1
ENABLE_DEFERRED_Q=true
ENABLE_UPFRONT_Q=false
Q_REQUEST_FORMATS=POST /orders !,POST,PUT /items/*
CUSTOM_RESPONSE_HEADERS=Server|Access-Control-Allow-Origin: *|X-Powered-By: weir
KEEP_ALIVE_TIMEOUT=30
SSL_ENABLE=true
SSL_CERTIFICATE_FILE=/etc/ssl/cert.pem
SSL_PRIVATE_KEY_FILE=/etc/ssl/key.pem
SSL_AUTO_ENABLE=true
SSL_AUTO_CERTIFICATE_DIR=/var/lib/sq
SSL_AUTO_EMAIL=ops@example.com
SSL_AUTO_DOMAIN_NAMES=api.example.com, www.example.com
SSL_AUTO_RENEW_BEFORE=15
METRICS_LISTENER=127.0.0.1:9200
LISTENER_ADDR=127.0.0.1
";

#[test]
fn a_realistic_file_maps_every_key() {
    let Loaded {
        config: c,
        warnings,
    } = ok(REALISTIC);
    assert_eq!(
        c.listen,
        vec![Listener {
            addr: "127.0.0.1:8080".into(),
            tls: true,
        }]
    );
    let urls: Vec<_> = c.upstreams.iter().map(|u| u.url.as_str()).collect();
    assert_eq!(
        urls,
        [
            "http://127.0.0.1:8001",
            "http://localhost:80",
            "https://127.0.0.1:8443"
        ]
    );
    assert_eq!(c.limits.concurrency_peak, 512);
    assert_eq!(c.deferred_queue.capacity, 512);
    assert_eq!(c.timeouts.request, Some(Duration::from_secs(3)));
    assert_eq!(c.retries.gap, Duration::from_secs(1));
    assert_eq!(c.timeouts.keepalive, Some(Duration::from_secs(30)));
    assert!(c.deferred_queue.enabled);
    assert!(!c.upfront_queue.enabled);
    for q in [&c.deferred_queue, &c.upfront_queue] {
        assert!(!q.formats.matches("POST", "/orders"));
        assert!(q.formats.matches("POST", "/pay"));
        assert!(q.formats.matches("PUT", "/items/3"));
        assert!(!q.formats.matches("PUT", "/other"));
    }
    assert_eq!(
        c.response_headers,
        vec![
            ("Server".to_string(), "weir".to_string()),
            ("Access-Control-Allow-Origin".to_string(), "*".to_string()),
            ("X-Powered-By".to_string(), "weir".to_string()),
        ]
    );
    let tls = c.tls.clone().unwrap_or_else(|| panic!("no tls"));
    assert_eq!(tls.cert, Some(PathBuf::from("/etc/ssl/cert.pem")));
    assert_eq!(tls.key, Some(PathBuf::from("/etc/ssl/key.pem")));
    let acme = tls.acme.unwrap_or_else(|| panic!("no acme"));
    assert_eq!(acme.domains, ["api.example.com", "www.example.com"]);
    assert_eq!(acme.email.as_deref(), Some("ops@example.com"));
    assert_eq!(acme.cache_dir, Some(PathBuf::from("/var/lib/sq")));
    assert_eq!(acme.renew_before, Duration::from_secs(15 * 86_400));
    assert_eq!(c.admin.listen.as_deref(), Some("127.0.0.1:9200"));
    // Untouched knobs keep the native defaults.
    assert_eq!(c.timeouts.connect, Duration::from_secs(1));
    assert_eq!(c.log.access, AccessLog::Stdout);

    let lines: Vec<_> = warnings.iter().map(|w| w.line).collect();
    // The queues and SSL_ENABLE are supported: only SSL_AUTO_ENABLE warns (no plain listener
    // for HTTP-01).
    assert_eq!(lines, [Some(17)]);
    assert!(warnings[0].message.starts_with("SSL_AUTO_ENABLE"));
    assert!(warnings[0]
        .message
        .contains(crate::config::ACME_NEEDS_PLAIN_LISTENER));
    assert!(
        c.listen.iter().all(|l| l.tls),
        "SSL_ENABLE makes the listener TLS"
    );
}

#[test]
fn a_converted_file_reads_back_as_the_same_config() {
    let c = config(REALISTIC);
    let yaml = c.to_yaml();
    let back = crate::config::yaml::parse(Path::new("converted.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(back.config, c);
}

#[test]
fn only_endpoints_is_required_and_the_rest_defaults() {
    let c = config(ENDPOINTS);
    assert_eq!(c.listen[0].addr, "0.0.0.0:5252");
    let mut d = Config {
        listen: c.listen.clone(),
        upstreams: c.upstreams.clone(),
        ..Config::default()
    };
    // sq.properties' own default: absent formats mean ALL, for both queues.
    d.deferred_queue.formats = RequestFormats::all();
    d.upfront_queue.formats = RequestFormats::all();
    assert_eq!(c, d);
    err_at("LISTENER_PORT=1\n", None, &["no upstreams", "ENDPOINTS"]);
}

#[test]
fn formats_absent_mean_all_and_empty_mean_none() {
    let all = config(ENDPOINTS);
    assert_eq!(all.deferred_queue.formats, RequestFormats::all());
    assert_eq!(all.upfront_queue.formats, RequestFormats::all());
    let none = config(&format!("{ENDPOINTS}Q_REQUEST_FORMATS=\n"));
    assert_eq!(none.deferred_queue.formats, RequestFormats::none());
    assert_eq!(none.upfront_queue.formats, RequestFormats::none());
}

#[test]
fn the_legacy_formats_key_is_read_but_not_together_with_the_new_one() {
    let c = config(&format!("{ENDPOINTS}DEFERRED_Q_REQUEST_FORMATS=PATCH\n"));
    assert_eq!(c.deferred_queue.formats.entries(), ["PATCH"]);
    assert_eq!(c.upfront_queue.formats.entries(), ["PATCH"]);
    err_at(
        &format!("{ENDPOINTS}Q_REQUEST_FORMATS=POST\nDEFERRED_Q_REQUEST_FORMATS=PUT\n"),
        Some(3),
        &["keep only Q_REQUEST_FORMATS"],
    );
}

#[test]
fn header_rules_bare_server_means_weir_and_names_must_be_valid() {
    let c = config(&format!(
        "{ENDPOINTS}CUSTOM_RESPONSE_HEADERS= X-A: 1 | Server | X-B:two words\n"
    ));
    assert_eq!(
        c.response_headers,
        vec![
            ("X-A".to_string(), "1".to_string()),
            ("Server".to_string(), "weir".to_string()),
            ("X-B".to_string(), "two words".to_string()),
        ]
    );
    let c = config(&format!(
        "{ENDPOINTS}CUSTOM_RESPONSE_HEADERS=Server: edge\n"
    ));
    assert_eq!(c.response_headers, vec![("Server".into(), "edge".into())]);
    assert!(config(&format!("{ENDPOINTS}CUSTOM_RESPONSE_HEADERS=\n"))
        .response_headers
        .is_empty());
    for (bad, needle) in [
        ("X-Flag", "is not `Name: value`"),
        ("Bad Name: x", "not a valid header name"),
        ("X-A: 1||X-B: 2", "empty entry"),
        ("X-A: 1|x-a: 2", "set twice"),
    ] {
        err_at(
            &format!("{ENDPOINTS}CUSTOM_RESPONSE_HEADERS={bad}\n"),
            Some(2),
            &["CUSTOM_RESPONSE_HEADERS", needle],
        );
    }
}

#[test]
fn a_line_without_equals_is_an_error_at_its_line() {
    err_at(
        &format!("# comment\n{ENDPOINTS}\nLISTENER_PORT\n"),
        Some(4),
        &["expected KEY=value", "LISTENER_PORT"],
    );
}

#[test]
fn a_second_equals_in_a_value_is_an_error() {
    err_at(
        &format!("{ENDPOINTS}CUSTOM_RESPONSE_HEADERS=Cache-Control: max-age=60\n"),
        Some(2),
        &["second `=`"],
    );
}

#[test]
fn spaces_around_the_key_are_an_error_asking_to_remove_them() {
    err_at(
        &format!("{ENDPOINTS}LISTENER_PORT = 80\n"),
        Some(2),
        &["remove the spaces", "LISTENER_PORT=..."],
    );
    err_at(&format!("  {ENDPOINTS}"), Some(1), &["remove the spaces"]);
}

#[test]
fn an_unparsable_number_is_an_error_not_zero() {
    for (line, needle) in [
        (
            "CONCURRENCY_PEAK=lots",
            "CONCURRENCY_PEAK: `lots` is not a whole number",
        ),
        ("OUTGOING_REQUEST_TIMEOUT=2s", "`2s` is not a whole number"),
        ("RETRY_GAP=0.5", "whole number"),
        ("KEEP_ALIVE_TIMEOUT=", "whole number"),
        ("LISTENER_PORT=70000", "not a port number"),
        ("SSL_AUTO_RENEW_BEFORE=soon", "whole number"),
    ] {
        err_at(&format!("{ENDPOINTS}{line}\n"), Some(2), &[needle]);
    }
}

#[test]
fn out_of_range_values_are_errors() {
    for (line, needle) in [
        ("CONCURRENCY_PEAK=0", "at least 1"),
        ("RETRY_GAP=-1", "negative"),
        ("ENABLE_DEFERRED_Q=yes", "true or false"),
        ("PROTO=ftp", "http or https"),
        ("METRICS_LISTENER=9100", "host:port"),
        ("LISTENER_ADDR=no host", "LISTENER_ADDR"),
    ] {
        err_at(&format!("{ENDPOINTS}{line}\n"), Some(2), &[needle]);
    }
}

#[test]
fn an_unknown_key_is_an_error_naming_it() {
    err_at(
        &format!("{ENDPOINTS}\nENDPOINT=http://x\n"),
        Some(3),
        &["unknown key `ENDPOINT`"],
    );
}

#[test]
fn a_duplicate_key_is_an_error_naming_the_first_line() {
    err_at(
        &format!("{ENDPOINTS}RETRY_GAP=1\nRETRY_GAP=2\n"),
        Some(3),
        &["duplicate key `RETRY_GAP`", "line 2"],
    );
}

#[test]
fn bad_endpoints_are_errors_at_their_line() {
    for (value, needle) in [
        ("http://127.0.0.1:1,,http://127.0.0.1:2", "empty entry"),
        ("127.0.0.1:8000", "http:// or https://"),
        ("http://127.0.0.1:1/api", "path"),
        ("http://127.0.0.1:1,http://127.0.0.1:1", "listed twice"),
    ] {
        err_at(
            &format!("PROTO=http\nENDPOINTS={value}\n"),
            Some(2),
            &["ENDPOINTS", needle],
        );
    }
}

#[test]
fn request_timeout_of_zero_or_less_means_none() {
    for t in ["0", "-1"] {
        let c = config(&format!("{ENDPOINTS}OUTGOING_REQUEST_TIMEOUT={t}\n"));
        assert_eq!(c.timeouts.request, None, "{t}");
    }
}

#[test]
fn proto_https_makes_the_listener_tls_and_needs_a_certificate() {
    let c = config(&format!(
        "{ENDPOINTS}PROTO=https\nSSL_CERTIFICATE_FILE=/c.pem\nSSL_PRIVATE_KEY_FILE=/k.pem\n"
    ));
    assert!(c.listen[0].tls);
    let tls = c.tls.unwrap_or_default();
    assert_eq!(
        (tls.cert, tls.key),
        (Some("/c.pem".into()), Some("/k.pem".into()))
    );
    let acme = config(&format!(
        "{ENDPOINTS}PROTO=https\nSSL_AUTO_ENABLE=true\nSSL_AUTO_DOMAIN_NAMES=a.example\n\
         SSL_AUTO_CERTIFICATE_DIR=/acme\n"
    ));
    assert!(acme.listen[0].tls);
    assert!(acme
        .tls
        .is_some_and(|t| t.acme.is_some() && t.cert.is_none()));
    err_at(
        &format!("{ENDPOINTS}PROTO=https\n"),
        Some(2),
        &[
            "PROTO=https needs SSL_CERTIFICATE_FILE and SSL_PRIVATE_KEY_FILE",
            "SSL_AUTO_ENABLE",
        ],
    );
    err_at(
        &format!("{ENDPOINTS}SSL_CERTIFICATE_FILE=/c.pem\nPROTO=https\n"),
        Some(3),
        &["PROTO=https needs SSL_PRIVATE_KEY_FILE"],
    );
    let plain = config(&format!("{ENDPOINTS}PROTO=http\n"));
    assert!(!plain.listen[0].tls && plain.tls.is_none());
}

#[test]
fn proto_disagreeing_with_the_ssl_keys_is_warned_naming_both_lines() {
    let loaded = ok(&format!(
        "{ENDPOINTS}PROTO=http\nSSL_ENABLE=true\nSSL_CERTIFICATE_FILE=/c.pem\n\
         SSL_PRIVATE_KEY_FILE=/k.pem\n"
    ));
    assert!(loaded.config.listen[0].tls, "TLS, as SSL_ENABLE says");
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    let w = &loaded.warnings[0];
    assert_eq!(w.line, Some(2));
    for needle in [
        "PROTO=http (line 2)",
        "SSL_ENABLE=true (line 3)",
        "the listener is TLS",
    ] {
        assert!(
            w.message.contains(needle),
            "`{needle}` not in: {}",
            w.message
        );
    }
    let loaded = ok(&format!(
        "{ENDPOINTS}SSL_ENABLE=false\nPROTO=https\nSSL_CERTIFICATE_FILE=/c.pem\n\
         SSL_PRIVATE_KEY_FILE=/k.pem\n"
    ));
    assert!(loaded.config.listen[0].tls, "TLS, as PROTO says");
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert_eq!(loaded.warnings[0].line, Some(3));
    assert!(loaded.warnings[0]
        .message
        .contains("PROTO=https (line 3) and SSL_ENABLE=false (line 2)"));
}

#[test]
fn a_concurrency_peak_over_the_queue_ceiling_caps_the_queue_with_a_warning() {
    let loaded = ok(&format!("{ENDPOINTS}CONCURRENCY_PEAK=50000000\n"));
    assert_eq!(loaded.config.limits.concurrency_peak, 50_000_000);
    assert_eq!(loaded.config.deferred_queue.capacity, 10_000_000);
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert_eq!(loaded.warnings[0].line, Some(2));
    assert!(loaded.warnings[0].message.contains("at most 10000000"));
    let exact = ok(&format!("{ENDPOINTS}CONCURRENCY_PEAK=10000000\n"));
    assert!(exact.warnings.is_empty(), "{:?}", exact.warnings);
}

#[test]
fn validation_findings_point_at_the_key_that_set_the_value() {
    err_at(
        &format!(
            "{ENDPOINTS}SSL_AUTO_ENABLE=true\nSSL_AUTO_CERTIFICATE_DIR=/acme\n\
             SSL_AUTO_DOMAIN_NAMES=a.example,*.example\n"
        ),
        Some(4),
        &["SSL_AUTO_DOMAIN_NAMES: tls.acme.domains[1]", "DNS-01"],
    );
}

#[test]
fn keep_alive_timeout_of_zero_or_less_turns_keep_alive_off() {
    for t in ["0", "-5"] {
        let c = config(&format!("{ENDPOINTS}KEEP_ALIVE_TIMEOUT={t}\n"));
        assert_eq!(c.timeouts.keepalive, None, "{t}");
    }
}

#[test]
fn ipv6_listener_addr_gets_brackets() {
    let c = config(&format!("{ENDPOINTS}LISTENER_ADDR=::1\nLISTENER_PORT=81\n"));
    assert_eq!(c.listen[0].addr, "[::1]:81");
}

#[test]
fn metrics_listener_can_be_turned_off() {
    let c = config(&format!("{ENDPOINTS}METRICS_LISTENER=off\n"));
    assert_eq!(c.admin.listen, None);
}

#[test]
fn tls_keys_need_their_companions_only_when_enabled() {
    let c = config(&format!(
        "{ENDPOINTS}SSL_ENABLE=false\nSSL_CERTIFICATE_FILE=/c.pem\n"
    ));
    assert!(c.tls.is_none());
    err_at(
        &format!("{ENDPOINTS}SSL_ENABLE=true\nSSL_CERTIFICATE_FILE=/c.pem\n"),
        Some(2),
        &["SSL_PRIVATE_KEY_FILE"],
    );
    err_at(
        &format!("{ENDPOINTS}SSL_AUTO_ENABLE=true\n"),
        Some(2),
        &["SSL_AUTO_DOMAIN_NAMES"],
    );
}

#[test]
fn warnings_come_only_from_keys_that_turn_something_on() {
    let quiet = ok(&format!(
        "{ENDPOINTS}ENABLE_DEFERRED_Q=false\nENABLE_UPFRONT_Q=false\nSSL_ENABLE=false\n"
    ));
    assert!(quiet.warnings.is_empty(), "{:?}", quiet.warnings);
    let queues = ok(&format!(
        "{ENDPOINTS}ENABLE_UPFRONT_Q=true\nENABLE_DEFERRED_Q=true\n"
    ));
    assert!(queues.warnings.is_empty(), "{:?}", queues.warnings);
    let served = ok(&format!(
        "{ENDPOINTS}SSL_ENABLE=true\nSSL_CERTIFICATE_FILE=/c.pem\nSSL_PRIVATE_KEY_FILE=/k.pem\n"
    ));
    assert!(served.warnings.is_empty(), "{:?}", served.warnings);
    let loud = ok(&format!(
        "{ENDPOINTS}SSL_AUTO_ENABLE=true\nSSL_AUTO_DOMAIN_NAMES=a.example\nSSL_AUTO_CERTIFICATE_DIR=/acme\n"
    ));
    assert_eq!(loud.warnings.len(), 1, "{:?}", loud.warnings);
    assert_eq!(loud.warnings[0].line, Some(2));
}

#[test]
fn windows_line_endings_are_accepted() {
    let c = config("ENDPOINTS=http://127.0.0.1:9001\r\nRETRY_GAP=2\r\n");
    assert_eq!(c.retries.gap, Duration::from_secs(2));
}

#[test]
fn a_byte_order_mark_before_the_first_key_is_ignored() {
    let c = config(&format!("\u{feff}LISTENER_PORT=5353\n{ENDPOINTS}"));
    assert_eq!(c.listen[0].addr, "0.0.0.0:5353");
}
