use super::*;

use crate::metrics::Metrics;
use crate::queue::{Queue, QueueKind};

fn entry(id: u64, target: &str, body: &[u8], at_ms: u64) -> QueuedRequest {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-request-id", http::HeaderValue::from_static("req-7"));
    QueuedRequest {
        id: QueueId(id),
        method: http::Method::POST,
        target: Bytes::copy_from_slice(target.as_bytes()),
        headers: Bytes::from_static(b"host: example\r\nx-a: 1\r\n"),
        client: crate::forward::Client::capture(&headers, Some([203, 0, 113, 7].into()), true),
        body: Bytes::copy_from_slice(body),
        enqueued: tokio::time::Instant::now(),
        enqueued_unix_ms: at_ms,
        attempts: 0,
        replay_safe: true,
        last_error: None,
        cluster: None,
    }
}

fn first_segment(dir: &Path) -> PathBuf {
    fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("a segment")
}

fn open(dir: &Path) -> (LogStore, Vec<QueuedRequest>) {
    LogStore::open(dir, Fsync::Always, 1 << 20, 1 << 30, false).expect("open")
}

#[test]
fn a_push_record_reads_back_equal() {
    let e = entry(0xab_0000_0001, "/x?y=1", b"\x00\xffbody", 1_700_000_000_123);
    let back = decode(&encode_push(&e)).expect("decode");
    assert_eq!(back.id, e.id);
    assert_eq!(back.method, e.method);
    assert_eq!(back.target, e.target);
    assert_eq!(back.headers, e.headers);
    assert_eq!(back.body, e.body);
    assert_eq!(back.enqueued_unix_ms, e.enqueued_unix_ms);
    assert_eq!(back.client.ip, e.client.ip);
    assert!(back.client.tls);
    assert_eq!(back.client.request_id, "req-7");
    assert_eq!(back.client.traceparent, e.client.traceparent);
    assert!(back.replay_safe);
}

#[tokio::test]
async fn entries_survive_a_restart_in_order_with_their_attempts() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (log, recovered) = open(dir.path());
        assert!(recovered.is_empty());
        for i in 1..=4u64 {
            log.append(&entry(i, &format!("/{i}"), b"b", 1000 + i))
                .await
                .expect("append");
        }
        log.remove(QueueId(2));
        let mut third = entry(3, "/3", b"b", 1003);
        third.attempts = 5;
        third.last_error = Some("connect refused".into());
        log.update(&third);
        log.sync().await;
        // Dropped without any shutdown: what a kill leaves.
    }
    let (_log, recovered) = open(dir.path());
    let targets: Vec<_> = recovered
        .iter()
        .map(|r| String::from_utf8_lossy(&r.target).into_owned())
        .collect();
    assert_eq!(targets, ["/1", "/3", "/4"]);
    assert_eq!(recovered[1].attempts, 5);
    assert_eq!(recovered[1].last_error.as_deref(), Some("connect refused"));
}

/// A log in `dir` with three synced entries `/1`..`/3` (100-byte bodies), then closed.
async fn write_three(dir: &Path) {
    let (log, _) = open(dir);
    for i in 1..=3u64 {
        log.append(&entry(i, &format!("/{i}"), &[b'x'; 100], 1000 + i))
            .await
            .expect("append");
    }
    log.sync().await;
}

#[tokio::test]
async fn a_torn_tail_is_truncated_and_the_rest_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_three(dir.path()).await;
    // Cut the only segment in the middle of its last record.
    let seg = first_segment(dir.path());
    let len = fs::metadata(&seg).expect("meta").len();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .and_then(|f| f.set_len(len - 40))
        .expect("cut");
    let (_log, recovered) = open(dir.path());
    let targets: Vec<_> = recovered
        .iter()
        .map(|r| String::from_utf8_lossy(&r.target).into_owned())
        .collect();
    assert_eq!(targets, ["/1", "/2"]);
}

