//! Who may steal or mirror what, decided by the cluster's own RBAC: the
//! agent asks the API server with a SubjectAccessReview for the verified
//! user, so a platform team grants remocal like any other permission.
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::{Api, Client, api::PostParams};

use super::Identity;
use crate::kube::within_timeout;

pub const API_GROUP: &str = "remocal.dev";

/// What a caller asks to do, in RBAC's terms.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `create` on `pods/SUBRESOURCE` (steal, steal-filtered, mirror,
    /// reset-connections) of one pod.
    Pod {
        namespace: String,
        name: String,
        subresource: &'static str,
    },
    /// `create` on `nodes/targets` of this node: any namespace or process on
    /// it, which only node admins may touch.
    Node { node: String },
    /// `get` on a pod (core API group): who may read a pod may see who
    /// intercepts it.
    ReadPod { namespace: String, name: String },
}

impl Access {
    fn attributes(&self) -> ResourceAttributes {
        let (group, verb, resource, subresource, namespace, name) = match self {
            Access::Pod {
                namespace,
                name,
                subresource,
            } => (
                API_GROUP,
                "create",
                "pods",
                Some(*subresource),
                Some(namespace.clone()),
                name.clone(),
            ),
            Access::Node { node } => (
                API_GROUP,
                "create",
                "nodes",
                Some("targets"),
                None,
                node.clone(),
            ),
            Access::ReadPod { namespace, name } => (
                "",
                "get",
                "pods",
                None,
                Some(namespace.clone()),
                name.clone(),
            ),
        };
        ResourceAttributes {
            group: Some(group.to_string()),
            resource: Some(resource.to_string()),
            subresource: subresource.map(str::to_string),
            verb: Some(verb.to_string()),
            namespace,
            name: Some(name),
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "user {user:?} may not {action} {scope}{reason}: ask a cluster admin for it (manifests/user-roles.yaml: {role})"
    )]
    Denied {
        user: String,
        /// The verb and resource, with its API group.
        action: String,
        scope: String,
        reason: String,
        role: &'static str,
    },
    #[error(
        "the agent cannot check your permissions with the API server ({0}); if it says forbidden, re-apply manifests/ (the agent's ClusterRole needs `create` on subjectaccessreviews)"
    )]
    Unavailable(String),
}

pub struct AccessReviewer {
    client: Client,
}

impl AccessReviewer {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    pub async fn check(&self, identity: &Identity, access: &Access) -> Result<(), AccessError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(identity.user.clone()),
                uid: Some(identity.uid.clone()).filter(|uid| !uid.is_empty()),
                groups: Some(identity.groups.clone()),
                extra: Some(identity.extra.clone()).filter(|extra| !extra.is_empty()),
                resource_attributes: Some(access.attributes()),
                ..Default::default()
            },
            ..Default::default()
        };
        let api = Api::<SubjectAccessReview>::all(self.client.clone());
        let status = within_timeout(api.create(&PostParams::default(), &review))
            .await
            .map_err(AccessError::Unavailable)?
            .status
            .unwrap_or_default();
        if status.allowed {
            return Ok(());
        }
        Err(denied(identity, access, status.reason))
    }
}

fn denied(identity: &Identity, access: &Access, reason: Option<String>) -> AccessError {
    let (action, scope, role) = match access {
        Access::Pod {
            namespace,
            name,
            subresource,
        } => (
            format!("create pods/{subresource} in API group {API_GROUP}"),
            format!("for pod {name} in namespace {namespace:?}"),
            if *subresource == "mirror" {
                "remocal-user or remocal-mirror-only, bound in that namespace"
            } else {
                "remocal-user, bound in that namespace"
            },
        ),
        Access::Node { node } => (
            format!("create nodes/targets in API group {API_GROUP}"),
            format!("on node {node} (namespaces and processes on the node)"),
            "remocal-node-admin",
        ),
        Access::ReadPod { namespace, name } => (
            "get pods".to_string(),
            format!("for pod {name} in namespace {namespace:?}"),
            "remocal-user or remocal-mirror-only, bound in that namespace",
        ),
    };
    AccessError::Denied {
        user: identity.user.clone(),
        action,
        scope,
        reason: reason
            .filter(|reason| !reason.is_empty())
            .map(|reason| format!(" ({reason})"))
            .unwrap_or_default(),
        role,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_names_user_verb_resource_and_namespace() {
        let identity = Identity {
            user: "alice".into(),
            ..Identity::anonymous()
        };
        let access = Access::Pod {
            namespace: "shop".into(),
            name: "web".into(),
            subresource: "steal",
        };
        let message = denied(&identity, &access, None).to_string();
        for part in [
            "\"alice\"",
            "create pods/steal",
            "remocal.dev",
            "\"shop\"",
            "web",
        ] {
            assert!(message.contains(part), "{part} in {message}");
        }
        let attributes = access.attributes();
        assert_eq!(attributes.verb.as_deref(), Some("create"));
        assert_eq!(attributes.subresource.as_deref(), Some("steal"));
        let node = Access::Node {
            node: "node-a".into(),
        }
        .attributes();
        assert_eq!(node.namespace, None, "nodes are cluster-scoped");
        assert_eq!(node.name.as_deref(), Some("node-a"));
        let read = Access::ReadPod {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let attributes = read.attributes();
        assert_eq!(
            (
                attributes.group.as_deref(),
                attributes.verb.as_deref(),
                attributes.resource.as_deref(),
                attributes.subresource,
            ),
            (Some(""), Some("get"), Some("pods"), None),
            "the core group's own permission"
        );
        let message = denied(&identity, &read, None).to_string();
        assert!(
            message.contains("may not get pods for pod web"),
            "{message}"
        );
    }
}
