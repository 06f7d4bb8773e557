//! Events on a target pod, so that `kubectl describe pod` and `kubectl get
//! events` show who intercepts it and since when: on a shared cluster that is
//! the first place a colleague looks when their pod behaves oddly.
use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tracing::warn;

use super::{ScheduledPod, within_timeout};

const COMPONENT: &str = "remocal-agent";

pub struct PodEvents {
    client: Option<Client>,
    node: Option<String>,
}

impl PodEvents {
    pub fn new(client: Option<Client>, node: Option<&str>) -> Self {
        Self {
            client,
            node: node.map(str::to_string),
        }
    }

    /// Records in the background: a session never waits for the API server
    /// to take its event, and a failure is only logged.
    pub fn record(&self, pod: &ScheduledPod, reason: &str, message: String) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let event = event(pod, reason, message, self.node.clone());
        let namespace = pod.namespace.clone();
        tokio::spawn(async move {
            let api = Api::<Event>::namespaced(client, &namespace);
            if let Err(reason) = within_timeout(api.create(&PostParams::default(), &event)).await {
                warn!(
                    reason,
                    "cannot record an event on the pod (the agent's ClusterRole needs `create` on events: re-apply manifests/)"
                );
            }
        });
    }
}

fn event(pod: &ScheduledPod, reason: &str, message: String, node: Option<String>) -> Event {
    let now = Time(Timestamp::now());
    Event {
        metadata: ObjectMeta {
            // As kubectl's recorder names them: unique per pod and moment.
            name: Some(format!(
                "{}.{:x}",
                pod.name,
                Timestamp::now().as_nanosecond()
            )),
            namespace: Some(pod.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(pod.namespace.clone()),
            name: Some(pod.name.clone()),
            uid: Some(pod.uid.clone()),
            ..Default::default()
        },
        reason: Some(reason.to_string()),
        message: Some(message),
        type_: Some("Normal".into()),
        source: Some(EventSource {
            component: Some(COMPONENT.into()),
            host: node.clone(),
        }),
        reporting_component: Some(COMPONENT.into()),
        reporting_instance: node,
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Default::default()
    }
}
