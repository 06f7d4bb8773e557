//! The one HTTP/2 connection to the agent that carries the session and every
//! stolen connection: straight to a URL, or through the Kubernetes
//! port-forward API. Keepalive pings notice a dead agent or network the same
//! way the agent notices a dead client.
use std::{fmt, time::Duration};

use remocal_proto::v1::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    cluster::PortForward,
    exit::{Failure, Status, root_cause},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Room for a few data chunks (the agent sends at most 64 KiB per message).
const MAX_MESSAGE: usize = 1 << 20;

pub type Agent = AgentClient<Channel>;

/// Where the agent is.
#[derive(Clone)]
pub enum AgentAddress {
    Url(String),
    PortForward(Box<PortForward>),
}

impl fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentAddress::Url(url) => write!(f, "the remocal agent at {url}"),
            AgentAddress::PortForward(forward) => f.write_str(&forward.describe()),
        }
    }
}

impl AgentAddress {
    pub fn url(url: &str) -> Self {
        if url.contains("://") {
            Self::Url(url.to_string())
        } else {
            Self::Url(format!("http://{url}"))
        }
    }

    pub async fn connect(&self) -> Result<Agent, Failure> {
        let connected = match self {
            AgentAddress::Url(url) => endpoint(url)?.connect().await,
            AgentAddress::PortForward(forward) => {
                let forward = PortForward::clone(forward);
                let connector = tower::service_fn(move |_: Uri| {
                    let forward = forward.clone();
                    async move { forward.open().await }
                });
                endpoint("http://remocal-agent")?
                    .connect_with_connector(connector)
                    .await
            }
        };
        match connected {
            Ok(channel) => Ok(AgentClient::new(channel).max_decoding_message_size(MAX_MESSAGE)),
            Err(err) => Err(match self.explain().await {
                Some(failure) => failure,
                None => Failure::new(
                    Status::AgentUnreachable,
                    format!(
                        "cannot reach {self} ({}): {}",
                        root_cause(&err),
                        self.remedy()
                    ),
                ),
            }),
        }
    }

    /// Why the link failed, when the port-forward knows better than tonic.
    pub async fn explain(&self) -> Option<Failure> {
        match self {
            AgentAddress::Url(_) => None,
            AgentAddress::PortForward(forward) => forward.explain().await,
        }
    }

    fn remedy(&self) -> &'static str {
        match self {
            AgentAddress::Url(_) => {
                "start it on the node (as root: `remocal-agent`), or point --agent at a running one"
            }
            AgentAddress::PortForward(_) => {
                "check the agent pod (`kubectl -n remocal get pods -o wide`) and its logs"
            }
        }
    }
}

fn endpoint(url: &str) -> Result<Endpoint, Failure> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|_| {
        Failure::new(
            Status::Usage,
            format!("--agent {url} is not a valid URL: use http://HOST:PORT"),
        )
    })?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(64 << 20)
        .max_frame_size(remocal_proto::HTTP2_FRAME_SIZE))
}
