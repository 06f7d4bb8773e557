//! One request per connection (`Connection: close`), as fast as wrk can open
//! them: each stolen connection costs an accept in the pod's namespace, a gRPC
//! stream and a local connect.

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
}

pub async fn measure(bed: &Bed, profile: &Profile) -> anyhow::Result<ConnectRate> {
    let run = || connections(bed, HTTP_PORT, profile);
    let direct = run().await.context("direct new connections")?;
    let stolen = bed
        .while_http_stolen(async || run().await.context("stolen new connections"))
        .await?;
    Ok(ConnectRate {
        per_second: Pair {
            direct: direct.requests_per_second,
            stolen: stolen.requests_per_second,
        },
        direct,
        stolen,
    })
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