#[tokio::test]
async fn a_corrupt_byte_ends_the_segment_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_three(dir.path()).await;
    let seg = first_segment(dir.path());
    let mut data = fs::read(&seg).expect("read");
    let second = record_at(&data, 0).expect("first").1;
    data[second + 20] ^= 0x55;
    fs::write(&seg, &data).expect("write");
    let (_log, recovered) = open(dir.path());
    assert_eq!(recovered.len(), 1, "only the record before the corruption");
}

#[tokio::test]
async fn a_running_owner_is_not_taken_over_except_by_an_upgrade() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, _) = open(dir.path());
    first
        .append(&entry(1, "/1", b"b", 1001))
        .await
        .expect("append");
    let refused = LogStore::open(dir.path(), Fsync::Always, 1 << 20, 1 << 30, false);
    assert!(refused.is_err_and(|e| e.contains("in use by another running weir")));
    let (second, recovered) =
        LogStore::open(dir.path(), Fsync::Always, 1 << 20, 1 << 30, true).expect("upgrade");
    assert!(recovered.is_empty(), "the predecessor still holds it");
    assert!(second.adopting());
    assert!(second.adopt_exited().await.is_empty());
    drop(first);
    let adopted = second.adopt_exited().await;
    assert_eq!(adopted.len(), 1);
    assert!(!second.adopting());
    // Adopted entries are this generation's now: a restart still finds them once.
    drop(second);
    let (_third, recovered) = open(dir.path());
    assert_eq!(recovered.len(), 1);
}

#[tokio::test]
async fn consumed_segments_are_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = LogStore::open(dir.path(), Fsync::Never, 1 << 20, 1 << 30, false).expect("open");
    let body = vec![b'x'; 64 << 10];
    for i in 1..=40u64 {
        log.append(&entry(i, "/", &body, i)).await.expect("append");
    }
    log.sync().await;
    let segments = |d: &Path| {
        fs::read_dir(d)
            .expect("dir")
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .count()
    };
    assert!(
        segments(dir.path()) >= 2,
        "40 x 64 KiB span segments of 1 MiB"
    );
    let before = log.disk_bytes();
    for i in 1..=40u64 {
        log.remove(QueueId(i));
    }
    // One more write makes the writer close the current segment's successor check.
    log.append(&entry(99, "/", b"", 99)).await.expect("append");
    log.sync().await;
    assert_eq!(segments(dir.path()), 1, "only the open segment is left");
    assert!(log.disk_bytes() < before);
}

#[tokio::test]
async fn max_bytes_bounds_the_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Metrics::new();
    let (log, _) =
        LogStore::open(dir.path(), Fsync::Never, 1 << 20, 64 << 10, false).expect("open");
    let q = Queue::logged(
        QueueKind::Deferred,
        1000,
        1 << 30,
        log,
        Vec::new(),
        &metrics,
    );
    let body = vec![b'x'; 10 << 10];
    let mut taken = 0;
    for i in 0..20u64 {
        let mut e = entry(i, "/", &body, i);
        e.id = q.new_id();
        match q.push(e).await {
            Ok(_) => taken += 1,
            Err(crate::queue::PushError::Full(_)) => break,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(taken, 6, "six 10 KiB records fit in 64 KiB");
    assert_eq!(q.len(), 6);
}

#[test]
fn a_push_record_keeps_its_cluster_and_one_without_reads_as_the_default() {
    let mut e = entry(9, "/c", b"x", 5);
    let without = encode_push(&e);
    assert_eq!(decode(&without).expect("decodes").cluster, None);
    e.cluster = Some(std::sync::Arc::from("api"));
    let with = encode_push(&e);
    assert_eq!(
        with.len(),
        without.len() + 4 + 3,
        "a trailing field: what an older log lacks"
    );
    assert_eq!(
        decode(&with).expect("decodes").cluster.as_deref(),
        Some("api")
    );
    // A cut inside the trailing field is a corrupt record, not a default cluster.
    assert!(decode(&with[..with.len() - 1]).is_err());
}
