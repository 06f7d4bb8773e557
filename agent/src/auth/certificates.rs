//! Users of client certificates (kind, minikube and k3s kubeconfigs) prove
//! they hold their key by signing a challenge this agent issued; the
//! certificate must chain to the cluster's client CA, the one the API server
//! itself trusts (published in kube-system/extension-apiserver-authentication).
//! Their name and groups are the certificate's CN and O, as the API server
//! reads them.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::prelude::{BASE64_STANDARD, Engine as _};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use prost::Message as _;
use remocal_proto::{auth::signed_message, v1::CertificateProof};
use ring::{hmac, rand::SecureRandom as _};
use rustls::pki_types::{
    CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime, pem::PemObject,
};
use tonic::{Status, metadata::MetadataValue};
use webpki::EndEntityCert;

use super::{Identity, cache::VerdictCache};

/// A challenge is good for this long after the agent issued it; the client
/// signs a new one well before (see the client's credentials).
pub const CHALLENGE_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// The client CA is read again after this long (a rotated CA is picked up).
const AUTHORITY_REFRESH: Duration = Duration::from_secs(5 * 60);
const API_TIMEOUT: Duration = Duration::from_secs(10);
const AUTHORITY_NAMESPACE: &str = "kube-system";
const AUTHORITY_CONFIGMAP: &str = "extension-apiserver-authentication";
const AUTHORITY_KEY: &str = "client-ca-file";
/// Issued-at seconds, random bytes, and the agent's MAC over both: the agent
/// keeps no state per challenge, so asking for challenges costs it nothing.
const ISSUED: usize = 8;
const NONCE: usize = 16;
const MAC: usize = 32;
const CHALLENGE_LEN: usize = ISSUED + NONCE + MAC;

type Anchors = Arc<Vec<TrustAnchor<'static>>>;

pub struct CertificateChecker {
    client: Client,
    /// Known only to this agent process: challenges cannot be forged, and
    /// those of an earlier agent are void.
    key: hmac::Key,
    rng: ring::rand::SystemRandom,
    authority: Mutex<Option<(Instant, Anchors)>>,
    verified: VerdictCache<Identity>,
}

impl CertificateChecker {
    pub fn new(client: Client) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("the OS random generator");
        Self {
            client,
            key,
            rng,
            authority: Mutex::default(),
            verified: VerdictCache::default(),
        }
    }

    /// A challenge for a caller to sign, as the metadata of an answer.
    pub fn challenge_metadata(&self) -> Option<MetadataValue<tonic::metadata::Binary>> {
        let mut challenge = vec![0; ISSUED + NONCE];
        challenge[..ISSUED].copy_from_slice(&unix_now().to_be_bytes());
        self.rng.fill(&mut challenge[ISSUED..]).ok()?;
        let tag = hmac::sign(&self.key, &challenge);
        challenge.extend_from_slice(tag.as_ref());
        Some(MetadataValue::from_bytes(&challenge))
    }

    /// The identity a `Remocal-Certificate` credential proves.
    pub async fn verify(&self, encoded: &str) -> Result<Identity, Status> {
        let key = VerdictCache::<()>::key(encoded.as_bytes());
        if let Some(identity) = self.verified.get(&key) {
            return Ok(identity);
        }
        let proof = BASE64_STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|bytes| CertificateProof::decode(bytes.as_slice()).ok())
            .ok_or_else(|| Status::unauthenticated("the certificate proof is malformed"))?;
        let issued = self.check_challenge(&proof.challenge)?;
        let anchors = self.authority().await?;
        let identity = verify_proof(&proof, &anchors)?;
        let left = CHALLENGE_LIFETIME.saturating_sub(Duration::from_secs(unix_now() - issued));
        self.verified.put(key, identity.clone(), left);
        Ok(identity)
    }

    /// When the challenge was issued, if this agent issued it and it is fresh.
    fn check_challenge(&self, challenge: &[u8]) -> Result<u64, Status> {
        let stale = || {
            Status::unauthenticated(
                "the signed challenge is not one of this agent's current challenges: sign a new one",
            )
        };
        if challenge.len() != CHALLENGE_LEN {
            return Err(stale());
        }
        let (signed, tag) = challenge.split_at(ISSUED + NONCE);
        hmac::verify(&self.key, signed, tag).map_err(|_| stale())?;
        let issued = u64::from_be_bytes(signed[..ISSUED].try_into().expect("8 bytes"));
        if unix_now().saturating_sub(issued) > CHALLENGE_LIFETIME.as_secs() {
            return Err(stale());
        }
        Ok(issued)
    }

    async fn authority(&self) -> Result<Anchors, Status> {
        if let Some((read, anchors)) = self.authority.lock().expect("authority lock").as_ref()
            && read.elapsed() < AUTHORITY_REFRESH
        {
            return Ok(anchors.clone());
        }
        let anchors = Arc::new(self.read_authority().await?);
        *self.authority.lock().expect("authority lock") = Some((Instant::now(), anchors.clone()));
        Ok(anchors)
    }

    async fn read_authority(&self) -> Result<Vec<TrustAnchor<'static>>, Status> {
        let where_ = format!("{AUTHORITY_NAMESPACE}/{AUTHORITY_CONFIGMAP}");
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), AUTHORITY_NAMESPACE);
        let configmap = match tokio::time::timeout(API_TIMEOUT, api.get(AUTHORITY_CONFIGMAP)).await
        {
            Ok(Ok(configmap)) => configmap,
            Ok(Err(err)) => {
                return Err(Status::unavailable(format!(
                    "the agent cannot read the cluster's client CA ({where_}: {}); if it says forbidden, re-apply manifests/",
                    super::api_reason(&err)
                )));
            }
            Err(_) => {
                return Err(Status::unavailable(format!(
                    "the agent cannot read the cluster's client CA: the API server did not answer within {API_TIMEOUT:?}"
                )));
            }
        };
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
    let user = subject
        .iter_common_name()
        .find_map(|name| name.as_str().ok())
        .unwrap_or_default()
        .to_string();
    if user.is_empty() {
        return Err(Status::unauthenticated(
            "your client certificate names no user (no CN)",
        ));
    }
    let mut groups: Vec<String> = subject
        .iter_organization()
        .filter_map(|org| org.as_str().ok().map(str::to_string))
        .collect();
    groups.push("system:authenticated".to_string());
    Ok(Identity {
        user,
        uid: String::new(),
        groups,
        extra: Default::default(),
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}
