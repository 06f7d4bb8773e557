//! What the kernel itself measures of an eBPF program: how often it ran and
//! for how long. Unlike throughput on a shared machine, this does not move
//! with the neighbours' load, so it pins down what a classifier costs the
//! packets it only looks at.
//!
//! The kernel counts only while statistics are enabled; [`enable`] does that
//! for as long as the returned descriptor is open (closing it, even by a
//! crash, turns counting off again), so no system setting is left changed.

use std::os::fd::OwnedFd;
use std::time::Duration;

use anyhow::Context as _;
use aya::programs::loaded_programs;
use aya::sys::{Stats, enable_stats};

/// Runs and run time of every loaded program of one name, summed.
#[derive(Clone, Copy, Default)]
pub struct RunTime {
    pub runs: u64,
    pub time: Duration,
}

impl RunTime {
    pub fn since(self, earlier: RunTime) -> RunTime {
        RunTime {
            runs: self.runs.saturating_sub(earlier.runs),
            time: self.time.saturating_sub(earlier.time),
        }
    }
}

/// Counting lasts while the descriptor lives.
pub fn enable() -> anyhow::Result<OwnedFd> {
    enable_stats(Stats::RunTime).context("enabling the kernel's eBPF run-time statistics")
}

/// Programs are found by name: the bench's agent is the only one loading
/// remocal's programs while the bench runs.
pub fn of(program: &str) -> anyhow::Result<RunTime> {
    let mut total = RunTime::default();
    for info in loaded_programs() {
        let info = info.context("listing the loaded eBPF programs")?;
        if info.name_as_str() == Some(program) {
            total.runs += info.run_count();
            total.time += info.run_time();
        }
    }
    Ok(total)
}
