//! `remocal sessions`: who intercepts what, asked of every agent of the
//! cluster at once (or of the one --agent names). Each agent shows a caller
//! only what RBAC lets them see, and says how many sessions it left out.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use remocal_proto::v1::{ListSessionsRequest, Mode, SessionInfo, SessionList};
use serde_json::json;

use crate::{
    agent_link::AgentAddress,
    cli::{OutputFormat, SessionsArgs},
    cluster::{self, Cluster, PortForward},
    credentials::Credentials,
    exit::{Failure, Status},
    filter, output,
};

/// An agent that does not answer within this is reported unreachable.
const LIST_TIMEOUT: Duration = Duration::from_secs(15);

/// One agent's answer.
struct Listing {
    /// Which agent, for an error: its node, or its address for --agent.
    agent: String,
    /// Its node as the cluster lists it, or its URL for --agent, unless
    /// the agent names its node itself.
    node: String,
    answer: Result<SessionList, Failure>,
}

pub async fn run(args: SessionsArgs) -> Result<(), Failure> {
    let (listings, namespace) = match &args.agent {
        Some(url) => ask_one(&args, url).await?,
        None => ask_all(&args).await?,
    };
    print(&listings, &args, &namespace);
    let mut shown = 0;
    let mut failed = None;
    for listing in &listings {
        match &listing.answer {
            Ok(list) => {
                shown += list.sessions.len();
                if list.not_shown > 0 {
                    eprintln!(
                        "{} more session(s) on {}: you may not see their targets (`get` on the pod, or a node admin's grant)",
                        list.not_shown,
                        node_of(listing, list),
                    );
                }
            }
            Err(failure) => {
                eprintln!("error: {}: {}", listing.agent, failure.message());
                failed.get_or_insert(failure.status());
            }
        }
    }
    if shown == 0 && failed.is_none() {
        eprintln!("No sessions found{}.", in_namespace(&namespace));
    }
    match failed {
        // Each failure is on stderr already; the status is for scripts.
        Some(status) => Err(Failure::new(status, "")),
        None => Ok(()),
    }
}

fn in_namespace(namespace: &str) -> String {
    if namespace.is_empty() {
        String::new()
    } else {
        format!(" in namespace {namespace}")
    }
}

/// The namespace to list: none with -A, else -n, else the context's.
fn namespace(args: &SessionsArgs, cluster: Option<&Cluster>) -> String {
    if args.all_namespaces {
        return String::new();
    }
    args.cluster
        .namespace
        .clone()
        .or_else(|| cluster.map(|cluster| cluster.default_namespace.clone()))
        .unwrap_or_default()
}

/// The agent at `url`. Without a kubeconfig (an agent with `--auth none`
/// on this machine) every namespace is listed.
async fn ask_one(args: &SessionsArgs, url: &str) -> Result<(Vec<Listing>, String), Failure> {
    let cluster = Cluster::connect(&args.cluster).await;
    let namespace = namespace(args, cluster.as_ref().ok());
    let credentials = match &cluster {
        Ok(cluster) => cluster.credentials()?,
        Err(failure) => Credentials::None {
            why: failure.message().to_string(),
        },
    };
    let address = AgentAddress::url(url);
    let answer = list(&address, &credentials, &namespace).await;
    Ok((
        vec![Listing {
            agent: address.to_string(),
            node: url.to_string(),
            answer,
        }],
        namespace,
    ))
}

/// Every agent of the cluster, at once, through the port-forward API.
async fn ask_all(args: &SessionsArgs) -> Result<(Vec<Listing>, String), Failure> {
    let cluster = Cluster::connect(&args.cluster).await?;
    let namespace = namespace(args, Some(&cluster));
    let agent_namespace = &args.cluster.agent_namespace;
    let agents = cluster::list_agents(&cluster, agent_namespace, None).await?;
    if agents.is_empty() {
        return Err(cluster::no_agents(&cluster, agent_namespace));
    }
    let credentials = cluster.credentials()?;
    let asks = agents.into_iter().map(|agent| {
        let address = AgentAddress::PortForward(Box::new(PortForward::new(&cluster, &agent)));
        let (credentials, namespace) = (&credentials, &namespace);
        async move {
            Listing {
                answer: list(&address, credentials, namespace).await,
                agent: format!("node {}", agent.node),
                node: agent.node,
            }
        }
    });
    Ok((futures::future::join_all(asks).await, namespace))
}

