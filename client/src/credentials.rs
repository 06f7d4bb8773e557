//! Who we are to the agent: the kubeconfig user's own credential, the one
//! kubectl would use. A token (static, from a file, an exec plugin or OIDC:
//! kube resolves and refreshes it) is sent as it is and the agent asks the
//! API server about it; a client certificate's key never leaves this machine:
//! we sign the agent's challenge with it instead.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use base64::prelude::{BASE64_STANDARD, Engine as _};
use http::{HeaderValue, header::AUTHORIZATION};
use kube::{Config, client::ConfigExt as _};
use prost::Message as _;
use remocal_proto::{
    auth::{CERTIFICATE_SCHEME, CHALLENGE_METADATA, signed_message},
    v1::{CertificateProof, InfoRequest, agent_client::AgentClient},
};
use rustls::{
    SignatureScheme,
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::SigningKey,
};
use secrecy::ExposeSecret as _;
use tonic::transport::Channel;
use tower::{BoxError, Service as _, ServiceExt as _, util::BoxCloneSyncService};

/// A signed challenge is sent again for this long; the agent accepts one
/// for ten minutes after it issued it.
const PROOF_REUSE: Duration = Duration::from_secs(5 * 60);
/// Schemes we can sign with, in the order we prefer them; the agent
/// verifies each of them.
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

#[derive(Clone)]
pub enum Credentials {
    /// Nothing to send (no kubeconfig, or a user without a credential): fine
    /// for an agent running with `--auth none`.
    None {
        why: String,
    },
    Token {
        user: String,
        /// kube's own layer that sets `Authorization`, around a service that
        /// hands the header back.
        header: BoxCloneSyncService<http::Request<String>, http::Response<()>, BoxError>,
    },
    Certificate(Arc<CertificateSigner>),
}

pub struct CertificateSigner {
    user: String,
    chain: Vec<Vec<u8>>,
    key: Arc<dyn SigningKey>,
    proof: tokio::sync::Mutex<Option<(Instant, HeaderValue)>>,
}

impl Credentials {
    /// The credential of a kubeconfig context (or of the pod's service
    /// account, in a cluster).
    pub fn from_config(config: &Config, context: &str) -> Result<Self, String> {
        let user = format!("the user of kubeconfig context {context}");
        let layer = config
            .auth_layer()
            .map_err(|err| format!("cannot use the credential of {user}: {err}"))?;
        if let Some(layer) = layer {
            let echo = tower::service_fn(|request: http::Request<String>| async move {
                let mut echoed = http::Response::new(());
                if let Some(header) = request.headers().get(AUTHORIZATION) {
                    echoed.headers_mut().insert(AUTHORIZATION, header.clone());
                }
                Ok::<_, BoxError>(echoed)
            });
            return Ok(Self::Token {
                user: format!("the token of {user}"),
                header: BoxCloneSyncService::new(tower::Layer::layer(&layer, echo)),
            });
        }
        let auth = &config.auth_info;
        let certificate = pem(
            auth.client_certificate_data.as_deref(),
            auth.client_certificate.as_deref(),
        );
        let key = pem(
            auth.client_key_data
                .as_ref()
                .map(|data| data.expose_secret()),
            auth.client_key.as_deref(),
        );
        match (certificate, key) {
            (Some(certificate), Some(key)) => Ok(Self::Certificate(Arc::new(
                CertificateSigner::new(&certificate?, &key?)
                    .map_err(|err| format!("cannot use the client certificate of {user}: {err}"))?,
            ))),
            _ => Ok(Self::None {
                why: format!("{user} has neither a token nor a client certificate"),
            }),
        }
    }

    /// Whether what we send could be replayed against the API server: a
    /// token could, a certificate proof (good for one agent, for minutes)
    /// could not.
    pub fn is_replayable(&self) -> bool {
        matches!(self, Credentials::Token { .. })
    }

    /// What we send, for error messages.
    pub fn describe(&self) -> String {
        match self {
            Credentials::None { why } => format!("no credential ({why})"),
            Credentials::Token { user, .. } => user.clone(),
            Credentials::Certificate(signer) => {
                format!("proof of the client certificate of {}", signer.user)
            }
        }
    }

    /// The `authorization` header for a call to the agent behind `channel`.
    pub async fn header(&self, channel: &Channel) -> Result<Option<HeaderValue>, String> {
        match self {
            Credentials::None { .. } => Ok(None),
            Credentials::Token { header, user } => {
                let mut header = header.clone();
                let request = http::Request::new(String::new());
                header
                    .ready()
                    .await
                    .map_err(|err| format!("cannot get {user}: {err}"))?
                    .call(request)
                    .await
                    .map_err(|err| format!("cannot get {user}: {err}"))
                    .and_then(|echoed| bearer_only(echoed.headers().get(AUTHORIZATION), user))
            }
            Credentials::Certificate(signer) => signer.header(channel).await.map(Some),
        }
    }
}

