use super::*;
use std::thread;

const HALF_LIFE: Duration = Duration::from_secs(10);
const MS: Duration = Duration::from_millis(1);

fn router(weights: &[u32], algorithm: Algorithm) -> (Router, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let settings = RouterSettings {
        algorithm,
        decay_half_life: HALF_LIFE,
    };
    (Router::new(weights, settings, clock.clone()), clock)
}

fn equal(n: usize, algorithm: Algorithm) -> (Router, Arc<ManualClock>) {
    router(&vec![1; n], algorithm)
}

fn fail(r: &Router, node: usize, times: usize) {
    for _ in 0..times {
        r.start(node);
        r.finish(node, Outcome::Failure, MS);
    }
}

fn succeed(r: &Router, node: usize, elapsed: Duration) {
    r.start(node);
    r.finish(node, Outcome::Success, elapsed);
}

/// ServiceQ's closed form for one dead node among `n` (the numbers measured on its binary).
fn serviceq_dead_share(n: usize, e: u64) -> f64 {
    let em = ((1.0 + e as f64).powf(1.5)).floor();
    let w = (em / (1.0 + e as f64)).ceil();
    w / (w + (n as f64 - 1.0) * em)
}

/// Shares of `count` sequential first attempts, each finishing at once as `finish` says.
fn shares(r: &Router, count: usize, seed: u64, mut finish: impl FnMut(usize)) -> Vec<f64> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut hits = vec![0usize; r.len()];
    for _ in 0..count {
        let node = r.select(&[], rng.f64()).expect("a node");
        hits[node] += 1;
        finish(node);
    }
    hits.iter().map(|&h| h as f64 / count as f64).collect()
}

// --- serviceq ---

#[test]
fn serviceq_formula_matches_measured_probabilities() {
    let table = [
        (0, 0.125),
        (1, 0.0667),
        (2, 0.0541),
        (3, 0.0345),
        (9, 0.0181),
        (19, 0.0080),
        (49, 0.0032),
        (99, 0.0014),
    ];
    let (r, _) = equal(8, Algorithm::Serviceq);
    let mut failures = 0;
    for (e, expected) in table {
        fail(&r, 0, e - failures);
        failures = e;
        let p = r.selection_probabilities()[0];
        assert_eq!((p * 1e4).round() / 1e4, expected, "e = {e}");
        assert_eq!(r.error_score(0), e as f64);
    }
}

#[test]
fn serviceq_success_resets_the_counter() {
    let (r, _) = equal(3, Algorithm::Serviceq);
    fail(&r, 1, 5);
    succeed(&r, 1, MS);
    assert_eq!(r.error_score(1), 0.0);
    assert_eq!(r.selection_probabilities(), vec![1.0 / 3.0; 3]);
}

#[test]
fn serviceq_retries_walk_round_robin_from_the_first_choice() {
    let (r, _) = equal(5, Algorithm::Serviceq);
    assert_eq!(r.select(&[3], 0.0), Some(4));
    assert_eq!(r.select(&[3, 4], 0.9), Some(0));
    assert_eq!(r.select(&[3, 4, 0], 0.5), Some(1));
    assert_eq!(r.select(&[3, 4, 0, 1], 0.5), Some(2));
    assert_eq!(r.select(&[3, 4, 0, 1, 2], 0.5), None);
}

#[test]
fn serviceq_multiplies_configured_weights() {
    let (r, _) = router(&[1, 3], Algorithm::Serviceq);
    assert_eq!(r.selection_probabilities(), vec![0.25, 0.75]);
    // e = 3 on node 1: Em = 8, w = [8·1, 2·3].
    fail(&r, 1, 3);
    let p = r.selection_probabilities();
    assert!((p[0] - 8.0 / 14.0).abs() < 1e-12, "{p:?}");
}

/// First attempts on node 0 out of 500 sequential requests over 3 nodes, node 0 dead, each
/// request retried round the others; `gap` of clock between requests.
fn dead_node_first_attempts(r: &Router, clock: &ManualClock, gap: Duration) -> usize {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut dead_hits = 0;
    for _ in 0..500 {
        let mut tried = Vec::new();
        while let Some(node) = r.select(&tried, rng.f64()) {
            tried.push(node);
            r.start(node);
            if node == 0 {
                r.finish(node, Outcome::Failure, MS);
            } else {
                r.finish(node, Outcome::Success, MS);
                break;
            }
        }
        dead_hits += usize::from(tried[0] == 0);
        clock.advance(gap);
    }
    dead_hits
}

