//! Events, as components record them on the objects they act on. The
//! apiserver keeps one kind of Event and serves it through both core/v1 and
//! events.k8s.io/v1, so the fake stores core/v1 Events and converts the others
//! (apiserver's conversion: `note` is `message`, `regarding` is
//! `involvedObject`, `deprecated*` are the old fields). Creation is validated as
//! the apiserver validates it, so an event the agent writes wrong fails here
//! as it would in a cluster.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::Response;
use k8s_openapi::api::core::v1::{Event, EventSeries};
use k8s_openapi::api::events::v1::Event as EventV1;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::Cluster;
use super::request_info::RequestInfo;
use super::selectors::Selectable;
use super::status::{self, FieldError};

const GROUP_V1: &str = "events.k8s.io";
/// The characters the apiserver appends to a `generateName`.
const GENERATED_SUFFIX_LEN: usize = 5;

/// `POST /api/v1/namespaces/NS/events`.
pub(super) fn create(cluster: &mut Cluster, info: &RequestInfo, body: &[u8]) -> Response {
    let mut event: Event = match serde_json::from_slice(body) {
        Ok(event) => event,
        Err(e) => return decode_error(e),
    };
    if let Err(refused) = name(&mut event.metadata, info) {
        return refused.response("");
    }
    let errors = validate(&event, "reportingComponent", false);
    if !errors.is_empty() {
        return status::invalid("", "Event", &name_of(&event.metadata), &errors);
    }
    match store(cluster, event) {
        Ok(event) => status::json(StatusCode::CREATED, &event),
        Err(taken) => status::already_exists("", "events", &taken),
    }
}

/// `POST /apis/events.k8s.io/v1/namespaces/NS/events`.
pub(super) fn create_v1(cluster: &mut Cluster, info: &RequestInfo, body: &[u8]) -> Response {
    let mut event: EventV1 = match serde_json::from_slice(body) {
        Ok(event) => event,
        Err(e) => return decode_error(e),
    };
    if let Err(refused) = name(&mut event.metadata, info) {
        return refused.response(GROUP_V1);
    }
    let core = to_core(event.clone());
    let errors = validate(&core, "reportingController", true);
    if !errors.is_empty() {
        return status::invalid(GROUP_V1, "Event", &name_of(&core.metadata), &errors);
    }
    match store(cluster, core) {
        Ok(stored) => {
            event.metadata = stored.metadata;
            status::json(StatusCode::CREATED, &event)
        }
        Err(taken) => status::already_exists(GROUP_V1, "events", &taken),
    }
}

fn decode_error(e: serde_json::Error) -> Response {
    status::bad_request(format!("the fake apiserver could not decode an Event: {e}"))
}

fn name_of(metadata: &ObjectMeta) -> String {
    metadata.name.clone().unwrap_or_default()
}

/// Why an event's namespace or name cannot be.
enum Unnamed {
    OtherNamespace,
    NoName,
}

impl Unnamed {
    fn response(self, group: &str) -> Response {
        match self {
            Unnamed::OtherNamespace => status::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
                    .into(),
            ),
            Unnamed::NoName => status::invalid(
                group,
                "Event",
                "",
                &[FieldError::required(
                    "metadata.name",
                    "name or generateName is required",
                )],
            ),
        }
    }
}

/// The request's namespace and the object's must agree; a `generateName`
/// becomes a name.
fn name(metadata: &mut ObjectMeta, info: &RequestInfo) -> Result<(), Unnamed> {
    match &metadata.namespace {
        Some(namespace) if !namespace.is_empty() && *namespace != info.namespace => {
            return Err(Unnamed::OtherNamespace);
        }
        _ => metadata.namespace = Some(info.namespace.clone()),
    }
    if metadata.name.as_deref().unwrap_or("").is_empty() {
        let Some(prefix) = metadata.generate_name.as_deref().filter(|p| !p.is_empty()) else {
            return Err(Unnamed::NoName);
        };
        let suffix: String = super::fresh_uid()
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(GENERATED_SUFFIX_LEN)
            .collect();
        metadata.name = Some(format!("{prefix}{suffix}"));
    }
    Ok(())
}

