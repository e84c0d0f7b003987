//! TLS: the certificate the TLS listeners serve, and the CA files of HTTPS upstreams.
//!
//! Every config (re)load reads `tls.cert`/`tls.key` into a rustls [`CertifiedKey`] held by the
//! [`State`](crate::proxy::State), so a file that cannot be served (unreadable, not PEM, key
//! not matching the certificate) fails `weir check`, the start and a reload alike. The
//! listeners do not hold a certificate of their own: their resolver ([`LiveCertificate`])
//! reads the one of the current state at every handshake. A SIGHUP that reloads the config
//! therefore serves renewed files to new connections, while established connections keep the
//! certificate they were opened with.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::ALPN;
use pingora::utils::tls::WrappedX509;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::acme::AcmeState;
use crate::proxy::State;

/// Reads a PEM certificate chain (leaf first) and its private key into what rustls serves.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain = read_certificates(cert)?;
    let key_der = read_private_key(key)?;
    let provider = rustls::crypto::ring::default_provider();
    // from_der compares the key with the certificate's public key (an undecidable comparison
    // passes; none of ring's key types is undecidable).
    CertifiedKey::from_der(chain, key_der, &provider)
        .map(Arc::new)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => format!(
                "tls: the key {} does not match the certificate {} (a key of another certificate?)",
                key.display(),
                cert.display()
            ),
            e => format!(
                "tls: the key {} cannot be used with the certificate {}: {e}",
                key.display(),
                cert.display()
            ),
        })
}

/// Every certificate of a PEM file, in file order; an error if there is none or one is bad.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("tls: cannot read certificate file {}: {e}", path.display()))?;
    let mut certs = Vec::new();
    for item in rustls_pemfile::certs(&mut bytes.as_slice()) {
        let der = item.map_err(|e| format!("tls: {}: bad PEM: {e}", path.display()))?;
        if let Err(e) = x509_parser::parse_x509_certificate(der.as_ref()) {
            return Err(format!(
                "tls: {}: certificate {} is not valid X.509: {e}",
                path.display(),
                certs.len() + 1
            ));
        }
        certs.push(der);
    }
    if certs.is_empty() {
        return Err(format!(
            "tls: {}: no PEM certificate (-----BEGIN CERTIFICATE-----) found",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("tls: cannot read key file {}: {e}", path.display()))?;
    match rustls_pemfile::private_key(&mut bytes.as_slice()) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(format!(
            "tls: {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) found",
            path.display()
        )),
        Err(e) => Err(format!("tls: {}: bad PEM: {e}", path.display())),
    }
}

/// The CA certificates of an upstream's `ca:` file, in the form Pingora's connector takes.
pub fn load_upstream_ca(path: &Path) -> Result<Arc<[WrappedX509]>, String> {
    let certs = read_certificates(path)?;
    // read_certificates checked every DER with x509-parser, the parser WrappedX509 uses.
    let wrapped: Vec<WrappedX509> = certs
        .into_iter()
        .map(|der| WrappedX509::new(der.as_ref().to_vec(), pingora::utils::tls::parse_x509))
        .collect();
    Ok(Arc::from(wrapped))
}

/// The listeners' certificate resolver: the certificate of the config in force at handshake
/// time.
pub struct LiveCertificate {
    state: Arc<ArcSwap<State>>,
    acme: Arc<AcmeState>,
}

impl LiveCertificate {
    pub fn new(state: Arc<ArcSwap<State>>, acme: Arc<AcmeState>) -> Self {
        LiveCertificate { state, acme }
    }
}

impl fmt::Debug for LiveCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LiveCertificate")
    }
}

impl ResolvesServerCert for LiveCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // An ACME certificate wins over the files; None (neither yet) aborts the handshake.
        self.acme
            .certificate
            .load_full()
            .or_else(|| self.state.load().certificate.clone())
    }
}

/// Pingora's settings for one TLS listener: TLS 1.2 and 1.3 (Pingora's rustls build offers
/// nothing older), ALPN h2 then http/1.1, the live certificate.
pub fn listener_settings(
    state: Arc<ArcSwap<State>>,
    acme: Arc<AcmeState>,
) -> Result<TlsSettings, String> {
    let mut settings =
        TlsSettings::intermediate("", "").map_err(|e| format!("tls listener settings: {e}"))?;
    settings.set_cert_resolver(Arc::new(LiveCertificate::new(state, acme)));
    settings.set_alpn(ALPN::H2H1);
    Ok(settings)
}