#[test]
fn serviceq_three_nodes_one_dead_hits_it_about_23_times_in_500() {
    // Measured on ServiceQ's binary: 20–26 first attempts on the dead node.
    let (r, clock) = equal(3, Algorithm::Serviceq);
    let hits = dead_node_first_attempts(&r, &clock, 10 * MS);
    assert!((17..=29).contains(&hits), "{hits}");
}

#[test]
fn feedback_three_nodes_one_dead_hits_it_less_than_serviceq() {
    // 500 requests over 5 s, i.e. half a half-life of decay.
    let (r, clock) = equal(3, Algorithm::Feedback);
    let hits = dead_node_first_attempts(&r, &clock, 10 * MS);
    assert!(hits <= 8, "{hits}");
}

// --- feedback: error score ---

#[test]
fn health_curve_has_the_documented_values() {
    assert!((health_factor(1.0) - 0.396).abs() < 5e-4);
    assert!((health_factor(2.0) - 0.039).abs() < 5e-4);
    assert!((health_factor(SCORE_CAP) - 0.0039).abs() < 5e-5);
    assert!((health_factor(0.9) - 0.5).abs() < 1e-12);
    assert_eq!(health_factor(0.0), 1.0);
}

#[test]
fn feedback_dead_node_curve_never_exceeds_serviceq() {
    let (fb, _) = equal(8, Algorithm::Feedback);
    let (sq, _) = equal(8, Algorithm::Serviceq);
    for e in 0..=100u64 {
        let p_fb = fb.selection_probabilities()[0];
        let p_sq = sq.selection_probabilities()[0];
        assert!((p_sq - serviceq_dead_share(8, e)).abs() < 1e-12, "e = {e}");
        assert!(
            p_fb <= p_sq + 1e-9,
            "e = {e}: feedback {p_fb} > serviceq {p_sq}"
        );
        fail(&fb, 0, 1);
        fail(&sq, 0, 1);
    }
}

#[test]
fn recovered_node_regains_half_its_share_within_two_half_lives() {
    for n in [3, 8] {
        let (r, clock) = equal(n, Algorithm::Feedback);
        fail(&r, 0, 1000);
        assert!(r.selection_probabilities()[0] < 0.01 / n as f64);
        clock.advance(2 * HALF_LIFE);
        let p = r.selection_probabilities()[0];
        assert!(p >= 0.5 / n as f64, "n = {n}: {p}");
        assert!((r.error_score(0) - 0.9).abs() < 1e-3);
    }
}

#[test]
fn success_lowers_score_gradually() {
    let (r, _) = equal(3, Algorithm::Feedback);
    fail(&r, 0, 3);
    assert!((r.error_score(0) - 3.0).abs() < 1e-4);
    let mut previous = r.error_score(0);
    for _ in 0..5 {
        succeed(&r, 0, MS);
        let score = r.error_score(0);
        assert!(score > 0.0 && (score - previous * 0.8).abs() < 1e-3);
        previous = score;
    }
    // After 5 successes a node that failed 3 times is still below full health.
    assert!(r.error_rate(0) > 0.0);
    for _ in 0..200 {
        succeed(&r, 0, MS);
    }
    assert_eq!(r.error_score(0), 0.0);
}

#[test]
fn score_decays_with_time() {
    let (r, clock) = equal(3, Algorithm::Feedback);
    fail(&r, 0, 2);
    clock.advance(HALF_LIFE);
    assert!((r.error_score(0) - 1.0).abs() < 1e-3);
    clock.advance(HALF_LIFE);
    assert!((r.error_score(0) - 0.5).abs() < 1e-3);
    // A failure now adds to the decayed score, not to the old one.
    fail(&r, 0, 1);
    assert!((r.error_score(0) - 1.5).abs() < 1e-3);
}

