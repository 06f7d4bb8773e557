//! Small HTTP requests on one keep-alive connection, one at a time: the time
//! each takes is the path's latency, and stolen minus direct is ours.

use anyhow::Context as _;
use serde::Serialize;

use crate::bed::{Bed, HTTP_PORT, LOCAL_BODY};
use crate::profile::Profile;
use crate::wrk::{self, Connections, WrkRun};

#[derive(Serialize)]
pub struct Latency {
    pub direct: WrkRun,
    pub stolen: WrkRun,
}

impl Latency {
    /// Microseconds the steal adds at `percentile`.
    pub fn added_us(&self, percentile: f64) -> f64 {
        self.stolen.percentile(percentile) - self.direct.percentile(percentile)
    }
}

pub async fn measure(bed: &Bed, profile: &Profile) -> anyhow::Result<Latency> {
    let url = bed.pod_url(HTTP_PORT);
    let run = || {
        wrk::run(
            bed.node(),
            &url,
            1,
            1,
            profile.latency_run,
            Connections::KeepAlive,
        )
    };
    let direct = run().await.context("direct keep-alive requests")?;
    let local = bed.local_http().await?;
    let mut session = bed.steal(HTTP_PORT, local.port()).start().await;
    bed.wait_for_server(LOCAL_BODY).await?;
    let stolen = run().await.context("stolen keep-alive requests");
    session.stop().await;
    Ok(Latency {
        direct,
        stolen: stolen?,
    })
}
