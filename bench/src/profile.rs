//! How long and how much each measurement runs.

use std::time::Duration;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

pub struct Profile {
    pub name: &'static str,
    /// One wrk run of keep-alive requests, per side.
    pub latency_run: Duration,
    /// One wrk run of one-request connections, per side.
    pub connect_run: Duration,
    /// Bytes of each iperf3 stream (the issue asks for at least 1 GiB).
    pub stream_bytes: u64,
    pub concurrent_connections: usize,
    /// Alternating rounds without and with remocal attached: the machine's
    /// drift hits both sides alike.
    pub bystander_rounds: usize,
    pub bystander_run: Duration,
    pub bystander_stream_bytes: u64,
    /// Paced rates tried for the mirror, in Gbit/s; 0 means unpaced.
    pub mirror_rates_gbit: &'static [f64],
    pub mirror_bytes: u64,
    pub startup_trials: usize,
    /// Starts of `remocal steal --reset-existing` under a client that holds
    /// a keep-alive connection to the pod.
    pub reset_trials: usize,
    /// Rounds of the filtered steal's paths, side by side in each.
    pub filtered_rounds: usize,
    /// Each path's probe run, and then its wrk run, per round.
    pub filtered_run: Duration,
}

impl Profile {
    pub const QUICK: Profile = Profile {
        name: "quick",
        latency_run: Duration::from_secs(2),
        connect_run: Duration::from_secs(2),
        stream_bytes: 128 * MIB,
        concurrent_connections: 1_000,
        bystander_rounds: 1,
        bystander_run: Duration::from_secs(1),
        bystander_stream_bytes: 128 * MIB,
        mirror_rates_gbit: &[1.0],
        mirror_bytes: 32 * MIB,
        startup_trials: 2,
        reset_trials: 2,
        filtered_rounds: 1,
        filtered_run: Duration::from_secs(1),
    };

    pub const FULL: Profile = Profile {
        name: "full",
        latency_run: Duration::from_secs(10),
        connect_run: Duration::from_secs(5),
        stream_bytes: 2 * GIB,
        concurrent_connections: 10_000,
        bystander_rounds: 5,
        bystander_run: Duration::from_secs(3),
        // About 2 s per stream here: shorter ones measured mostly iperf3's
        // start.
        bystander_stream_bytes: 4 * GIB,
        mirror_rates_gbit: &[2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 0.0],
        mirror_bytes: GIB,
        startup_trials: 9,
        reset_trials: 7,
        filtered_rounds: 5,
        filtered_run: Duration::from_secs(2),
    };
}
