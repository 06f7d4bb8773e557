//! The eBPF programs' counters are per-CPU arrays: a value is the sum over
//! the CPUs.
use aya::maps::{MapData, PerCpuArray};
use remocal_agent_common::Counter;

pub fn total(counters: &PerCpuArray<MapData, u64>, counter: Counter) -> u64 {
    counters
        .get(&(counter as u32), 0)
        .map_or(0, |per_cpu| per_cpu.iter().sum())
}
