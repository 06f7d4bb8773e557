//! Per-CPU counters: no atomics and no contention on the packet path; the
//! agent sums the CPUs when it reads them.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use remocal_agent_common::Counter;

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
pub fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the slot belongs to this CPU and programs do not migrate mid-run.
        unsafe { *slot += 1 };
    }
}
