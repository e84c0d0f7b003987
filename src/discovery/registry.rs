//! The service registry: nodes register themselves in a cluster with a PUT on the admin
//! listener and renew it by PUTting again; an entry not renewed within the cluster's
//! `registry.liveness` expires (logged, counted) and leaves routing. Entries are kept here,
//! outside the runtime, so they survive reloads; a reload that drops a cluster's `registry`
//! stops routing to them (they come back if it returns and they are still live).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::shared::SharedRegistry;
use crate::config::clusters::RegistryStorage;
use crate::config::values::{host_port, is_host_name, parse_upstream};
use crate::config::{Scheme, Upstream};
use crate::metrics::Metrics;
use crate::runtime::{Members, Runtime};

/// Why a registry request was refused.
#[derive(Debug, PartialEq)]
pub enum RegistryError {
    /// No such cluster, or it has no `registry` (404).
    NoRegistry(String),
    /// The body or the id is not acceptable (400).
    Bad(String),
    /// `storage: redis` and Redis did not take it (503).
    Unavailable(String),
}

/// One registered node.
struct Entry {
    upstream: Upstream,
    /// The entry's JSON as stored (`storage: redis`: as read, to see a change).
    json: String,
    /// The object as PUT (host, port and scheme normalised; other fields kept as metadata).
    fields: Map<String, Value>,
    expires: Instant,
}

/// Registered nodes by cluster and id.
pub struct Registry {
    entries: Mutex<HashMap<String, BTreeMap<String, Entry>>>,
    metrics: Arc<Metrics>,
    /// Wakes the expiry loop when an entry is added (its deadline may be the next).
    changed: Notify,
    /// The Redis side of `storage: redis` registries (made on first use).
    shared: Mutex<Option<Arc<SharedRegistry>>>,
}

