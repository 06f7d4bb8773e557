//! Reaching an agent through the Kubernetes port-forward API: the agent's
//! gRPC port stays on the node's loopback, and the user needs nothing but
//! `create pods/portforward` in the agents' namespace. Every HTTP/2
//! connection to the agent is one port-forward stream.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::io::DuplexStream;

use super::{AgentPod, Cluster, api_call::ApiCall};
use crate::exit::{Failure, Status};

/// How long to wait for the reason of a failed forward (it arrives on the
/// port's error channel, just after the stream closes).
const REASON_WAIT: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct PortForward {
    cluster: Cluster,
    agent: AgentPod,
    /// Why the last forward failed, in words the user can act on: tonic only
    /// passes on an opaque error.
    failure: Arc<Mutex<Option<Failure>>>,
}

impl PortForward {
    pub fn new(cluster: &Cluster, agent: &AgentPod) -> Self {
        Self {
            cluster: cluster.clone(),
            agent: agent.clone(),
            failure: Arc::default(),
        }
    }

    /// The agent as error messages name it.
    pub fn describe(&self) -> String {
        format!(
            "the remocal agent on node {} (pod {}/{}, through the port-forward API)",
            self.agent.node, self.agent.namespace, self.agent.name
        )
    }

    /// Opens one forwarded stream to the agent's gRPC port.
    pub async fn open(&self) -> Result<TokioIo<DuplexStream>, std::io::Error> {
        let agent = &self.agent;
        let pods = Api::<Pod>::namespaced(self.cluster.client.clone(), &agent.namespace);
        let mut forwarder = match pods.portforward(&agent.name, &[agent.grpc_port]).await {
            Ok(forwarder) => forwarder,
            Err(err) => {
                let call = ApiCall {
                    verb: "create",
                    resource: "pods/portforward",
                    kind: "agent pod",
                    namespace: &agent.namespace,
                    name: Some(&agent.name),
                };
                let failure = match call.failure(err, &self.cluster) {
                    // The agent pod went away between listing and forwarding.
                    failure if failure.status() == Status::TargetNotFound => Failure::new(
                        Status::AgentUnreachable,
                        format!("{} is gone: try again", self.describe()),
                    ),
                    failure => failure,
                };
                let message = failure.message().to_string();
                self.remember(failure);
                return Err(std::io::Error::other(message));
            }
        };
        let stream = forwarder
            .take_stream(agent.grpc_port)
            .ok_or_else(|| std::io::Error::other("the port-forward gave no stream"))?;
        if let Some(reason) = forwarder.take_error(agent.grpc_port) {
            let this = self.clone();
            tokio::spawn(async move {
                if let Some(reason) = reason.await {
                    let failure = Failure::new(
                        Status::AgentUnreachable,
                        format!(
                            "{} does not answer on port {}: {reason}",
                            this.describe(),
                            this.agent.grpc_port
                        ),
                    );
                    this.remember(failure);
                }
            });
        }
        Ok(TokioIo::new(stream))
    }

    /// Why forwarding failed, if it did: asked after the agent link broke.
    pub async fn explain(&self) -> Option<Failure> {
        let deadline = tokio::time::Instant::now() + REASON_WAIT;
        loop {
            if let Some(failure) = self.failure.lock().expect("failure lock").take() {
                return Some(failure);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn remember(&self, failure: Failure) {
        *self.failure.lock().expect("failure lock") = Some(failure);
    }
}
