//! The whole request, in this process over loopback: a keep-alive client, weir with its shipped
//! defaults (access log on, into a file; request id, traceparent, forwarding headers, metrics,
//! feedback routing, hedging registered), two nodes that answer `200 ok`; and the bare Pingora
//! proxy (round robin, nothing else) on the same nodes for comparison. Reports the round trip
//! per request (criterion) and the allocations per request (printed; the same count
//! `tests/allocations.rs` pins).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

#[path = "../tests/inproc/mod.rs"]
mod inproc;

#[global_allocator]
static GLOBAL: inproc::Counting = inproc::Counting;

fn allocations_per_request(client: &mut inproc::Client, n: u64) -> f64 {
    let before = inproc::allocations();
    for _ in 0..n {
        assert_eq!(client.get(), 200);
    }
    (inproc::allocations() - before) as f64 / n as f64
}

fn whole_request(c: &mut Criterion) {
    let nodes = [inproc::upstream(), inproc::upstream()];
    let weir = inproc::start(&nodes, "");
    let bare = inproc::start_bare(&nodes);
    let mut group = c.benchmark_group("request");
    group.measurement_time(Duration::from_secs(5));
    for (name, addr) in [("weir_defaults", weir.addr), ("bare_pingora", bare)] {
        let mut client = inproc::Client::connect(addr, "/bench?q=1");
        allocations_per_request(&mut client, 2_000);
        let allocs = allocations_per_request(&mut client, 5_000);
        eprintln!("request/{name}: {allocs:.1} allocations per request");
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                for _ in 0..iters {
                    assert_eq!(client.get(), 200);
                }
                started.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, whole_request);
criterion_main!(benches);