/// Only a bearer token goes to an agent: a username and password (basic
/// authentication) would give whoever runs the agent the user's password.
fn bearer_only(header: Option<&HeaderValue>, user: &str) -> Result<Option<HeaderValue>, String> {
    match header {
        Some(value) if value.as_bytes().starts_with(b"Bearer ") => Ok(Some(value.clone())),
        Some(_) => Err(format!(
            "{user} is a username and password, which remocal does not send to agents: use a token or a client certificate"
        )),
        None => Ok(None),
    }
}

/// PEM from a kubeconfig field: inline data (base64 of the PEM) or a file.
fn pem(data: Option<&str>, file: Option<&str>) -> Option<Result<Vec<u8>, String>> {
    if let Some(data) = data {
        return Some(
            BASE64_STANDARD
                .decode(data.trim())
                .map_err(|err| format!("the kubeconfig's certificate data is not base64: {err}")),
        );
    }
    file.map(|path| std::fs::read(path).map_err(|err| format!("cannot read {path}: {err}")))
}

impl CertificateSigner {
    fn new(certificate_pem: &[u8], key_pem: &[u8]) -> Result<Self, String> {
        let chain: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(certificate_pem)
            .filter_map(Result::ok)
            .map(|der| der.to_vec())
            .collect();
        if chain.is_empty() {
            return Err("no certificate in its PEM".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|err| format!("its key cannot be read: {err}"))?;
        let key = any_supported_type(&key).map_err(|err| format!("its key cannot sign: {err}"))?;
        Ok(Self {
            user: subject_name(&chain[0]),
            chain,
            key,
            proof: tokio::sync::Mutex::default(),
        })
    }

    async fn header(&self, channel: &Channel) -> Result<HeaderValue, String> {
        // One refresh at a time: a burst of new connections when the proof
        // turns stale waits for one new challenge instead of asking for one
        // each.
        let mut proof = self.proof.lock().await;
        if let Some((made, header)) = proof.as_ref()
            && made.elapsed() < PROOF_REUSE
        {
            return Ok(header.clone());
        }
        let challenge = challenge(channel).await?;
        let header = self.sign(&challenge)?;
        *proof = Some((Instant::now(), header.clone()));
        Ok(header)
    }

    fn sign(&self, challenge: &[u8]) -> Result<HeaderValue, String> {
        let signer = self.key.choose_scheme(SCHEMES).ok_or(
            "the client certificate's key type cannot sign for remocal (use ECDSA, RSA or Ed25519)",
        )?;
        let signature = signer
            .sign(&signed_message(challenge))
            .map_err(|err| format!("signing the agent's challenge failed: {err}"))?;
        let proof = CertificateProof {
            certificates: self.chain.iter().cloned().map(Into::into).collect(),
            challenge: challenge.to_vec().into(),
            scheme: u16::from(signer.scheme()).into(),
            signature: signature.into(),
        };
        let encoded = BASE64_STANDARD.encode(proof.encode_to_vec());
        HeaderValue::try_from(format!("{CERTIFICATE_SCHEME} {encoded}"))
            .map_err(|err| format!("the certificate proof is not a valid header: {err}"))
    }
}

/// Asks the agent for a challenge: a call that names the certificate
/// scheme without a proof is answered with one.
async fn challenge(channel: &Channel) -> Result<Vec<u8>, String> {
    let mut request = tonic::Request::new(InfoRequest {});
    request.metadata_mut().insert(
        AUTHORIZATION.as_str(),
        tonic::metadata::MetadataValue::from_static(CERTIFICATE_SCHEME),
    );
    match AgentClient::new(channel.clone()).info(request).await {
        Err(status) => status
            .metadata()
            .get_bin(CHALLENGE_METADATA)
            .and_then(|value| value.to_bytes().ok())
            .map(|bytes| bytes.to_vec())
            .ok_or_else(|| format!("the agent gave no challenge to sign: {}", status.message())),
        // An agent that lets anyone in needs no proof; an empty challenge
        // signed is harmless and tells us nothing new.
        Ok(_) => Ok(Vec::new()),
    }
}

/// The certificate's subject as the API server names the user (its CN).
fn subject_name(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .and_then(|(_, certificate)| {
            certificate
                .subject()
                .iter_common_name()
                .find_map(|name| name.as_str().ok().map(str::to_string))
        })
        .map_or_else(|| "an unnamed user".into(), |name| format!("user {name}"))
}