#[test]
fn score_is_capped() {
    let (r, _) = equal(3, Algorithm::Feedback);
    fail(&r, 0, 50);
    assert!((r.error_score(0) - SCORE_CAP).abs() < 1e-3);
}

#[test]
fn zero_half_life_forgets_at_once() {
    let clock = Arc::new(ManualClock::new());
    let settings = RouterSettings {
        algorithm: Algorithm::Feedback,
        decay_half_life: Duration::ZERO,
    };
    let r = Router::new(&[1, 1], settings, clock.clone());
    fail(&r, 0, 2);
    assert!((r.error_score(0) - 2.0).abs() < 1e-3);
    clock.advance(Duration::from_micros(1));
    assert_eq!(r.error_score(0), 0.0);
}

// --- feedback: spreading traffic ---

#[test]
fn healthy_traffic_spreads_within_five_percent() {
    for n in [3, 8] {
        let (r, _) = equal(n, Algorithm::Feedback);
        let got = shares(&r, 100_000, 42, |node| succeed(&r, node, MS));
        for (node, share) in got.iter().enumerate() {
            let fair = 1.0 / n as f64;
            assert!(
                (share - fair).abs() <= 0.05 * fair,
                "n = {n}, node {node}: {share}"
            );
        }
    }
}

#[test]
fn weighted_nodes_get_traffic_in_proportion() {
    let (r, _) = router(&[1, 2], Algorithm::Feedback);
    let got = shares(&r, 100_000, 9, |node| succeed(&r, node, MS));
    assert!((got[0] - 1.0 / 3.0).abs() < 0.01, "{got:?}");
    assert!((got[1] - 2.0 / 3.0).abs() < 0.01, "{got:?}");
}

#[test]
fn zero_weight_node_is_used_only_when_nothing_else_is_left() {
    let (r, _) = router(&[0, 1], Algorithm::Feedback);
    assert_eq!(r.selection_probabilities(), vec![0.0, 1.0]);
    assert_eq!(r.select(&[], 0.99), Some(1));
    assert_eq!(r.select(&[1], 0.5), Some(0));
}

#[test]
fn slow_node_gets_less_traffic() {
    let (r, clock) = equal(3, Algorithm::Feedback);
    let got = shares(&r, 30_000, 3, |node| {
        let elapsed = if node == 0 { 10 * MS } else { MS };
        succeed(&r, node, elapsed);
        clock.advance(Duration::from_micros(100));
    });
    // Cost 10× its peers: about 1/21 of the traffic.
    assert!(got[0] < 0.07, "{got:?}");
    assert!(got[0] > 0.02, "slow is not dead: {got:?}");
}

#[test]
fn node_without_latency_sample_is_costed_at_the_mean() {
    let (r, _) = equal(3, Algorithm::Feedback);
    succeed(&r, 0, MS);
    succeed(&r, 1, 3 * MS);
    let p = r.selection_probabilities();
    // Latencies 1, 3 and (mean) 2 ms.
    let total = 1.0 + 1.0 / 3.0 + 0.5;
    assert!((p[2] - 0.5 / total).abs() < 1e-9, "{p:?}");
}

#[test]
fn in_flight_attempts_raise_a_nodes_cost() {
    let (r, _) = equal(2, Algorithm::Feedback);
    succeed(&r, 0, MS);
    succeed(&r, 1, MS);
    r.start(0);
    r.start(0);
    r.start(0);
    let p = r.selection_probabilities();
    assert!((p[0] - 0.2).abs() < 1e-9, "{p:?}"); // 1/4 against 1/1
    assert_eq!(r.inflight(0), 3);
}

#[test]
fn stalled_node_loses_traffic_before_any_timeout() {
    let (r, clock) = equal(3, Algorithm::Feedback);
    let mut rng = fastrand::Rng::with_seed(11);
    // 50 ms of traffic, one request every 100 µs; node 2 never answers.
    for _ in 0..500 {
        let node = r.select(&[], rng.f64()).expect("a node");
        r.start(node);
        if node != 2 {
            r.finish(node, Outcome::Success, MS);
        }
        clock.advance(Duration::from_micros(100));
    }
    assert!(r.inflight(2) > 0);
    let p = r.selection_probabilities()[2];
    assert!(p < 0.01, "{p}");
    // Even a single hung attempt is enough once it is older than the stall threshold.
    let (r, clock) = equal(3, Algorithm::Feedback);
    r.start(2);
    clock.advance(Duration::from_millis(50));
    assert!(r.selection_probabilities()[2] < 0.01);
}

