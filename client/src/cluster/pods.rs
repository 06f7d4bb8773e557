//! The pod a session targets: named directly, or one ready pod of a
//! deployment, like `kubectl port-forward deploy/NAME` picks one.
use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{Api, api::ListParams};

use super::{Cluster, api_call::ApiCall};
use crate::exit::{Failure, Status};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Workload {
    Pod(String),
    Deployment(String),
}

/// A pod to steal from, and the node whose agent can do it.
#[derive(Clone, Debug)]
pub struct TargetPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
}

pub async fn find_pod(
    cluster: &Cluster,
    namespace: &str,
    workload: &Workload,
) -> Result<TargetPod, Failure> {
    let pod = match workload {
        Workload::Pod(name) => get_pod(cluster, namespace, name).await?,
        Workload::Deployment(name) => ready_pod_of(cluster, namespace, name).await?,
    };
    let name = pod.metadata.name.clone().unwrap_or_default();
    let node = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.node_name.clone())
        .unwrap_or_default();
    if node.is_empty() {
        return Err(Failure::new(
            Status::Rejected,
            format!(
                "pod {namespace}/{name} is not scheduled on a node yet (phase {}): wait until it runs",
                phase(&pod)
            ),
        ));
    }
    Ok(TargetPod {
        namespace: namespace.to_string(),
        name,
        node,
    })
}

async fn get_pod(cluster: &Cluster, namespace: &str, name: &str) -> Result<Pod, Failure> {
    let call = ApiCall {
        verb: "get",
        resource: "pods",
        kind: "pod",
        namespace,
        name: Some(name),
    };
    Api::<Pod>::namespaced(cluster.client.clone(), namespace)
        .get(name)
        .await
        .map_err(|err| call.failure(err, cluster))
}

async fn ready_pod_of(cluster: &Cluster, namespace: &str, name: &str) -> Result<Pod, Failure> {
    let call = ApiCall {
        verb: "get",
        resource: "deployments.apps",
        kind: "deployment",
        namespace,
        name: Some(name),
    };
    let deployment = Api::<Deployment>::namespaced(cluster.client.clone(), namespace)
        .get(name)
        .await
        .map_err(|err| call.failure(err, cluster))?;
    let selector = deployment
        .spec
        .as_ref()
        .map(|spec| selector_string(&spec.selector))
        .filter(|selector| !selector.is_empty())
        .ok_or_else(|| {
            Failure::new(
                Status::Rejected,
                format!("deployment {namespace}/{name} has no pod selector"),
            )
        })?;
    let call = ApiCall::list_pods(namespace);
    let pods = Api::<Pod>::namespaced(cluster.client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|err| call.failure(err, cluster))?
        .items;
    let total = pods.len();
    let mut ready: Vec<Pod> = pods.into_iter().filter(is_ready).collect();
    // The oldest ready pod: the one least likely to go away mid-session.
    ready.sort_by(|a, b| {
        let key = |pod: &Pod| {
            (
                pod.metadata.creation_timestamp.clone(),
                pod.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    ready.into_iter().next().ok_or_else(|| {
        Failure::new(
            Status::TargetNotFound,
            format!(
                "deployment {namespace}/{name} has no Running and Ready pod ({total} pods match its selector {selector}): see `kubectl -n {namespace} get pods -l {selector}` (context {})",
                cluster.context
            ),
        )
    })
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .unwrap_or("Unknown")
}

pub(super) fn is_ready(pod: &Pod) -> bool {
    let ready_condition = pod
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|condition| condition.type_ == "Ready" && condition.status == "True")
        });
    phase(pod) == "Running" && ready_condition && pod.metadata.deletion_timestamp.is_none()
}

/// A deployment's selector in the label-selector syntax of the list API.
fn selector_string(selector: &LabelSelector) -> String {
    let mut terms: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    for expression in selector.match_expressions.iter().flatten() {
        let values = expression.values.clone().unwrap_or_default().join(",");
        let key = &expression.key;
        terms.push(match expression.operator.as_str() {
            "In" => format!("{key} in ({values})"),
            "NotIn" => format!("{key} notin ({values})"),
            "Exists" => key.clone(),
            _ => format!("!{key}"),
        });
    }
    terms.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn selectors_use_the_list_api_syntax() {
        let selector = LabelSelector {
            match_labels: Some([("app".to_string(), "web".to_string())].into()),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["a".into(), "b".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert_eq!(selector_string(&selector), "app=web,tier in (a,b),!canary");
    }
}
