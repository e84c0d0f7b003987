//! The queue's hot path and footprint: push + take + finish on the lock-free memory store,
//! single-threaded and with 2 producers + 1 consumer, and the bytes of memory one queued request
//! with a 1 KiB body costs (counted by a wrapping global allocator: the entry's bytes and its
//! share of the queue's blocks); and a push as a client waits for it per storage (memory, the
//! log per fsync policy, Redis against a redis-server the bench starts on loopback).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use weir::config::Fsync;
use weir::metrics::Metrics;
use weir::queue::journal::LogStore;
use weir::queue::memory::MemoryQueue;
use weir::queue::{unix_ms, Queue, QueueKind, QueuedRequest, RequestQueue};

/// Counts live heap bytes so that the footprint of queued requests can be measured.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A request as `proxy::defer::entry` builds it: exact-size target, header block and body,
/// and the client's side of the forwarding headers.
fn request(id: u64, body_len: usize) -> QueuedRequest {
    let headers = "host: api.example.com\r\nuser-agent: curl/8.5.0\r\naccept: */*\r\n\
                   content-type: application/json\r\nx-forwarded-for: 10.0.0.7\r\n\
                   x-request-id: 3f2a9c0e7b1d4e5fa6c8b9d0e1f2a3b4\r\n";
    let client = weir::forward::Client::capture(
        &http::HeaderMap::new(),
        Some(std::net::Ipv4Addr::LOCALHOST.into()),
        false,
    );
    QueuedRequest {
        id: weir::queue::QueueId(id),
        method: http::Method::POST,
        target: Bytes::copy_from_slice(b"/api/v1/orders?tenant=42"),
        headers: Bytes::from(headers.as_bytes().to_vec().into_boxed_slice()),
        client,
        body: Bytes::from(vec![b'x'; body_len].into_boxed_slice()),
        enqueued: tokio::time::Instant::now(),
        enqueued_unix_ms: unix_ms(SystemTime::now()),
        attempts: 0,
        replay_safe: false,
        last_error: None,
        cluster: None,
    }
}

fn push_take(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue");
    g.throughput(Throughput::Elements(1));
    let q = MemoryQueue::new(4096, 1 << 30);
    let template = request(1, 1024);
    let size = template.size();
    g.bench_function("push_take_finish_1_thread", |b| {
        b.iter(|| {
            if q.reserve(size) {
                q.insert(black_box(template.clone()));
            }
            let r = q.take();
            q.finish(size);
            black_box(r)
        })
    });

    // 2 producers + 1 consumer, 2 x 50k entries through a 4096-entry queue per iteration.
    const PER_PRODUCER: u64 = 50_000;
    g.throughput(Throughput::Elements(2 * PER_PRODUCER));
    g.sample_size(10);
    g.bench_function("push_take_2_producers_1_consumer", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let q = Arc::new(MemoryQueue::new(4096, 1 << 30));
                let started = Instant::now();
                let producers: Vec<_> = (0..2)
                    .map(|_| {
                        let q = q.clone();
                        let t = template.clone();
                        std::thread::spawn(move || {
                            for _ in 0..PER_PRODUCER {
                                while !q.reserve(size) {
                                    std::thread::yield_now();
                                }
                                q.insert(t.clone());
                            }
                        })
                    })
                    .collect();
                let mut taken = 0;
                while taken < 2 * PER_PRODUCER {
                    if q.take().is_some() {
                        q.finish(size);
                        taken += 1;
                    } else {
                        std::thread::yield_now();
                    }
                }
                for p in producers {
                    let _ = p.join();
                }
                total += started.elapsed();
            }
            total
        })
    });
    g.finish();
}

/// Heap bytes per queued request with a 1 KiB body, printed once (not a timing).
fn memory_per_request(_c: &mut Criterion) {
    const N: usize = 10_000;
    let metrics = Metrics::new();
    let before_queue = LIVE.load(Ordering::Relaxed);
    let q = Queue::memory(QueueKind::Deferred, N, 1 << 30, &metrics);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let empty_queue = LIVE.load(Ordering::Relaxed) - before_queue;
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..N {
        if rt.block_on(q.push(request(i as u64, 1024))).is_err() {
            panic!("queue full at {i}");
        }
    }
    let entries = LIVE.load(Ordering::Relaxed) - before;
    let per_entry = entries as f64 / N as f64;
    let per_slot = empty_queue as f64 / N as f64;
    println!(
        "queue/memory_per_request_1KiB_body: {:.0} B heap per entry (1024 B body, its block \
         share included); an empty queue of capacity {N}: {empty_queue} B ({:.2} B per unit of \
         capacity); struct {} B",
        per_entry,
        per_slot,
        std::mem::size_of::<QueuedRequest>()
    );
    black_box(&q);
}