/// The longest id and the largest body a PUT may carry.
const MAX_ID: usize = 128;
pub const MAX_BODY: usize = 16 * 1024;
/// How long resolving a registered host name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Registry {
        Registry {
            entries: Mutex::new(HashMap::new()),
            metrics,
            changed: Notify::new(),
            shared: Mutex::new(None),
        }
    }

    /// The Redis client for the running `store.redis` (a new one if it changed).
    fn shared(&self, runtime: &Runtime) -> Arc<SharedRegistry> {
        let settings = &runtime.config.store.redis;
        let mut slot = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some(s) if s.settings() == settings => s.clone(),
            _ => {
                let s = Arc::new(SharedRegistry::new(settings));
                *slot = Some(s.clone());
                s
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, BTreeMap<String, Entry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every live entry's node, by cluster.
    pub fn members(&self) -> Members {
        self.lock()
            .iter()
            .map(|(c, e)| (c.clone(), e.values().map(|e| e.upstream.clone()).collect()))
            .collect()
    }

    fn event(&self, cluster: &str, event: &str) {
        self.metrics
            .registry_events
            .with_label_values(&[cluster, event])
            .inc();
    }

    /// Refreshes `weir_registry_nodes` for the clusters with a registry in `runtime`.
    pub fn refresh_gauges(&self, runtime: &Runtime) {
        let entries = self.lock();
        for c in &runtime.clusters {
            if c.settings.registry.is_some() {
                let n = entries.get(&*c.name).map_or(0, BTreeMap::len);
                self.metrics
                    .registry_nodes
                    .with_label_values(&[&c.name])
                    .set(n as i64);
            }
        }
    }

    /// `PUT /registry/{cluster}/{id}`: adds or renews an entry. `Ok((entry, changed))`:
    /// the stored entry as answered, and whether routing must change (a new node, or one
    /// whose address or weight changed).
    pub async fn put(
        &self,
        runtime: &Runtime,
        cluster: &str,
        id: &str,
        body: &[u8],
    ) -> Result<(Value, bool), RegistryError> {
        let (liveness, storage) = settings(runtime, cluster)?;
        check_id(id)?;
        let (upstream, mut fields) = parse_entry(body).await?;
        let json = Value::Object(fields.clone()).to_string();
        if storage == RegistryStorage::Redis {
            self.shared(runtime)
                .put(cluster, id, &json, liveness)
                .await
                .map_err(RegistryError::Unavailable)?;
        }
        let expires = Instant::now() + liveness;
        let changed = self.insert(cluster, id, upstream, fields.clone(), json, expires, true);
        self.changed.notify_one();
        fields.insert(
            "expires_in_ms".into(),
            Value::from(liveness.as_millis() as u64),
        );
        Ok((Value::Object(fields), changed))
    }

    /// Adds or replaces an entry; whether routing must change. `counted`: a registration
    /// made here (counted and logged as registered or renewed).
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &self,
        cluster: &str,
        id: &str,
        upstream: Upstream,
        fields: Map<String, Value>,
        json: String,
        expires: Instant,
        counted: bool,
    ) -> bool {
        let mut entries = self.lock();
        let cluster_entries = entries.entry(cluster.to_string()).or_default();
        let changed = cluster_entries
            .get(id)
            .is_none_or(|e| e.upstream.url != upstream.url || e.upstream.weight != upstream.weight);
        let first = !cluster_entries.contains_key(id);
        if first {
            log::info!("registry: {cluster}/{id} registered ({})", upstream.url);
        } else if changed {
            log::info!("registry: {cluster}/{id} now {}", upstream.url);
        }
        cluster_entries.insert(
            id.to_string(),
            Entry {
                upstream,
                json,
                fields,
                expires,
            },
        );
        if counted {
            self.event(cluster, if first { "registered" } else { "renewed" });
        }
        changed
    }

    /// `storage: redis` clusters: reads every live entry from Redis and makes the local view
    /// match it; whether routing must change. Expiries removed by this read are logged and
    /// counted here; a Redis that does not answer leaves the view as it is.
    pub async fn sync_shared(&self, runtime: &Runtime) -> bool {
        let mut changed = false;
        for c in &runtime.clusters {
            if c.settings.registry.as_ref().map(|r| r.storage) != Some(RegistryStorage::Redis) {
                continue;
            }
            let Ok((expired, live)) = self.shared(runtime).live(&c.name).await else {
                continue;
            };
            for id in &expired {
                log::warn!(
                    "registry: {}/{id} expired: no renewal within its liveness",
                    c.name
                );
                self.event(&c.name, "expired");
            }
            let now = Instant::now();
            let known: HashMap<String, String> = self
                .lock()
                .get(&*c.name)
                .map(|e| {
                    e.iter()
                        .map(|(id, e)| (id.clone(), e.json.clone()))
                        .collect()
                })
                .unwrap_or_default();
            for (id, json, left_ms) in &live {
                let expires = now + Duration::from_millis(*left_ms);
                if known.get(id) == Some(json) {
                    if let Some(e) = self.lock().get_mut(&*c.name).and_then(|m| m.get_mut(id)) {
                        e.expires = expires;
                    }
                    continue;
                }
                match parse_entry(json.as_bytes()).await {
                    Ok((upstream, fields)) => {
                        changed |= self.insert(
                            &c.name,
                            id,
                            upstream,
                            fields,
                            json.clone(),
                            expires,
                            false,
                        );
                    }
                    Err(e) => log::warn!("registry: {}/{id} in Redis is not usable: {e:?}", c.name),
                }
            }
            let mut entries = self.lock();
            if let Some(list) = entries.get_mut(&*c.name) {
                list.retain(|id, e| {
                    let stays = live.iter().any(|(l, _, _)| l == id);
                    if !stays {
                        log::info!(
                            "registry: {}/{id} ({}) left (expired or deleted)",
                            c.name,
                            e.upstream.url
                        );
                        changed = true;
                    }
                    stays
                });
            }
        }
        changed
    }
}

/// A registration body (a JSON object with host, port, optional scheme and weight) as a
/// resolved node and its fields (host, port, scheme and weight normalised).
async fn parse_entry(body: &[u8]) -> Result<(Upstream, Map<String, Value>), RegistryError> {
    let (url, weight, fields) = check_entry(body)?;
    // A host name is resolved once here (as a configured upstream is at load), off the
    // runtime's threads and bounded.
    let parsed = tokio::time::timeout(
        RESOLVE_TIMEOUT,
        tokio::task::spawn_blocking(move || parse_upstream(&url)),
    )
    .await;
    let mut upstream = match parsed {
        Ok(Ok(Ok(u))) => u,
        Ok(Ok(Err(e))) => return Err(bad(&e)),
        Ok(Err(_)) => return Err(bad("the host could not be resolved")),
        Err(_) => return Err(bad("resolving the host took longer than 2s")),
    };
    upstream.weight = weight;
    Ok((upstream, fields))
}

