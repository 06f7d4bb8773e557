//! Client certificates as clusters issue them, and the client CA that signs
//! them. kind, minikube and kubeadm write kubeconfigs whose user is an RSA key
//! and a certificate; k3s writes ECDSA P-256 ones. The apiserver takes the
//! user's name from the subject CN and the groups from every subject O, after
//! verifying the chain to its client CA (`--client-ca-file`, published in
//! `kube-system/extension-apiserver-authentication`), which this module does
//! for the fake too.
//!
//! Certificates are issued with the `openssl` command: rcgen keeps one value
//! per name attribute (a user in two groups needs two O attributes) and cannot
//! make RSA keys with ring, and `openssl` writes keys in the forms kubeconfigs
//! carry (PKCS#1 `RSA PRIVATE KEY`, SEC1 `EC PRIVATE KEY`).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use super::auth::Identity;
use super::objects::{fresh_uid, now};

/// Where the apiserver publishes its client CA, and the key of the CA in it.
pub const AUTHENTICATION_CONFIG_MAP: (&str, &str) =
    ("kube-system", "extension-apiserver-authentication");
pub const CLIENT_CA_KEY: &str = "client-ca-file";
/// Every client CA, the trusted one and the foreign ones alike, has the name of
/// a kubeadm cluster's CA (which signs its client certificates too): only a
/// verified signature tells them apart.
const CA_NAME: &str = "kubernetes";
/// The aggregation layer's CA in the same ConfigMap, as kubeadm names it.
const FRONT_PROXY_CA_NAME: &str = "front-proxy-ca";
/// Where `openssl` is; the tests run on a host that has it.
const OPENSSL: &str = "/usr/bin/openssl";
/// What a kubeadm client certificate has besides its names.
const CLIENT_EXTENSIONS: &str = "[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
";

/// The key of a client certificate (or of a client CA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// As k3s writes; the key PEM is SEC1 (`EC PRIVATE KEY`).
    EcdsaP256,
    /// As kubeadm, kind and minikube write; the key PEM is PKCS#1 (`RSA PRIVATE KEY`).
    Rsa2048,
}

/// A kubeconfig user's `client-certificate-data` and `client-key-data`, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The certificate alone (no chain), PEM.
    pub cert_pem: String,
    pub key_pem: String,
}

/// A client CA: the fake's own, or a throw-away one it does not trust.
pub(super) struct ClientCa {
    /// The CA certificate, PEM: the ConfigMap's `client-ca-file`.
    pub cert_pem: String,
    /// PKCS#8, for `openssl`.
    key_pem: String,
    kind: KeyKind,
    /// Chain and key usage (clientAuth) checks against this CA alone.
    verifier: Arc<dyn ClientCertVerifier>,
}

impl ClientCa {
    pub fn generate(kind: KeyKind) -> ClientCa {
        let key = match kind {
            KeyKind::EcdsaP256 => KeyPair::generate().expect("generate a client CA key"),
            KeyKind::Rsa2048 => {
                let pkcs8 = openssl(&[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ]);
                KeyPair::from_pem(&pkcs8).expect("the RSA client CA key")
            }
        };
        let cert = ca_params(CA_NAME)
            .self_signed(&key)
            .expect("self-sign the client CA");
        let mut roots = RootCertStore::empty();
        roots
            .add(cert.der().clone())
            .expect("the client CA as a trust anchor");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .expect("client certificate verifier");
        ClientCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            kind,
            verifier,
        }
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// What the TLS handshake uses for the client's signature and CA hints.
    pub fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.verifier.clone()
    }

    /// A client certificate for `common_name` in `groups` (one O each), valid
    /// for a year from now, signed by this CA.
    pub fn issue(&self, common_name: &str, groups: &[&str], kind: KeyKind) -> ClientCertificate {
        let dir = tempfile::tempdir().expect("temporary directory for a client certificate");
        let path = |name: &str| dir.path().join(name).display().to_string();
        write(&dir.path().join("ca.pem"), &self.cert_pem);
        write(&dir.path().join("ca.key"), &self.key_pem);
        write(&dir.path().join("client.cnf"), CLIENT_EXTENSIONS);
        let key_pem = match kind {
            KeyKind::EcdsaP256 => openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout"]),
            KeyKind::Rsa2048 => openssl(&["genrsa", "-traditional", "2048"]),
        };
        write(&dir.path().join("client.key"), &key_pem);
        let subject: String = groups
            .iter()
            .map(|group| format!("/O={}", escape(group)))
            .chain([format!("/CN={}", escape(common_name))])
            .collect();
        openssl(&[
            "req",
            "-new",
            "-utf8",
            "-config",
            "/dev/null",
            "-subj",
            &subject,
            "-key",
            &path("client.key"),
            "-out",
            &path("client.csr"),
        ]);
        let serial = format!("0x{}", fresh_uid().replace('-', ""));
        openssl(&[
            "x509",
            "-req",
            "-in",
            &path("client.csr"),
            "-CA",
            &path("ca.pem"),
            "-CAkey",
            &path("ca.key"),
            "-set_serial",
            &serial,
            "-days",
            "365",
            "-sha256",
            "-extfile",
            &path("client.cnf"),
            "-extensions",
            "client",
            "-out",
            &path("client.pem"),
        ]);
        let cert_pem = fs::read_to_string(path("client.pem")).expect("read the issued certificate");
        ClientCertificate { cert_pem, key_pem }
    }

    /// The user of a TLS client's certificate chain, as kube-apiserver's x509
    /// authenticator reads it: `None` if the chain does not verify to this CA
    /// (for clientAuth, now) or names no CN; the request may still carry a token.
    pub fn identify(&self, chain: &[CertificateDer<'static>]) -> Option<Identity> {
        let (end_entity, intermediates) = chain.split_first()?;
        self.verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity).ok()?;
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .filter(|cn| !cn.is_empty())?
            .to_string();
        let groups = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok())
            .map(str::to_string);
        Some(Identity::new(name, String::new(), groups))
    }
}

