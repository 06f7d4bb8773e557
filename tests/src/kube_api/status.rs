//! Error answers in the apiserver's own shape: a `meta/v1 Status` whose message
//! and details follow apimachinery's `errors.New*` constructors, because clients
//! (kube's `Error::Api`, and remocal's messages built from it) show those texts to
//! the user.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Status, StatusCause, StatusDetails};

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

/// One of a validation's errors, as apimachinery's `field.Error` prints it.
pub(super) struct FieldError {
    pub field: &'static str,
    /// `None`: a required value is missing; `Some(value)`: the value is invalid.
    pub invalid: Option<String>,
    pub detail: String,
}

impl FieldError {
    pub fn required(field: &'static str, detail: &str) -> FieldError {
        FieldError {
            field,
            invalid: None,
            detail: detail.to_string(),
        }
    }

    pub fn invalid(field: &'static str, value: &str, detail: &str) -> FieldError {
        FieldError {
            field,
            invalid: Some(value.to_string()),
            detail: detail.to_string(),
        }
    }

    fn reason(&self) -> &'static str {
        if self.invalid.is_some() {
            "FieldValueInvalid"
        } else {
            "FieldValueRequired"
        }
    }

    /// The text after the field: `Required value` or `Invalid value: "x"`, and
    /// the detail if any.
    fn message(&self) -> String {
        let what = match &self.invalid {
            None => "Required value".to_string(),
            Some(value) => format!("Invalid value: {value:?}"),
        };
        if self.detail.is_empty() {
            what
        } else {
            format!("{what}: {}", self.detail)
        }
    }
}

/// `errors.NewInvalid`: `Event "x" is invalid: reason: Required value`, the
/// errors in brackets when there are several. `kind` is the object's kind.
pub(super) fn invalid(group: &str, kind: &str, name: &str, errors: &[FieldError]) -> Response {
    let mut shown: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message()))
        .collect();
    let shown = if shown.len() == 1 {
        shown.remove(0)
    } else {
        format!("[{}]", shown.join(", "))
    };
    let causes = errors
        .iter()
        .map(|e| StatusCause {
            field: Some(e.field.to_string()),
            message: Some(e.message()),
            reason: Some(e.reason().to_string()),
        })
        .collect();
    failure(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!("{} {name:?} is invalid: {shown}", qualified(group, kind)),
        Some(StatusDetails {
            causes: Some(causes),
            ..details(group, kind, name)
        }),
    )
}

/// `errors.NewAlreadyExists`: `events "x" already exists`.
pub(super) fn already_exists(group: &str, resource: &str, name: &str) -> Response {
    failure(
        StatusCode::CONFLICT,
        "AlreadyExists",
        format!("{} \"{name}\" already exists", qualified(group, resource)),
        Some(details(group, resource, name)),
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
