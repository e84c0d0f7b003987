//! ACME (RFC 8555): weir obtains and renews the TLS listeners' certificate itself.
//!
//! A background service keeps one certificate for `tls.acme.domains`:
//!
//! 1. At start it serves what `cache_dir` holds (`cert.pem`, `key.pem`) if that still loads.
//! 2. When there is none, or it expires within `renew_before`, it orders one from the
//!    directory (instant-acme) with the HTTP-01 challenge: the answer to
//!    `GET /.well-known/acme-challenge/{token}` is served by the proxy listeners themselves
//!    (the ACME server connects to port 80 of each domain, so a plain listener must be
//!    reachable there). The new pair is written to `cache_dir` and served to new connections.
//! 3. A failed order is logged and counted (`weir_acme_orders_total{result="failed"}`); the
//!    certificate in service stays, and the order is retried with a growing pause (1 min to
//!    1 h), so an ACME outage shorter than `renew_before` costs nothing.
//!
//! Until a certificate exists (first start, ACME server unreachable), a TLS listener serves
//! `tls.cert`/`tls.key` if those are configured, and otherwise refuses handshakes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rustls::sign::CertifiedKey;

use crate::certs::CertStore;
use crate::config::AcmeConfig;
use crate::metrics::Metrics;

/// Let's Encrypt's production directory, used when `tls.acme.directory` is not given.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// The path prefix of HTTP-01 challenge requests.
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// What the proxy shares with the ACME service: pending challenge answers. (The certificate
/// obtained goes to the [`CertStore`].)
#[derive(Default)]
pub struct AcmeState {
    /// token → key authorization, while an order is being validated.
    challenges: RwLock<HashMap<String, String>>,
}

impl AcmeState {
    /// The key authorization to answer for a request path, if it is a pending challenge.
    pub fn challenge_answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(CHALLENGE_PREFIX)?;
        let map = self.challenges.read().ok()?;
        map.get(token).cloned()
    }

    fn set_challenge(&self, token: String, key_authorization: String) {
        if let Ok(mut map) = self.challenges.write() {
            map.insert(token, key_authorization);
        }
    }

    fn clear_challenges(&self) {
        if let Ok(mut map) = self.challenges.write() {
            map.clear();
        }
    }
}

/// The files of `cache_dir`.
struct Cache {
    cert: PathBuf,
    key: PathBuf,
    account: PathBuf,
}

impl Cache {
    fn new(dir: &Path) -> Cache {
        Cache {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            account: dir.join("account.json"),
        }
    }
}

/// The background service that obtains and renews the certificate.
pub struct AcmeService {
    pub config: AcmeConfig,
    pub state: Arc<AcmeState>,
    pub certs: Arc<CertStore>,
    pub metrics: Arc<Metrics>,
}

/// First pause after a failed order, doubled up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(60);
const MAX_RETRY: Duration = Duration::from_secs(3600);
/// Even a long-lived certificate is looked at this often (the cache may have been replaced).
const MAX_SLEEP: Duration = Duration::from_secs(12 * 3600);

