//! Queue hand-over on a zero-downtime upgrade.
//!
//! A successor started with `weir run -u` listens on a unix socket next to Pingora's upgrade
//! socket (`<server.upgrade_sock>.queue`) for a bounded window. When the old process shuts
//! down, each queue's replay stops taking new work, lets deliveries in flight finish, and, if a
//! successor answers on that socket, sends it every request still queued, in queue order, as
//! the queue log's records (bytes as they are, with a checksum), then waits for `ok <n>`. The
//! successor reads and checks everything before it takes anything (all or nothing). Only after that acknowledgement are the requests the
//! successor's; if anything fails they are put back and the old process carries on as it would
//! without a successor (replay through the grace period, then a report of what is left).
//! Both sides log the count; queue ids, attempts, age (for the TTL) and last errors travel with
//! the requests, so a client's `X-Weir-Queue-Id` stays valid across the upgrade.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::{unix_ms, ExportedRequest, Queue, QueueId, QueueKind, QueuedRequest, Queues};

/// How long a successor accepts hand-overs after it starts (the old process gets SIGQUIT
/// within Pingora's 5 s fd hand-over, then lingers 5 s before its shutdown begins).
pub const WINDOW: Duration = Duration::from_secs(60);
/// How long the old process waits for the successor's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest hand-over accepted (a memory queue's bytes are bounded by its `max_bytes`).
const MAX_HANDOVER: usize = 64 << 30;

/// The hand-over socket for a given Pingora upgrade socket.
pub fn socket_path(upgrade_sock: &Path) -> PathBuf {
    let mut p = upgrade_sock.as_os_str().to_owned();
    p.push(".queue");
    PathBuf::from(p)
}

/// A queued request rebuilt from its exported form (in the successor).
pub fn import(e: ExportedRequest) -> Result<QueuedRequest, String> {
    let id = u64::from_str_radix(&e.id, 16).map_err(|_| format!("bad queue id {:?}", e.id))?;
    let method = http::Method::from_bytes(e.method.as_bytes())
        .map_err(|_| format!("bad method {:?}", e.method))?;
    let mut headers = BytesMut::new();
    for (name, value) in &e.headers {
        headers.put_slice(name.as_bytes());
        headers.put_slice(b": ");
        headers.put_slice(value.as_bytes());
        headers.put_slice(b"\r\n");
    }
    let ip = e.client_ip.as_deref().and_then(|s| s.parse().ok());
    let client = restore_client(
        e.request_id.as_bytes(),
        e.traceparent.as_bytes(),
        ip,
        e.tls,
        e.trace_started_here,
    );
    let enqueued = enqueued_at(e.enqueued_unix_ms);
    Ok(QueuedRequest {
        id: QueueId(id),
        method,
        target: Bytes::from(e.target.into_bytes()),
        headers: headers.freeze(),
        client,
        body: Bytes::from(e.body),
        enqueued,
        enqueued_unix_ms: e.enqueued_unix_ms,
        attempts: e.attempts,
        replay_safe: e.replay_safe,
        last_error: e.last_error.map(String::into_boxed_str),
        cluster: e.cluster.map(std::sync::Arc::from),
    })
}

/// The tokio instant of an arrival at `unix_ms`: the age carries over, so the TTL counts from
/// the original arrival.
pub fn enqueued_at(unix_ms_at: u64) -> Instant {
    let age = Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(unix_ms_at));
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

/// The client side of a queued request that was stored: the ids as the client got them; a
/// missing or unusable one (an older process's export) is made anew as on arrival.
pub fn restore_client(
    request_id: &[u8],
    traceparent: &[u8],
    ip: Option<std::net::IpAddr>,
    tls: bool,
    trace_started_here: bool,
) -> crate::forward::Client {
    let mut ids = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(request_id) {
        ids.insert(crate::forward::X_REQUEST_ID, v);
    }
    if let Ok(v) = http::HeaderValue::from_bytes(traceparent) {
        ids.insert(crate::forward::trace::TRACEPARENT, v);
    }
    let mut client = crate::forward::Client::capture(&ids, ip, tls);
    client.trace_started_here |= trace_started_here;
    client
}