/// `Err(name)` if an event of that name exists.
fn store(cluster: &mut Cluster, mut event: Event) -> Result<Event, String> {
    let key = (
        event.metadata.namespace.clone().unwrap_or_default(),
        name_of(&event.metadata),
    );
    if cluster.events.contains_key(&key) {
        return Err(key.1);
    }
    cluster.stamp(&mut event.metadata);
    cluster.events.insert(key, event.clone());
    Ok(event)
}

/// Apiserver's `legacyValidateEvent` (and, for events.k8s.io, the fields its
/// stricter validation requires), which every created Event passes.
fn validate(event: &Event, reporting_field: &'static str, strict: bool) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let name = name_of(&event.metadata);
    if !is_dns_subdomain(&name) {
        errors.push(FieldError::invalid(
            "metadata.name",
            &name,
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        ));
    }
    let namespace = event.metadata.namespace.as_deref().unwrap_or("");
    let involved = event.involved_object.namespace.as_deref().unwrap_or("");
    let text = |value: &Option<String>| value.as_deref().unwrap_or("").is_empty();
    let namespace_mismatch = if event.event_time.is_none() {
        if strict {
            errors.push(FieldError::required("eventTime", ""));
        }
        if involved.is_empty() {
            namespace != "default"
        } else {
            namespace != involved
        }
    } else {
        if text(&event.reporting_component) {
            errors.push(FieldError::required(reporting_field, ""));
        }
        if text(&event.reporting_instance) {
            errors.push(FieldError::required("reportingInstance", ""));
        }
        if text(&event.action) {
            errors.push(FieldError::required("action", ""));
        }
        if text(&event.reason) {
            errors.push(FieldError::required("reason", ""));
        }
        involved.is_empty() && namespace != "default" && namespace != "kube-system"
    };
    if namespace_mismatch {
        errors.push(FieldError::invalid(
            "involvedObject.namespace",
            involved,
            "does not match event.namespace",
        ));
    }
    errors
}

fn is_dns_subdomain(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| alnum(c) || c == '-' || c == '.')
        && name.starts_with(alnum)
        && name.ends_with(alnum)
}

fn to_core(event: EventV1) -> Event {
    Event {
        action: event.action,
        count: event.deprecated_count,
        event_time: event.event_time,
        first_timestamp: event.deprecated_first_timestamp,
        involved_object: event.regarding.unwrap_or_default(),
        last_timestamp: event.deprecated_last_timestamp,
        message: event.note,
        metadata: event.metadata,
        reason: event.reason,
        related: event.related,
        reporting_component: event.reporting_controller,
        reporting_instance: event.reporting_instance,
        series: event.series.map(|s| EventSeries {
            count: Some(s.count),
            last_observed_time: Some(s.last_observed_time),
        }),
        source: event.deprecated_source,
        type_: event.type_,
    }
}

impl Selectable for Event {
    const FIELDS: &'static [&'static str] = &[
        "metadata.name",
        "metadata.namespace",
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    ];

    fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.labels.as_ref()
    }

    fn field(&self, name: &str) -> String {
        let object = &self.involved_object;
        let value = match name {
            "metadata.name" => self.metadata.name.as_ref(),
            "metadata.namespace" => self.metadata.namespace.as_ref(),
            "involvedObject.kind" => object.kind.as_ref(),
            "involvedObject.namespace" => object.namespace.as_ref(),
            "involvedObject.name" => object.name.as_ref(),
            "involvedObject.uid" => object.uid.as_ref(),
            "involvedObject.apiVersion" => object.api_version.as_ref(),
            "involvedObject.resourceVersion" => object.resource_version.as_ref(),
            "involvedObject.fieldPath" => object.field_path.as_ref(),
            "reason" => self.reason.as_ref(),
            "reportingComponent" => self.reporting_component.as_ref(),
            "source" => self.source.as_ref().and_then(|s| s.component.as_ref()),
            "type" => self.type_.as_ref(),
            _ => None,
        };
        value.cloned().unwrap_or_default()
    }
}
