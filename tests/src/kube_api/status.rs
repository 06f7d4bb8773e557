//! Error answers in the apiserver's own shape: a `meta/v1 Status` whose message
//! and details follow apimachinery's `errors.New*` constructors, because clients
//! (kube's `Error::Api`, and remocal's messages built from it) show those texts to
//! the user.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Status, StatusDetails};

/// A resource as apimachinery names it in messages: `pods`, `deployments.apps`.
pub(super) fn qualified(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

fn failure(
    code: StatusCode,
    reason: &str,
    message: String,
    details: Option<StatusDetails>,
) -> Response {
    let status = Status {
        code: Some(i32::from(code.as_u16())),
        details,
        message: Some(message),
        metadata: Default::default(),
        reason: Some(reason.to_string()),
        status: Some("Failure".to_string()),
    };
    json(code, &status)
}

fn details(group: &str, resource: &str, name: &str) -> StatusDetails {
    StatusDetails {
        group: (!group.is_empty()).then(|| group.to_string()),
        kind: Some(resource.to_string()),
        name: (!name.is_empty()).then(|| name.to_string()),
        ..Default::default()
    }
}

/// `errors.NewNotFound`: `pods "web" not found`.
pub(super) fn not_found(group: &str, resource: &str, name: &str) -> Response {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{} \"{name}\" not found", qualified(group, resource)),
        Some(details(group, resource, name)),
    )
}

/// What the apiserver answers for a path no API group serves.
pub(super) fn no_such_path() -> Response {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource".to_string(),
        Some(StatusDetails::default()),
    )
}

/// `errors.NewForbidden`, with the authorizer's reason as its last part. `name` is
/// empty for collections, which changes the message to `pods is forbidden: ...`.
pub(super) fn forbidden(group: &str, resource: &str, name: &str, reason: &str) -> Response {
    let subject = if name.is_empty() {
        qualified(group, resource)
    } else {
        format!("{} \"{name}\"", qualified(group, resource))
    };
    failure(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!("{subject} is forbidden: {reason}"),
        Some(details(group, resource, name)),
    )
}

/// The authentication filter's answer: it says nothing about why.
pub(super) fn unauthorized() -> Response {
    failure(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "Unauthorized".to_string(),
        None,
    )
}

pub(super) fn bad_request(message: String) -> Response {
    failure(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

/// A verb the fake does not implement on a resource it knows (writes, watches):
/// the apiserver's answer for a verb a resource does not support.
pub(super) fn method_not_allowed() -> Response {
    failure(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource".to_string(),
        Some(StatusDetails::default()),
    )
}

pub(super) fn json<T: serde::Serialize>(code: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (code, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("fake apiserver could not encode its answer: {e}"),
        )
            .into_response(),
    }
}