/// Old process: offers `entries` of `kind` to a successor. `Ok(n)` once the successor
/// acknowledged all `n`; `Err` (nothing taken over) when there is no successor or it failed.
pub async fn offer(
    path: &Path,
    kind: QueueKind,
    entries: &[QueuedRequest],
) -> Result<usize, String> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|e| format!("no successor on {}: {e}", path.display()))?;
    let send = async {
        let mut out = Vec::with_capacity(64 + entries.iter().map(|e| e.size() + 64).sum::<usize>());
        out.extend_from_slice(kind.label().as_bytes());
        out.push(b'\n');
        for e in entries {
            super::journal::frame(&mut out, &super::journal::encode_push(e));
        }
        stream.write_all(&out).await.map_err(|e| e.to_string())?;
        stream.shutdown().await.map_err(|e| e.to_string())?;
        let mut ack = String::new();
        stream
            .read_to_string(&mut ack)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(ack)
    };
    let ack = tokio::time::timeout(ACK_TIMEOUT, send)
        .await
        .map_err(|_| "the successor did not acknowledge in time".to_string())??;
    match ack.trim().strip_prefix("ok ").map(str::parse::<usize>) {
        Some(Ok(n)) if n == entries.len() => Ok(n),
        _ => Err(format!("unexpected acknowledgement {ack:?}")),
    }
}

/// Successor: accepts hand-overs for [`WINDOW`], importing each request at the tail of its
/// queue. Requests that do not fit are logged one by one (never dropped silently).
pub async fn receive(path: PathBuf, queues: Arc<Queues>) {
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            log::error!("queue hand-over: cannot listen on {}: {e}", path.display());
            return;
        }
    };
    let receiving = |on: bool| {
        for q in [&queues.deferred, &queues.upfront] {
            q.receiving_handover
                .store(on, std::sync::atomic::Ordering::Release);
        }
    };
    receiving(true);
    let until = tokio::time::Instant::now() + WINDOW;
    while let Ok(Ok((stream, _))) = tokio::time::timeout_at(until, listener.accept()).await {
        let queues = queues.clone();
        tokio::spawn(async move {
            if let Err(e) = take_over(stream, &queues).await {
                log::error!("queue hand-over failed (nothing taken over): {e}");
            }
        });
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
    receiving(false);
}

