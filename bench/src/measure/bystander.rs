//! What the attached programs cost traffic they do not take: the same pod's
//! other ports, measured without remocal and with a steal active on port 80,
//! in alternating rounds so the machine's drift hits both alike. The cost is
//! the median of each round's ratio: a slow spell of the machine then skews
//! one round, not the verdict.
//!
//! That comparison is at the mercy of the machine's noise; what the steal
//! classifier costs each packet it lets pass is also read from the kernel's
//! own accounting, in one more round of its own (counting adds two clock
//! reads per run, which must not weigh on the compared rounds).

use std::time::Instant;

use anyhow::Context as _;
use remocal_agent_common::STEAL_PROGRAM;
use serde::Serialize;

use crate::bed::{BYSTANDER_HTTP_PORT, BYSTANDER_STREAM_PORT, Bed};
use crate::iperf::{self, Direction};
use crate::probe;
use crate::profile::Profile;
use crate::program_run_time;
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
    pub classifier: ClassifierCost,
}

/// The steal classifier's run time over the same traffic, as the kernel
/// measured it.
#[derive(Serialize)]
pub struct ClassifierCost {
    pub packets: u64,
    pub nanoseconds_per_packet: f64,
    /// Its run time over the round's wall time: the share of one CPU the
    /// classifier took while that traffic ran as fast as it could.
    pub share_of_one_cpu: f64,
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
    let classifier = bed
        .while_http_stolen(async || classifier_cost(bed, profile).await)
        .await
        .context("measuring the classifier's run time")?;
    Ok(Bystander {
        rounds: profile.bystander_rounds,
        without: medians(&without),
        with: medians(&with),
        ratios: medians(&ratios),
        classifier,
    })
}

async fn classifier_cost(bed: &Bed, profile: &Profile) -> anyhow::Result<ClassifierCost> {
    let counting = program_run_time::enable()?;
    let before = program_run_time::of(STEAL_PROGRAM)?;
    let started = Instant::now();
    figures(bed, profile).await?;
    let elapsed = started.elapsed();
    let ran = program_run_time::of(STEAL_PROGRAM)?.since(before);
    drop(counting);
    anyhow::ensure!(
        ran.runs > 0,
        "the kernel counted no run of {STEAL_PROGRAM} while a steal was active"
    );
    Ok(ClassifierCost {
        packets: ran.runs,
        nanoseconds_per_packet: ran.time.as_nanos() as f64 / ran.runs as f64,
        share_of_one_cpu: ran.time.as_secs_f64() / elapsed.as_secs_f64(),
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
