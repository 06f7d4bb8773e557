//! Pods named by namespace and name: the agent reads them from the API with
//! its own service account and checks them itself, so a client that talks to
//! the wrong node's agent, or names a pod that is not running, gets a refusal
//! that says why instead of a steal of something else.
use std::{fmt, path::Path};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, Config, config::Kubeconfig};

use super::API_TIMEOUT;

/// A pod that passed every check: Running, on this node, with its own network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl fmt::Display for ScheduledPod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pod {}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PodLookupError {
    #[error(
        "this agent cannot read pods from the Kubernetes API (it runs outside a cluster): start it with --kubeconfig, or target a namespace with --netns or --pid"
    )]
    NoApiAccess,
    #[error(
        "this agent does not know its node's name: set NODE_NAME or --node-name (the DaemonSet in manifests/ sets it from spec.nodeName)"
    )]
    NoNodeName,
    #[error("pod {name} not found in namespace {namespace}")]
    NotFound { namespace: String, name: String },
    #[error(
        "the agent's service account may not read pod {namespace}/{name}: {message}; re-apply manifests/ (its ClusterRole grants `get` on pods)"
    )]
    Forbidden {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("pod {namespace}/{name} is not scheduled on a node yet: wait until it runs")]
    NotScheduled { namespace: String, name: String },
    #[error(
        "pod {namespace}/{name} runs on node {pod_node}, but this agent is on node {agent_node}: use the agent on {pod_node} (remocal finds it by itself unless --agent is given)"
    )]
    OtherNode {
        namespace: String,
        name: String,
        pod_node: String,
        agent_node: String,
    },
    #[error("pod {namespace}/{name} is {phase}, not Running: wait until it runs")]
    NotRunning {
        namespace: String,
        name: String,
        phase: String,
    },
    #[error(
        "pod {namespace}/{name} uses the node's network (hostNetwork): stealing its port would take the node's; refusing"
    )]
    HostNetwork { namespace: String, name: String },
    #[error("cannot read pod {namespace}/{name} from the Kubernetes API: {reason}")]
    Api {
        namespace: String,
        name: String,
        reason: String,
    },
}

/// The agent's read access to pods, and the node it runs on.
pub struct PodLookup {
    client: Option<Client>,
    node: Option<String>,
}

impl PodLookup {
    /// `kubeconfig` wins; otherwise the pod's service account when running in
    /// a cluster; otherwise no API access (pod targets by name are refused).
    pub async fn connect(
        kubeconfig: Option<&Path>,
        node: Option<String>,
    ) -> Result<Self, kube::Error> {
        let config = match kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .map_err(|err| kube::Error::Service(Box::new(err)))?;
                Some(
                    Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                        .await
                        .map_err(|err| kube::Error::Service(Box::new(err)))?,
                )
            }
            None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
                Some(Config::incluster().map_err(|err| kube::Error::Service(Box::new(err)))?)
            }
            None => None,
        };
        let client = config.map(Client::try_from).transpose()?;
        Ok(Self {
            client,
            node: node.filter(|node| !node.is_empty()),
        })
    }

    /// No API access, for the in-process tests.
    #[cfg(test)]
    pub fn unavailable() -> Self {
        Self {
            client: None,
            node: None,
        }
    }

    /// The agent's own API client (its service account, or --kubeconfig).
    pub fn client(&self) -> Option<Client> {
        self.client.clone()
    }

    pub fn has_api_access(&self) -> bool {
        self.client.is_some()
    }

    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    pub async fn find(&self, namespace: &str, name: &str) -> Result<ScheduledPod, PodLookupError> {
        let client = self.client.clone().ok_or(PodLookupError::NoApiAccess)?;
        let node = self.node.as_deref().ok_or(PodLookupError::NoNodeName)?;
        let api = Api::<Pod>::namespaced(client, namespace);
        let api_error = |reason: String| PodLookupError::Api {
            namespace: namespace.to_string(),
            name: name.to_string(),
            reason,
        };
        let pod = match tokio::time::timeout(API_TIMEOUT, api.get_opt(name)).await {
            Err(_) => return Err(api_error(format!("no answer within {API_TIMEOUT:?}"))),
            Ok(Ok(Some(pod))) => pod,
            Ok(Ok(None)) => {
                return Err(PodLookupError::NotFound {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                });
            }
            Ok(Err(kube::Error::Api(status))) if status.code == 403 => {
                return Err(PodLookupError::Forbidden {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    message: status.message,
                });
            }
            Ok(Err(err)) => return Err(api_error(with_root_cause(&err))),
        };
        check(&pod, namespace, name, node)
    }
}

