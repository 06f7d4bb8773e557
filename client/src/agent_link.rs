//! The one HTTP/2 connection to the agent that carries the session and every
//! stolen connection. Keepalive pings notice a dead agent or network the same
//! way the agent notices a dead client.
use std::time::Duration;

use remocal_proto::v1::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint};

use crate::exit::{Failure, Status};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Room for a few data chunks (the agent sends at most 64 KiB per message).
const MAX_MESSAGE: usize = 1 << 20;

pub type Agent = AgentClient<Channel>;

pub async fn connect(url: &str) -> Result<Agent, Failure> {
    let url = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|_| {
            Failure::new(
                Status::Usage,
                format!("--agent {url} is not a valid URL: use http://HOST:PORT"),
            )
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(64 << 20);
    let channel = endpoint.connect().await.map_err(|err| {
        Failure::new(
            Status::AgentUnreachable,
            format!(
                "cannot reach the remocal agent at {url} ({}): start it on the node (as root: `remocal-agent`), or point --agent at a running one",
                root_cause(&err)
            ),
        )
    })?;
    Ok(AgentClient::new(channel).max_decoding_message_size(MAX_MESSAGE))
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
