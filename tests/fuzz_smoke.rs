//! The fuzz targets on stable, in the normal test suite: every file of the committed corpus and
//! seeds (`fuzz/corpus/<target>/`, `fuzz/seeds/<target>/`) through its `weir::fuzzing` entry,
//! then mutations of them (byte flips, insertions, deletions, splices) from a fixed seed, for
//! a bounded count and at most `BUDGET` per target. A panic fails the test with the input that
//! caused it. The long runs are `scripts/fuzz` (cargo-fuzz, nightly).

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

/// The most mutations per target.
const MUTATIONS: usize = 20_000;
/// The most time the mutations of one target may take (a busy 2-core CI machine included).
const BUDGET: Duration = Duration::from_secs(10);
/// The largest mutated input.
const MAX_LEN: usize = 8 * 1024;

fn inputs(target: &str) -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "seeds"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if let Ok(bytes) = std::fs::read(&p) {
                files.push(bytes);
            }
        }
    }
    files
}

/// Runs `input` through `target`; a panic fails the test, naming the input.
fn run(name: &str, target: fn(&[u8]), input: &[u8], what: &str) {
    if let Err(cause) = panic::catch_unwind(AssertUnwindSafe(|| target(input))) {
        let why = cause
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| cause.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        panic!(
            "fuzz target {name} panicked on {what}: {why}\ninput ({} bytes): {:?}",
            input.len(),
            String::from_utf8_lossy(input)
        );
    }
}

/// One mutation of `base` (another corpus file `other` for splices).
fn mutate(rng: &mut fastrand::Rng, base: &[u8], other: &[u8], dict: &[&[u8]]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.usize(1..=4) {
        let at = rng.usize(..=v.len());
        match rng.u8(..6) {
            0 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] ^= 1 << rng.u8(..8);
            }
            1 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] = rng.u8(..);
            }
            2 => v.insert(at, rng.u8(..)),
            3 if !v.is_empty() => {
                let end = (at + rng.usize(1..=8)).min(v.len());
                v.drain(at.min(end)..end);
            }
            4 if !other.is_empty() => {
                let from = rng.usize(..other.len());
                let len = rng.usize(1..=(other.len() - from).min(64));
                v.splice(at..at, other[from..from + len].iter().copied());
            }
            _ => {
                let word = dict[rng.usize(..dict.len())];
                v.splice(at..at, word.iter().copied());
            }
        }
    }
    v.truncate(MAX_LEN);
    v
}

fn smoke(name: &str, target: fn(&[u8]), dict: &[&[u8]]) {
    let files = inputs(name);
    assert!(!files.is_empty(), "no corpus for {name} under fuzz/");
    for (i, f) in files.iter().enumerate() {
        run(name, target, f, &format!("corpus file {i}"));
    }
    let mut rng = fastrand::Rng::with_seed(0x5eed_f0e1);
    let started = Instant::now();
    let mut done = 0;
    while done < MUTATIONS && started.elapsed() < BUDGET {
        let base = &files[rng.usize(..files.len())];
        let other = &files[rng.usize(..files.len())];
        let input = mutate(&mut rng, base, other, dict);
        run(name, target, &input, &format!("mutation {done}"));
        done += 1;
    }
    eprintln!(
        "{name}: {} corpus files, {done} mutations in {:?}",
        files.len(),
        started.elapsed()
    );
}

#[test]
fn properties_target_holds_over_its_corpus_and_mutations() {
    smoke(
        "properties",
        weir::fuzzing::properties,
        &[
            b"=",
            b"\n",
            b",",
            b"ENDPOINTS=",
            b"PROTO=https\n",
            b"SSL_ENABLE=true\n",
            b"|",
        ],
    );
}

#[test]
fn yaml_target_holds_over_its_corpus_and_mutations() {
    smoke(
        "yaml",
        weir::fuzzing::yaml,
        &[
            b": ",
            b"\n  - ",
            b"{",
            b"}",
            b"[",
            b"]",
            b"tls: true",
            b"~",
            b"&a",
            b"*a",
        ],
    );
}

#[test]
fn formats_target_holds_over_its_corpus_and_mutations() {
    smoke(
        "formats",
        weir::fuzzing::formats,
        &[b" !", b",", b"/*", b"ALL", b"?", b"://", b"\n", b" /"],
    );
}

#[test]
fn request_head_target_holds_over_its_corpus_and_mutations() {
    smoke(
        "request_head",
        weir::fuzzing::request_head,
        &[
            b"\r\n",
            b"Connection: ",
            b"Transfer-Encoding: chunked\r\n",
            b"Content-Length: 3\r\n",
            b"Host: localhost\r\n",
            b", ",
            b"HTTP/1.0",
        ],
    );
}

#[test]
fn registry_entry_target_holds_over_its_corpus_and_mutations() {
    smoke(
        "registry_entry",
        weir::fuzzing::registry_entry,
        &[
            b"\"host\":",
            b"\"port\":",
            b"\"scheme\":\"https\"",
            b"\"weight\":",
            b"[::1]",
            b"65536",
            b",",
            b"}",
        ],
    );
}