/// `batch` pushes at once (iteration `i`), each a task as a request's would be; all accepted.
async fn push_batch(q: &Arc<Queue>, i: u64, batch: usize) {
    let pushes: Vec<_> = (0..batch)
        .map(|j| {
            let q = q.clone();
            let r = request(i * 64 + j as u64, 1024);
            tokio::spawn(async move { q.push(r).await.is_ok() })
        })
        .collect();
    for p in pushes {
        assert!(p.await.unwrap_or(false), "push refused");
    }
}

/// A push as a client waits for it (answered after it returns), one at a time and 64 at once
/// (group commit), per storage and fsync policy, with a 1 KiB body.
fn push_durable(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue_push");
    g.sample_size(20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let metrics = Metrics::new();
    let policies = [
        ("memory", None),
        ("log_fsync_never", Some(Fsync::Never)),
        (
            "log_fsync_5ms",
            Some(Fsync::Interval(Duration::from_millis(5))),
        ),
        ("log_fsync_always", Some(Fsync::Always)),
    ];
    for (name, policy) in policies {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Arc::new(match policy {
            None => Queue::memory(QueueKind::Deferred, 1 << 20, 1 << 34, &metrics),
            Some(fsync) => {
                let (log, _) = LogStore::open(dir.path(), fsync, 64 << 20, 1 << 34, false)
                    .expect("open the log");
                Queue::logged(
                    QueueKind::Deferred,
                    1 << 20,
                    1 << 34,
                    log,
                    Vec::new(),
                    &metrics,
                )
            }
        });
        for batch in [1usize, 64] {
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_function(format!("{name}_x{batch}"), |b| {
                b.iter_custom(|iters| {
                    let q = q.clone();
                    rt.block_on(async move {
                        let started = Instant::now();
                        for i in 0..iters {
                            push_batch(&q, i, batch).await;
                            // Empty the queue again (not timed separately: it is the replay's).
                            for r in q.drain() {
                                if let Some(log) = q.log() {
                                    log.remove(r.id);
                                }
                            }
                        }
                        started.elapsed()
                    })
                })
            });
        }
    }
    g.finish();
}

/// A `redis-server` on a free loopback port, in memory only (no RDB, no AOF), killed on drop.
struct RedisServer {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one if `redis-server` is installed (`scripts/deps test` installs it).
    fn start() -> Option<RedisServer> {
        let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|b| std::path::Path::new(b).exists())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let dir = tempfile::tempdir().ok()?;
        let child = std::process::Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let server = RedisServer {
            child,
            port,
            _dir: dir,
        };
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if server.connection().is_some() {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn connection(&self) -> Option<redis::Connection> {
        let mut c = redis::Client::open(self.url())
            .ok()?
            .get_connection()
            .ok()?;
        redis::cmd("PING").query::<String>(&mut c).ok()?;
        Some(c)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same push with `storage: redis`: answered once the Lua script's XADD (capacity and byte
/// checks included) has been acknowledged by a local redis-server. This instance also holds the
/// delivery lease and reads ahead, as the fleet's deliverer does.
fn push_redis(c: &mut Criterion) {
    let Some(server) = RedisServer::start() else {
        eprintln!("queue_push/redis_*: skipped, no redis-server (scripts/deps test installs it)");
        return;
    };
    let Some(mut admin) = server.connection() else {
        eprintln!("queue_push/redis_*: skipped, redis-server does not answer");
        return;
    };
    let mut g = c.benchmark_group("queue_push");
    g.sample_size(20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let metrics = Metrics::new();
    let settings = weir::config::RedisSettings {
        url: server.url(),
        ..Default::default()
    };
    let store = weir::queue::redis::RedisStore::open(&settings, "deferred", 1 << 22, 1 << 34)
        .expect("open the stream");
    let keys = [
        store.stream().to_string(),
        format!("{}:bytes", store.stream()),
        format!("{}:meta", store.stream()),
    ];
    let q = Queue::shared(QueueKind::Deferred, 1 << 22, 1 << 34, store, &metrics);
    for batch in [1usize, 64] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("redis_x{batch}"), |b| {
            b.iter_custom(|iters| {
                let pusher = q.clone();
                let elapsed = rt.block_on(async move {
                    let started = Instant::now();
                    for i in 0..iters {
                        push_batch(&pusher, i, batch).await;
                    }
                    started.elapsed()
                });
                // Empty the stream again between samples (not timed).
                let _ = redis::cmd("DEL").arg(&keys).query::<i64>(&mut admin);
                let _ = q.drain();
                elapsed
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    push_take,
    memory_per_request,
    push_durable,
    push_redis
);
criterion_main!(benches);
