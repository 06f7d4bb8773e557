//! Builders for the objects tests put in the fake. They fill in what a real
//! cluster would (conditions, container statuses, timestamps, QoS class) so that
//! code reading the objects meets the same shapes as against a cluster, not the
//! sparse ones a test would write by hand.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodSpec, PodStatus,
    PodTemplateSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;

/// The label remocal finds its agents by.
pub const AGENT_LABEL: (&str, &str) = ("app.kubernetes.io/name", "remocal-agent");
/// The annotation an agent pod publishes its gRPC port in.
pub const GRPC_PORT_ANNOTATION: &str = "remocal.dev/grpc-port";
/// The namespace agents run in.
pub const AGENT_NAMESPACE: &str = "remocal";

/// `status.phase` of a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }
}

/// A pod as a test describes it; `build` writes what kubelet and the scheduler
/// would have filled in. Starts as a just-created pod: Pending, unscheduled.
#[derive(Debug, Clone)]
#[must_use]
pub struct PodBuilder {
    namespace: String,
    name: String,
    uid: Option<String>,
    node: Option<String>,
    phase: Phase,
    ready: bool,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    host_network: bool,
    ip: Option<String>,
    ports: Vec<u16>,
}

pub fn pod(namespace: &str, name: &str) -> PodBuilder {
    PodBuilder {
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: None,
        node: None,
        phase: Phase::Pending,
        ready: false,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        host_network: false,
        ip: None,
        ports: Vec::new(),
    }
}

/// A node's remocal agent as the DaemonSet runs it: hostNetwork, Running and
/// Ready, publishing its gRPC port. Its IP is 127.0.0.1 because the fake's
/// nodes are this host (port-forwards to it dial 127.0.0.1).
pub fn agent_pod(node: &str, name: &str, grpc_port: u16) -> PodBuilder {
    pod(AGENT_NAMESPACE, name)
        .labels(&[AGENT_LABEL])
        .annotation(GRPC_PORT_ANNOTATION, &grpc_port.to_string())
        .node(node)
        .host_network(true)
        .ip("127.0.0.1")
        .container_port(grpc_port)
        .running()
        .ready(true)
}