/// What a registration body says, checked but not resolved: the node's URL
/// (`scheme://host:port`), its weight, and the body's fields with host (lowercase, without
/// brackets), port, scheme and weight normalised; other fields as they were.
pub fn check_entry(body: &[u8]) -> Result<(String, u32, Map<String, Value>), RegistryError> {
    let mut fields = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(bad("the body must be a JSON object with host and port")),
        Err(e) => return Err(bad(&format!("the body is not JSON: {e}"))),
    };
    let host = match fields.get("host") {
        Some(Value::String(h)) if !h.trim().is_empty() => h.trim().to_string(),
        Some(_) => return Err(bad("`host` must be a non-empty string")),
        None => return Err(bad("`host` is missing")),
    };
    let port = match fields.get("port") {
        Some(Value::Number(n)) => match n.as_u64() {
            Some(p @ 1..=65535) => p as u16,
            _ => return Err(bad("`port` must be a port number (1-65535)")),
        },
        Some(_) => return Err(bad("`port` must be a number")),
        None => return Err(bad("`port` is missing")),
    };
    let scheme = match fields.get("scheme") {
        None => Scheme::Http,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("http") => Scheme::Http,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("https") => Scheme::Https,
        Some(_) => return Err(bad("`scheme` must be \"http\" or \"https\"")),
    };
    let weight = match fields.get("weight") {
        None => 1,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(w @ 1..=1000) => w as u32,
            _ => return Err(bad("`weight` must be a whole number from 1 to 1000")),
        },
        Some(_) => return Err(bad("`weight` must be a number")),
    };
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(&host)
        .to_ascii_lowercase();
    if !bare.contains(':') && !is_host_name(&bare) {
        return Err(bad(&format!("`{bare}` is not an IP address or host name")));
    }
    if bare.contains(':') && bare.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(bad(&format!("`{bare}` is not an IPv6 address")));
    }
    let scheme_name = match scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    let url = format!("{scheme_name}://{}", host_port(&bare, port));
    fields.insert("host".into(), Value::String(bare));
    fields.insert("port".into(), Value::from(port));
    fields.insert("scheme".into(), Value::String(scheme_name.into()));
    fields.insert("weight".into(), Value::from(weight));
    Ok((url, weight, fields))
}

impl Registry {
    /// `DELETE /registry/{cluster}/{id}`: whether an entry was removed.
    pub async fn delete(
        &self,
        runtime: &Runtime,
        cluster: &str,
        id: &str,
    ) -> Result<bool, RegistryError> {
        let (_, storage) = settings(runtime, cluster)?;
        if storage == RegistryStorage::Redis {
            self.shared(runtime)
                .delete(cluster, id)
                .await
                .map_err(RegistryError::Unavailable)?;
        }
        let removed = self.lock().get_mut(cluster).and_then(|e| e.remove(id));
        if let Some(e) = &removed {
            log::info!("registry: {cluster}/{id} ({}) deleted", e.upstream.url);
            self.event(cluster, "deleted");
        }
        Ok(removed.is_some())
    }

    /// `GET /registry/{cluster}`: `{id: {host, port, ..., expires_in_ms}}`.
    pub fn list(&self, runtime: &Runtime, cluster: &str) -> Result<Value, RegistryError> {
        settings(runtime, cluster)?;
        let now = Instant::now();
        let entries = self.lock();
        let mut out = Map::new();
        for (id, e) in entries.get(cluster).into_iter().flatten() {
            let mut fields = e.fields.clone();
            let left = e.expires.saturating_duration_since(now).as_millis() as u64;
            fields.insert("expires_in_ms".into(), Value::from(left));
            out.insert(id.clone(), Value::Object(fields));
        }
        Ok(Value::Object(out))
    }

    /// `GET /registry`: `{cluster: count}` for every cluster with a registry.
    pub fn counts(&self, runtime: &Runtime) -> Value {
        let entries = self.lock();
        let mut out = Map::new();
        for c in &runtime.clusters {
            if c.settings.registry.is_some() {
                let n = entries.get(&*c.name).map_or(0, BTreeMap::len);
                out.insert(c.name.to_string(), Value::from(n));
            }
        }
        Value::Object(out)
    }

    /// Removes the entries whose liveness ran out by `now`; the next deadline, if any.
    /// `expired` is whether any was removed.
    pub fn sweep(&self, runtime: &Runtime, now: Instant) -> (bool, Option<Instant>) {
        let mut expired = false;
        let mut next: Option<Instant> = None;
        let mut entries = self.lock();
        for (cluster, list) in entries.iter_mut() {
            // A shared registry's entries expire in Redis (`sync_shared`).
            let shared = runtime
                .cluster_index(cluster)
                .and_then(|i| runtime.cluster(i).settings.registry.as_ref())
                .is_some_and(|r| r.storage == RegistryStorage::Redis);
            if shared {
                continue;
            }
            list.retain(|id, e| {
                if e.expires <= now {
                    log::warn!(
                        "registry: {cluster}/{id} ({}) expired: no renewal within its liveness",
                        e.upstream.url
                    );
                    self.metrics
                        .registry_events
                        .with_label_values(&[cluster, "expired"])
                        .inc();
                    expired = true;
                    false
                } else {
                    next = Some(next.map_or(e.expires, |n| n.min(e.expires)));
                    true
                }
            });
        }
        (expired, next)
    }

