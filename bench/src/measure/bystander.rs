//! What the attached programs cost traffic they do not take: the same pod's
//! other ports, measured without remocal and with a steal active on port 80,
//! in alternating rounds so the machine's drift hits both alike. The cost is
//! the median of each round's ratio: a slow spell of the machine then skews
//! one round, not the verdict.

use anyhow::Context as _;
use serde::Serialize;

use crate::bed::{BYSTANDER_HTTP_PORT, BYSTANDER_STREAM_PORT, Bed};
use crate::iperf::{self, Direction};
use crate::probe;
use crate::profile::Profile;
use crate::server_process::{Place, ServerProcess};

use super::median;

#[derive(Serialize)]
pub struct Bystander {
    pub rounds: usize,
    /// Medians over the rounds.
    pub without: Figures,
    pub with: Figures,
    /// `with / without` of each figure, the median over the rounds; 1.0 is
    /// no cost at all.
    pub ratios: Figures,
}

#[derive(Clone, Copy, Serialize)]
pub struct Figures {
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub requests_per_second: f64,
    pub stream_gbit_per_second: f64,
}

impl Figures {
    fn ratio(&self, without: &Figures) -> Figures {
        Figures {
            latency_p50_us: self.latency_p50_us / without.latency_p50_us,
            latency_p99_us: self.latency_p99_us / without.latency_p99_us,
            requests_per_second: self.requests_per_second / without.requests_per_second,
            stream_gbit_per_second: self.stream_gbit_per_second / without.stream_gbit_per_second,
        }
    }
}

pub async fn measure(bed: &Bed, profile: &Profile) -> anyhow::Result<Bystander> {
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..profile.bystander_rounds {
        without.push(figures(bed, profile).await.context("without remocal")?);
        let measured = bed
            .while_http_stolen(async || {
                figures(bed, profile)
                    .await
                    .context("with a steal on another port")
            })
            .await?;
        with.push(measured);
    }
    let ratios: Vec<Figures> = with.iter().zip(&without).map(|(b, a)| b.ratio(a)).collect();
    Ok(Bystander {
        rounds: profile.bystander_rounds,
        without: medians(&without),
        with: medians(&with),
        ratios: medians(&ratios),
    })
}

async fn figures(bed: &Bed, profile: &Profile) -> anyhow::Result<Figures> {
    let requests = probe::keep_alive(
        bed.node(),
        bed.pod_addr(BYSTANDER_HTTP_PORT),
        profile.bystander_run,
    )
    .await?;
    let server = ServerProcess::iperf(Place::Pod(&bed.pod().netns), BYSTANDER_STREAM_PORT).await?;
    let stream = iperf::stream(
        bed.node(),
        bed.pod_addr(BYSTANDER_STREAM_PORT),
        profile.bystander_stream_bytes,
        Direction::IntoPod,
    )
    .await;
    server.stop().await;
    let stream = stream?;
    Ok(Figures {
        latency_p50_us: requests.percentile(50.0),
        latency_p99_us: requests.percentile(99.0),
        requests_per_second: requests.requests_per_second,
        stream_gbit_per_second: stream.gbit_per_second,
    })
}

fn medians(rounds: &[Figures]) -> Figures {
    let of = |field: fn(&Figures) -> f64| median(&rounds.iter().map(field).collect::<Vec<_>>());
    Figures {
        latency_p50_us: of(|f| f.latency_p50_us),
        latency_p99_us: of(|f| f.latency_p99_us),
        requests_per_second: of(|f| f.requests_per_second),
        stream_gbit_per_second: of(|f| f.stream_gbit_per_second),
    }
}
