//! Who is calling, and what they may do. Every call passes [`AuthLayer`]
//! before any service sees it (the hand-framed data call included), which
//! puts the caller's verified [`Identity`] into the request; sessions then
//! ask [`Auth::authorize`] before they look at their target at all.
mod access;
mod cache;
mod certificates;
mod challenge;
mod layer;
mod tokens;

use std::{collections::BTreeMap, fmt, sync::Arc};

use http::header::AUTHORIZATION;
use kube::Client;
use remocal_proto::auth::{CERTIFICATE_SCHEME, CHALLENGE_METADATA};
use tonic::Status;

use access::AccessReviewer;
pub use access::{Access, AccessError};
use certificates::CertificateChecker;
pub use layer::AuthLayer;
use layer::LogBudget;
use tokens::TokenReviewer;

use crate::metrics::Metrics;

/// A caller as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl Identity {
    /// Every caller of an agent running with `--auth none`.
    pub fn anonymous() -> Self {
        Self {
            user: "anonymous".into(),
            uid: String::new(),
            groups: Vec::new(),
            extra: BTreeMap::new(),
        }
    }

    /// Whether two calls come from the same person: what the API server
    /// would tell apart (a recreated user with the same name has a new uid).
    pub fn same_as(&self, other: &Identity) -> bool {
        self.user == other.user && self.uid == other.uid
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.user)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Callers prove who they are with their kubeconfig credential, and the
    /// cluster's RBAC decides what they may steal or mirror.
    Kubernetes,
    /// Every caller may do anything: only for an agent listening on
    /// loopback, on a machine of one developer (the demo, tests).
    None,
}

pub struct Auth {
    kubernetes: Option<KubernetesAuth>,
    metrics: Arc<Metrics>,
    refusals: LogBudget,
}

struct KubernetesAuth {
    tokens: TokenReviewer,
    certificates: CertificateChecker,
    access: AccessReviewer,
    /// Verdicts on what callers may see (not do), kept briefly.
    sights: cache::VerdictCache<bool>,
}

/// How long a verdict on what a caller may see is kept: someone listing in
/// a loop costs the API server one review per target per this, and a
/// revoked `get` stops showing sessions at most this late.
const SIGHT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10);

impl Auth {
    pub fn none(metrics: Arc<Metrics>) -> Self {
        Self {
            kubernetes: None,
            metrics,
            refusals: LogBudget::default(),
        }
    }

    pub fn kubernetes(client: Client, metrics: Arc<Metrics>) -> Self {
        Self {
            kubernetes: Some(KubernetesAuth {
                tokens: TokenReviewer::new(client.clone()),
                certificates: CertificateChecker::new(client.clone()),
                access: AccessReviewer::new(client),
                sights: cache::VerdictCache::default(),
            }),
            metrics,
            refusals: LogBudget::default(),
        }
    }

    pub fn mode(&self) -> AuthMode {
        if self.kubernetes.is_some() {
            AuthMode::Kubernetes
        } else {
            AuthMode::None
        }
    }

    /// The caller behind a call's headers, or why not (with a challenge to
    /// sign, for users of client certificates).
    pub async fn authenticate(&self, headers: &http::HeaderMap) -> Result<Identity, Status> {
        let Some(kubernetes) = &self.kubernetes else {
            return Ok(Identity::anonymous());
        };
        let credential = headers
            .get(AUTHORIZATION)
            .map(|value| value.to_str().unwrap_or_default());
        let verdict = match credential.map(|value| value.split_once(' ').unwrap_or((value, ""))) {
            None => Err(Status::unauthenticated(
                "this agent needs to know who you are, and the call carried no credential: remocal sends your kubeconfig user's token or proves its client certificate (check `kubectl auth whoami`)",
            )),
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                kubernetes.tokens.review(token.trim()).await
            }
            Some((scheme, proof))
                if scheme.eq_ignore_ascii_case(CERTIFICATE_SCHEME) && proof.trim().is_empty() =>
            {
                Err(Status::unauthenticated(
                    "here is a challenge: sign it with your client certificate's key",
                ))
            }
            Some((scheme, proof)) if scheme.eq_ignore_ascii_case(CERTIFICATE_SCHEME) => {
                kubernetes.certificates.verify(proof).await
            }
            Some(_) => Err(Status::unauthenticated(
                "the call's credential is neither a bearer token nor a certificate proof",
            )),
        };
        verdict.map_err(|mut status| {
            if status.code() == tonic::Code::Unauthenticated
                && let Some(challenge) = kubernetes.certificates.challenge_metadata()
            {
                status
                    .metadata_mut()
                    .insert_bin(CHALLENGE_METADATA, challenge);
            }
            status
        })
    }

    /// Whether `identity` may `access` something to be shown what exists
    /// there (never to do it: that is [`Auth::authorize`], asked afresh);
    /// always on an agent without authentication.
    pub async fn allows_seeing(
        &self,
        identity: &Identity,
        access: &Access,
    ) -> Result<bool, AccessError> {
        let Some(kubernetes) = &self.kubernetes else {
            return Ok(true);
        };
        let key = cache::key(format!("{identity:?}\n{access:?}").as_bytes());
        if let Some(verdict) = kubernetes.sights.get(&key) {
            return Ok(verdict);
        }
        let verdict = match kubernetes.access.check(identity, access).await {
            Ok(()) => true,
            Err(AccessError::Denied { .. }) => false,
            Err(err) => return Err(err),
        };
        kubernetes.sights.put(key, verdict, SIGHT_LIFETIME);
        Ok(verdict)
    }

    /// Whether `identity` may do `access`; always on an agent without
    /// authentication.
    pub async fn authorize(&self, identity: &Identity, access: &Access) -> Result<(), AccessError> {
        match &self.kubernetes {
            Some(kubernetes) => kubernetes.access.check(identity, access).await,
            None => Ok(()),
        }
    }
}
