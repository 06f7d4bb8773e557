//! API calls described the way RBAC and kubectl name them, so a failure says
//! which permission is missing, or what was not found and where we looked.
use crate::exit::{Failure, Status, root_cause};

use super::Cluster;

pub struct ApiCall<'a> {
    /// The RBAC verb: get, list, create.
    pub verb: &'static str,
    /// The RBAC resource: pods, deployments.apps, pods/portforward.
    pub resource: &'static str,
    /// What a user calls one of them: pod, deployment.
    pub kind: &'static str,
    pub namespace: &'a str,
    pub name: Option<&'a str>,
}

impl<'a> ApiCall<'a> {
    /// `list pods` in `namespace`, the call behind deployments and agents.
    pub fn list_pods(namespace: &'a str) -> Self {
        ApiCall {
            verb: "list",
            resource: "pods",
            kind: "pods",
            namespace,
            name: None,
        }
    }
}

impl ApiCall<'_> {
    pub fn failure(&self, err: kube::Error, cluster: &Cluster) -> Failure {
        let context = &cluster.context;
        let namespace = self.namespace;
        match err {
            kube::Error::Api(status) if status.code == 403 => Failure::new(
                Status::PermissionDenied,
                format!(
                    "no permission to {} {} in namespace {namespace} (context {context}): ask a cluster admin to grant it; manifests/user-roles.yaml holds what remocal needs ({})",
                    self.verb, self.resource, status.message
                ),
            ),
            kube::Error::Api(status) if status.code == 401 => Failure::new(
                Status::PermissionDenied,
                format!(
                    "the cluster of context {context} did not accept your credentials ({}): log in again or renew your token",
                    status.message
                ),
            ),
            kube::Error::Api(status) if status.code == 404 => Failure::new(
                Status::TargetNotFound,
                format!(
                    "{} {} not found in namespace {namespace} (context {context})",
                    self.kind,
                    self.name.unwrap_or_default()
                ),
            ),
            kube::Error::Api(status) => Failure::unexpected(format!(
                "the Kubernetes API of context {context} refused to {} {} in namespace {namespace}: {} ({})",
                self.verb, self.resource, status.message, status.code
            )),
            other => Failure::new(
                Status::AgentUnreachable,
                format!(
                    "cannot reach the Kubernetes API of context {context}: {}",
                    root_cause(&other)
                ),
            ),
        }
    }
}
