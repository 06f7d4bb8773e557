//! One long TCP stream each way, direct to the pod's iperf3 and stolen to a
//! local iperf3.

use anyhow::Context as _;
use remocal_tests::processes::free_port;
use serde::Serialize;

use crate::bed::{Bed, STREAM_PORT};
use crate::iperf::{self, Direction, Stream};
use crate::profile::Profile;
use crate::server_process::{Place, ServerProcess};

use super::Pair;

#[derive(Serialize)]
pub struct Streams {
    pub into_pod: StreamPair,
    pub out_of_pod: StreamPair,
}

#[derive(Serialize)]
pub struct StreamPair {
    pub gbit_per_second: Pair,
    pub direct: Stream,
    pub stolen: Stream,
}

pub async fn measure(bed: &Bed, profile: &Profile) -> anyhow::Result<Streams> {
    let bytes = profile.stream_bytes;
    let pod = Place::Pod(&bed.pod().netns);
    // Every stream is sent to the pod's STREAM_PORT; who serves it differs.
    let one = |place, listen_port, direction| {
        one_stream(bed, place, listen_port, STREAM_PORT, bytes, direction)
    };
    let direct_in = one(pod, STREAM_PORT, Direction::IntoPod)
        .await
        .context("direct stream into the pod")?;
    let direct_out = one(pod, STREAM_PORT, Direction::OutOfPod)
        .await
        .context("direct stream out of the pod")?;

    // Nothing listens in the pod now: a stream that was not stolen would fail
    // to connect rather than count as stolen.
    let local_port = free_port();
    let mut session = bed.steal(STREAM_PORT, local_port).start().await;
    let stolen = async {
        let into = one(Place::Local, local_port, Direction::IntoPod)
            .await
            .context("stolen stream into the pod")?;
        let out = one(Place::Local, local_port, Direction::OutOfPod)
            .await
            .context("stolen stream out of the pod")?;
        anyhow::Ok((into, out))
    }
    .await;
    session.stop().await;
    let (stolen_in, stolen_out) = stolen?;
    Ok(Streams {
        into_pod: pair(direct_in, stolen_in),
        out_of_pod: pair(direct_out, stolen_out),
    })
}

/// One stream from the node to the pod's `pod_port`, served by a fresh iperf3
/// server listening on `listen_port` at `place`. One long-lived server would
/// refuse the next test as "busy" whenever the previous one's last bytes and
/// close still trail through a proxy, remocal's or any other.
pub(super) async fn one_stream(
    bed: &Bed,
    place: Place<'_>,
    listen_port: u16,
    pod_port: u16,
    bytes: u64,
    direction: Direction,
) -> anyhow::Result<Stream> {
    let server = ServerProcess::iperf(place, listen_port).await?;
    let stream = iperf::stream(bed.node(), bed.pod_addr(pod_port), bytes, direction).await;
    server.stop().await;
    stream
}

fn pair(direct: Stream, stolen: Stream) -> StreamPair {
    StreamPair {
        gbit_per_second: Pair {
            direct: direct.gbit_per_second,
            stolen: stolen.gbit_per_second,
        },
        direct,
        stolen,
    }
}
