//! Cost of one routing decision: `select` + `start` + `finish` on the real clock, for both
//! algorithms, all nodes healthy or a quarter of them (at least one) failing every attempt.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use weir::routing::{Algorithm, Outcome, Router, RouterSettings, SystemClock};

const SIZES: [usize; 4] = [3, 8, 64, 1024];

fn router(n: usize, algorithm: Algorithm) -> Router {
    let settings = RouterSettings {
        algorithm,
        decay_half_life: Duration::from_secs(10),
    };
    Router::new(&vec![1; n], settings, Arc::new(SystemClock::new()))
}

/// Nodes 0, 4, 8, … fail (with 3 nodes, that is one of them).
fn failing(node: usize, quarter_failing: bool) -> bool {
    quarter_failing && node.is_multiple_of(4)
}

fn one_attempt(r: &Router, rng: &mut fastrand::Rng, quarter_failing: bool) {
    if let Some(node) = r.select(black_box(&[]), rng.f64()) {
        r.start(node);
        let outcome = if failing(node, quarter_failing) {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        r.finish(node, outcome, Duration::from_millis(1));
    }
}

fn select_start_finish(c: &mut Criterion) {
    for (algorithm, name) in [
        (Algorithm::Feedback, "feedback"),
        (Algorithm::Serviceq, "serviceq"),
    ] {
        for (quarter_failing, scenario) in [(false, "healthy"), (true, "quarter_failing")] {
            let mut group = c.benchmark_group(format!("select_start_finish/{name}/{scenario}"));
            for n in SIZES {
                let r = router(n, algorithm);
                let mut rng = fastrand::Rng::with_seed(1);
                // Reach the steady state (scores at the cap, latencies sampled) first.
                for _ in 0..20 * n {
                    one_attempt(&r, &mut rng, quarter_failing);
                }
                group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                    b.iter(|| one_attempt(&r, &mut rng, quarter_failing))
                });
            }
            group.finish();
        }
    }
}

/// A second attempt (select only): one node already tried, all healthy.
fn retry_select(c: &mut Criterion) {
    for (algorithm, name) in [
        (Algorithm::Feedback, "feedback"),
        (Algorithm::Serviceq, "serviceq"),
    ] {
        let mut group = c.benchmark_group(format!("retry_select/{name}"));
        for n in SIZES {
            let r = router(n, algorithm);
            let mut rng = fastrand::Rng::with_seed(2);
            for _ in 0..20 * n {
                one_attempt(&r, &mut rng, false);
            }
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
                b.iter(|| {
                    let first = rng.usize(..n);
                    black_box(r.select(&[first], rng.f64()))
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, select_start_finish, retry_select);
criterion_main!(benches);
