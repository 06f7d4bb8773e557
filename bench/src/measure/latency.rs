//! Small HTTP requests on one keep-alive connection, one at a time: the time
//! each takes is the path's latency, and stolen minus direct is ours.

use anyhow::Context as _;
use serde::Serialize;

use crate::bed::{Bed, HTTP_PORT};
use crate::probe;
use crate::profile::Profile;
use crate::request_run::RequestRun;

#[derive(Serialize)]
pub struct Latency {
    pub direct: RequestRun,
    pub stolen: RequestRun,
}

impl Latency {
    /// Microseconds the steal adds at `percentile`.
    pub fn added_us(&self, percentile: f64) -> f64 {
        self.stolen.percentile(percentile) - self.direct.percentile(percentile)
    }
}

pub async fn measure(bed: &Bed, profile: &Profile) -> anyhow::Result<Latency> {
    let run = || requests(bed, HTTP_PORT, profile);
    let direct = run().await.context("direct keep-alive requests")?;
    let stolen = bed
        .while_http_stolen(async || run().await.context("stolen keep-alive requests"))
        .await?;
    Ok(Latency { direct, stolen })
}

/// The one run of keep-alive requests to the pod's `port`, so every path
/// that is compared meets the same probe.
pub(super) async fn requests(
    bed: &Bed,
    port: u16,
    profile: &Profile,
) -> anyhow::Result<RequestRun> {
    probe::keep_alive(bed.node(), bed.pod_addr(port), profile.latency_run).await
}
