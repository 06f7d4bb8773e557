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

use crate::bed::{Bed, FLOOR_PORT, FLOOR_STREAM_PORT, LOCAL_BODY};
use crate::iperf::{Direction, Stream};
use crate::profile::Profile;
use crate::relay::{DEFAULT_BUFFER, STREAM_BUFFER};
use crate::request_run::RequestRun;
use crate::server_process::{Place, ServerProcess};

use super::{connect_rate, latency, stream};

#[derive(Serialize)]
pub struct Floor {
    /// Keep-alive requests, probed as the direct and stolen ones are.
    pub latency: RequestRun,
    /// New connections, driven as the direct and stolen ones are.
    pub connect_rate: RequestRun,
    /// One stream each way, sent as the direct and stolen ones are.
    pub into_pod: Stream,
    pub out_of_pod: Stream,
}

impl Floor {
    /// Microseconds the two relays add over `direct` at `percentile`.
    pub fn added_us(&self, direct: &RequestRun, percentile: f64) -> f64 {
        self.latency.percentile(percentile) - direct.percentile(percentile)
    }
}

pub async fn measure(bed: &Bed, profile: &Profile) -> anyhow::Result<Floor> {
    let (latency, connect_rate) = requests(bed, profile).await?;
    let (into_pod, out_of_pod) = streams(bed, profile).await?;
    Ok(Floor {
        latency,
        connect_rate,
        into_pod,
        out_of_pod,
    })
}

/// Keep-alive latency and new connections, relayed to a local HTTP server.
async fn requests(bed: &Bed, profile: &Profile) -> anyhow::Result<(RequestRun, RequestRun)> {
    let local = bed.local_http().await?;
    let measured = while_relayed(bed, FLOOR_PORT, local.port(), DEFAULT_BUFFER, async || {
        served_locally(bed).await?;
        let latency = latency::requests(bed, FLOOR_PORT, profile)
            .await
            .context("keep-alive requests through two relays")?;
        let connect_rate = connect_rate::connections(bed, FLOOR_PORT, profile)
            .await
            .context("new connections through two relays")?;
        Ok((latency, connect_rate))
    })
    .await;
    local.stop().await;
    measured
}

/// One stream each way, relayed to a local iperf3. The relays connect once
/// per connection they accept, so each stream's fresh iperf3 server is there
/// by the time its connections arrive.
async fn streams(bed: &Bed, profile: &Profile) -> anyhow::Result<(Stream, Stream)> {
    let iperf = free_port();
    let one = |direction| {
        let bytes = profile.stream_bytes;
        stream::one_stream(
            bed,
            Place::Local,
            iperf,
            FLOOR_STREAM_PORT,
            bytes,
            direction,
        )
    };
    while_relayed(bed, FLOOR_STREAM_PORT, iperf, STREAM_BUFFER, async || {
        let into = one(Direction::IntoPod)
            .await
            .context("stream into the pod through two relays")?;
        let out = one(Direction::OutOfPod)
            .await
            .context("stream out of the pod through two relays")?;
        Ok((into, out))
    })
    .await
}

/// Runs `measure` while the pod's `pod_port` is relayed twice to the local
/// `local_port`, and stops the relays either way.
async fn while_relayed<T>(
    bed: &Bed,
    pod_port: u16,
    local_port: u16,
    buffer: usize,
    measure: impl AsyncFnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let to_local =
        ServerProcess::relay(Place::Local, free_port(), loopback(local_port), buffer).await?;
    let pod = Place::Pod(&bed.pod().netns);
    let from_pod = ServerProcess::relay(pod, pod_port, loopback(to_local.port()), buffer).await?;
    let result = measure().await;
    from_pod.stop().await;
    to_local.stop().await;
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
