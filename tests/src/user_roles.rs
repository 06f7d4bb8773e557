//! The roles of `manifests/user-roles.yaml`, bound in the fake API server the
//! way a platform team binds them: tests grant exactly what the shipped roles
//! say, so a role missing a permission fails the tests that need it.

use std::path::Path;

use serde::Deserialize as _;
use serde_yaml::Value;

use crate::kube_api::FakeKubeApi;

/// Binds the ClusterRole `role` of user-roles.yaml to `subject` (a user, or
/// `group:NAME`) in `namespace`, or cluster-wide with "".
pub fn bind(api: &FakeKubeApi, subject: &str, role: &str, namespace: &str) {
    grant(api, subject, "ClusterRole", role, "", namespace);
}

/// Binds the Role `role` of user-roles.yaml, in its own namespace.
pub fn bind_role(api: &FakeKubeApi, subject: &str, role: &str, namespace: &str) {
    grant(api, subject, "Role", role, namespace, namespace);
}

fn grant(api: &FakeKubeApi, subject: &str, kind: &str, role: &str, own: &str, namespace: &str) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/user-roles.yaml"),
    )
    .expect("read manifests/user-roles.yaml");
    let document = serde_yaml::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).expect("YAML"))
        .find(|document| {
            document["kind"] == kind
                && document["metadata"]["name"] == role
                && (own.is_empty() || document["metadata"]["namespace"] == own)
        })
        .unwrap_or_else(|| panic!("no {kind} {role} in manifests/user-roles.yaml"));
    let strings = |value: &Value| -> Vec<String> {
        value
            .as_sequence()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| item.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    for rule in document["rules"].as_sequence().expect("rules") {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    api.grant(subject, &verb, &group, &resource, namespace);
                }
            }
        }
    }
}
