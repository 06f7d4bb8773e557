//! Every measurement, in the order they run, on one shared test bed.

mod bystander;
mod concurrency;
mod connect_rate;
pub mod filtered;
mod floor;
mod latency;
mod mirror_rate;
mod reset_takeover;
mod startup;
mod stream;

use serde::Serialize;

use crate::bed::Bed;
use crate::profile::Profile;

pub use bystander::Bystander;
pub use concurrency::Concurrency;
pub use connect_rate::ConnectRate;
pub use filtered::Filtered;
pub use floor::Floor;
pub use latency::Latency;
pub use mirror_rate::MirrorRate;
pub use reset_takeover::ResetTakeover;
pub use startup::Startup;
pub use stream::Streams;

#[derive(Serialize)]
pub struct Results {
    pub profile: &'static str,
    /// Whether the binaries measured were optimised: debug figures say little.
    pub build: &'static str,
    pub kernel: String,
    pub cpus: usize,
    pub latency: Latency,
    pub connect_rate: ConnectRate,
    /// The same hops as stolen traffic through two plain relays.
    pub floor: Floor,
    /// A filtered steal: unmatched requests against direct and one plain
    /// relay, matched ones against a whole-port steal.
    pub filtered: Filtered,
    pub streams: Streams,
    pub concurrency: Concurrency,
    pub bystander: Bystander,
    pub mirror: MirrorRate,
    pub startup: Startup,
    /// A client holding a keep-alive connection to the pod, reached by
    /// `remocal steal --reset-existing`.
    pub reset_takeover: ResetTakeover,
}

pub async fn all(profile: &Profile) -> anyhow::Result<Results> {
    let bed = Bed::start().await?;
    step("keep-alive latency");
    let latency = latency::measure(&bed, profile).await?;
    step("new-connection rate");
    let connect_rate = connect_rate::measure(&bed, profile).await?;
    step("the same hops through two plain relays");
    let floor = floor::measure(&bed, profile).await?;
    step("a filtered steal: unmatched and matched requests");
    let filtered = filtered::measure(&bed, profile).await?;
    step("single-stream throughput");
    let streams = stream::measure(&bed, profile).await?;
    step("traffic remocal does not steal");
    let bystander = bystander::measure(&bed, profile).await?;
    step("mirror rate");
    let mirror = mirror_rate::measure(&bed, profile).await?;
    step("time to the first stolen connection");
    let startup = startup::measure(&bed, profile).await?;
    step("a held keep-alive connection, stolen with --reset-existing");
    let reset_takeover = reset_takeover::measure(&bed, profile).await?;
    step(&format!(
        "{} concurrent stolen connections",
        profile.concurrent_connections
    ));
    let concurrency = concurrency::measure(&bed, profile).await?;
    Ok(Results {
        profile: profile.name,
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        kernel: kernel_release(),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        latency,
        connect_rate,
        floor,
        filtered,
        streams,
        concurrency,
        bystander,
        mirror,
        startup,
        reset_takeover,
    })
}

/// Progress on stderr; the table goes to stdout.
fn step(what: &str) {
    eprintln!("==> {what}");
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_string())
        .unwrap_or_default()
}

/// Direct vs stolen of one figure.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Pair {
    pub direct: f64,
    pub stolen: f64,
}

impl Pair {
    pub fn ratio(&self) -> f64 {
        self.stolen / self.direct
    }
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