/// The ConfigMap kube-apiserver keeps, with its client CA and (as kubeadm's
/// has) the aggregation layer's request-header settings and CA: a CA nothing in
/// the fake verifies against, so that a reader taking the wrong key trusts the
/// wrong CA. Made with the cluster, before the objects of a test: its
/// resourceVersion is "0", so that theirs start at 1.
pub(super) fn authentication_config_map(client_ca_pem: &str) -> ConfigMap {
    let front_proxy_key = KeyPair::generate().expect("generate the front-proxy CA key");
    let front_proxy_ca = ca_params(FRONT_PROXY_CA_NAME)
        .self_signed(&front_proxy_key)
        .expect("self-sign the front-proxy CA");
    let data = [
        (CLIENT_CA_KEY, client_ca_pem.to_string()),
        (
            "requestheader-allowed-names",
            r#"["front-proxy-client"]"#.into(),
        ),
        ("requestheader-client-ca-file", front_proxy_ca.pem()),
        (
            "requestheader-extra-headers-prefix",
            r#"["X-Remote-Extra-"]"#.into(),
        ),
        (
            "requestheader-group-headers",
            r#"["X-Remote-Group"]"#.into(),
        ),
        (
            "requestheader-username-headers",
            r#"["X-Remote-User"]"#.into(),
        ),
    ];
    let (namespace, name) = AUTHENTICATION_CONFIG_MAP;
    ConfigMap {
        metadata: ObjectMeta {
            namespace: Some(namespace.to_string()),
            name: Some(name.to_string()),
            uid: Some(fresh_uid()),
            creation_timestamp: Some(now()),
            resource_version: Some("0".to_string()),
            ..Default::default()
        },
        data: Some(data.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
        ..Default::default()
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    params
}

/// `openssl -subj` reads `/` and `=` as separators and `\` as the escape.
fn escape(value: &str) -> String {
    value
        .chars()
        .flat_map(|c| match c {
            '\\' | '/' | '=' | '+' => vec!['\\', c],
            c => vec![c],
        })
        .collect()
}

fn write(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Runs `openssl ARGS`, its standard output as text.
fn openssl(args: &[&str]) -> String {
    let output = Command::new(OPENSSL)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {OPENSSL}: {e}"));
    assert!(
        output.status.success(),
        "{OPENSSL} {}: {}\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("openssl writes PEM text")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    fn der(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn names_and_groups_come_from_cn_and_every_o() {
        let ca = ClientCa::generate(KeyKind::EcdsaP256);
        let cert = ca.issue(
            "alice",
            &["system:masters", "dev/ops=x"],
            KeyKind::EcdsaP256,
        );
        assert!(
            cert.key_pem.starts_with("-----BEGIN EC PRIVATE KEY-----"),
            "{}",
            cert.key_pem
        );
        let identity = ca.identify(&der(&cert.cert_pem)).unwrap();
        assert_eq!(identity.name, "alice");
        assert_eq!(
            identity.groups,
            ["system:masters", "dev/ops=x", "system:authenticated"]
        );
        let other = ClientCa::generate(KeyKind::EcdsaP256);
        assert!(other.identify(&der(&cert.cert_pem)).is_none());
    }
}
