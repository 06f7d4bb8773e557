//! Bearer tokens (static, exec plugins, OIDC, service accounts: whatever the
//! client's kubeconfig gave it) checked the way the API server checks them,
//! with a TokenReview.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use tokio::sync::Semaphore;
use tonic::Status;
use tracing::warn;

use super::{
    Identity,
    cache::{self, VerdictCache},
};
use crate::kube::within_timeout;

/// How long an accepted token is trusted without asking again: a revoked
/// token keeps working on this agent for at most this long.
const ACCEPTED_FOR: Duration = Duration::from_secs(60);
/// An accepted token is asked about again this long before its answer
/// expires, so its calls never wait for a review (nor fail for want of one).
const REFRESH_BEFORE: Duration = Duration::from_secs(15);
/// A rejected token is not asked about again for this long, so a caller
/// retrying a bad token cannot turn each call into an API request.
const REJECTED_FOR: Duration = Duration::from_secs(10);
/// Reviews in flight at once; more callers wait their turn.
const CONCURRENT_REVIEWS: usize = 8;
/// How long a call waits for its turn to have its token reviewed.
const TURN_WAIT: Duration = Duration::from_secs(2);
/// Longer than any token an API server issues (service-account JWTs and
/// OIDC ID tokens are 1-4 KiB), short enough that a hostile caller's cannot
/// cost much to hash or forward.
const MAX_TOKEN: usize = 16 * 1024;

pub struct TokenReviewer {
    client: Client,
    verdicts: VerdictCache<Result<Identity, String>>,
    reviews: Semaphore,
    /// One review per token at a time: the many calls a new session makes at
    /// once (its connections' calls) wait for the first one's answer.
    in_flight: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
}

impl TokenReviewer {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            verdicts: VerdictCache::default(),
            reviews: Semaphore::new(CONCURRENT_REVIEWS),
            in_flight: Mutex::default(),
        }
    }

    pub async fn review(&self, token: &str) -> Result<Identity, Status> {
        if token.is_empty() || token.len() > MAX_TOKEN {
            return Err(Status::unauthenticated(format!(
                "the bearer token is empty or longer than {MAX_TOKEN} bytes: not a Kubernetes token"
            )));
        }
        let key = cache::key(token.as_bytes());
        let cached = self.verdicts.get_with_time_left(&key);
        let due = match &cached {
            Some((Ok(_), left)) => *left < REFRESH_BEFORE,
            Some((Err(_), _)) => false,
            None => true,
        };
        if !due && let Some((verdict, _)) = cached {
            return verdict.map_err(Status::unauthenticated);
        }
        let this_token = self
            .in_flight
            .lock()
            .expect("in-flight lock")
            .entry(key)
            .or_default()
            .clone();
        let verdict = match cached {
            // An accepted token about to expire: one call asks again while
            // the others go on with the answer they have, and if asking fails
            // (the API server busy or away), so does this one.
            Some((accepted, _)) => match this_token.try_lock() {
                Ok(_only_one) => Ok(self.ask(token, key).await.unwrap_or(accepted)),
                Err(_) => Ok(accepted),
            },
            None => {
                let _only_one = this_token.lock().await;
                match self.verdicts.get(&key) {
                    // Answered while we waited.
                    Some(verdict) => Ok(verdict),
                    None => self.ask(token, key).await,
                }
            }
        };
        let mut in_flight = self.in_flight.lock().expect("in-flight lock");
        // The map's and ours: nobody else waits on this token.
        if Arc::strong_count(&this_token) == 2 {
            in_flight.remove(&key);
        }
        verdict?.map_err(Status::unauthenticated)
    }

    /// Asks the API server, and keeps the answer.
    async fn ask(&self, token: &str, key: [u8; 32]) -> Result<Result<Identity, String>, Status> {
        // A caller flooding the agent with new tokens fills the turns; the
        // others are told to retry rather than queue behind it for ever.
        let _turn = tokio::time::timeout(TURN_WAIT, self.reviews.acquire())
            .await
            .map_err(|_| {
                Status::unavailable(
                    "the agent is busy checking other callers' tokens: retry in a moment",
                )
            })?
            .map_err(|_| Status::unavailable("the agent is shutting down"))?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..Default::default()
        };
        let api = Api::<TokenReview>::all(self.client.clone());
        let status = within_timeout(api.create(&PostParams::default(), &review))
            .await
            .map_err(|reason| {
                warn!(reason, "a TokenReview failed");
                Status::unavailable(format!(
                    "the agent cannot check your token with the API server ({reason}); if it says forbidden, re-apply manifests/ (the agent's ClusterRole needs `create` on tokenreviews)"
                ))
            })?
            .status
            .unwrap_or_default();
        let verdict = match status.user {
            Some(user) if status.authenticated == Some(true) => Ok(Identity {
                user: user.username.unwrap_or_default(),
                uid: user.uid.unwrap_or_default(),
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
            }),
            _ => Err(format!(
                "the cluster rejected your token{}: log in again (refresh your kubeconfig's credentials) and retry",
                status
                    .error
                    .filter(|error| !error.is_empty())
                    .map(|error| format!(" ({error})"))
                    .unwrap_or_default()
            )),
        };
        let lifetime = if verdict.is_ok() {
            ACCEPTED_FOR
        } else {
            REJECTED_FOR
        };
        self.verdicts.put(key, verdict.clone(), lifetime);
        Ok(verdict)
    }
}