async fn list(
    address: &AgentAddress,
    credentials: &Credentials,
    namespace: &str,
) -> Result<SessionList, Failure> {
    let asked = async {
        let mut agent = address.connect(credentials).await?;
        let request = ListSessionsRequest {
            namespace: namespace.to_string(),
        };
        let status = match agent.api.list_sessions(request).await {
            Ok(answer) => return Ok(answer.into_inner()),
            Err(status) => status,
        };
        if let Some(failure) = address.call_failure(&status, credentials).await {
            return Err(failure);
        }
        Err(match status.code() {
            tonic::Code::Unimplemented => Failure::new(
                Status::Unexpected,
                "this agent cannot list sessions (an older version): update the remocal DaemonSet",
            ),
            tonic::Code::Unknown | tonic::Code::Cancelled => Failure::new(
                Status::AgentUnreachable,
                format!("the link to {address} broke: {}", status.message()),
            ),
            _ => Failure::from_status(&status, address),
        })
    };
    tokio::time::timeout(LIST_TIMEOUT, asked)
        .await
        .unwrap_or_else(|_| {
            Err(Failure::new(
                Status::AgentUnreachable,
                format!("no answer within {LIST_TIMEOUT:?}"),
            ))
        })
}

fn node_of<'a>(listing: &'a Listing, list: &'a SessionList) -> &'a str {
    if list.node_name.is_empty() {
        &listing.node
    } else {
        &list.node_name
    }
}

fn print(listings: &[Listing], args: &SessionsArgs, namespace: &str) {
    let now = SystemTime::now();
    let mut rows = Vec::new();
    for listing in listings {
        let Ok(list) = &listing.answer else { continue };
        for session in &list.sessions {
            let node = node_of(listing, list);
            match args.output {
                OutputFormat::Json => println!("{}", to_json(session, node, now)),
                OutputFormat::Text => rows.push(row(session, node, now, namespace.is_empty())),
            }
        }
    }
    if rows.is_empty() {
        return;
    }
    let mut header = vec![
        "TARGET",
        "PORT",
        "MODE",
        "FILTER",
        "USER",
        "FROM",
        "CONNECTIONS",
        "AGE",
        "NODE",
    ];
    if namespace.is_empty() {
        header.insert(0, "NAMESPACE");
    }
    output::print_table(&header, &rows);
}

/// A pod as kubectl names it within its namespace (`pod/web`), anything
/// else as the agent resolved it (`netns=/var/run/netns/x`).
fn row(session: &SessionInfo, node: &str, now: SystemTime, with_namespace: bool) -> Vec<String> {
    let (namespace, target) = match &session.pod {
        Some(pod) => (pod.namespace.clone(), format!("pod/{}", pod.name)),
        None => ("-".to_string(), session.target.clone()),
    };
    let mut row = vec![
        target,
        session.port.to_string(),
        mode(session).to_string(),
        session
            .filter
            .as_ref()
            .map_or("-".to_string(), remocal_proto::filter::describe),
        session.user.clone(),
        session.client.clone(),
        session.connections.to_string(),
        age(age_of(session, now)),
        node.to_string(),
    ];
    if with_namespace {
        row.insert(0, namespace);
    }
    row
}

fn to_json(session: &SessionInfo, node: &str, now: SystemTime) -> serde_json::Value {
    let started = i64::try_from(session.started_unix_ms)
        .ok()
        .and_then(|ms| k8s_openapi::jiff::Timestamp::from_millisecond(ms).ok())
        .map(|started| started.to_string());
    json!({
        "node": node,
        "namespace": session.pod.as_ref().map(|pod| &pod.namespace),
        "pod": session.pod.as_ref().map(|pod| &pod.name),
        "target": session.target,
        "port": session.port,
        "mode": mode(session),
        "filter": session.filter.as_ref().map(filter::to_json),
        "user": session.user,
        "client": session.client,
        "started": started,
        "age_seconds": age_of(session, now).as_secs(),
        "connections": session.connections,
    })
}

fn mode(session: &SessionInfo) -> &'static str {
    match Mode::try_from(session.mode) {
        Ok(Mode::Mirror) => "mirror",
        Ok(Mode::Steal) => "steal",
        _ => "unknown",
    }
}

fn age_of(session: &SessionInfo, now: SystemTime) -> Duration {
    let started = UNIX_EPOCH + Duration::from_millis(session.started_unix_ms);
    now.duration_since(started).unwrap_or_default()
}

/// As kubectl shows ages: the largest unit that fits, two below a day.
fn age(age: Duration) -> String {
    let seconds = age.as_secs();
    match seconds {
        0..120 => format!("{seconds}s"),
        120..3_600 => format!("{}m", seconds / 60),
        3_600..172_800 => format!("{}h", seconds / 3_600),
        _ => format!("{}d", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        let cases = [
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (3_599, "59m"),
            (3_600, "1h"),
            (172_799, "47h"),
            (172_800, "2d"),
        ];
        for (seconds, shown) in cases {
            assert_eq!(age(Duration::from_secs(seconds)), shown, "{seconds} s");
        }
    }
}