impl PodBuilder {
    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = Some(uid.to_string());
        self
    }

    /// Schedules the pod (`spec.nodeName`).
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
        self
    }

    pub fn phase(mut self, phase: Phase) -> Self {
        self.phase = phase;
        self
    }

    pub fn pending(self) -> Self {
        self.phase(Phase::Pending)
    }

    pub fn running(self) -> Self {
        self.phase(Phase::Running)
    }

    pub fn succeeded(self) -> Self {
        self.phase(Phase::Succeeded)
    }

    pub fn failed(self) -> Self {
        self.phase(Phase::Failed)
    }

    /// The Ready condition (only a Running pod can be ready).
    pub fn ready(mut self, ready: bool) -> Self {
        self.ready = ready;
        self
    }

    pub fn labels(mut self, labels: &[(&str, &str)]) -> Self {
        self.labels
            .extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }

    pub fn host_network(mut self, host_network: bool) -> Self {
        self.host_network = host_network;
        self
    }

    /// `status.podIP` (and `hostIP` too for a hostNetwork pod). Port-forwards to
    /// a pod without hostNetwork dial this address.
    pub fn ip(mut self, ip: &str) -> Self {
        self.ip = Some(ip.to_string());
        self
    }

    /// A `containerPort` of the pod's container (informational, as in Kubernetes).
    pub fn container_port(mut self, port: u16) -> Self {
        self.ports.push(port);
        self
    }

    pub fn build(self) -> Pod {
        let uid = self.uid.clone().unwrap_or_else(fresh_uid);
        let now = now();
        let container_name = "app".to_string();
        let image = format!("registry.example.com/{}:1.0", self.name);
        let scheduled = self.node.is_some();
        let running = self.phase == Phase::Running;
        let ready = running && self.ready;
        let spec = PodSpec {
            containers: vec![Container {
                name: container_name.clone(),
                image: Some(image.clone()),
                image_pull_policy: Some("IfNotPresent".into()),
                ports: (!self.ports.is_empty()).then(|| {
                    self.ports
                        .iter()
                        .map(|p| ContainerPort {
                            container_port: i32::from(*p),
                            protocol: Some("TCP".into()),
                            ..Default::default()
                        })
                        .collect()
                }),
                termination_message_path: Some("/dev/termination-log".into()),
                termination_message_policy: Some("File".into()),
                ..Default::default()
            }],
            dns_policy: Some(
                if self.host_network {
                    "ClusterFirstWithHostNet"
                } else {
                    "ClusterFirst"
                }
                .into(),
            ),
            enable_service_links: Some(true),
            // The apiserver omits a false hostNetwork.
            host_network: self.host_network.then_some(true),
            node_name: self.node.clone(),
            preemption_policy: Some("PreemptLowerPriority".into()),
            priority: Some(0),
            restart_policy: Some("Always".into()),
            scheduler_name: Some("default-scheduler".into()),
            service_account: Some("default".into()),
            service_account_name: Some("default".into()),
            termination_grace_period_seconds: Some(30),
            ..Default::default()
        };
        let started = scheduled && self.phase != Phase::Pending;
        let condition = |type_: &str, ok: bool, reason: Option<&str>| PodCondition {
            type_: type_.into(),
            status: if ok { "True" } else { "False" }.into(),
            reason: reason.map(Into::into),
            message: reason
                .filter(|r| *r == "ContainersNotReady")
                .map(|_| format!("containers with unready status: [{container_name}]")),
            last_transition_time: Some(now.clone()),
            last_probe_time: None,
            observed_generation: None,
        };
        let not_ready_reason = match self.phase {
            Phase::Succeeded => "PodCompleted",
            Phase::Failed => "PodFailed",
            _ => "ContainersNotReady",
        };
        let conditions = if scheduled {
            vec![
                condition("PodReadyToStartContainers", started, None),
                condition("Initialized", true, None),
                condition("Ready", ready, (!ready).then_some(not_ready_reason)),
                condition(
                    "ContainersReady",
                    ready,
                    (!ready).then_some(not_ready_reason),
                ),
                condition("PodScheduled", true, None),
            ]
        } else {
            vec![PodCondition {
                message: Some(
                    "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
                        .into(),
                ),
                ..condition("PodScheduled", false, Some("Unschedulable"))
            }]
        };
        let runtime_id = format!("containerd://{}", container_id(&uid));
        let state = match self.phase {
            Phase::Pending => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ContainerCreating".into()),
                    message: None,
                }),
                ..Default::default()
            },
            Phase::Running => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(now.clone()),
                }),
                ..Default::default()
            },
            Phase::Succeeded | Phase::Failed => {
                let ok = self.phase == Phase::Succeeded;
                ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        container_id: Some(runtime_id.clone()),
                        exit_code: if ok { 0 } else { 1 },
                        reason: Some(if ok { "Completed" } else { "Error" }.into()),
                        started_at: Some(now.clone()),
                        finished_at: Some(now.clone()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            }
        };
        let container_status = ContainerStatus {
            name: container_name.clone(),
            image: image.clone(),
            image_id: if started {
                format!("{image}@sha256:{}", container_id(&image))
            } else {
                String::new()
            },
            container_id: started.then(|| runtime_id.clone()),
            ready,
            restart_count: 0,
            started: Some(running),
            state: Some(state),
            ..Default::default()
        };
        let host_ip = self.ip.clone().filter(|_| self.host_network);
        let status = PodStatus {
            phase: Some(self.phase.as_str().into()),
            conditions: Some(conditions),
            container_statuses: scheduled.then(|| vec![container_status]),
            host_ip: host_ip.clone(),
            host_ips: host_ip.map(|ip| vec![HostIP { ip }]),
            pod_ip: self.ip.clone().filter(|_| scheduled),
            pod_ips: self
                .ip
                .clone()
                .filter(|_| scheduled)
                .map(|ip| vec![PodIP { ip }]),
            qos_class: Some("BestEffort".into()),
            start_time: scheduled.then(|| now.clone()),
            ..Default::default()
        };
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name),
                namespace: Some(self.namespace),
                uid: Some(uid),
                creation_timestamp: Some(now),
                labels: (!self.labels.is_empty()).then_some(self.labels),
                annotations: (!self.annotations.is_empty()).then_some(self.annotations),
                ..Default::default()
            },
            spec: Some(spec),
            status: Some(status),
        }
    }
}

impl From<PodBuilder> for Pod {
    fn from(builder: PodBuilder) -> Pod {
        builder.build()
    }
}

/// A Deployment with one available replica whose pods carry `labels`.
pub fn deployment(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Deployment {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Deployment {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            uid: Some(fresh_uid()),
            creation_timestamp: Some(now()),
            generation: Some(1),
            annotations: Some(BTreeMap::from([(
                "deployment.kubernetes.io/revision".to_string(),
                "1".to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            revision_history_limit: Some(10),
            progress_deadline_seconds: Some(600),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "app".into(),
                        image: Some(format!("registry.example.com/{name}:1.0")),
                        ..Default::default()
                    }],
                    restart_policy: Some("Always".into()),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: Some(DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(1),
            updated_replicas: Some(1),
            ready_replicas: Some(1),
            available_replicas: Some(1),
            ..Default::default()
        }),
    }
}

/// Object timestamps have second precision in the apiserver.
pub(super) fn now() -> Time {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let seconds = i64::try_from(seconds).unwrap_or(0);
    Time(Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn hash(value: impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// A v4-shaped UUID, unique within the test process and across processes.
pub fn fresh_uid() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let a = hash((std::process::id(), n, nanos));
    let b = hash((a, n));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48 & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// The containerd ID (64 hex digits) of the pod's container, derived from the pod
/// UID so that a pod's status and a `KubeletCgroup` for it name the same container.
pub fn container_id(uid: &str) -> String {
    (0..4u8)
        .map(|i| format!("{:016x}", hash((uid, i))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_look_like_kubernetes_uids() {
        let uid = fresh_uid();
        assert_eq!(uid.len(), 36, "{uid}");
        assert_eq!(uid.as_bytes()[14], b'4', "{uid}");
        assert_ne!(uid, fresh_uid());
        assert_eq!(container_id(&uid).len(), 64);
        assert_eq!(container_id(&uid), container_id(&uid));
    }
}
