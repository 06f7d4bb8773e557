//! A one-node cluster as the Kubernetes tests need it: the fake API server,
//! node `node-a` with its agent (reading the API with its own service
//! account, so authenticating callers), and a pod `shop/web` of deployment
//! `shop/web` whose process sits in a kubelet-named cgroup and answers
//! [`POD_BODY`](crate::scenario::POD_BODY) on port 80. Developers and their
//! grants are the tests' own.

use crate::kube_api::{self, FakeKubeApi};
use crate::kubelet_cgroup::KubeletCgroup;
use crate::processes::PodProcess;
use crate::scenario::Scenario;
use crate::user_roles;

pub const NODE: &str = "node-a";
pub const AGENT_USER: &str = "system:serviceaccount:remocal:remocal-agent";
pub const AGENT_POD: &str = "remocal-agent-x7k2p";

pub struct KubeCluster {
    pub api: FakeKubeApi,
    // Drop order: the agent and namespaces, then the pod's process, then its cgroup.
    pub scenario: Scenario,
    pub pod_process: PodProcess,
    pub cgroup: KubeletCgroup,
}

impl KubeCluster {
    pub async fn start() -> KubeCluster {
        let api = FakeKubeApi::start().await;
        api.add_user("agent-token", AGENT_USER);
        // The agent may do what manifests/rbac.yaml grants it, nothing more.
        api.strict(AGENT_USER);
        user_roles::bind_agent(&api, AGENT_USER);
        let agent_kubeconfig = api.kubeconfig("in-cluster", "agent-token", None);
        let scenario = Scenario::start_with(
            1,
            &[80],
            &[
                "--node-name",
                NODE,
                "--kubeconfig",
                agent_kubeconfig.to_str().expect("a UTF-8 path"),
            ],
        )
        .await;
        let uid = kube_api::fresh_uid();
        let pod_process = PodProcess::start(&scenario.pod(0).netns).await;
        let cgroup = KubeletCgroup::create(&uid);
        cgroup.add(pod_process.pid());
        api.upsert_pod(
            kube_api::pod("shop", "web")
                .uid(&uid)
                .node(NODE)
                .labels(&[("app", "web")])
                .ip(&scenario.pod(0).ipv4.to_string())
                .running()
                .ready(true),
        );
        api.upsert_deployment(kube_api::deployment("shop", "web", &[("app", "web")]));
        api.upsert_pod(kube_api::agent_pod(
            NODE,
            AGENT_POD,
            scenario.agent.grpc_addr().port(),
        ));
        KubeCluster {
            api,
            scenario,
            pod_process,
            cgroup,
        }
    }
}
