//! TokenReview and SubjectAccessReview, the APIs a component (the agent) uses
//! to ask the apiserver who a credential is and what a user may do. Answers
//! come from the same users and rules as the fake's own requests, and every
//! review is recorded so tests can check what was asked (and how often).

use axum::http::StatusCode;
use axum::response::Response;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use k8s_openapi::api::authorization::v1::{SubjectAccessReview, SubjectAccessReviewStatus};

use super::Cluster;
use super::request_info::RequestInfo;
use super::status::{self, FieldError};

/// The audience every token of the fake is good for, as kubeadm's apiserver
/// says (`--api-audiences`, by default the service account issuer).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// One SubjectAccessReview as the fake received and answered it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessReview {
    pub user: String,
    pub groups: Vec<String>,
    pub verb: String,
    /// The API group (`remocal.dev`); `""` for the core group.
    pub group: String,
    pub resource: String,
    pub subresource: String,
    /// `""` for cluster-scoped resources.
    pub namespace: String,
    pub name: String,
    /// The URL path of a non-resource review (`nonResourceAttributes`), else `""`.
    pub path: String,
    pub allowed: bool,
}

/// The review in `body`, or the answer to a body that is none.
fn decode<T: serde::de::DeserializeOwned>(body: &[u8], kind: &str) -> Result<T, String> {
    serde_json::from_slice(body)
        .map_err(|e| format!("the fake apiserver could not decode a {kind}: {e}"))
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`.
pub(super) fn token_review(cluster: &mut Cluster, body: &[u8]) -> Response {
    let mut review: TokenReview = match decode(body, "TokenReview") {
        Ok(review) => review,
        Err(message) => return status::bad_request(message),
    };
    let token = review.spec.token.clone().unwrap_or_default();
    if token.is_empty() {
        // The apiserver's own words (tokenreview storage).
        return status::bad_request("token is required for TokenReview in authentication".into());
    }
    cluster.token_reviews.push(token.clone());
    let requested = review.spec.audiences.clone().unwrap_or_default();
    // Tokens here are audience-agnostic (like static or webhook tokens): the
    // apiserver authenticates them only for audiences it serves itself, and
    // says nothing about why not otherwise.
    let serves_audience = requested.is_empty() || requested.iter().any(|a| a == API_AUDIENCE);
    let status = match cluster.policy.review_token(&token) {
        Ok(_) if !serves_audience => TokenReviewStatus {
            authenticated: Some(false),
            ..Default::default()
        },
        Ok(identity) => TokenReviewStatus {
            audiences: Some(vec![API_AUDIENCE.to_string()]),
            authenticated: Some(true),
            error: None,
            user: Some(UserInfo {
                extra: None,
                groups: Some(identity.groups),
                uid: Some(identity.uid),
                username: Some(identity.name),
            }),
        },
        Err(error) => TokenReviewStatus {
            authenticated: Some(false),
            error: Some(error.message().to_string()),
            ..Default::default()
        },
    };
    review.status = Some(status);
    status::json(StatusCode::CREATED, &review)
}

/// `POST /apis/authorization.k8s.io/v1/subjectaccessreviews`.
pub(super) fn subject_access_review(cluster: &mut Cluster, body: &[u8]) -> Response {
    let mut review: SubjectAccessReview = match decode(body, "SubjectAccessReview") {
        Ok(review) => review,
        Err(message) => return status::bad_request(message),
    };
    let spec = &review.spec;
    let user = spec.user.clone().unwrap_or_default();
    let groups = spec.groups.clone().unwrap_or_default();
    // The apiserver's validation of the spec.
    let mut errors = Vec::new();
    match (&spec.resource_attributes, &spec.non_resource_attributes) {
        (Some(_), Some(_)) => errors.push(FieldError::invalid(
            "spec.nonResourceAttributes",
            "",
            "cannot be specified in combination with resourceAttributes",
        )),
        (None, None) => errors.push(FieldError::required(
            "spec.resourceAttributes",
            "exactly one of nonResourceAttributes or resourceAttributes must be specified",
        )),
        _ => {}
    }
    if user.is_empty() && groups.is_empty() {
        errors.push(FieldError::invalid(
            "spec.user",
            "",
            "at least one of user or group must be specified",
        ));
    }
    if !errors.is_empty() {
        return status::invalid("authorization.k8s.io", "SubjectAccessReview", "", &errors);
    }

    let mut asked = AccessReview {
        user,
        groups,
        ..Default::default()
    };
    let decision = if let Some(attributes) = &spec.resource_attributes {
        let text = |value: &Option<String>| value.clone().unwrap_or_default();
        let info = RequestInfo {
            verb: text(&attributes.verb),
            group: text(&attributes.group),
            version: text(&attributes.version),
            resource: text(&attributes.resource),
            subresource: text(&attributes.subresource),
            namespace: text(&attributes.namespace),
            name: text(&attributes.name),
        };
        let decision = cluster
            .policy
            .rbac
            .decide(&asked.user, &asked.groups, &info.verb, &info);
        asked.verb = info.verb;
        asked.group = info.group;
        asked.resource = info.resource;
        asked.subresource = info.subresource;
        asked.namespace = info.namespace;
        asked.name = info.name;
        (decision.allowed, decision.denied, decision.reason)
    } else {
        let attributes = spec.non_resource_attributes.clone().unwrap_or_default();
        asked.verb = attributes.verb.unwrap_or_default();
        asked.path = attributes.path.unwrap_or_default();
        // The fake has no rules for URLs: `/version`, `/healthz` and the like
        // are open to every user, as in a cluster's default RBAC.
        (
            true,
            false,
            "the fake apiserver allows every non-resource URL".to_string(),
        )
    };
    let (allowed, denied, reason) = decision;
    asked.allowed = allowed;
    cluster.access_reviews.push(asked);
    review.status = Some(SubjectAccessReviewStatus {
        allowed,
        denied: denied.then_some(true),
        evaluation_error: None,
        reason: Some(reason),
    });
    status::json(StatusCode::CREATED, &review)
}
