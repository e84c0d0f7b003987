//! The certificate store: what the TLS listeners serve. Config loads and reloads write the
//! pair read from `tls.cert`/`tls.key`; the ACME service writes the certificate it obtained
//! (preferred); the TLS listeners' resolver (`tls.rs`) reads it at every handshake. Also the
//! PEM readers for those files and for upstream CA files.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use pingora::utils::tls::WrappedX509;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::{Config, TlsConfig};

/// The certificates in service. Cheap to read from any thread.
#[derive(Default)]
pub struct CertStore {
    /// From `tls.cert`/`tls.key`, read at start and by every reload.
    files: ArcSwapOption<CertifiedKey>,
    /// Obtained (or read from its cache) by ACME; served ahead of the files.
    acme: ArcSwapOption<CertifiedKey>,
}

impl CertStore {
    /// The certificate a new TLS connection gets, if any.
    pub fn serving(&self) -> Option<Arc<CertifiedKey>> {
        self.acme.load_full().or_else(|| self.files.load_full())
    }

    pub fn files(&self) -> Option<Arc<CertifiedKey>> {
        self.files.load_full()
    }

    pub fn set_files(&self, pair: Option<Arc<CertifiedKey>>) {
        self.files.store(pair);
    }

    pub fn acme(&self) -> Option<Arc<CertifiedKey>> {
        self.acme.load_full()
    }

    pub fn set_acme(&self, certified: Arc<CertifiedKey>) {
        self.acme.store(Some(certified));
    }
}

/// The pair named by `tls.cert`/`tls.key`, loaded and checked, if the config names one.
pub fn load_configured(config: &Config) -> Result<Option<Arc<CertifiedKey>>, String> {
    match &config.tls {
        Some(TlsConfig {
            cert: Some(cert),
            key: Some(key),
            ..
        }) => load_certified_key(cert, key).map(Some),
        _ => Ok(None),
    }
}

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
