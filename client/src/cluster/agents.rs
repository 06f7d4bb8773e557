//! The agent pods of the DaemonSet in manifests/: found by label, one per
//! node, each telling its gRPC port in an annotation (it listens on the
//! node's loopback, which the port-forward API reaches).
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};

use super::{Cluster, api_call::ApiCall, pods::is_ready};
use crate::exit::{Failure, Status};

/// The label the DaemonSet gives its pods.
const AGENT_SELECTOR: &str = "app.kubernetes.io/name=remocal-agent";
/// Where an agent pod says which port its gRPC server listens on.
const GRPC_PORT_ANNOTATION: &str = "remocal.dev/grpc-port";

#[derive(Clone, Debug)]
pub struct AgentPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ready: bool,
    pub grpc_port: u16,
}

impl AgentPod {
    fn from_pod(pod: Pod, namespace: &str) -> Self {
        let grpc_port = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(GRPC_PORT_ANNOTATION))
            .and_then(|port| port.parse().ok())
            .unwrap_or(remocal_proto::DEFAULT_GRPC_PORT);
        Self {
            namespace: namespace.to_string(),
            ready: is_ready(&pod),
            node: pod
                .spec
                .as_ref()
                .and_then(|spec| spec.node_name.clone())
                .unwrap_or_default(),
            name: pod.metadata.name.unwrap_or_default(),
            grpc_port,
        }
    }
}

/// Every agent of the cluster (or of one node), sorted by node.
pub async fn list_agents(
    cluster: &Cluster,
    namespace: &str,
    node: Option<&str>,
) -> Result<Vec<AgentPod>, Failure> {
    let call = ApiCall::list_pods(namespace);
    let mut params = ListParams::default().labels(AGENT_SELECTOR);
    if let Some(node) = node {
        params = params.fields(&format!("spec.nodeName={node}"));
    }
    let mut agents: Vec<AgentPod> = Api::<Pod>::namespaced(cluster.client.clone(), namespace)
        .list(&params)
        .await
        .map_err(|err| call.failure(err, cluster))?
        .items
        .into_iter()
        .map(|pod| AgentPod::from_pod(pod, namespace))
        .collect();
    agents.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));
    Ok(agents)
}

/// What to say when `namespace` holds no agent at all.
pub fn no_agents(cluster: &Cluster, namespace: &str) -> Failure {
    Failure::new(
        Status::AgentUnreachable,
        format!(
            "no remocal agents in namespace {namespace} (context {}): install remocal with `kubectl apply -k manifests/` (see the README)",
            cluster.context
        ),
    )
}

/// The ready agent on `node`; during a rolling update the old and the new
/// pod may both be listed.
pub async fn agent_on_node(
    cluster: &Cluster,
    namespace: &str,
    node: &str,
) -> Result<AgentPod, Failure> {
    let agents = list_agents(cluster, namespace, Some(node)).await?;
    if let Some(ready) = agents.iter().find(|agent| agent.ready) {
        return Ok(ready.clone());
    }
    let context = &cluster.context;
    Err(Failure::new(
        Status::AgentUnreachable,
        match agents.first() {
            None => format!(
                "no remocal agent runs on node {node} (namespace {namespace}, context {context}): install remocal with `kubectl apply -k manifests/` (see the README), or check `kubectl -n {namespace} get pods -o wide`"
            ),
            Some(agent) => format!(
                "the remocal agent on node {node} (pod {namespace}/{}) is not ready: see `kubectl -n {namespace} describe pod {}` (context {context})",
                agent.name, agent.name
            ),
        },
    ))
}
