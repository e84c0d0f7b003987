//! `weir demo` shows the failure path without a command typed: node 3 cycles through crash,
//! hang and pause, the demo's own load goes on, and its report lines show stuck attempts
//! aborted or hedged while the clients see no errors.
//!
//! The demo binds fixed ports (upstreams 9001-9003, admin 9100), so this is the only test
//! that runs it.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use support::ports::free_port;
use support::WEIR;

/// How long the demo may take to show a whole cycle on a busy machine.
const DEADLINE: Duration = Duration::from_secs(90);

/// The number after `label` in a report line (`clients 240 ok 0 err`, `aborted 2`).
fn number_before(line: &str, label: &str) -> Option<u64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[1] == label)
        .and_then(|w| w[0].parse().ok())
}

fn number_after(line: &str, label: &str) -> Option<u64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == label)
        .and_then(|w| w[1].parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_cycles_node_3_through_its_faults_and_clients_see_no_errors() {
    let listen = free_port();
    let mut child = Command::new(WEIR)
        .args(["demo", "--listen", &listen.to_string(), "--phase", "2s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn weir demo");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let end = Instant::now() + DEADLINE;
    let (mut seen, mut ok, mut errors, mut aborted) = (Vec::new(), 0, 0, 0);
    let mut phases = std::collections::BTreeSet::new();
    // Until every fault was shown, a stuck attempt was rescued (aborted, or overtaken by a
    // hedge that won), and a full cycle (12 s) of client traffic went through.
    while !(phases.len() == 3 && aborted > 0 && ok > 500) {
        let left = end.saturating_duration_since(Instant::now());
        let line = match tokio::time::timeout(left, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => panic!("demo output ended ({other:?}) after:\n{}", seen.join("\n")),
        };
        seen.push(line.clone());
        for phase in ["CRASHED", "HUNG", "PAUSING"] {
            if line.starts_with(&format!("weir demo: node3 {phase}")) {
                phases.insert(phase);
            }
        }
        if !line.starts_with("weir demo: clients") {
            continue;
        }
        ok += number_before(&line, "ok").unwrap_or(0);
        errors += number_before(&line, "err,").unwrap_or(0);
        aborted += number_after(&line, "aborted").unwrap_or(0);
        aborted += number_after(&line, "won").unwrap_or(0);
    }
    let _ = child.start_kill();
    assert_eq!(errors, 0, "clients saw errors:\n{}", seen.join("\n"));
}
