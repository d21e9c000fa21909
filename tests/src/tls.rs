//! Certificates made for one test: a CA, an etcd serving certificate for
//! 127.0.0.1, and a client certificate.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// PEM files on disk; the directory lives as long as any clone.
#[derive(Clone)]
pub struct TlsFiles {
    _dir: Arc<TempDir>,
    /// The CA certificate.
    pub ca_cert: PathBuf,
    /// etcd's serving certificate (SANs 127.0.0.1 and localhost).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate signed by the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().expect("ca key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-sign ca");
    (params, key, cert.pem())
}

impl TlsFiles {
    /// A fresh CA with a server and a client certificate.
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_params, ca_key, ca_pem) = ca("etcd-backup-test-ca");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |sans: Vec<String>, cn: &str, eku: Vec<ExtendedKeyUsagePurpose>| {
            let key = KeyPair::generate().expect("leaf key");
            let mut params = CertificateParams::new(sans).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = eku;
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            let cert = params.signed_by(&key, &issuer).expect("sign leaf");
            (cert.pem(), key.serialize_pem())
        };
        let (server_pem, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "etcd-server",
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        let (client_pem, client_key) = leaf(
            Vec::new(),
            "etcd-backup-agent",
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        let write = |name: &str, content: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, content).expect("write pem");
            p
        };
        Self {
            ca_cert: write("ca.crt", &ca_pem),
            server_cert: write("server.crt", &server_pem),
            server_key: write("server.key", &server_key),
            client_cert: write("client.crt", &client_pem),
            client_key: write("client.key", &client_key),
            _dir: Arc::new(dir),
        }
    }

    /// The PEM of a CA that signed nothing here, to stand for a wrong `ca_file`.
    pub fn unrelated_ca_pem() -> String {
        ca("some-other-ca").2
    }
}