#[test]
fn busy_node_is_not_stalled_while_it_makes_progress() {
    let (r, clock) = equal(2, Algorithm::Feedback);
    succeed(&r, 0, MS);
    succeed(&r, 1, MS);
    r.start(0);
    clock.advance(Duration::from_millis(3));
    // Below max(1 ms, 4 × 1 ms): only the in-flight term applies (cost 2 vs 1).
    let p = r.selection_probabilities();
    assert!((p[0] - 1.0 / 3.0).abs() < 1e-9, "{p:?}");
}

#[test]
fn stalled_node_gets_no_new_attempts_while_another_node_is_fine() {
    let (r, clock) = equal(3, Algorithm::Feedback);
    for node in 0..3 {
        succeed(&r, node, MS);
    }
    r.start(1);
    clock.advance(Duration::from_millis(5));
    let p = r.selection_probabilities();
    assert!(p[1] < 1e-6, "{p:?}");
    // As a retry with both healthy nodes tried, the stalled node is still a candidate.
    assert_eq!(r.select(&[0, 2], 0.5), Some(1));
    // Its first completion clears the stall.
    r.finish(1, Outcome::Success, Duration::from_millis(5));
    let p = r.selection_probabilities();
    assert!(p[1] > 0.05, "{p:?}");
}

#[test]
fn node_whose_late_answers_inflated_its_latency_regains_traffic_through_time() {
    let (r, clock) = equal(3, Algorithm::Feedback);
    for node in 0..3 {
        succeed(&r, node, MS);
    }
    // Requests stuck for 2 s on node 1 complete at once when it resumes.
    r.start(1);
    r.finish(1, Outcome::Success, Duration::from_secs(2));
    assert!(r.selection_probabilities()[1] < 0.01);
    // No traffic luck: nobody sends it anything for three seconds, peers keep sampling.
    for _ in 0..300 {
        clock.advance(Duration::from_millis(10));
        succeed(&r, 0, MS);
        succeed(&r, 2, MS);
    }
    let p = r.selection_probabilities();
    assert!(p[1] > 0.5 / 3.0, "{p:?}");
}

// --- retries ---

#[test]
fn retry_never_picks_a_tried_node() {
    for algorithm in [Algorithm::Feedback, Algorithm::Serviceq] {
        let n = 20;
        let (r, _) = equal(n, algorithm);
        fail(&r, 3, 2);
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..200 {
            let mut tried = Vec::new();
            while let Some(node) = r.select(&tried, rng.f64()) {
                assert!(!tried.contains(&node), "{algorithm:?}: {node} in {tried:?}");
                tried.push(node);
            }
            tried.sort_unstable();
            assert_eq!(tried, (0..n).collect::<Vec<_>>(), "{algorithm:?}");
        }
    }
}

#[test]
fn select_is_none_when_every_node_is_tried() {
    for algorithm in [Algorithm::Feedback, Algorithm::Serviceq] {
        let (r, _) = equal(3, algorithm);
        assert_eq!(r.select(&[2, 0, 1], 0.3), None);
        assert_eq!(r.select(&[1, 1, 0, 2, 7], 0.3), None);
        let (empty, _) = equal(0, algorithm);
        assert!(empty.is_empty());
        assert_eq!(empty.select(&[], 0.3), None);
        assert!(empty.selection_probabilities().is_empty());
    }
}

#[test]
fn feedback_retry_weighs_untried_nodes_like_the_first_attempt() {
    let (r, _) = router(&[1, 1, 3], Algorithm::Feedback);
    let mut rng = fastrand::Rng::with_seed(1);
    let mut hits = [0usize; 3];
    for _ in 0..40_000 {
        hits[r.select(&[0], rng.f64()).expect("a node")] += 1;
    }
    assert_eq!(hits[0], 0);
    let share2 = hits[2] as f64 / 40_000.0;
    assert!((share2 - 0.75).abs() < 0.01, "{hits:?}");
}

