//! The roles of `manifests/user-roles.yaml` (and the agent's of
//! `manifests/rbac.yaml`), bound in the fake API server the way a platform
//! team binds them: tests grant exactly what the shipped roles say, so a role
//! missing a permission fails the tests that need it.

use std::path::Path;

use serde::Deserialize as _;
use serde_yaml::Value;

use crate::kube_api::FakeKubeApi;

/// Binds the ClusterRole `role` of user-roles.yaml to `subject` (a user, or
/// `group:NAME`) in `namespace`, or cluster-wide with "".
pub fn bind(api: &FakeKubeApi, subject: &str, role: &str, namespace: &str) {
    grant(
        api,
        "user-roles.yaml",
        subject,
        "ClusterRole",
        role,
        "",
        namespace,
    );
}

/// Binds the agent's ClusterRole of rbac.yaml to `subject`, cluster-wide, as
/// its ClusterRoleBinding does.
pub fn bind_agent(api: &FakeKubeApi, subject: &str) {
    grant(
        api,
        "rbac.yaml",
        subject,
        "ClusterRole",
        "remocal-agent",
        "",
        "",
    );
}

/// Binds the Role `role` of user-roles.yaml, in its own namespace.
pub fn bind_role(api: &FakeKubeApi, subject: &str, role: &str, namespace: &str) {
    grant(
        api,
        "user-roles.yaml",
        subject,
        "Role",
        role,
        namespace,
        namespace,
    );
}

fn grant(
    api: &FakeKubeApi,
    file: &str,
    subject: &str,
    kind: &str,
    role: &str,
    own: &str,
    namespace: &str,
) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests")
            .join(file),
    )
    .unwrap_or_else(|err| panic!("read manifests/{file}: {err}"));
    let document = serde_yaml::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).expect("YAML"))
        .find(|document| {
            document["kind"] == kind
                && document["metadata"]["name"] == role
                && (own.is_empty() || document["metadata"]["namespace"] == own)
        })
        .unwrap_or_else(|| panic!("no {kind} {role} in manifests/{file}"));
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
                    let names = strings(&rule["resourceNames"]);
                    if names.is_empty() {
                        api.grant(subject, &verb, &group, &resource, namespace);
                    }
                    for name in names {
                        api.grant_named(subject, &verb, &group, &resource, namespace, &name);
                    }
                }
            }
        }
    }
}