    /// Waits until an entry may have expired: the next deadline, or a change.
    pub async fn wait(&self, next: Option<Instant>) {
        let changed = self.changed.notified();
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = changed => {}
                }
            }
            None => changed.await,
        }
    }
}

fn bad(why: &str) -> RegistryError {
    RegistryError::Bad(why.to_string())
}

/// The liveness and storage of `cluster`'s registry in the running config.
fn settings(
    runtime: &Runtime,
    cluster: &str,
) -> Result<(Duration, RegistryStorage), RegistryError> {
    runtime
        .cluster_index(cluster)
        .and_then(|i| runtime.cluster(i).settings.registry.as_ref())
        .map(|r| (r.liveness, r.storage))
        .ok_or_else(|| {
            RegistryError::NoRegistry(format!(
                "cluster `{cluster}` has no registry (clusters.{cluster}.registry in the config)"
            ))
        })
}

fn check_id(id: &str) -> Result<(), RegistryError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    match ok {
        true => Ok(()),
        false => Err(bad(
            "the id must be 1-128 letters, digits, `-`, `_`, `.` or `:`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::clusters::RegistryConfig;
    use crate::config::{ClusterConfig, Config};

    fn runtime(liveness: Duration) -> Runtime {
        let mut config = Config::embedded_default();
        config.clusters.insert(
            "api".into(),
            ClusterConfig {
                registry: Some(RegistryConfig {
                    liveness,
                    storage: RegistryStorage::Memory,
                }),
                ..Default::default()
            },
        );
        Runtime::build(config, &Metrics::new()).expect("runtime")
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_expires_after_its_liveness_unless_renewed() {
        let rt = runtime(Duration::from_secs(10));
        let reg = Registry::new(Metrics::new());
        let body = br#"{"host":"127.0.0.1","port":9001,"zone":"a"}"#;
        let (entry, changed) = reg.put(&rt, "api", "n1", body).await.expect("put");
        assert!(changed);
        assert_eq!(entry["zone"], "a", "other fields are kept");
        assert_eq!(entry["expires_in_ms"], 10_000);
        assert_eq!(reg.members()["api"][0].url, "http://127.0.0.1:9001");

        tokio::time::advance(Duration::from_secs(6)).await;
        let (_, changed) = reg.put(&rt, "api", "n1", body).await.expect("renew");
        assert!(!changed, "a renewal changes no routing");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!reg.sweep(&rt, Instant::now()).0, "renewed 6 s ago");
        tokio::time::advance(Duration::from_secs(4)).await;
        let (expired, next) = reg.sweep(&rt, Instant::now());
        assert!(expired);
        assert!(next.is_none());
        assert!(reg.members()["api"].is_empty());
    }

    #[tokio::test]
    async fn bad_bodies_and_clusters_without_a_registry_are_refused_with_a_reason() {
        let rt = runtime(Duration::from_secs(10));
        let reg = Registry::new(Metrics::new());
        for (body, why) in [
            (&b"[1]"[..], "JSON object"),
            (b"{", "not JSON"),
            (br#"{"port":1}"#, "`host` is missing"),
            (br#"{"host":"a"}"#, "`port` is missing"),
            (br#"{"host":"127.0.0.1","port":0}"#, "port number"),
            (br#"{"host":"127.0.0.1","port":"80"}"#, "must be a number"),
            (
                br#"{"host":"127.0.0.1","port":80,"scheme":"ftp"}"#,
                "scheme",
            ),
            (br#"{"host":"127.0.0.1","port":80,"weight":0}"#, "weight"),
            (
                br#"{"host":"no such host!","port":80}"#,
                "not an IP address",
            ),
        ] {
            match reg.put(&rt, "api", "n1", body).await {
                Err(RegistryError::Bad(m)) => assert!(m.contains(why), "{m:?} for {body:?}"),
                other => panic!("{body:?}: {other:?}"),
            }
        }
        let ok = br#"{"host":"127.0.0.1","port":80}"#;
        assert!(matches!(
            reg.put(&rt, "api", "bad/id", ok).await,
            Err(RegistryError::Bad(_))
        ));
        assert!(matches!(
            reg.put(&rt, "default", "n1", ok).await,
            Err(RegistryError::NoRegistry(_))
        ));
        assert!(matches!(
            reg.put(&rt, "nope", "n1", ok).await,
            Err(RegistryError::NoRegistry(_))
        ));
    }
}
