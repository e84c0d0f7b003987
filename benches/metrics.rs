//! Cost of weir's metric recording on the request path: one `Metrics::request_done`, one
//! per-attempt record (`NodeMetrics::attempt_done`: attempts counter + response histogram), and
//! a whole request of each shape (one attempt; a refused attempt, a retry and a good attempt).
//! Also the trace-context work of each request: validating a client `traceparent` and making one,
//! and the access log line: formatting it, and handing it to a log writer (to /dev/null).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::header::HeaderValue;
use weir::forward::trace::{new_traceparent, valid_traceparent};
use weir::metrics::{Metrics, Outcome, RetryReason};

fn recording(c: &mut Criterion) {
    let metrics = Metrics::new();
    let a = metrics.node("default", "http://10.0.0.1:8080");
    let b = metrics.node("default", "http://10.0.0.2:8080");
    let mut g = c.benchmark_group("metrics");
    g.bench_function("request_done", |bench| {
        bench.iter(|| metrics.request_done(black_box(200), Outcome::Proxied, black_box(0.0021)))
    });
    g.bench_function("attempt_done", |bench| {
        bench.iter(|| a.attempt_done(black_box(0), Some(black_box(0.0018))))
    });
    g.bench_function("request_one_attempt", |bench| {
        bench.iter(|| {
            a.attempt_done(black_box(0), Some(black_box(0.0018)));
            metrics.request_done(black_box(200), Outcome::Proxied, black_box(0.0021));
        })
    });
    g.bench_function("request_refused_then_retried", |bench| {
        bench.iter(|| {
            b.attempt_done(black_box(1), None);
            metrics.retry(RetryReason::after_failure(1));
            a.attempt_done(black_box(0), Some(black_box(0.0018)));
            metrics.request_done(black_box(200), Outcome::Proxied, black_box(0.0031));
        })
    });
    g.finish();

    let mut g = c.benchmark_group("trace");
    let client =
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    g.bench_function("validate_traceparent", |bench| {
        bench.iter(|| valid_traceparent(black_box(client.as_bytes())))
    });
    g.bench_function("new_traceparent", |bench| bench.iter(new_traceparent));
    g.finish();
}

fn access_log(c: &mut Criterion) {
    use std::time::Duration;
    use weir::logs::{AccessRecord, Logs};
    let record = AccessRecord {
        id: "3f2a9c0e7b1d4e5fa6c8b9d0e1f2a3b4",
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        client: Some(std::net::Ipv4Addr::new(10, 0, 0, 7).into()),
        method: b"GET",
        target: b"/api/v1/orders?tenant=42&page=3",
        status: 200,
        outcome: "proxied",
        upstream: Some("http://10.0.0.1:8080"),
        attempts: 1,
        elapsed: Duration::from_micros(2_422),
    };
    let mut g = c.benchmark_group("access_log");
    let mut buf = Vec::with_capacity(512);
    g.bench_function("format_line", |bench| {
        bench.iter(|| {
            buf.clear();
            black_box(&record).write_json(&mut buf);
            black_box(buf.len())
        })
    });
    let logs = Logs::start(
        &weir::config::AccessLog::File("/dev/null".into()),
        &weir::config::ErrorLog::Off,
    )
    .expect("open /dev/null");
    let sink = logs.access.as_ref().expect("an access log");
    g.bench_function("write_access_to_writer", |bench| {
        bench.iter(|| sink.write_access(black_box(&record)))
    });
    g.finish();
    eprintln!(
        "access_log: {} lines dropped during the run",
        sink.dropped()
    );
}

criterion_group!(benches, recording, access_log);
criterion_main!(benches);
