//! From the moment `remocal steal` is started to the first new connection to
//! the pod that the local server answers: process start, gRPC connect, the
//! agent's attach, and the first stolen connection's whole path.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use remocal_tests::remote::http_get;

use crate::bed::{Bed, HTTP_PORT, LOCAL_BODY, POD_BODY};
use crate::profile::Profile;

use super::median;

#[derive(Serialize)]
pub struct Startup {
    pub trials_ms: Vec<f64>,
    pub median_ms: f64,
}

pub async fn measure(bed: &Bed, profile: &Profile) -> anyhow::Result<Startup> {
    let local = bed.local_http().await?;
    let mut trials_ms = Vec::new();
    for _ in 0..profile.startup_trials {
        bed.wait_for_server(POD_BODY).await?;
        let command = bed.steal(HTTP_PORT, local.port());
        let started = Instant::now();
        let (mut session, first_stolen) =
            tokio::join!(command.start(), first_local_answer(bed, started));
        session.stop().await;
        trials_ms.push(first_stolen?.as_secs_f64() * 1e3);
    }
    Ok(Startup {
        median_ms: median(&trials_ms),
        trials_ms,
    })
}

/// New connections, one after another, until one is served locally.
async fn first_local_answer(bed: &Bed, started: Instant) -> anyhow::Result<Duration> {
    let limit = Duration::from_secs(20);
    while started.elapsed() < limit {
        let answer = http_get(bed.node(), bed.pod_addr(HTTP_PORT), Duration::from_secs(1)).await;
        if answer.as_deref().ok() == Some(LOCAL_BODY) {
            return Ok(started.elapsed());
        }
    }
    anyhow::bail!("no connection was stolen within {limit:?} of starting remocal steal")
}
