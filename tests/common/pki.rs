//! Certificates for the TLS tests, made with rcgen: a CA, and leaf certificates it signs
//! for either end of a migration. Used by the integration tests (`common::pki`) and by
//! the transport's unit tests (`vmm/src/migration/transport.rs` includes this file).
#![allow(dead_code)]

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::path::{Path, PathBuf};

/// One side's files: its certificate and key, and the CA it trusts.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// `--tls-cert CERT --tls-key KEY --tls-ca CA`.
    pub fn args(&self) -> Vec<String> {
        let p = |p: &Path| p.to_str().expect("a UTF-8 temp path").to_string();
        ["--tls-cert".into(), p(&self.cert), "--tls-key".into(), p(&self.key), "--tls-ca".into(), p(&self.ca)].to_vec()
    }
}

/// A certificate authority that signs leaves.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("a key");
        let pem = params.self_signed(&key).expect("a self-signed CA").pem();
        Ca { issuer: Issuer::new(params, key), pem }
    }

    /// This CA's certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Writes a leaf certificate for `names` (DNS names or IP addresses), usable as a
    /// server and as a client, its key, and this CA into `dir` as `NAME-cert.pem`,
    /// `NAME-key.pem`, `NAME-ca.pem`.
    pub fn issue(&self, dir: &Path, name: &str, names: &[&str]) -> TlsFiles {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("valid names");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.issuer).expect("a signed leaf");
        let files = TlsFiles {
            cert: dir.join(format!("{name}-cert.pem")),
            key: dir.join(format!("{name}-key.pem")),
            ca: dir.join(format!("{name}-ca.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write the certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write the key");
        std::fs::write(&files.ca, &self.pem).expect("write the CA");
        files
    }
}
