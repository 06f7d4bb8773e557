//! Bearer tokens (static, exec plugins, OIDC, service accounts: whatever the
//! client's kubeconfig gave it) checked the way the API server checks them,
//! with a TokenReview.
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use tokio::sync::Semaphore;
use tonic::Status;
use tracing::warn;

use super::{Identity, cache::VerdictCache};

/// How long an accepted token is trusted without asking again: a revoked
/// token keeps working on this agent for at most this long.
const ACCEPTED_FOR: Duration = Duration::from_secs(60);
/// A rejected token is not asked about again for this long, so a caller
/// retrying a bad token cannot turn each call into an API request.
const REJECTED_FOR: Duration = Duration::from_secs(10);
/// Reviews in flight at once; more callers wait their turn.
const CONCURRENT_REVIEWS: usize = 8;
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TokenReviewer {
    client: Client,
    verdicts: VerdictCache<Result<Identity, String>>,
    reviews: Semaphore,
}

impl TokenReviewer {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            verdicts: VerdictCache::default(),
            reviews: Semaphore::new(CONCURRENT_REVIEWS),
        }
    }

    pub async fn review(&self, token: &str) -> Result<Identity, Status> {
        let key = VerdictCache::<()>::key(token.as_bytes());
        if let Some(verdict) = self.verdicts.get(&key) {
            return verdict.map_err(Status::unauthenticated);
        }
        let _turn = self
            .reviews
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the agent is shutting down"))?;
        // Someone else may have asked while we waited.
        if let Some(verdict) = self.verdicts.get(&key) {
            return verdict.map_err(Status::unauthenticated);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..Default::default()
        };
        let api = Api::<TokenReview>::all(self.client.clone());
        let answer =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review)).await;
        let status = match answer {
            Ok(Ok(review)) => review.status.unwrap_or_default(),
            Ok(Err(err)) => {
                warn!(%err, "a TokenReview failed");
                return Err(Status::unavailable(format!(
                    "the agent cannot check your token with the API server ({}); if it says forbidden, re-apply manifests/ (the agent's ClusterRole needs `create` on tokenreviews)",
                    super::api_reason(&err)
                )));
            }
            Err(_) => {
                return Err(Status::unavailable(format!(
                    "the agent cannot check your token: the API server did not answer a TokenReview within {REVIEW_TIMEOUT:?}"
                )));
            }
        };
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
        verdict.map_err(Status::unauthenticated)
    }
}
