//! Users of client certificates (kind, minikube and k3s kubeconfigs) prove
//! they hold their key by signing a challenge this agent issued; the
//! certificate must chain to the cluster's client CA, the one the API server
//! itself trusts (published in kube-system/extension-apiserver-authentication).
//! Their name and groups are the certificate's CN and O, as the API server
//! reads them.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::prelude::{BASE64_STANDARD, Engine as _};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use prost::Message as _;
use remocal_proto::{auth::signed_message, v1::CertificateProof};
use rustls::pki_types::{
    CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime, pem::PemObject,
};
use tonic::{Status, metadata::MetadataValue};
use tracing::warn;
use webpki::EndEntityCert;

use super::{
    Identity,
    cache::{self, VerdictCache},
    challenge::Challenges,
};
use crate::kube::within_timeout;

/// The client CA is read again after this long (a rotated CA is picked up).
const AUTHORITY_REFRESH: Duration = Duration::from_secs(5 * 60);
const AUTHORITY_NAMESPACE: &str = "kube-system";
const AUTHORITY_CONFIGMAP: &str = "extension-apiserver-authentication";
const AUTHORITY_KEY: &str = "client-ca-file";
/// A client certificate and its intermediates: kubeconfigs hold one or two.
const MAX_CHAIN: usize = 4;
const MAX_CHAIN_BYTES: usize = 32 * 1024;

type Anchors = Arc<Vec<TrustAnchor<'static>>>;

pub struct CertificateChecker {
    client: Client,
    challenges: Challenges,
    authority: Mutex<Option<(Instant, Anchors)>>,
    verified: VerdictCache<Identity>,
}

impl CertificateChecker {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            challenges: Challenges::new(),
            authority: Mutex::default(),
            verified: VerdictCache::default(),
        }
    }

    /// A challenge for a caller to sign, as the metadata of an answer.
    pub fn challenge_metadata(&self) -> Option<MetadataValue<tonic::metadata::Binary>> {
        Some(MetadataValue::from_bytes(&self.challenges.issue()?))
    }

    /// The identity a `Remocal-Certificate` credential proves.
    pub async fn verify(&self, encoded: &str) -> Result<Identity, Status> {
        let key = cache::key(encoded.as_bytes());
        if let Some(identity) = self.verified.get(&key) {
            return Ok(identity);
        }
        let proof = BASE64_STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|bytes| CertificateProof::decode(bytes.as_slice()).ok())
            .ok_or_else(|| Status::unauthenticated("the certificate proof is malformed"))?;
        if proof.certificates.len() > MAX_CHAIN
            || proof
                .certificates
                .iter()
                .map(|der| der.len())
                .sum::<usize>()
                > MAX_CHAIN_BYTES
        {
            return Err(Status::unauthenticated(format!(
                "the certificate proof holds more than {MAX_CHAIN} certificates or {MAX_CHAIN_BYTES} bytes"
            )));
        }
        let left = self.challenges.check(&proof.challenge)?;
        let anchors = self.authority().await?;
        // Checking a chain costs signature verifications: off the runtime
        // that moves everyone's bytes.
        let identity = tokio::task::spawn_blocking(move || verify_proof(&proof, &anchors))
            .await
            .map_err(|_| Status::internal("verifying the certificate proof failed"))??;
        self.verified.put(key, identity.clone(), left);
        Ok(identity)
    }

    async fn authority(&self) -> Result<Anchors, Status> {
        let known = self.authority.lock().expect("authority lock").clone();
        if let Some((read, anchors)) = &known
            && read.elapsed() < AUTHORITY_REFRESH
        {
            return Ok(anchors.clone());
        }
        let anchors = match (self.read_authority().await, known) {
            (Ok(anchors), _) => Arc::new(anchors),
            // The CA read before stays good while the API server is away;
            // it is asked again at the next refresh.
            (Err(err), Some((_, anchors))) => {
                warn!(
                    reason = err.message(),
                    "cannot read the client CA again; keeping the one read before"
                );
                anchors
            }
            (Err(err), None) => return Err(err),
        };
        *self.authority.lock().expect("authority lock") = Some((Instant::now(), anchors.clone()));
        Ok(anchors)
    }

    async fn read_authority(&self) -> Result<Vec<TrustAnchor<'static>>, Status> {
        let where_ = format!("{AUTHORITY_NAMESPACE}/{AUTHORITY_CONFIGMAP}");
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), AUTHORITY_NAMESPACE);
        let configmap = within_timeout(api.get(AUTHORITY_CONFIGMAP))
            .await
            .map_err(|reason| {
                Status::unavailable(format!(
                    "the agent cannot read the cluster's client CA ({where_}: {reason}); if it says forbidden, re-apply manifests/"
                ))
            })?;
        let pem = configmap
            .data
            .and_then(|mut data| data.remove(AUTHORITY_KEY))
            .unwrap_or_default();
        let anchors: Vec<TrustAnchor<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .filter_map(Result::ok)
            .filter_map(|der| {
                webpki::anchor_from_trusted_cert(&der)
                    .ok()
                    .map(|anchor| anchor.to_owned())
            })
            .collect();
        if anchors.is_empty() {
            return Err(Status::unavailable(format!(
                "{where_} holds no client CA under {AUTHORITY_KEY}: this cluster does not accept client certificates; use a token"
            )));
        }
        Ok(anchors)
    }
}