/// kube's own message names the layer ("client error (Connect)"); the
/// innermost cause says what to fix (a certificate, a refused connection).
pub fn with_root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut root = err;
    while let Some(next) = root.source() {
        root = next;
    }
    let (outer, root) = (err.to_string(), root.to_string());
    if outer.contains(&root) {
        outer
    } else {
        format!("{outer}: {root}")
    }
}

/// Every refusal that the pod object alone decides, in the order a user
/// would fix them.
fn check(
    pod: &Pod,
    namespace: &str,
    name: &str,
    node: &str,
) -> Result<ScheduledPod, PodLookupError> {
    let spec = pod.spec.as_ref();
    let ids = || (namespace.to_string(), name.to_string());
    let pod_node = spec
        .and_then(|spec| spec.node_name.as_deref())
        .unwrap_or("");
    if pod_node.is_empty() {
        let (namespace, name) = ids();
        return Err(PodLookupError::NotScheduled { namespace, name });
    }
    if pod_node != node {
        let (namespace, name) = ids();
        return Err(PodLookupError::OtherNode {
            namespace,
            name,
            pod_node: pod_node.to_string(),
            agent_node: node.to_string(),
        });
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .unwrap_or("Unknown");
    if phase != "Running" || pod.metadata.deletion_timestamp.is_some() {
        let (namespace, name) = ids();
        let phase = if phase == "Running" {
            "Terminating"
        } else {
            phase
        };
        return Err(PodLookupError::NotRunning {
            namespace,
            name,
            phase: phase.to_string(),
        });
    }
    if spec.and_then(|spec| spec.host_network).unwrap_or(false) {
        let (namespace, name) = ids();
        return Err(PodLookupError::HostNetwork { namespace, name });
    }
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if uid.is_empty() {
        let (namespace, name) = ids();
        return Err(PodLookupError::Api {
            namespace,
            name,
            reason: "the API returned the pod without a UID".into(),
        });
    }
    Ok(ScheduledPod {
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_keep_their_root_cause() {
        let root = std::io::Error::other("invalid peer certificate: BadSignature");
        assert_eq!(
            with_root_cause(&ServiceError(root)),
            "client error (Connect): invalid peer certificate: BadSignature"
        );
        let plain = std::io::Error::other("no route");
        assert_eq!(with_root_cause(&plain), "no route");
    }

    #[derive(Debug)]
    struct ServiceError(std::io::Error);

    impl std::fmt::Display for ServiceError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error (Connect)")
        }
    }

    impl std::error::Error for ServiceError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    use k8s_openapi::{
        api::core::v1::{PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };

    fn pod(node: Option<&str>, phase: &str, host_network: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                uid: Some("0b4f7e58-1c2d-4e5f-8a9b-0c1d2e3f4a5b".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(Into::into),
                host_network: Some(host_network),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_running_pod_on_this_node_is_accepted() {
        let found = check(
            &pod(Some("node-a"), "Running", false),
            "shop",
            "web",
            "node-a",
        )
        .unwrap();
        assert_eq!(found.uid, "0b4f7e58-1c2d-4e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(found.to_string(), "pod shop/web");
    }

    #[test]
    fn each_refusal_says_why() {
        let cases = [
            (
                pod(None, "Pending", false),
                "is not scheduled on a node yet",
            ),
            (
                pod(Some("node-b"), "Running", false),
                "runs on node node-b, but this agent is on node node-a",
            ),
            (
                pod(Some("node-a"), "Pending", false),
                "is Pending, not Running",
            ),
            (
                pod(Some("node-a"), "Succeeded", false),
                "is Succeeded, not Running",
            ),
            (pod(Some("node-a"), "Running", true), "hostNetwork"),
        ];
        for (pod, expected) in cases {
            let err = check(&pod, "shop", "web", "node-a")
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err}");
            assert!(err.contains("shop/web"), "{err}");
        }
    }

    #[test]
    fn a_terminating_pod_is_refused() {
        let mut terminating = pod(Some("node-a"), "Running", false);
        terminating.metadata.deletion_timestamp = Some(Time(Default::default()));
        let err = check(&terminating, "shop", "web", "node-a").unwrap_err();
        assert!(err.to_string().contains("is Terminating"), "{err}");
    }
}
