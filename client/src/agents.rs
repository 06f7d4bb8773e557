//! `remocal agents`: one line per node's agent, with what the pod status says
//! and what the agent itself answers through the port-forward API, so a
//! broken install shows up before a session fails.
use std::time::Duration;

use remocal_proto::v1::{AgentInfo, InfoRequest};
use serde_json::json;

use crate::{
    agent_link::AgentAddress,
    cli::{AgentsArgs, OutputFormat},
    cluster::{self, AgentPod, Cluster, PortForward},
    credentials::Credentials,
    exit::{Failure, Status},
    output,
};

/// An agent that does not answer within this is reported unreachable.
const INFO_TIMEOUT: Duration = Duration::from_secs(10);

struct Health {
    agent: AgentPod,
    answer: Result<AgentInfo, String>,
}

impl Health {
    fn healthy(&self) -> bool {
        self.agent.ready && self.answer.is_ok()
    }

    fn state(&self) -> String {
        match (&self.answer, self.agent.ready) {
            (Ok(_), true) => "healthy".into(),
            (Ok(_), false) => "not ready".into(),
            (Err(reason), _) => format!("unreachable: {reason}"),
        }
    }
}

pub async fn run(args: AgentsArgs) -> Result<(), Failure> {
    let cluster = Cluster::connect(&args.cluster).await?;
    let namespace = &args.cluster.agent_namespace;
    let agents = cluster::list_agents(&cluster, namespace, None).await?;
    if agents.is_empty() {
        return Err(cluster::no_agents(&cluster, namespace));
    }
    let credentials = cluster.credentials()?;
    let checks = agents
        .into_iter()
        .map(|agent| check(&cluster, &credentials, agent));
    let health = futures::future::join_all(checks).await;
    print(&health, args.output);
    if health.iter().all(Health::healthy) {
        Ok(())
    } else {
        // The table already says which; the status is for scripts.
        Err(Failure::new(Status::AgentUnreachable, ""))
    }
}

async fn check(cluster: &Cluster, credentials: &Credentials, agent: AgentPod) -> Health {
    let address = AgentAddress::PortForward(Box::new(PortForward::new(cluster, &agent)));
    let answer = tokio::time::timeout(INFO_TIMEOUT, async {
        let mut client = address
            .connect(credentials)
            .await
            .map_err(|failure| failure.message().to_string())?;
        client
            .api
            .info(InfoRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| status.message().to_string())
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {INFO_TIMEOUT:?}")));
    Health { agent, answer }
}

fn print(health: &[Health], format: OutputFormat) {
    match format {
        OutputFormat::Json => {
            for entry in health {
                let info = entry.answer.as_ref().ok();
                println!(
                    "{}",
                    json!({
                        "node": entry.agent.node,
                        "pod": format!("{}/{}", entry.agent.namespace, entry.agent.name),
                        "ready": entry.agent.ready,
                        "healthy": entry.healthy(),
                        "state": entry.state(),
                        "version": info.map(|info| &info.version),
                        "kernel": info.map(|info| &info.kernel),
                        "active_sessions": info.map(|info| info.active_sessions),
                        "kubernetes_api": info.map(|info| info.kubernetes_api),
                        "uptime_seconds": info.map(|info| info.uptime_seconds),
                    })
                );
            }
        }
        OutputFormat::Text => {
            let rows: Vec<Vec<String>> = health
                .iter()
                .map(|entry| {
                    let info = entry.answer.as_ref().ok();
                    let field = |value: Option<String>| value.unwrap_or_else(|| "-".into());
                    vec![
                        entry.agent.node.clone(),
                        entry.agent.name.clone(),
                        field(info.map(|info| info.version.clone())),
                        field(info.map(|info| info.active_sessions.to_string())),
                        field(info.map(|info| info.kernel.clone())),
                        entry.state(),
                    ]
                })
                .collect();
            output::print_table(
                &["NODE", "POD", "VERSION", "SESSIONS", "KERNEL", "STATE"],
                &rows,
            );
        }
    }
}