#[async_trait]
impl BackgroundService for AcmeService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(dir) = self.config.cache_dir.clone() else {
            log::error!("acme: tls.acme.cache_dir is not set; no certificate will be obtained");
            return;
        };
        let cache = Cache::new(&dir);
        let mut retry = FIRST_RETRY;
        loop {
            let pause = match self.round(&cache).await {
                Ok(next) => {
                    retry = FIRST_RETRY;
                    next
                }
                Err(e) => {
                    self.metrics
                        .acme_orders
                        .with_label_values(&["failed"])
                        .inc();
                    let kept = match self.certs.acme().is_some() {
                        true => "the certificate in service stays",
                        false => "no ACME certificate yet",
                    };
                    log::error!(
                        "acme: ordering a certificate for {:?} failed ({kept}); retrying in {}s: {e}",
                        self.config.domains,
                        retry.as_secs()
                    );
                    let pause = retry;
                    retry = (retry * 2).min(MAX_RETRY);
                    pause
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

impl AcmeService {
    /// Serves the cached certificate if it loads; orders a new one if it is missing or due.
    /// Returns how long to wait before looking again.
    async fn round(&self, cache: &Cache) -> Result<Duration, String> {
        if let Ok((certified, not_after)) = load(cache) {
            let due = not_after.checked_sub(self.config.renew_before);
            let now = SystemTime::now();
            self.serve(certified, not_after);
            if let Some(wait) = due.and_then(|due| due.duration_since(now).ok()) {
                return Ok(wait.min(MAX_SLEEP));
            }
            log::warn!(
                "acme: the certificate in {} expires within {}s: renewing",
                cache.cert.display(),
                self.config.renew_before.as_secs()
            );
        }
        self.order(cache).await?;
        let (certified, not_after) = load(cache)?;
        self.serve(certified, not_after);
        self.metrics.acme_orders.with_label_values(&["ok"]).inc();
        log::warn!(
            "acme: new certificate for {:?} in service, valid until {} (unix)",
            self.config.domains,
            unix(not_after)
        );
        let due = not_after
            .checked_sub(self.config.renew_before)
            .and_then(|due| due.duration_since(SystemTime::now()).ok());
        let Some(due) = due else {
            log::warn!(
                "acme: tls.acme.renew_before ({}s) is longer than the certificates this CA issues; ordering again in {}s",
                self.config.renew_before.as_secs(),
                FIRST_RETRY.as_secs()
            );
            return Ok(FIRST_RETRY);
        };
        Ok(due.min(MAX_SLEEP))
    }

    fn serve(&self, certified: Arc<CertifiedKey>, not_after: SystemTime) {
        self.certs.set_acme(certified);
        self.metrics
            .acme_certificate_expiry
            .set(i64::try_from(unix(not_after)).unwrap_or(i64::MAX));
    }

    /// One ACME order: account, HTTP-01 for every domain, finalize, write the cache.
    async fn order(&self, cache: &Cache) -> Result<(), String> {
        let directory = self
            .config
            .directory
            .clone()
            .unwrap_or_else(|| LETS_ENCRYPT.to_string());
        let account = self.account(cache, &directory).await?;
        let identifiers: Vec<Identifier> = self
            .config
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(|e| format!("new order at {directory}: {e}"))?;
        let result = self.validate(&mut order).await;
        self.state.clear_challenges();
        result?;
        let key_pem = order
            .finalize()
            .await
            .map_err(|e| format!("finalize: {e}"))?;
        let chain_pem = order
            .poll_certificate(&patient())
            .await
            .map_err(|e| format!("download the certificate: {e}"))?;
        write_private(&cache.key, key_pem.as_bytes())?;
        write_private(&cache.cert, chain_pem.as_bytes())?;
        Ok(())
    }

    async fn validate(&self, order: &mut instant_acme::Order) -> Result<(), String> {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| format!("authorization: {e}"))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(format!("authorization is {other:?}")),
            }
            let mut challenge = authz
                .challenge(ChallengeType::Http01)
                .ok_or("the ACME server offers no http-01 challenge")?;
            self.state.set_challenge(
                challenge.token.clone(),
                challenge.key_authorization().as_str().to_string(),
            );
            challenge
                .set_ready()
                .await
                .map_err(|e| format!("challenge ready: {e}"))?;
        }
        let status = order
            .poll_ready(&patient())
            .await
            .map_err(|e| format!("validation: {e}"))?;
        if status != OrderStatus::Ready {
            return Err(format!(
                "validation failed: order is {status:?} (is port 80 of {:?} served by weir?)",
                self.config.domains
            ));
        }
        Ok(())
    }

    /// The account in `account.json`, or a new one (saved there).
    async fn account(&self, cache: &Cache, directory: &str) -> Result<Account, String> {
        if let Ok(text) = std::fs::read_to_string(&cache.account) {
            if let Ok(credentials) = serde_json::from_str::<AccountCredentials>(&text) {
                let builder = Account::builder().map_err(|e| format!("http client: {e}"))?;
                match builder.from_credentials(credentials).await {
                    Ok(account) => return Ok(account),
                    Err(e) => log::warn!(
                        "acme: the account in {} is not usable ({e}); creating a new one",
                        cache.account.display()
                    ),
                }
            }
        }
        let contact: Vec<String> = self
            .config
            .email
            .iter()
            .map(|e| format!("mailto:{e}"))
            .collect();
        let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
        let builder = Account::builder().map_err(|e| format!("http client: {e}"))?;
        let (account, credentials) = builder
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                directory.to_string(),
                None,
            )
            .await
            .map_err(|e| format!("create an account at {directory}: {e}"))?;
        match serde_json::to_string(&credentials) {
            Ok(text) => write_private(&cache.account, text.as_bytes())?,
            Err(e) => log::warn!("acme: cannot save the account: {e}"),
        }
        Ok(account)
    }
}

/// Validation and issuance may take a while on a real CA.
fn patient() -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(Duration::from_secs(120))
}

/// The cached pair and the leaf's expiry.
fn load(cache: &Cache) -> Result<(Arc<CertifiedKey>, SystemTime), String> {
    let certified = crate::certs::load_certified_key(&cache.cert, &cache.key)?;
    let not_after = certified
        .cert
        .first()
        .ok_or("empty chain")
        .and_then(|leaf| {
            x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|_| "unparsable certificate")
        })
        .map(|(_, leaf)| leaf.validity().not_after.timestamp())?;
    let not_after = UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).unwrap_or(0));
    Ok((certified, not_after))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes a secret (key, account) readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("write {}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pending_tokens_under_the_challenge_path_are_answered() {
        let state = AcmeState::default();
        state.set_challenge("tok".into(), "tok.thumb".into());
        assert_eq!(
            state.challenge_answer("/.well-known/acme-challenge/tok"),
            Some("tok.thumb".to_string())
        );
        assert_eq!(
            state.challenge_answer("/.well-known/acme-challenge/other"),
            None
        );
        assert_eq!(state.challenge_answer("/tok"), None);
        assert_eq!(state.challenge_answer("/.well-known/acme-challenge/"), None);
        state.clear_challenges();
        assert_eq!(
            state.challenge_answer("/.well-known/acme-challenge/tok"),
            None
        );
    }
}