fn verify_proof(proof: &CertificateProof, anchors: &[TrustAnchor<'_>]) -> Result<Identity, Status> {
    let Some((leaf, intermediates)) = proof.certificates.split_first() else {
        return Err(Status::unauthenticated(
            "the certificate proof holds no certificate",
        ));
    };
    let leaf = CertificateDer::from(&leaf[..]);
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|der| CertificateDer::from(&der[..]))
        .collect();
    let certificate = EndEntityCert::try_from(&leaf).map_err(|err| {
        Status::unauthenticated(format!("your client certificate cannot be read: {err}"))
    })?;
    certificate
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            anchors,
            &intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|err| {
            Status::unauthenticated(format!(
                "your client certificate is not valid for this cluster ({err:?}): it must be signed by the cluster's client CA and not expired"
            ))
        })?;
    let algorithm = algorithm(proof.scheme).ok_or_else(|| {
        Status::unauthenticated(format!(
            "signature scheme {:#06x} is not supported: use an ECDSA, RSA or Ed25519 key",
            proof.scheme
        ))
    })?;
    certificate
        .verify_signature(
            algorithm,
            &signed_message(&proof.challenge),
            &proof.signature,
        )
        .map_err(|_| {
            Status::unauthenticated(
                "the signature over the challenge was not made with your certificate's key",
            )
        })?;
    subject(&leaf)
}

/// TLS SignatureScheme codes, as the client's signer names them.
fn algorithm(scheme: u32) -> Option<&'static dyn SignatureVerificationAlgorithm> {
    Some(match scheme {
        0x0403 => webpki::ring::ECDSA_P256_SHA256,
        0x0503 => webpki::ring::ECDSA_P384_SHA384,
        0x0804 => webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        0x0805 => webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
        0x0806 => webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
        0x0807 => webpki::ring::ED25519,
        _ => return None,
    })
}