/// Reads the whole hand-over and checks every entry before taking any (all or nothing).
async fn take_over(stream: UnixStream, queues: &Queues) -> Result<(), String> {
    let (read, mut write) = stream.into_split();
    let mut data = Vec::new();
    read.take(MAX_HANDOVER as u64 + 1)
        .read_to_end(&mut data)
        .await
        .map_err(|e| e.to_string())?;
    if data.len() > MAX_HANDOVER {
        return Err("hand-over larger than its limit".into());
    }
    let nl = data
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no queue name")?;
    let queue: &Queue = match &data[..nl] {
        b"deferred" => &queues.deferred,
        b"upfront" => &queues.upfront,
        other => {
            return Err(format!(
                "unknown queue {:?}",
                String::from_utf8_lossy(other)
            ))
        }
    };
    let mut entries = Vec::new();
    let mut at = nl + 1;
    while at < data.len() {
        let (payload, next) = super::journal::record_at(&data, at)?;
        entries.push(super::journal::decode(payload)?);
        at = next;
    }
    let mut taken = 0usize;
    let mut refused = 0usize;
    let n = entries.len();
    for req in entries {
        let (id, method, target) = (req.id, req.method.clone(), req.target.clone());
        match queue.push(req).await {
            Ok(_) => taken += 1,
            Err(e) => {
                refused += 1;
                let why = match e {
                    super::PushError::Full(_) => "the queue is full".to_string(),
                    super::PushError::Unavailable(_, e) => e,
                };
                log::error!(
                    "queue={} id={id} {method} {} handed over but not kept: {why}",
                    queue.kind.label(),
                    String::from_utf8_lossy(&target)
                );
            }
        }
    }
    log::warn!(
        "queue={} took over {taken} queued requests from the previous process{}",
        queue.kind.label(),
        if refused > 0 {
            format!(" ({refused} could not be kept and were logged)")
        } else {
            String::new()
        }
    );
    queue.signal_recovery();
    write
        .write_all(format!("ok {n}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn exported(id: &str, target: &str) -> ExportedRequest {
        ExportedRequest {
            id: id.into(),
            method: "POST".into(),
            target: target.into(),
            headers: vec![("x-a".into(), "1".into())],
            body: b"body".to_vec(),
            enqueued_unix_ms: unix_ms(SystemTime::now()) - 1_000,
            attempts: 2,
            replay_safe: false,
            last_error: Some("connect refused".into()),
            client_ip: Some("203.0.113.7".into()),
            tls: true,
            request_id: "req-1".into(),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            trace_started_here: true,
            cluster: None,
        }
    }

    #[test]
    fn an_imported_request_keeps_its_id_attempts_and_age() {
        let req = import(exported("00000a0000000007", "/x?y")).expect("valid");
        assert_eq!(req.id, QueueId(0xa0000000007));
        assert_eq!(req.id.to_string(), "00000a0000000007");
        assert_eq!(&req.target[..], b"/x?y");
        assert_eq!(&req.headers[..], b"x-a: 1\r\n");
        assert_eq!(req.client.ip, Some("203.0.113.7".parse().unwrap()));
        assert!(req.client.tls && req.client.trace_started_here);
        assert_eq!(req.client.request_id, "req-1");
        assert_eq!(
            req.client.traceparent,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(req.attempts, 2);
        assert!(req.enqueued.elapsed() >= Duration::from_millis(900));
        assert!(import(exported("zz", "/")).is_err());
    }

    #[tokio::test]
    async fn requests_offered_to_a_successor_arrive_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_path(&dir.path().join("up.sock"));
        let metrics = Metrics::new();
        let queues = Arc::new(Queues::memory(8, 8, &metrics));
        let receiver = tokio::spawn(receive(path.clone(), queues.clone()));
        while !path.exists() {
            tokio::task::yield_now().await;
        }
        let entries: Vec<_> = (1..=3)
            .map(|i| import(exported(&format!("{i:016x}"), &format!("/r{i}"))).expect("valid"))
            .collect();
        let n = offer(&path, QueueKind::Deferred, &entries)
            .await
            .expect("taken");
        assert_eq!(n, 3);
        let got: Vec<_> = queues
            .deferred
            .drain()
            .into_iter()
            .map(|e| String::from_utf8_lossy(&e.target).into_owned())
            .collect();
        assert_eq!(got, ["/r1", "/r2", "/r3"]);
        receiver.abort();
    }

    #[tokio::test]
    async fn a_corrupt_hand_over_takes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_path(&dir.path().join("bad.sock"));
        let metrics = Metrics::new();
        let queues = Arc::new(Queues::memory(8, 8, &metrics));
        let receiver = tokio::spawn(receive(path.clone(), queues.clone()));
        while !path.exists() {
            tokio::task::yield_now().await;
        }
        let good = import(exported("00000000000000a1", "/a")).expect("valid");
        let mut out = b"deferred\n".to_vec();
        crate::queue::journal::frame(&mut out, &crate::queue::journal::encode_push(&good));
        crate::queue::journal::frame(&mut out, &crate::queue::journal::encode_push(&good));
        // Corrupt the second record's payload: its checksum no longer matches.
        let last = out.len() - 1;
        out[last] ^= 0xff;
        let mut s = UnixStream::connect(&path).await.expect("connect");
        s.write_all(&out).await.expect("write");
        s.shutdown().await.expect("shutdown");
        let mut ack = String::new();
        s.read_to_string(&mut ack).await.expect("read");
        assert_eq!(ack, "", "no acknowledgement for a corrupt hand-over");
        assert_eq!(queues.deferred.len(), 0, "all or nothing");
        receiver.abort();
    }

    #[tokio::test]
    async fn without_a_successor_the_offer_fails_and_nothing_is_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_path(&dir.path().join("none.sock"));
        let one = import(exported("1", "/")).expect("valid");
        let e = offer(&path, QueueKind::Deferred, &[one]).await;
        assert!(e.is_err());
    }
}
