//! TLS listeners: Pingora's settings and the certificate resolver.
//!
//! Every config (re)load reads `tls.cert`/`tls.key` into the [`CertStore`], so a file that
//! cannot be served (unreadable, not PEM, key not matching the certificate) fails `weir check`,
//! the start and a reload alike. The listeners do not hold a certificate of their own: their
//! resolver ([`LiveCertificate`]) reads the store at every handshake. A SIGHUP that reloads the
//! config therefore serves renewed files to new connections, while established connections
//! keep the certificate they were opened with.

use std::fmt;
use std::sync::Arc;

use pingora::listeners::tls::TlsSettings;
use pingora::protocols::ALPN;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::certs::CertStore;

/// The listeners' certificate resolver: the store's certificate at handshake time.
pub struct LiveCertificate {
    certs: Arc<CertStore>,
}

impl LiveCertificate {
    pub fn new(certs: Arc<CertStore>) -> Self {
        LiveCertificate { certs }
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
        self.certs.serving()
    }
}

/// Pingora's settings for one TLS listener: TLS 1.2 and 1.3 (Pingora's rustls build offers
/// nothing older), ALPN h2 then http/1.1, the live certificate.
pub fn listener_settings(certs: Arc<CertStore>) -> Result<TlsSettings, String> {
    let mut settings =
        TlsSettings::intermediate("", "").map_err(|e| format!("tls listener settings: {e}"))?;
    settings.set_cert_resolver(Arc::new(LiveCertificate::new(certs)));
    settings.set_alpn(ALPN::H2H1);
    Ok(settings)
}
