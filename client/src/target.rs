//! From what the user names to what the agent is asked for, and which agent:
//! a namespace or PID on the agent given by --agent (or the local one), or a
//! pod whose node's agent is found through the cluster.
use remocal_proto::v1::{PodRef, Target, target};

use crate::{
    agent_link::AgentAddress,
    cli::{ClusterArgs, TargetArgs},
    cluster::{self, Cluster, PortForward, Workload},
    credentials::Credentials,
    exit::{Failure, Status},
};

/// What the user named.
#[derive(Debug, PartialEq, Eq)]
pub enum Named {
    Netns(String),
    Pid(u32),
    Kube(Workload),
}

/// As the user would write it again: the local command's REMOCAL_TARGET.
impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Named::Netns(path) => write!(f, "{path}"),
            Named::Pid(pid) => write!(f, "pid/{pid}"),
            Named::Kube(Workload::Pod(name)) => write!(f, "pod/{name}"),
            Named::Kube(Workload::Deployment(name)) => write!(f, "deploy/{name}"),
        }
    }
}

impl Named {
    pub fn parse(args: &TargetArgs) -> Result<Self, Failure> {
        if let Some(path) = &args.netns {
            return Ok(Self::Netns(path.clone()));
        }
        if let Some(pid) = args.pid {
            return Ok(Self::Pid(pid));
        }
        let resource = args
            .resource
            .as_deref()
            .or(args.pod.as_deref())
            .unwrap_or_default();
        let workload = match resource.split_once('/') {
            None => Workload::Pod(resource.to_string()),
            Some(("pod" | "pods" | "po", name)) => Workload::Pod(name.to_string()),
            Some(("deploy" | "deployment" | "deployments", name)) => {
                Workload::Deployment(name.to_string())
            }
            Some((kind, _)) => {
                return Err(Failure::new(
                    Status::Usage,
                    format!(
                        "{} cannot target a {kind}: name a pod (pod/NAME) or a deployment (deploy/NAME)",
                        crate::cli::program()
                    ),
                ));
            }
        };
        let (Workload::Pod(name) | Workload::Deployment(name)) = &workload;
        if name.is_empty() || name.contains('/') {
            return Err(Failure::new(
                Status::Usage,
                format!("{resource:?} is not a pod name: use NAME, pod/NAME or deploy/NAME"),
            ));
        }
        Ok(Self::Kube(workload))
    }
}

/// The target as the agent takes it, where that agent is, and who we are
/// to it.
pub struct Located {
    pub target: Target,
    pub agent: AgentAddress,
    pub credentials: Credentials,
}

pub async fn locate(
    named: Named,
    cluster_args: &ClusterArgs,
    agent: Option<&str>,
) -> Result<Located, Failure> {
    let kind = match named {
        Named::Netns(path) => target::Kind::NetnsPath(path),
        Named::Pid(pid) => target::Kind::Pid(pid),
        Named::Kube(workload) => return locate_pod(workload, cluster_args, agent).await,
    };
    let agent = agent.unwrap_or(DEFAULT_AGENT);
    Ok(Located {
        target: Target { kind: Some(kind) },
        agent: AgentAddress::url(agent),
        credentials: cluster::credentials(cluster_args).await?,
    })
}

const DEFAULT_AGENT: &str = "http://127.0.0.1:7420";

async fn locate_pod(
    workload: Workload,
    cluster_args: &ClusterArgs,
    agent: Option<&str>,
) -> Result<Located, Failure> {
    // With --agent and a pod name the client needs nothing from the cluster:
    // the agent reads and checks the pod itself.
    if let (Some(agent), Workload::Pod(name)) = (agent, &workload) {
        let (namespace, credentials) = match Cluster::connect(cluster_args).await {
            Ok(cluster) => (
                cluster_args
                    .namespace
                    .clone()
                    .unwrap_or_else(|| cluster.default_namespace.clone()),
                cluster.credentials()?,
            ),
            Err(failure) => match &cluster_args.namespace {
                Some(namespace) => (
                    namespace.clone(),
                    Credentials::None {
                        why: failure.message().to_string(),
                    },
                ),
                None => return Err(failure),
            },
        };
        return Ok(pod_on(
            &namespace,
            name,
            AgentAddress::url(agent),
            credentials,
        ));
    }
    let cluster = Cluster::connect(cluster_args).await?;
    let namespace = cluster.default_namespace.clone();
    let pod = cluster::find_pod(&cluster, &namespace, &workload).await?;
    let address = match agent {
        Some(agent) => AgentAddress::url(agent),
        None => {
            let agent =
                cluster::agent_on_node(&cluster, &cluster_args.agent_namespace, &pod.node).await?;
            AgentAddress::PortForward(Box::new(PortForward::new(&cluster, &agent)))
        }
    };
    Ok(pod_on(
        &pod.namespace,
        &pod.name,
        address,
        cluster.credentials()?,
    ))
}

fn pod_on(namespace: &str, name: &str, agent: AgentAddress, credentials: Credentials) -> Located {
    Located {
        credentials,
        target: Target {
            kind: Some(target::Kind::Pod(PodRef {
                namespace: namespace.to_string(),
                name: name.to_string(),
            })),
        },
        agent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(resource: &str) -> Result<Named, Failure> {
        Named::parse(&TargetArgs {
            resource: Some(resource.to_string()),
            pod: None,
            netns: None,
            pid: None,
        })
    }

    #[test]
    fn targets_are_named_like_kubectl_names_them() {
        let pod = |name: &str| Named::Kube(Workload::Pod(name.into()));
        let deploy = |name: &str| Named::Kube(Workload::Deployment(name.into()));
        assert_eq!(named("web").unwrap(), pod("web"));
        assert_eq!(named("pod/web").unwrap(), pod("web"));
        assert_eq!(named("po/web").unwrap(), pod("web"));
        assert_eq!(named("deploy/web").unwrap(), deploy("web"));
        assert_eq!(named("deployment/web").unwrap(), deploy("web"));
    }

    #[test]
    fn other_kinds_and_malformed_names_are_usage_errors() {
        for (resource, expected) in [
            ("svc/web", "cannot target a svc"),
            ("pod/", "is not a pod name"),
            ("pod/a/b", "is not a pod name"),
        ] {
            let failure = named(resource).unwrap_err();
            assert_eq!(failure.status(), Status::Usage, "{resource}");
            assert!(
                failure.message().contains(expected),
                "{resource}: {}",
                failure.message()
            );
        }
    }
}