/// The API server's reading of a client certificate: CN is the user, each
/// O a group.
fn subject(der: &CertificateDer<'_>) -> Result<Identity, Status> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).map_err(|err| {
        Status::unauthenticated(format!("your client certificate cannot be read: {err}"))
    })?;
    let subject = certificate.subject();
    let unreadable = || Status::unauthenticated("your client certificate's subject cannot be read");
    // Exactly one CN: the API server takes the last of several, and a
    // certificate read two ways must not be read at all.
    let names: Vec<&str> = subject
        .iter_common_name()
        .map(|name| name.as_str().map_err(|_| unreadable()))
        .collect::<Result<_, _>>()?;
    let [user] = names.as_slice() else {
        return Err(Status::unauthenticated(
            "your client certificate must name exactly one user (one CN)",
        ));
    };
    if user.is_empty() {
        return Err(Status::unauthenticated(
            "your client certificate names no user (an empty CN)",
        ));
    }
    let user = user.to_string();
    let mut groups: Vec<String> = subject
        .iter_organization()
        .map(|org| org.as_str().map(str::to_string).map_err(|_| unreadable()))
        .collect::<Result<_, _>>()?;
    groups.push("system:authenticated".to_string());
    Ok(Identity {
        user,
        uid: String::new(),
        groups,
        extra: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    use rustls::{
        SignatureScheme,
        crypto::ring::sign::any_supported_type,
        pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    };

    use super::*;

    struct Authority {
        anchor: TrustAnchor<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn authority() -> Authority {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "kubernetes");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let certificate = params.self_signed(&key).unwrap();
        let der = CertificateDer::from(certificate.der().to_vec());
        let anchor = webpki::anchor_from_trusted_cert(&der).unwrap().to_owned();
        Authority {
            anchor,
            issuer: Issuer::new(params, key),
        }
    }

    /// A client certificate for `names` (CN) and `groups` (O), and its key.
    fn client(authority: &Authority, names: &[&str], groups: &[&str]) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        // rcgen keeps one value per attribute type: further CNs and Os go
        // in under their OIDs spelled out, as separate attributes.
        let repeated = |values: &[&str], first: DnType, oid: &[u64]| {
            values
                .iter()
                .enumerate()
                .map(|(at, value)| {
                    let kind = if at == 0 {
                        first.clone()
                    } else {
                        DnType::CustomDnType(oid.to_vec())
                    };
                    (kind, value.to_string())
                })
                .collect::<Vec<_>>()
        };
        for (kind, value) in repeated(names, DnType::CommonName, &[2, 5, 4, 3])
            .into_iter()
            .chain(repeated(groups, DnType::OrganizationName, &[2, 5, 4, 10]))
        {
            params.distinguished_name.push(kind, value);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let certificate = params.signed_by(&key, &authority.issuer).unwrap();
        (certificate.der().to_vec(), key)
    }

    fn proof(certificate: &[u8], signer: &KeyPair, challenge: &[u8]) -> CertificateProof {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signer.serialize_der()));
        let signer = any_supported_type(&key)
            .unwrap()
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .unwrap();
        CertificateProof {
            certificates: vec![certificate.to_vec().into()],
            challenge: challenge.to_vec().into(),
            scheme: u16::from(signer.scheme()).into(),
            signature: signer.sign(&signed_message(challenge)).unwrap().into(),
        }
    }

    fn refusal(result: Result<Identity, Status>) -> String {
        result.expect_err("must be refused").message().to_string()
    }

    #[test]
    fn the_holder_of_a_certificate_of_the_cluster_is_its_cn_in_its_os() {
        let cluster = authority();
        let (certificate, key) = client(&cluster, &["alice"], &["developers", "oncall"]);
        let identity = verify_proof(
            &proof(&certificate, &key, b"challenge"),
            std::slice::from_ref(&cluster.anchor),
        )
        .unwrap();
        assert_eq!(identity.user, "alice");
        assert_eq!(
            identity.groups,
            ["developers", "oncall", "system:authenticated"]
        );
    }

    #[test]
    fn a_proof_is_refused_unless_everything_about_it_holds() {
        let cluster = authority();
        let anchors = [cluster.anchor.clone()];
        let (certificate, key) = client(&cluster, &["alice"], &[]);

        let (_, other_key) = client(&cluster, &["mallory"], &[]);
        let signed_by_another = proof(&certificate, &other_key, b"challenge");
        assert!(refusal(verify_proof(&signed_by_another, &anchors)).contains("not made with"));

        let mut other_challenge = proof(&certificate, &key, b"challenge");
        other_challenge.challenge = b"another challenge".to_vec().into();
        assert!(refusal(verify_proof(&other_challenge, &anchors)).contains("not made with"));

        let mut wrong_scheme = proof(&certificate, &key, b"challenge");
        wrong_scheme.scheme = 0x0804; // RSA-PSS, for an ECDSA key
        assert!(refusal(verify_proof(&wrong_scheme, &anchors)).contains("not made with"));

        let elsewhere = authority();
        let (foreign, foreign_key) = client(&elsewhere, &["alice"], &[]);
        let foreign = proof(&foreign, &foreign_key, b"challenge");
        assert!(refusal(verify_proof(&foreign, &anchors)).contains("not valid for this cluster"));

        let (two_names, two_key) = client(&cluster, &["alice", "root"], &[]);
        let two_names = proof(&two_names, &two_key, b"challenge");
        assert!(refusal(verify_proof(&two_names, &anchors)).contains("exactly one user"));

        let mut empty = proof(&certificate, &key, b"challenge");
        empty.certificates.clear();
        assert!(refusal(verify_proof(&empty, &anchors)).contains("no certificate"));
    }
}