#[test]
fn buffered_and_two_pass_draws_pick_the_same_node() {
    let mut rng = fastrand::Rng::with_seed(3);
    for _ in 0..2_000 {
        let n = rng.usize(1..=64);
        let weights: Vec<f64> = (0..n)
            .map(|_| if rng.u8(..) < 40 { 0.0 } else { rng.f64() })
            .collect();
        let tried_list: Vec<usize> = (0..rng.usize(0..=n)).map(|_| rng.usize(..n)).collect();
        let tried = Tried::new(&tried_list, n);
        for rand in [rng.f64(), 0.0, 1.0] {
            assert_eq!(
                draw_buffered::<64>(n, &tried, rand, |i| weights[i]),
                draw_two_pass(n, &tried, rand, |i| weights[i]),
                "{weights:?} {tried_list:?} {rand}"
            );
        }
    }
}

#[test]
fn clusters_beyond_the_buffer_draw_correctly() {
    let mut weights = vec![1; 1500];
    weights[1200] = 1499;
    let (r, _) = router(&weights, Algorithm::Feedback);
    let got = shares(&r, 5_000, 8, |node| succeed(&r, node, MS));
    assert!((got[1200] - 0.5).abs() < 0.03, "{}", got[1200]);
    let tried: Vec<usize> = (0..1500).filter(|&i| i != 700).collect();
    assert_eq!(r.select(&tried, 0.99), Some(700));
}

#[test]
fn long_retry_chains_over_many_nodes_use_the_bitmap() {
    let (r, _) = equal(100, Algorithm::Feedback);
    let tried: Vec<usize> = (0..99).collect();
    assert_eq!(r.select(&tried, 0.7), Some(99));
}

#[test]
fn out_of_range_input_is_ignored() {
    let (r, _) = equal(2, Algorithm::Feedback);
    r.start(5);
    r.finish(5, Outcome::Failure, MS);
    r.finish(0, Outcome::Success, MS); // finish without start
    assert_eq!((r.inflight(0), r.inflight(5)), (0, 0));
    assert_eq!((r.error_score(9), r.error_rate(9)), (0.0, 0.0));
    for rand in [f64::NAN, -1.0, 1.0, f64::INFINITY] {
        assert!(r.select(&[usize::MAX], rand).is_some());
    }
    let (sq, _) = equal(2, Algorithm::Serviceq);
    assert!(sq.select(&[usize::MAX], 0.5).is_some());
    assert_eq!(sq.select(&[], 1.0), Some(1));
}

// --- reload ---

#[test]
fn reload_carries_state_of_kept_nodes() {
    let (old, clock) = equal(3, Algorithm::Feedback);
    fail(&old, 0, 3);
    succeed(&old, 2, 4 * MS);
    old.start(2); // in flight across the reload
    let new = Router::with_carried_state(
        &[1, 1],
        old.settings(),
        clock.clone(),
        &old,
        &[Some(2), Some(0)],
    );
    assert_eq!(new.len(), 2);
    assert_eq!(new.inflight(0), 1);
    assert_eq!(new.latency(0), Some(4 * MS));
    assert!((new.error_score(1) - 3.0).abs() < 1e-3);
    // The attempt started before the reload finishes on the old router; the new one sees it.
    old.finish(2, Outcome::Success, MS);
    assert_eq!(new.inflight(0), 0);
    // Unmapped, out-of-range and duplicate carries are handled.
    let other = Router::with_carried_state(
        &[1, 1, 1, 1],
        old.settings(),
        clock,
        &old,
        &[None, Some(9), Some(0)],
    );
    assert_eq!(other.error_score(0), 0.0);
    assert_eq!(other.error_score(1), 0.0);
    assert!((other.error_score(2) - 3.0).abs() < 1e-3);
    assert_eq!(other.error_score(3), 0.0);
    let dup = Router::with_carried_state(
        &[1, 1],
        old.settings(),
        Arc::new(ManualClock::new()),
        &old,
        &[Some(0), Some(0)],
    );
    assert!((dup.error_score(1) - 3.0).abs() < 1e-3);
}

