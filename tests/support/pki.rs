//! A test CA and the certificates it signs (rcgen), written to a tempdir, for TLS listeners.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tempfile::TempDir;

/// A test CA and the files of the certificates it signs.
pub struct Pki {
    pub dir: TempDir,
    pub ca: rcgen::Certificate,
    pub ca_key: KeyPair,
}

/// One issued certificate: its PEM files and the leaf's DER (to compare with what is served).
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("weir-tls-")
            .tempdir()
            .expect("tempdir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "weir test CA");
        let ca = params.self_signed(&ca_key).expect("self-sign the CA");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write ca.pem");
        Pki { dir, ca, ca_key }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A leaf for `localhost` written as `{name}.pem` / `{name}.key` (full chain: leaf, CA).
    pub fn issue(&self, name: &str) -> Issued {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("weir test {name}"));
        let leaf = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign the leaf");
        let issued = Issued {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
            der: leaf.der().to_vec(),
            key_der: key.serialize_der(),
        };
        std::fs::write(&issued.cert, format!("{}{}", leaf.pem(), self.ca.pem())).expect("write");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write key");
        issued
    }
}

/// The config fragment that makes every listener TLS with `cert` and `key`.
pub fn tls_yaml(cert: &Path, key: &Path) -> String {
    format!(
        "tls: {{cert: '{}', key: '{}'}}\n",
        cert.display(),
        key.display()
    )
}
