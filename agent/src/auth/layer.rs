//! The tower layer every call passes before any service sees it: it puts
//! the caller's verified [`Identity`] into the request, or answers the call
//! itself with the refusal.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use http::header::AUTHORIZATION;
use remocal_proto::auth::CERTIFICATE_SCHEME;
use tonic::{
    body::Body,
    codegen::{BoxFuture, Service},
};
use tower_layer::Layer;
use tracing::warn;

use super::Auth;

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

/// `authorization: Remocal-Certificate` without a proof: a certificate
/// user's first call, answered with a challenge to sign.
fn asks_for_challenge(headers: &http::HeaderMap) -> bool {
    headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().eq_ignore_ascii_case(CERTIFICATE_SCHEME))
}

/// At most one log line per [`LogBudget::EVERY`] for refused calls: a
/// caller flooding the agent fills the metric, not the node's disk. Each
/// line says how many refusals went unlogged before it.
#[derive(Default)]
pub(super) struct LogBudget {
    last: Mutex<Option<Instant>>,
    unlogged: AtomicU64,
}

impl LogBudget {
    const EVERY: Duration = Duration::from_millis(100);

    pub(super) fn log_now(&self) -> Option<u64> {
        let mut last = self.last.lock().expect("log budget lock");
        if last.is_some_and(|last| last.elapsed() < Self::EVERY) {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }
}
