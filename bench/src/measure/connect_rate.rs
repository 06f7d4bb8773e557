//! One request per connection (`Connection: close`), as fast as wrk can open
//! them: each stolen connection costs an accept in the pod's namespace, a gRPC
//! stream and a local connect. Then one connection at a time, for how long a
//! new connection waits for its answer, where a round trip between agent and
//! client shows instead of drowning in the load.

use anyhow::Context as _;
use serde::Serialize;

use crate::bed::{Bed, HTTP_PORT};
use crate::profile::Profile;
use crate::request_run::RequestRun;
use crate::wrk;

use super::Pair;

/// Connections wrk keeps in flight, on two threads (one per core here).
const IN_FLIGHT: u32 = 32;

#[derive(Serialize)]
pub struct ConnectRate {
    /// Completed connections (each one request) per second.
    pub per_second: Pair,
    pub direct: RequestRun,
    pub stolen: RequestRun,
    /// One connection at a time. wrk times each from writing its request to
    /// the end of the answer; the handshake before is the kernel's in the
    /// pod either way, while a stolen connection's handoff to the client
    /// overlaps the request.
    pub one_at_a_time: OneAtATime,
}

#[derive(Serialize)]
pub struct OneAtATime {
    pub direct: RequestRun,
    pub stolen: RequestRun,
}

impl OneAtATime {
    pub fn p50_us(&self) -> Pair {
        Pair {
            direct: self.direct.percentile(50.0),
            stolen: self.stolen.percentile(50.0),
        }
    }
}

pub async fn measure(bed: &Bed, profile: &Profile) -> anyhow::Result<ConnectRate> {
    let run = || connections(bed, HTTP_PORT, profile);
    let single = || one_at_a_time(bed, profile);
    let direct = run().await.context("direct new connections")?;
    let single_direct = single()
        .await
        .context("direct new connections, one at a time")?;
    let (stolen, single_stolen) = bed
        .while_http_stolen(async || {
            let stolen = run().await.context("stolen new connections")?;
            let single = single()
                .await
                .context("stolen new connections, one at a time")?;
            Ok((stolen, single))
        })
        .await?;
    Ok(ConnectRate {
        per_second: Pair {
            direct: direct.requests_per_second,
            stolen: stolen.requests_per_second,
        },
        direct,
        stolen,
        one_at_a_time: OneAtATime {
            direct: single_direct,
            stolen: single_stolen,
        },
    })
}

async fn one_at_a_time(bed: &Bed, profile: &Profile) -> anyhow::Result<RequestRun> {
    let url = bed.pod_url(HTTP_PORT);
    wrk::new_connections(bed.node(), &url, 1, 1, profile.connect_run).await
}

/// The one wrk run of new connections to the pod's `port`, so every path
/// that is compared meets the same load.
pub(super) async fn connections(
    bed: &Bed,
    port: u16,
    profile: &Profile,
) -> anyhow::Result<RequestRun> {
    let url = bed.pod_url(port);
    wrk::new_connections(bed.node(), &url, 2, IN_FLIGHT, profile.connect_run).await
}
