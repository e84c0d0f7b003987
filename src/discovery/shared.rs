//! `registry.storage: redis`: a cluster's registry kept in Redis, so that every weir instance
//! using the same Redis and `store.redis.key` routes to the same nodes.
//!
//! Per cluster a hash `<key>:registry:<cluster>` (id -> the entry's JSON) and a sorted set
//! `<key>:registry:<cluster>:expiry` (id scored by its expiry, in Redis's own clock, so that
//! the instances' clocks do not matter). A PUT on any instance writes both; every instance
//! reads the live entries twice a second, and whichever reads first after an entry's expiry
//! removes it (and logs and counts the expiry). While Redis cannot be reached, each instance
//! keeps the entries it last read and PUTs are answered 503.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use crate::config::RedisSettings;

const PUT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + live, ARGV[1])
redis.call('PEXPIRE', KEYS[1], live * 2)
redis.call('PEXPIRE', KEYS[2], live * 2)
return 1
";

const DELETE: &str = r"
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
";

const LIVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #expired do
  redis.call('HDEL', KEYS[1], expired[i])
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf', 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  local v = redis.call('HGET', KEYS[1], live[i])
  if v then
    table.insert(out, live[i])
    table.insert(out, v)
    table.insert(out, tostring(tonumber(live[i + 1]) - now))
  end
end
return {expired, out}
";

/// weir's Redis connection (the queue stream's and the shared registry's): lazy, bounded by
/// `store.redis.timeout`, reconnecting by itself with a short backoff.
pub fn connection_manager(settings: &RedisSettings) -> Result<ConnectionManager, String> {
    let client = redis::Client::open(settings.url.as_str())
        .map_err(|e| format!("store.redis.url {:?}: {e}", settings.url))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.timeout))
        .set_response_timeout(Some(settings.timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1));
    ConnectionManager::new_lazy_with_config(client, config).map_err(|e| e.to_string())
}

/// One live entry as read: id, its JSON, milliseconds left.
pub type LiveEntry = (String, String, u64);

/// The Redis side of the shared registries.
pub struct SharedRegistry {
    settings: RedisSettings,
    conn: tokio::sync::OnceCell<ConnectionManager>,
    /// Whether the last command failed (for logging the outage once).
    down: Mutex<bool>,
}

impl SharedRegistry {
    pub fn new(settings: &RedisSettings) -> SharedRegistry {
        SharedRegistry {
            settings: settings.clone(),
            conn: tokio::sync::OnceCell::new(),
            down: Mutex::new(false),
        }
    }

    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    fn keys(&self, cluster: &str) -> [String; 2] {
        let hash = format!("{}:registry:{cluster}", self.settings.key);
        let expiry = format!("{hash}:expiry");
        [hash, expiry]
    }

    async fn conn(&self) -> Result<ConnectionManager, String> {
        self.conn
            .get_or_try_init(|| async { connection_manager(&self.settings) })
            .await
            .cloned()
    }

    /// Notes the outcome of a command; logs the start and the end of an outage once.
    fn mark<T>(&self, r: Result<T, String>) -> Result<T, String> {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        match (&r, *down) {
            (Err(e), false) => {
                log::error!(
                    "registry: Redis {} unreachable ({e}); routing keeps the nodes last read, \
                     registrations get 503",
                    self.settings.url
                );
                *down = true;
            }
            (Ok(_), true) => {
                log::warn!("registry: Redis {} reachable again", self.settings.url);
                *down = false;
            }
            _ => {}
        }
        r
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &str,
        cluster: &str,
        args: &[&str],
    ) -> Result<T, String> {
        let r = async {
            let mut conn = self.conn().await?;
            let [hash, expiry] = self.keys(cluster);
            let script = Script::new(script);
            let mut inv = script.prepare_invoke();
            inv.key(hash).key(expiry);
            for a in args {
                inv.arg(*a);
            }
            match tokio::time::timeout(self.settings.timeout, inv.invoke_async::<T>(&mut conn))
                .await
            {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(format!("redis: {e}")),
                Err(_) => Err(format!(
                    "redis: no answer within {:?}",
                    self.settings.timeout
                )),
            }
        }
        .await;
        self.mark(r)
    }

    /// Stores (or renews) an entry for `liveness`.
    pub async fn put(
        &self,
        cluster: &str,
        id: &str,
        json: &str,
        liveness: Duration,
    ) -> Result<(), String> {
        let ms = liveness.as_millis().to_string();
        self.run::<i64>(PUT, cluster, &[id, json, &ms])
            .await
            .map(|_| ())
    }

    /// Removes an entry; whether it was there.
    pub async fn delete(&self, cluster: &str, id: &str) -> Result<bool, String> {
        self.run::<i64>(DELETE, cluster, &[id]).await.map(|n| n > 0)
    }

    /// Removes the expired entries (returned first) and reads the live ones.
    pub async fn live(&self, cluster: &str) -> Result<(Vec<String>, Vec<LiveEntry>), String> {
        let (expired, flat): (Vec<String>, Vec<String>) = self.run(LIVE, cluster, &[]).await?;
        let live = flat
            .chunks_exact(3)
            .map(|c| (c[0].clone(), c[1].clone(), c[2].parse().unwrap_or(0)))
            .collect();
        Ok((expired, live))
    }
}