#[test]
fn reload_can_switch_algorithm_and_keep_counts() {
    let (old, clock) = equal(2, Algorithm::Feedback);
    fail(&old, 1, 4);
    let settings = RouterSettings {
        algorithm: Algorithm::Serviceq,
        decay_half_life: HALF_LIFE,
    };
    let new = Router::with_carried_state(&[1, 1], settings, clock, &old, &[Some(0), Some(1)]);
    assert_eq!(new.error_score(1), 4.0);
}

// --- concurrency ---

#[test]
fn concurrent_traffic_keeps_counts_consistent() {
    for algorithm in [Algorithm::Feedback, Algorithm::Serviceq] {
        let r = Arc::new(Router::new(
            &[1, 2, 1, 3, 1, 1, 1, 1],
            RouterSettings {
                algorithm,
                decay_half_life: Duration::from_millis(50),
            },
            Arc::new(SystemClock::new()),
        ));
        let failures_on_7: usize = thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|t| {
                    let r = Arc::clone(&r);
                    s.spawn(move || {
                        let mut rng = fastrand::Rng::with_seed(t);
                        let mut failures_on_7 = 0;
                        for _ in 0..20_000 {
                            let mut tried = Vec::new();
                            while let Some(node) = r.select(&tried, rng.f64()) {
                                tried.push(node);
                                r.start(node);
                                // Node 7 only ever fails, so its ServiceQ counter must count
                                // every failure exactly.
                                if node == 7 || rng.u8(..) < 20 {
                                    failures_on_7 += usize::from(node == 7);
                                    r.finish(node, Outcome::Failure, MS);
                                } else {
                                    r.finish(node, Outcome::Success, MS);
                                    break;
                                }
                            }
                        }
                        failures_on_7
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("worker panicked"))
                .sum()
        });
        for node in 0..r.len() {
            assert_eq!(r.inflight(node), 0, "{algorithm:?} node {node}");
            let score = r.error_score(node);
            assert!(score >= 0.0 && score.is_finite());
        }
        if algorithm == Algorithm::Serviceq {
            assert_eq!(r.error_score(7), failures_on_7 as f64);
        }
        let total: f64 = r.selection_probabilities().iter().sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
}

#[test]
fn node_that_finishes_nothing_while_its_peers_finish_many_is_stalled() {
    // Latency estimates inflated by queueing (100 ms) would delay a time-based verdict; the
    // peers' progress does not wait for it.
    let (r, clock) = equal(3, Algorithm::Feedback);
    for node in 0..3 {
        succeed(&r, node, Duration::from_millis(100));
    }
    r.start(1);
    clock.advance(Duration::from_millis(1));
    assert!(r.selection_probabilities()[1] > 0.1);
    for _ in 0..5 {
        succeed(&r, 0, Duration::from_millis(100));
        succeed(&r, 2, Duration::from_millis(100));
    }
    let p = r.selection_probabilities();
    assert!(p[1] < 1e-6, "{p:?}");
}

#[test]
fn stalled_for_reports_the_same_judgement_as_the_weights() {
    let (r, clock) = equal(3, Algorithm::Feedback);
    for node in 0..3 {
        succeed(&r, node, MS);
    }
    assert_eq!(r.stalled_for(1), None, "idle is never stalled");
    r.start(1);
    clock.advance(Duration::from_millis(3));
    assert_eq!(r.stalled_for(1), None, "within 4 × latency");
    clock.advance(Duration::from_millis(2));
    assert_eq!(r.stalled_for(1), Some(Duration::from_millis(5)));
    assert!(r.selection_probabilities()[1] < 1e-6);
    // Serviceq routing does not use the judgement, but it is still made.
    let (r, clock) = equal(2, Algorithm::Serviceq);
    r.start(0);
    clock.advance(Duration::from_millis(50));
    assert!(r.stalled_for(0).is_some());
}

#[test]
fn an_abandoned_attempt_is_a_failure_but_not_progress() {
    let (r, clock) = equal(2, Algorithm::Feedback);
    succeed(&r, 0, MS);
    succeed(&r, 1, MS);
    r.start(1);
    r.start(1);
    clock.advance(Duration::from_millis(20));
    let before = r.error_score(1);
    r.finish_stalled(1, Duration::from_millis(20));
    assert_eq!(r.inflight(1), 1);
    assert!(r.error_score(1) > before);
    // Still stalled: the other stuck attempt may be abandoned too.
    assert!(r.stalled_for(1).is_some());
    r.finish_stalled(1, Duration::from_millis(20));
    assert_eq!(r.inflight(1), 0);
    assert_eq!(r.stalled_for(1), None);
}

#[test]
fn aborts_need_more_evidence_than_steering() {
    let ms20 = Duration::from_millis(20);
    let (r, clock) = equal(3, Algorithm::Feedback);
    for node in 0..3 {
        succeed(&r, node, MS);
    }
    r.start(1);
    clock.advance(Duration::from_millis(30));
    assert!(r.stalled_for(1).is_some(), "steered away already");
    assert!(!r.should_abort(1, ms20), "no peer answered meanwhile");
    // Its peers answer many requests while it answers none: comparative evidence.
    for _ in 0..9 {
        succeed(&r, 0, MS);
    }
    assert!(r.should_abort(1, ms20));
    assert!(
        !r.should_abort(1, Duration::from_millis(40)),
        "not that old"
    );
    // A quiet gateway: silence for 4 × the abort age is enough on its own.
    let (r, clock) = equal(2, Algorithm::Feedback);
    succeed(&r, 0, MS);
    succeed(&r, 1, MS);
    r.start(1);
    clock.advance(Duration::from_millis(79));
    assert!(!r.should_abort(1, ms20));
    clock.advance(Duration::from_millis(1));
    assert!(r.should_abort(1, ms20));
}

#[test]
fn no_abort_when_no_other_node_could_take_the_attempt() {
    let ms20 = Duration::from_millis(20);
    let (r, clock) = equal(2, Algorithm::Feedback);
    succeed(&r, 1, MS);
    fail(&r, 0, 20);
    r.start(1);
    clock.advance(Duration::from_millis(100));
    assert!(r.error_rate(0) >= 0.5);
    assert!(!r.should_abort(1, ms20), "the only other node is down");
    // Both stuck: neither is aborted in favour of the other.
    let (r, clock) = equal(2, Algorithm::Feedback);
    r.start(0);
    r.start(1);
    clock.advance(Duration::from_millis(100));
    assert!(!r.should_abort(0, ms20) && !r.should_abort(1, ms20));
}

#[test]
fn abandoned_attempts_raise_the_routing_latency_but_not_the_answered_one() {
    let (r, clock) = equal(2, Algorithm::Feedback);
    succeed(&r, 0, MS);
    succeed(&r, 1, MS);
    r.start(1);
    clock.advance(Duration::from_millis(100));
    r.finish_stalled(1, Duration::from_millis(100));
    assert_eq!(r.latency(1), Some(Duration::from_millis(100)));
    assert_eq!(r.answered_latency(1), Some(MS));
}

#[test]
fn a_node_failing_its_health_check_gets_no_attempt_while_another_passes() {
    let clock = Arc::new(ManualClock::new());
    let mut r = Router::new(&[1, 1, 1], RouterSettings::default(), clock);
    r.set_health_checked(true);
    assert!(r.set_down(1, true));
    assert!(!r.set_down(1, true), "no change the second time");
    for i in 0..1000 {
        let rand = f64::from(i) / 1000.0;
        assert_ne!(r.select(&[], rand), Some(1), "rand {rand}");
        // A retry after node 0 failed still avoids it while node 2 is left.
        assert_eq!(r.select(&[0], rand), Some(2));
    }
    // Every other node tried: the failing one is the last resort.
    assert_eq!(r.select(&[0, 2], 0.5), Some(1));
    assert_eq!(r.selection_probabilities()[1], 0.0);
    // All down: the rule steps aside.
    r.set_down(0, true);
    r.set_down(2, true);
    assert!(r.select(&[], 0.5).is_some());
    assert!(r.selection_probabilities().iter().all(|p| *p > 0.0));
    // Without health checks the flag is ignored.
    r.set_down(0, false);
    r.set_down(2, false);
    r.set_health_checked(false);
    let picked: std::collections::BTreeSet<_> = (0..100)
        .filter_map(|i| r.select(&[], f64::from(i) / 100.0))
        .collect();
    assert_eq!(picked.len(), 3);
}
