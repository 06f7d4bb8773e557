//! Many stolen connections held open at once, each proven served by one
//! request, and what holding them costs the agent and the client in resident
//! memory.

use std::time::Duration;

use anyhow::{Context as _, bail};
use remocal_tests::remote::http_exchange;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::bed::{Bed, HTTP_PORT, LOCAL_BODY};
use crate::process_memory::resident_bytes;
use crate::profile::Profile;

/// Connections being opened at once: enough to be quick, few enough that no
/// SYN is dropped from a listen backlog (a dropped SYN waits a second).
const OPENING_AT_ONCE: usize = 128;
/// Time for freed memory and late work to settle before reading RSS.
const SETTLE: Duration = Duration::from_millis(500);

#[derive(Serialize)]
pub struct Concurrency {
    pub connections: usize,
    pub seconds_to_open: f64,
    pub agent: Resident,
    pub client: Resident,
}

/// Resident memory with the session idle, and with every connection held.
#[derive(Serialize)]
pub struct Resident {
    pub idle_bytes: u64,
    pub holding_bytes: u64,
    pub per_connection_bytes: f64,
}

pub async fn measure(bed: &Bed, profile: &Profile) -> anyhow::Result<Concurrency> {
    let count = profile.concurrent_connections;
    let (open_files, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    if open_files < count as u64 + 1024 {
        bail!(
            "holding {count} connections needs more open files than the limit of {open_files}: raise it (ulimit -n)"
        );
    }
    let local = bed.local_http().await?;
    let mut session = bed.steal(HTTP_PORT, local.port()).start().await;
    let measured = async {
        bed.wait_for_server(LOCAL_BODY).await?;
        tokio::time::sleep(SETTLE).await;
        let (agent_idle, client_idle) = (
            resident_bytes(bed.agent.pid())?,
            resident_bytes(session.pid())?,
        );
        let started = tokio::time::Instant::now();
        let held = open_all(bed, count).await?;
        let seconds_to_open = started.elapsed().as_secs_f64();
        tokio::time::sleep(SETTLE).await;
        let (agent_holding, client_holding) = (
            resident_bytes(bed.agent.pid())?,
            resident_bytes(session.pid())?,
        );
        drop(held);
        let resident = |idle: u64, holding: u64| Resident {
            idle_bytes: idle,
            holding_bytes: holding,
            per_connection_bytes: holding.saturating_sub(idle) as f64 / count as f64,
        };
        anyhow::Ok(Concurrency {
            connections: count,
            seconds_to_open,
            agent: resident(agent_idle, agent_holding),
            client: resident(client_idle, client_holding),
        })
    }
    .await;
    session.stop().await;
    measured
}

/// `count` connections from the node to the pod's stolen port, each answered
/// by the local server before it counts.
async fn open_all(bed: &Bed, count: usize) -> anyhow::Result<Vec<TcpStream>> {
    let addr = bed.pod_addr(HTTP_PORT);
    let sockets = bed.node().tcp_sockets(count, false);
    let mut opening = JoinSet::new();
    let mut held = Vec::with_capacity(count);
    for socket in sockets {
        if opening.len() >= OPENING_AT_ONCE {
            held.push(joined(opening.join_next().await)?);
        }
        opening.spawn(async move {
            let mut stream = socket.connect(addr).await.context("connect")?;
            let body = http_exchange(&mut stream).await.context("request")?;
            if body != LOCAL_BODY {
                bail!("answered by {body:?}, not the local server");
            }
            anyhow::Ok(stream)
        });
    }
    while let Some(result) = opening.join_next().await {
        held.push(joined(Some(result))?);
    }
    Ok(held)
}

fn joined(
    result: Option<Result<anyhow::Result<TcpStream>, tokio::task::JoinError>>,
) -> anyhow::Result<TcpStream> {
    let stream = result.context("no connection task")?;
    stream
        .context("a connection task died")?
        .with_context(|| "a held connection was not served")
}
