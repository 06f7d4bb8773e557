//! The stolen path's hops with two plain TCP relays in place of the agent
//! and the client: node → pod → a host process listening in the pod →
//! loopback → a second host process → loopback → the local server. Without
//! eBPF, gRPC and HTTP/2 left on the path, what remains is what two extra
//! processes and two extra connections cost here: the least any design with
//! an agent and a client could add on this machine.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, bail};
use remocal_tests::processes::free_port;
use remocal_tests::remote::http_get;
use serde::Serialize;

use crate::bed::{Bed, FLOOR_PORT, LOCAL_BODY};
use crate::profile::Profile;
use crate::request_run::RequestRun;
use crate::server_process::{Place, ServerProcess};

use super::{connect_rate, latency};

#[derive(Serialize)]
pub struct Floor {
    /// Keep-alive requests, probed as the direct and stolen ones are.
    pub latency: RequestRun,
    /// New connections, driven as the direct and stolen ones are.
    pub connect_rate: RequestRun,
}

impl Floor {
    /// Microseconds the two relays add over `direct` at `percentile`.
    pub fn added_us(&self, direct: &RequestRun, percentile: f64) -> f64 {
        self.latency.percentile(percentile) - direct.percentile(percentile)
    }
}

pub async fn measure(bed: &Bed, profile: &Profile) -> anyhow::Result<Floor> {
    while_relayed(bed, async || {
        let latency = latency::requests(bed, FLOOR_PORT, profile)
            .await
            .context("keep-alive requests through two relays")?;
        let connect_rate = connect_rate::connections(bed, FLOOR_PORT, profile)
            .await
            .context("new connections through two relays")?;
        Ok(Floor {
            latency,
            connect_rate,
        })
    })
    .await
}

/// Runs `measure` while the pod's [`FLOOR_PORT`] is relayed twice to a local
/// server answering [`LOCAL_BODY`], and stops the relays either way.
async fn while_relayed<T>(
    bed: &Bed,
    measure: impl AsyncFnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let local = bed.local_http().await?;
    let to_local = ServerProcess::relay(Place::Local, free_port(), loopback(local.port())).await?;
    let pod = Place::Pod(&bed.pod().netns);
    let from_pod = ServerProcess::relay(pod, FLOOR_PORT, loopback(to_local.port())).await?;
    let result = async {
        served_locally(bed).await?;
        measure().await
    }
    .await;
    from_pod.stop().await;
    to_local.stop().await;
    local.stop().await;
    result
}

fn loopback(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

/// Proves the relays reach the local server before any figure is taken.
async fn served_locally(bed: &Bed) -> anyhow::Result<()> {
    let addr = bed.pod_addr(FLOOR_PORT);
    let answer = http_get(bed.node(), addr, Duration::from_secs(5))
        .await
        .with_context(|| format!("no answer through the relays at {addr}"))?;
    if answer != LOCAL_BODY {
        bail!("{addr} answered {answer:?} through the relays, not {LOCAL_BODY:?}");
    }
    Ok(())
}
