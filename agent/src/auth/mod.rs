//! Who is calling, and what they may do. Every call passes [`AuthLayer`]
//! before any service sees it (the hand-framed data call included), which
//! puts the caller's verified [`Identity`] into the request; sessions then
//! ask [`Auth::authorize`] before they look at their target at all.
mod access;
mod cache;
mod certificates;
mod challenge;
mod tokens;

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use http::header::AUTHORIZATION;
use kube::Client;
use remocal_proto::auth::{CERTIFICATE_SCHEME, CHALLENGE_METADATA};
use tonic::{
    Status,
    body::Body,
    codegen::{BoxFuture, Service},
};
use tower_layer::Layer;
use tracing::warn;

use access::AccessReviewer;
pub use access::{Access, AccessError};
use certificates::CertificateChecker;
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

/// At most one log line per [`LogBudget::EVERY`] for refused calls: a
/// caller flooding the agent fills the metric, not the node's disk. Each
/// line says how many refusals went unlogged before it.
#[derive(Default)]
struct LogBudget {
    last: Mutex<Option<Instant>>,
    unlogged: AtomicU64,
}

impl LogBudget {
    const EVERY: Duration = Duration::from_millis(100);

    fn log_now(&self) -> Option<u64> {
        let mut last = self.last.lock().expect("log budget lock");
        if last.is_some_and(|last| last.elapsed() < Self::EVERY) {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }
}

struct KubernetesAuth {
    tokens: TokenReviewer,
    certificates: CertificateChecker,
    access: AccessReviewer,
}

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

    /// Whether `identity` may do `access`; always on an agent without
    /// authentication.
    pub async fn authorize(&self, identity: &Identity, access: &Access) -> Result<(), AccessError> {
        match &self.kubernetes {
            Some(kubernetes) => kubernetes.access.check(identity, access).await,
            None => Ok(()),
        }
    }
}

/// `authorization: Remocal-Certificate` without a proof: a certificate
/// user's first call, answered with a challenge to sign.
fn asks_for_challenge(headers: &http::HeaderMap) -> bool {
    headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().eq_ignore_ascii_case(CERTIFICATE_SCHEME))
}

/// Puts every call behind [`Auth::authenticate`].
#[derive(Clone)]
pub struct AuthLayer(pub Arc<Auth>);

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            auth: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    auth: Arc<Auth>,
}

impl<S, B> Service<http::Request<B>> for Authenticated<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The service that was polled ready serves this call; a clone takes
        // its place for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            match auth.authenticate(request.headers()).await {
                Ok(identity) => {
                    request.extensions_mut().insert(identity);
                    inner.call(request).await
                }
                // A certificate user asking for a challenge to sign is not
                // refused anything: no error to count or log.
                Err(status) if asks_for_challenge(request.headers()) => Ok(status.into_http()),
                Err(status) => {
                    if let Some(unlogged) = auth.refusals.log_now() {
                        warn!(
                            call = request.uri().path(),
                            reason = status.message(),
                            unlogged,
                            "refused a call"
                        );
                    }
                    auth.metrics.session_error(status.code());
                    Ok(status.into_http())
                }
            }
        })
    }
}
